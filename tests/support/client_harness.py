"""Running clients in tests, in-process or as real processes, and comparing trees byte for byte."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

from dlopbox.client import service as client
from dlopbox.client.state import STATE_DIR, TEMP_PREFIX
from dlopbox.events import Event, Op
from dlopbox.paths import url_path
from dlopbox.settings import ClientSettings
from dlopbox.tree import Tree, scan

REPO = Path(__file__).resolve().parents[2]
BIG = 200 * 1024 * 1024
RSS_LIMIT_KIB = 64 * 1024


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
        "DLOPBOX_LOCAL_CHANGES": settings.local_changes, "DLOPBOX_AUDIT_INTERVAL": str(settings.audit_interval),
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

    async def exited(self, timeout: float) -> int:
        """Wait for the process to exit without blocking this loop (an in-test interface may run on it)."""
        return await asyncio.to_thread(self.wait, timeout)

    async def stopped(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait, without blocking this loop."""
        return await asyncio.to_thread(self.stop, timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def temp_files(root: Path) -> list[str]:
    return [n for n in os.listdir(root) if n.startswith(TEMP_PREFIX)]


def write_big(path: Path, size: int = BIG, seed: bytes = b"") -> Event:
    """A file of ``size`` pseudo-random bytes, written and hashed 1 MiB at a time; its write event."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    block = hashlib.sha256(seed).digest() * 32768  # 1 MiB
    with open(path, "wb") as f:
        for i in range(size // len(block)):
            chunk = i.to_bytes(8, "big") + block[8:]
            f.write(chunk)
            digest.update(chunk)
    st = os.stat(path)
    return Event(Op.WRITE, path.name, size=st.st_size, mtime_ns=st.st_mtime_ns, mode=st.st_mode & 0o7777,
                 digest=digest.hexdigest())


class FinalNameSampler(threading.Thread):
    """Watches a final name while it is downloaded: only complete versions may ever be seen there."""

    def __init__(self, path: Path, versions: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.versions = versions  # digest -> size
        self.stop = threading.Event()
        self.samples = 0
        self.hashed = 0
        self.bad: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                time.sleep(0.002)
                continue
            with os.fdopen(fd, "rb") as f:
                size = os.fstat(fd).st_size
                self.samples += 1
                if size not in self.versions.values():
                    self.bad.append(f"size {size}")
                elif self.hashed < 6:  # the open descriptor pins one version: hash it whole
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
                    self.hashed += 1
                    if digest not in self.versions:
                        self.bad.append(f"digest {digest}")


class TreeSampler(threading.Thread):
    """Walks a slave over and over while it syncs: every file under its final name must be complete.

    ``expected`` maps each relative path to its (size, sha256); a file seen with anything else,
    or a path not expected at all, is recorded in ``bad``. Temp files are skipped: they are the
    only place where partial content may live.
    """

    def __init__(self, root: Path, expected: dict[str, tuple[int, str]]) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.expected = expected
        self.stop = threading.Event()
        self.walks = 0
        self.files_checked = 0
        self.bad: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            for dirpath, dirs, files in os.walk(self.root):
                if Path(dirpath) == self.root and STATE_DIR in dirs:
                    dirs.remove(STATE_DIR)
                for name in files:
                    if name.startswith(TEMP_PREFIX):
                        continue
                    path = os.path.join(dirpath, name)
                    rel = os.path.relpath(path, self.root)
                    try:
                        with open(path, "rb") as f:
                            got = (os.fstat(f.fileno()).st_size, hashlib.file_digest(f, "sha256").hexdigest())
                    except FileNotFoundError:
                        continue
                    self.files_checked += 1
                    if self.expected.get(rel) != got:
                        self.bad.append(f"{rel}: {got}")
            self.walks += 1
