"""The downloader against the real nginx: bytes on disk, no partial file ever, every installed file made durable."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import threading
from pathlib import Path

import aiohttp
import pytest

from dlopbox.client import download
from dlopbox.client.download import Downloader, FileVersion, StaleContent
from dlopbox.paths import url_path
from tests.support.client_harness import leftovers

pytestmark = pytest.mark.timeout(60)


def version_of(path: Path, mode: int = 0o640, mtime_ns: int = 1_600_000_000_123_456_789) -> FileVersion:
    data = path.read_bytes()
    return FileVersion(len(data), hashlib.sha256(data).hexdigest(), mode, mtime_ns)


@pytest.fixture
async def downloader(nginx, shared_dir):
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        d = Downloader(session, nginx.url + url_path(shared_dir.name) + "/", 1 << 20, 4)
        yield d
        await asyncio.to_thread(d.unsynced.sync)  # closes the descriptors of what the test installed


class DiskLog:
    """Records, in order, every fsync (by inode) and every rename done through the os module."""

    def fsynced(self) -> set[int]:
        with self.lock:
            return {arg for op, arg in self.ops if op == "fsync"}  # type: ignore[misc]

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.lock = threading.Lock()
        self.ops: list[tuple[str, object]] = []
        fsync, replace = os.fsync, os.replace

        def logged_fsync(fd: int) -> None:
            fsync(fd)
            with self.lock:
                self.ops.append(("fsync", os.fstat(fd).st_ino))

        def logged_replace(src, dst, **kw) -> None:
            ino = os.lstat(src).st_ino
            replace(src, dst, **kw)
            with self.lock:
                self.ops.append(("rename", (ino, Path(dst))))

        monkeypatch.setattr(os, "fsync", logged_fsync)
        monkeypatch.setattr(os, "replace", logged_replace)


async def test_a_burst_is_visible_once_verified_and_durable_after_one_sync(
        downloader: Downloader, shared_dir: Path, tmp_path: Path, monkeypatch):
    files = {f"d{i % 5}/f{i:03d}": os.urandom(4096 + i) for i in range(200)}
    for rel, data in files.items():
        (shared_dir / rel).parent.mkdir(exist_ok=True)
        (shared_dir / rel).write_bytes(data)
    slave = tmp_path / "slave"
    disk = DiskLog(monkeypatch)
    await asyncio.gather(*(downloader.install(rel, slave / rel, version_of(shared_dir / rel)) for rel in files))

    for rel, data in files.items():
        assert (slave / rel).read_bytes() == data
        st = (slave / rel).stat()
        assert (st.st_mode & 0o777, st.st_mtime_ns) == (0o640, 1_600_000_000_123_456_789)
    assert not leftovers(slave)
    assert [op for op, _ in disk.ops] == ["rename"] * len(files), "no file waits for the disk to be visible"
    assert len(downloader.unsynced) == len(files)

    await asyncio.to_thread(downloader.unsynced.sync)
    fsynced = disk.fsynced()
    assert {(slave / rel).stat().st_ino for rel in files} <= fsynced
    assert {(slave / f"d{i}").stat().st_ino for i in range(5)} <= fsynced, "the directories holding the renames"
    assert (len(downloader.unsynced), downloader.unsynced.files, downloader.unsynced.syncs) == (0, len(files), 1)


async def test_a_file_moved_or_replaced_before_the_sync_is_still_made_durable(
        downloader: Downloader, shared_dir: Path, tmp_path: Path, monkeypatch):
    """The sync follows the installed inode, not its name: a rename applied meanwhile cannot hide it."""
    for name in ("a", "b"):
        (shared_dir / name).write_bytes(os.urandom(5000))
    slave = tmp_path / "slave"
    disk = DiskLog(monkeypatch)
    await downloader.install("a", slave / "a", version_of(shared_dir / "a"))
    moved = (slave / "a").stat().st_ino
    os.rename(slave / "a", slave / "elsewhere")  # a move event applied before the next state write
    await downloader.install("b", slave / "b", version_of(shared_dir / "b"))
    replaced = (slave / "b").stat().st_ino
    (shared_dir / "b").write_bytes(b"newer")
    await downloader.install("b", slave / "b", version_of(shared_dir / "b"))
    await asyncio.to_thread(downloader.unsynced.sync)
    assert {moved, replaced, (slave / "b").stat().st_ino} <= disk.fsynced()


async def test_past_the_limit_a_writer_syncs_instead_of_holding_more_descriptors(
        downloader: Downloader, shared_dir: Path, tmp_path: Path, monkeypatch):
    files = {f"f{i:02d}": os.urandom(1000 + i) for i in range(50)}
    for rel, data in files.items():
        (shared_dir / rel).write_bytes(data)
    slave = tmp_path / "slave"
    disk = DiskLog(monkeypatch)
    downloader.unsynced = unsynced = download.Unsynced(limit=8)
    held: list[int] = []
    add = unsynced.add

    def counted_add(fd: int, directory: Path) -> bool:
        full = add(fd, directory)
        held.append(len(unsynced))
        return full

    monkeypatch.setattr(unsynced, "add", counted_add)
    await asyncio.gather(*(downloader.install(rel, slave / rel, version_of(shared_dir / rel)) for rel in files))
    assert len(downloader.unsynced) < 8
    # Installs go on while a sync runs (4 at a time here): the descriptors held stay near the limit.
    assert max(held) <= 8 + 4 and downloader.unsynced.syncs >= 50 // (8 + 4)
    fsynced = disk.fsynced()
    synced_files = sum((slave / rel).stat().st_ino in fsynced for rel in files)
    assert synced_files == downloader.unsynced.files == 50 - len(downloader.unsynced)


async def test_no_partial_file_is_ever_visible_under_its_final_name(downloader: Downloader, shared_dir: Path,
                                                                    tmp_path: Path):
    files = {f"big{i}.bin": os.urandom(3 * 2**20 + i) for i in range(6)}
    for rel, data in files.items():
        (shared_dir / rel).write_bytes(data)
    slave = tmp_path / "slave"
    slave.mkdir()
    seen_bad: list[tuple[str, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            with os.scandir(slave) as entries:
                names = [e.name for e in entries if not e.name.startswith(".")]
            for name in names:
                try:
                    data = (slave / name).read_bytes()
                except FileNotFoundError:
                    continue  # removed between the listing and the read
                if data != files[name]:
                    seen_bad.append((name, len(data)))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        for _ in range(3):  # each round replaces the same files: the old version must stay whole too
            await asyncio.gather(*(downloader.install(rel, slave / rel, version_of(shared_dir / rel))
                                   for rel in files))
            for rel in files:
                os.unlink(slave / rel)
    finally:
        stop.set()
        sampler.join()
    assert not seen_bad
    assert not leftovers(slave)


async def test_wrong_bytes_leave_the_old_file_and_no_temp_file(downloader: Downloader, shared_dir: Path,
                                                               tmp_path: Path):
    (shared_dir / "a").write_bytes(b"new content")
    slave = tmp_path / "slave"
    slave.mkdir()
    (slave / "a").write_bytes(b"old content")
    wrong = FileVersion(11, hashlib.sha256(b"something else").hexdigest(), 0o644, 0)
    with pytest.raises(StaleContent, match="digest"):
        await downloader.install("a", slave / "a", wrong)
    with pytest.raises(StaleContent, match="bytes"):
        await downloader.install("a", slave / "a", FileVersion(5, wrong.digest, 0o644, 0))
    assert (slave / "a").read_bytes() == b"old content"
    assert not leftovers(slave)


@pytest.mark.parametrize("after", [0.0, 0.005, 0.02])
@pytest.mark.parametrize(("count", "size"), [(20, 300_000), (100, 4096)], ids=["streamed", "inline"])
async def test_cancelled_installs_leave_the_new_file_or_nothing_never_a_temp_file(
        downloader: Downloader, shared_dir: Path, tmp_path: Path, after: float, count: int, size: int):
    files = {f"f{i}": os.urandom(size) for i in range(count)}
    for rel, data in files.items():
        (shared_dir / rel).write_bytes(data)
    slave = tmp_path / "slave"
    slave.mkdir()
    tasks = [asyncio.create_task(downloader.install(rel, slave / rel, version_of(shared_dir / rel))) for rel in files]
    await asyncio.sleep(after)
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks)
    for rel, data in files.items():
        if (slave / rel).exists():
            assert (slave / rel).read_bytes() == data
    assert not leftovers(slave)
    await asyncio.to_thread(downloader.unsynced.sync)  # whatever was installed: no descriptor left behind


async def test_small_files_are_installed_without_a_thread_hop_and_verified_all_the_same(
        downloader: Downloader, shared_dir: Path, tmp_path: Path, monkeypatch):
    """The fast path for small files: received whole and installed on the loop, each checked before its rename."""
    files = {f"d{i % 3}/f{i:03d}": os.urandom(download.INLINE_MAX if i == 0 else 2048 + i) for i in range(60)}
    for rel, data in files.items():
        (shared_dir / rel).parent.mkdir(exist_ok=True)
        (shared_dir / rel).write_bytes(data)
    slave = tmp_path / "slave"
    hops: list[object] = []
    loop = asyncio.get_running_loop()
    run_in_executor = loop.run_in_executor

    def counted(executor, func, *args):
        hops.append(func)
        return run_in_executor(executor, func, *args)

    monkeypatch.setattr(loop, "run_in_executor", counted)
    versions = {rel: version_of(shared_dir / rel) for rel in files}
    (shared_dir / "d1/f001").write_bytes(b"replaced on the master meanwhile")
    results = await asyncio.gather(*(downloader.install(rel, slave / rel, versions[rel]) for rel in files),
                                   return_exceptions=True)
    assert hops == [], "no thread hop for a file of at most INLINE_MAX bytes"
    assert [type(r) for r, rel in zip(results, files) if rel == "d1/f001"] == [StaleContent]
    assert not (slave / "d1/f001").exists()
    for rel, data in files.items():
        if rel != "d1/f001":
            assert (slave / rel).read_bytes() == data
    assert not leftovers(slave)


async def test_a_file_already_there_is_not_downloaded_and_an_empty_file_needs_no_transfer(
        downloader: Downloader, shared_dir: Path, tmp_path: Path):
    (shared_dir / "a").write_bytes(b"content")
    slave = tmp_path / "slave"
    slave.mkdir()
    version = version_of(shared_dir / "a", mode=0o600)
    await downloader.install("a", slave / "a", version)
    assert downloader.counters.files == 1
    os.chmod(slave / "a", 0o644)
    (shared_dir / "a").unlink()  # a second download would fail: it must not happen
    await downloader.install("a", slave / "a", version)
    assert (slave / "a").stat().st_mode & 0o777 == 0o600
    await downloader.install("missing-on-nginx", slave / "sub" / "empty",
                             FileVersion(0, download.EMPTY_DIGEST, 0o604, 1_000_000_000))
    assert (slave / "sub" / "empty").read_bytes() == b""
    assert (slave / "sub" / "empty").stat().st_mode & 0o777 == 0o604
    assert not leftovers(slave)


async def test_a_transfer_gone_silent_is_abandoned_and_retried(tmp_path: Path, monkeypatch):
    """A peer that stops sending without closing (a network cut drops packets: no FIN, no RST) must
    not hold a download for ever: past the read timeout it is retried on a new connection.
    nginx cannot be made to go silent mid-body, so the peer here is a bare TCP server."""
    data = os.urandom(200_000)
    version = FileVersion(len(data), hashlib.sha256(data).hexdigest(), 0o644, 1_600_000_000_000_000_000)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n" % len(data)
    requests: list[int] = []
    silent = asyncio.Event()
    handlers: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await reader.readuntil(b"\r\n\r\n")
            requests.append(len(requests) + 1)
            if len(requests) == 1:
                writer.write(head + b"\r\n" + data[:50_000])
                await writer.drain()
                silent.set()
                await asyncio.sleep(3600)  # half a body, then nothing
            writer.write(head + b"Connection: close\r\n\r\n" + data)
            await writer.drain()
        finally:
            writer.close()

    monkeypatch.setattr(download, "_TIMEOUT", aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=0.5))
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            d = Downloader(session, f"http://127.0.0.1:{port}/", 1 << 20, 2)
            await asyncio.wait_for(d.install("f", tmp_path / "f", version), 20)
            await asyncio.to_thread(d.unsynced.sync)
    finally:
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()
    assert silent.is_set() and requests == [1, 2]
    assert (tmp_path / "f").read_bytes() == data
    assert not leftovers(tmp_path)


async def test_a_directory_removed_before_its_fsync_is_skipped_and_an_io_error_still_raised(
        downloader: Downloader, shared_dir: Path, tmp_path: Path, monkeypatch):
    (shared_dir / "a").write_bytes(b"content")
    slave = tmp_path / "slave"
    await downloader.install("a", slave / "a", version_of(shared_dir / "a"))
    fsync = os.fsync

    def gone_directory(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise FileNotFoundError(2, "No such file or directory")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", gone_directory)
    await asyncio.to_thread(downloader.unsynced.sync)  # does not raise: nothing of it left to make durable
    assert len(downloader.unsynced) == 0

    await downloader.install("a", slave / "b", version_of(shared_dir / "a"))
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "Input/output error")))
    with pytest.raises(OSError, match="Input/output"):
        await asyncio.to_thread(downloader.unsynced.sync)
