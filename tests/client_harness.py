"""Running clients in tests, in-process or as real processes, and comparing trees byte for byte."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from dlopbox import client
from dlopbox.paths import url_path
from dlopbox.settings import ClientSettings
from dlopbox.state import STATE_DIR, TEMP_PREFIX
from dlopbox.tree import Tree, scan

REPO = Path(__file__).resolve().parent.parent


def client_settings(rabbit, nginx, shared_dir: Path, interface_url: str, token: str, client_id: str,
                    target: Path, **overrides) -> ClientSettings:
    return ClientSettings(
        client_id=client_id, target=target, amqp_url=rabbit.client_url, exchange="dlopbox.events",
        files_url=nginx.url + url_path(shared_dir.name) + "/", interface_url=interface_url, read_token=token,
        **overrides)


def settings_env(settings: ClientSettings) -> dict[str, str]:
    return {
        **os.environ,
        "DLOPBOX_CLIENT_ID": settings.client_id, "DLOPBOX_TARGET": str(settings.target),
        "DLOPBOX_AMQP_URL": settings.amqp_url, "DLOPBOX_EXCHANGE": settings.exchange,
        "DLOPBOX_FILES_URL": settings.files_url, "DLOPBOX_INTERFACE_URL": settings.interface_url,
        "DLOPBOX_READ_TOKEN": settings.read_token, "DLOPBOX_PREFETCH": str(settings.prefetch),
        "DLOPBOX_DOWNLOADS": str(settings.downloads), "DLOPBOX_CHUNK_BYTES": str(settings.chunk_bytes),
    }


def leftovers(root: Path, state_too: bool = True) -> list[str]:
    """Temp files left anywhere below ``root`` (in the client's state dir too, unless it is running)."""
    found = []
    for dirpath, dirs, files in os.walk(root):
        if not state_too and STATE_DIR in dirs and Path(dirpath) == root:
            dirs.remove(STATE_DIR)
        found += [os.path.join(dirpath, f) for f in files if f.startswith(TEMP_PREFIX)]
    return found


def describe_difference(master: Tree, slave: Tree) -> str:
    lines = []
    for path in sorted(set(master.entries) | set(slave.entries)):
        a, b = master.get(path), slave.get(path)
        if a != b:
            lines.append(f"  {path!r}:\n    master {a}\n    slave  {b}")
    return "\n".join(lines[:30]) + (f"\n  ... {len(lines) - 30} more" if len(lines) > 30 else "")


async def wait_equal(master: Path, *slaves: Path, timeout: float = 60.0) -> None:
    """Poll until every slave's tree equals the master's: paths, types, sizes, digests, modes, file mtimes."""
    deadline = time.monotonic() + timeout
    while True:
        want = await asyncio.to_thread(scan, master)
        trees = [await asyncio.to_thread(scan, s) for s in slaves]
        if all(t == want for t in trees):
            for s in slaves:
                assert not leftovers(s, state_too=False), leftovers(s, state_too=False)
            return
        if time.monotonic() > deadline:
            bad = [(s, t) for s, t in zip(slaves, trees) if t != want]
            report = "\n".join(f"{s}:\n{describe_difference(want, t)}" for s, t in bad)
            raise AssertionError(f"slaves differ from the master after {timeout}s:\n{report}")
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def running(settings: ClientSettings) -> AsyncIterator[asyncio.Task[None]]:
    """A client running in this process until the block ends (then stopped as on SIGTERM)."""
    stop = asyncio.Event()
    task = asyncio.create_task(client.run(settings, stop=stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


class ClientProcess:
    """`python -m dlopbox client` as a real process, for kills and memory measurements."""

    def __init__(self, settings: ClientSettings, log_path: Path) -> None:
        self.settings = settings
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "dlopbox", "client"], env=settings_env(self.settings),
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO)

    def peak_rss_kib(self) -> int:
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0])

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
