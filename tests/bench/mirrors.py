"""The two systems under benchmark, behind one small interface: a master dir, N target dirs.

`DlopboxMirror` runs the real pipeline as separate processes (watcher, interface, one client
per target) on real RabbitMQ, SecantusDB and nginx; `LsyncdMirror` runs Debian's lsyncd with
rsync at delay 0, one sync per target. Both are started fresh for each configuration.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.support.polling import eventually_blocking
from tests.support.services import NginxServer, RabbitNode, SecantusNode, free_port


class Mirror:
    name = "mirror"

    def __init__(self, workdir: Path, clients: int) -> None:
        self.workdir = workdir
        self.master = workdir / "master"
        self.targets = [workdir / f"slave{i}" for i in range(clients)]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        for d in (self.master, *self.targets):
            d.mkdir(parents=True, exist_ok=True)

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items() if p.poll() is None}

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = open(self.workdir / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.workdir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.name}: {name} exited with {proc.returncode}:\n{tail}")


class LsyncdMirror(Mirror):
    """lsyncd as configured in the comparison (rsync copies whole files); ``delta`` forces rsync's delta
    algorithm (--no-whole-file), as it would run between machines."""

    name = "lsyncd"

    def __init__(self, workdir: Path, clients: int, delta: bool = False, network: bool = False) -> None:
        super().__init__(workdir, clients)
        self.delta = delta
        #: Through an rsync daemon on loopback (TCP, as between machines) rather than between local paths.
        self.network = network
        if delta:
            self.name = "lsyncd-delta"

    def rsync_log(self, index: int) -> Path:
        return self.workdir / f"rsync-{index}.log"

    def received(self) -> list[int]:
        """Bytes rsync transferred to each target so far (its %b: literal data and block references)."""
        out = []
        for i in range(len(self.targets)):
            total = 0
            path = self.rsync_log(i)
            for line in path.read_text(errors="replace").splitlines() if path.exists() else ():
                _, marker, rest = line.partition("] XFER ")
                if marker:
                    total += int(rest.split()[0])
            out.append(total)
        return out

    def _rsync_daemon(self) -> list[str]:
        """An rsync daemon with one module per target: lsyncd's rsync then sends over TCP, as between machines."""
        port = free_port()
        modules = "\n".join(f"[slave{i}]\n  path = {t}\n  read only = false\n  use chroot = false\n"
                            f"  uid = {os.getuid()}\n  gid = {os.getgid()}\n" for i, t in enumerate(self.targets))
        config = self.workdir / "rsyncd.conf"
        config.write_text(f"pid file = {self.workdir}/rsyncd.pid\nlog file = {self.workdir}/rsyncd.log\n{modules}")
        self._spawn("rsyncd", ["rsync", "--daemon", "--no-detach", f"--port={port}", "--address=127.0.0.1",
                               f"--config={config}"])
        eventually_blocking(lambda: self.check_alive() or _listening(port), 30, "rsync daemon")
        return [f"rsync://127.0.0.1:{port}/slave{i}/" for i in range(len(self.targets))]

    def start(self) -> None:
        # rsync copies whole files between local paths unless told otherwise, and sends deltas over a network.
        whole = 'whole_file = false, _extra = { "--no-whole-file", ' if self.delta else "whole_file = true, _extra = { "
        targets = self._rsync_daemon() if self.network else [f"{t}/" for t in self.targets]
        syncs = "\n".join(
            f'sync {{ default.rsync, source = "{self.master}/", target = "{t}", delay = 0, '
            f'rsync = {{ archive = true, {whole}"--log-file={self.rsync_log(i)}", '
            f'"--log-file-format=XFER %b %n" }} }} }}'
            for i, t in enumerate(targets))
        config = self.workdir / "lsyncd.conf.lua"
        config.write_text(f'settings {{ nodaemon = true, logfile = "{self.workdir}/lsyncd-internal.log", '
                          f'statusFile = "{self.workdir}/lsyncd.status", statusInterval = 1, maxProcesses = 16 }}\n'
                          f"{syncs}\n")
        self._spawn("lsyncd", [shutil.which("lsyncd") or "/usr/bin/lsyncd", str(config)])
        # lsyncd starts with a full rsync of each target; wait for a probe file to arrive everywhere.
        probe = self.master / f"probe-{secrets.token_hex(3)}"
        probe.write_text("ready")
        eventually_blocking(lambda: self.check_alive() or all((t / probe.name).exists() for t in self.targets), 60, "lsyncd")
        probe.unlink()


class DlopboxMirror(Mirror):
    name = "dlopbox"

    def received(self) -> list[int]:
        """Bytes nginx sent to each client so far (headers included), from its access log."""
        by_client = dict.fromkeys(self.client_ids, 0)
        for line in self.access_log.read_text(errors="replace").splitlines() if self.access_log.exists() else ():
            agent, sent, _status = line.rsplit(" ", 2)
            name = agent.removeprefix("dlopbox-client/")
            if name in by_client:
                by_client[name] += int(sent)
        return [by_client[c] for c in self.client_ids]

    def start(self) -> None:
        self.rabbit = RabbitNode(self.workdir / "rabbitmq")
        self.mongo = SecantusNode(self.workdir / "secantus")
        self.access_log = self.workdir / "nginx-access.log"
        self.client_ids = [f"bench-{i}-{secrets.token_hex(2)}" for i in range(len(self.targets))]
        self.nginx = NginxServer(self.workdir / "nginx", self.master, access_log=self.access_log)
        for service in (self.rabbit, self.mongo, self.nginx):
            service.start()
        token, read_token = secrets.token_hex(16), secrets.token_hex(16)
        port = free_port()
        interface_url = f"http://127.0.0.1:{port}"
        base = {**os.environ, "DLOPBOX_LOG_LEVEL": "WARNING", "DLOPBOX_INTERFACE_URL": interface_url,
                "DLOPBOX_TOKEN": token, "DLOPBOX_READ_TOKEN": read_token}
        dlopbox = [sys.executable, "-m", "dlopbox"]
        self._spawn("interface", [*dlopbox, "interface"], {
            **base, "DLOPBOX_HOST": "127.0.0.1", "DLOPBOX_PORT": str(port),
            "DLOPBOX_MONGO_URL": self.mongo.url, "DLOPBOX_AMQP_URL": self.rabbit.interface_url})
        eventually_blocking(lambda: self.check_alive() or _http_ok(interface_url + "/healthz"), 60, "interface")
        self._spawn("watcher", [*dlopbox, "watch"], {**base, "DLOPBOX_ROOT": str(self.master)})
        self._base = base
        for i, target in enumerate(self.targets):
            self._spawn_client(f"client{i}", self.client_ids[i], target)
        probe = self.master / f"probe-{secrets.token_hex(3)}"
        probe.write_text("ready")
        eventually_blocking(lambda: self.check_alive() or all((t / probe.name).exists() for t in self.targets), 120, "dlopbox")
        probe.unlink()

    def _spawn_client(self, name: str, client_id: str, target: Path) -> None:
        self._spawn(name, [sys.executable, "-m", "dlopbox", "client"], {
            **self._base, "DLOPBOX_CLIENT_ID": client_id, "DLOPBOX_TARGET": str(target),
            "DLOPBOX_AMQP_URL": self.rabbit.client_url, "DLOPBOX_FILES_URL": self.nginx.url})

    def add_client(self, target: Path) -> None:
        """A slave that joins late: its first sync comes from the manifest. Not among ``targets``."""
        target.mkdir(parents=True, exist_ok=True)
        client_id = f"bench-late-{secrets.token_hex(2)}"
        self.client_ids.append(client_id)
        self._spawn_client(f"late-{client_id}", client_id, target)

    def stop(self) -> None:
        """Also after a start that failed half-way: whatever was started is stopped."""
        super().stop()
        for name in ("nginx", "mongo", "rabbit"):
            if (service := getattr(self, name, None)) is not None:
                service.stop()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as r:
        return r.status == 200


async def settle(seconds: float = 0.3) -> None:
    """Let the previous workload's tail drain before timing the next."""
    await asyncio.sleep(seconds)


def now() -> float:
    return time.time()
