"""The whole system on this host: the interface, the watcher and N clients as real processes.

RabbitMQ, SecantusDB and nginx come from the session fixtures; nginx's root is the master's
directory, as in the deployment where both mount the same volume.
"""

from __future__ import annotations

import os
import secrets
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from dlopbox.paths import url_path
from dlopbox.settings import ClientSettings
from tests.support.client_harness import REPO, ClientProcess
from tests.support.services import _Process, free_port

TOKEN = "write-" + secrets.token_hex(8)
READ_TOKEN = "read-" + secrets.token_hex(8)


class InterfaceProcess(_Process):
    name = "interface"

    def __init__(self, workdir: Path, rabbit: Any, mongo: Any, mongo_db: str) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.rabbit, self.mongo, self.mongo_db = rabbit, mongo, mongo_db

    def command(self) -> list[str]:
        return [sys.executable, "-m", "dlopbox", "interface"]

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(REPO), "DLOPBOX_HOST": "127.0.0.1", "DLOPBOX_PORT": str(self.port),
                "DLOPBOX_TOKEN": TOKEN, "DLOPBOX_READ_TOKEN": READ_TOKEN, "DLOPBOX_MONGO_URL": self.mongo.url,
                "DLOPBOX_MONGO_DB": self.mongo_db, "DLOPBOX_AMQP_URL": self.rabbit.interface_url}

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
                return r.status == 200
        except urllib.error.HTTPError as exc:  # 503 while its backends connect
            exc.close()
            return False


class WatcherProcess(_Process):
    name = "watcher"

    def __init__(self, workdir: Path, root: Path, interface_url: str) -> None:
        super().__init__(workdir)
        self.root = root
        self.interface_url = interface_url

    def command(self) -> list[str]:
        return [sys.executable, "-m", "dlopbox", "watch"]

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(REPO), "DLOPBOX_ROOT": str(self.root),
                "DLOPBOX_INTERFACE_URL": self.interface_url, "DLOPBOX_TOKEN": TOKEN}

    def ready(self) -> bool:
        return "watching" in self.log_path.read_text(errors="replace")


class Pipeline:
    """Start and stop the system's processes; every slave is compared with ``master``."""

    def __init__(self, workdir: Path, rabbit: Any, mongo: Any, mongo_db: str, nginx: Any, master: Path,
                 client_ids: list[str]) -> None:
        self.workdir = workdir
        self.rabbit, self.nginx, self.master = rabbit, nginx, master
        self.interface = InterfaceProcess(workdir / "interface", rabbit, mongo, mongo_db)
        self.watcher = WatcherProcess(workdir / "watcher", master, self.interface.url)
        self.client_ids = client_ids
        self.slaves = [workdir / f"slave{i}" for i in range(len(client_ids))]
        self.clients = [ClientProcess(self.client_settings(i), workdir / f"client{i}.log")
                        for i in range(len(client_ids))]

    def client_settings(self, index: int) -> ClientSettings:
        return ClientSettings(client_id=self.client_ids[index], target=self.slaves[index],
                              amqp_url=self.rabbit.client_url, exchange="dlopbox.events",
                              files_url=self.nginx.url + url_path(self.master.name) + "/",
                              interface_url=self.interface.url, read_token=READ_TOKEN)

    def start(self, clients: bool = True) -> None:
        self.interface.start()
        self.watcher.start()
        if clients:
            for c in self.clients:
                c.start()

    def stop(self) -> None:
        for c in self.clients:
            if c.proc is not None and c.proc.poll() is None:
                c.stop()
        self.watcher.stop()
        self.interface.stop()

    def logs(self) -> str:
        """The tail of every process's log, for a failing test's report."""
        paths = {"watcher": self.watcher.log_path, "interface": self.interface.log_path,
                 **{f"client{i}": c.log_path for i, c in enumerate(self.clients)}}
        return "\n".join(f"--- {name}\n{path.read_text(errors='replace')[-4000:]}"
                         for name, path in paths.items() if path.exists())
