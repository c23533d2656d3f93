"""The downloader against the real nginx: bytes on disk, durability before the rename, no partial file ever."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from pathlib import Path

import aiohttp
import pytest

from dlopbox import download
from dlopbox.download import Downloader, FileVersion, StaleContent
from dlopbox.paths import url_path
from tests.client_harness import leftovers

pytestmark = pytest.mark.timeout(60)


def version_of(path: Path, mode: int = 0o640, mtime_ns: int = 1_600_000_000_123_456_789) -> FileVersion:
    data = path.read_bytes()
    return FileVersion(len(data), hashlib.sha256(data).hexdigest(), mode, mtime_ns)


@pytest.fixture
async def downloader(nginx, shared_dir):
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield Downloader(session, nginx.url + url_path(shared_dir.name) + "/", 1 << 20, 4)


class DiskLog:
    """Records, in order, every fsync (by inode) and every rename done through the os module."""

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


async def test_a_burst_is_fsynced_back_to_back_then_renamed_and_every_file_is_durable(
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
    fsynced: set[int] = set()
    renamed = 0
    for op, arg in disk.ops:
        if op == "fsync":
            fsynced.add(arg)  # type: ignore[arg-type]
        else:
            ino, dst = arg  # type: ignore[misc]
            assert ino in fsynced, f"{dst} renamed into place before its content was durable"
            renamed += 1
    assert renamed == len(files)
    installer = downloader.installer
    assert installer.files == len(files)
    assert installer.rounds < len(files) / 2, f"{installer.rounds} install rounds for {len(files)} files"


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


async def test_cancelled_while_waiting_for_its_round_leaves_old_or_new_never_a_temp_file(
        downloader: Downloader, shared_dir: Path, tmp_path: Path, monkeypatch):
    files = {f"f{i}": os.urandom(100_000) for i in range(20)}
    for rel, data in files.items():
        (shared_dir / rel).write_bytes(data)
    slave = tmp_path / "slave"
    slave.mkdir()
    fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        fsync(fd)
        threading.Event().wait(0.02)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    tasks = [asyncio.create_task(downloader.install(rel, slave / rel, version_of(shared_dir / rel))) for rel in files]
    await asyncio.sleep(0.1)
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks)
    for rel, data in files.items():
        if (slave / rel).exists():
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


async def test_a_lone_file_is_fsynced_before_its_rename_in_its_writer_thread(downloader: Downloader, shared_dir: Path,
                                                                             tmp_path: Path, monkeypatch):
    (shared_dir / "lone").write_bytes(b"x" * 5000)
    disk = DiskLog(monkeypatch)
    await downloader.install("lone", tmp_path / "slave" / "lone", version_of(shared_dir / "lone"))
    ino = (tmp_path / "slave" / "lone").stat().st_ino
    assert disk.ops == [("fsync", ino), ("rename", (ino, tmp_path / "slave" / "lone"))]
    assert (downloader.installer.rounds, downloader.installer.files) == (1, 1)
