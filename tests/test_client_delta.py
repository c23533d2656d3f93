"""Block-level assembly against the real nginx: only the blocks a slave lacks cross the wire.

Each test builds a version on the "master" (the shared dir nginx serves), describes it as the
watcher would (tree.file_version), and installs it on a slave that holds an older copy, another
file with the same blocks, or nothing; it asserts the bytes on disk, the bytes received from
nginx (the downloader's own count of what the socket delivered) and the blocks on disk.
"""

from __future__ import annotations

import asyncio
import os
import tracemalloc
from pathlib import Path

import aiohttp
import pytest

from dlopbox.client.apply import Applier
from dlopbox.client.blocks import BlockIndex, LocalSources
from dlopbox.client.download import Downloader, FileVersion, StaleContent
from dlopbox.events import BLOCK_SIZE, Event, Op
from dlopbox.paths import url_path
from dlopbox.tree import file_version
from tests.support.client_harness import client_settings, leftovers, running, wait_equal
from tests.support.polling import eventually

pytestmark = pytest.mark.timeout(120)
MiB = BLOCK_SIZE
MTIME = 1_600_000_000_123_456_789


def version_of(path: Path, mode: int = 0o644) -> FileVersion:
    digest, blocks = file_version(path)
    return FileVersion(path.stat().st_size, digest, mode, MTIME, blocks)


def random_blocks(count: int, tail: int = 0) -> bytes:
    return os.urandom(count * MiB + tail)


def on_disk(path: Path) -> int:
    return path.stat().st_blocks * 512


@pytest.fixture
def slave(tmp_path: Path) -> Path:
    target = tmp_path / "slave"
    target.mkdir()
    return target


@pytest.fixture
async def downloader(nginx, shared_dir, slave):
    index = BlockIndex(slave)
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        d = Downloader(session, nginx.url + url_path(shared_dir.name) + "/", 1 << 20, 4, index)
        yield d
        await asyncio.to_thread(d.unsynced.sync)
    index.close()


async def install(downloader: Downloader, shared_dir: Path, slave: Path, rel: str) -> int:
    """Install the master's current ``rel`` on the slave; the bytes it cost from nginx."""
    before = downloader.counters.bytes
    await downloader.install(rel, slave / rel, version_of(shared_dir / rel))
    assert (slave / rel).read_bytes() == (shared_dir / rel).read_bytes()
    return downloader.counters.bytes - before


async def test_an_edit_in_the_middle_costs_the_changed_block_only(downloader, shared_dir, slave):
    data = bytearray(random_blocks(16, 1234))
    (shared_dir / "f.bin").write_bytes(data)
    assert await install(downloader, shared_dir, slave, "f.bin") == len(data)  # nothing here yet: all of it

    data[7 * MiB + 100:7 * MiB + 200] = os.urandom(100)
    (shared_dir / "f.bin").write_bytes(data)
    assert await install(downloader, shared_dir, slave, "f.bin") == MiB
    assert downloader.counters.blocks["same file"] == 16
    assert not leftovers(slave)


async def test_an_append_costs_the_new_tail_only(downloader, shared_dir, slave):
    data = random_blocks(8, 5000)
    (shared_dir / "log.bin").write_bytes(data)
    await install(downloader, shared_dir, slave, "log.bin")
    tail = os.urandom(MiB)
    with open(shared_dir / "log.bin", "ab") as f:
        f.write(tail)
    # The old last block (5000 bytes) is now a full block: it and the new one are fetched.
    assert await install(downloader, shared_dir, slave, "log.bin") == len(data) + len(tail) - 8 * MiB


async def test_a_truncation_costs_nothing(downloader, shared_dir, slave):
    data = random_blocks(8)
    (shared_dir / "t.bin").write_bytes(data)
    await install(downloader, shared_dir, slave, "t.bin")
    os.truncate(shared_dir / "t.bin", 5 * MiB + MiB // 2)
    # Its new short last block is the start of the old copy's block 5.
    assert await install(downloader, shared_dir, slave, "t.bin") == 0
    os.truncate(shared_dir / "t.bin", 3 * MiB)
    assert await install(downloader, shared_dir, slave, "t.bin") == 0


async def test_a_copy_comes_from_the_local_file_and_follows_moves(downloader, shared_dir, slave):
    data = random_blocks(6, 77)
    (shared_dir / "a").mkdir()
    (shared_dir / "a" / "orig.bin").write_bytes(data)
    await install(downloader, shared_dir, slave, "a/orig.bin")

    # The slave renames its directory as the master did; the index follows it.
    applier = Applier(slave, downloader)
    os.rename(shared_dir / "a", shared_dir / "b")
    await applier.apply(Event(Op.MOVE, "a", dest="b", is_dir=True))
    (shared_dir / "copy.bin").write_bytes(data)
    assert await install(downloader, shared_dir, slave, "copy.bin") == 0
    assert downloader.counters.blocks["other file"] == 7  # its 77-byte last block too

    # Once both are gone, nothing is found locally any more: a third copy is fetched.
    for rel in ("b", "copy.bin"):
        await applier.apply(Event(Op.RMDIR, rel, is_dir=True) if rel == "b" else Event(Op.DELETE, rel))
    (shared_dir / "third.bin").write_bytes(data)
    assert await install(downloader, shared_dir, slave, "third.bin") == len(data)


async def test_zero_blocks_stay_holes_even_in_a_multi_gib_file(downloader, shared_dir, slave):
    size = 4 * 1024 * MiB
    data = os.urandom(MiB)
    with open(shared_dir / "sparse.img", "wb") as f:
        f.truncate(size)
        f.seek(2048 * MiB)
        f.write(data)
    version = await asyncio.to_thread(version_of, shared_dir / "sparse.img")
    tracemalloc.start()
    try:
        await downloader.install("sparse.img", slave / "sparse.img", version)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert downloader.counters.bytes == MiB
    assert downloader.counters.blocks["hole"] == 4095
    assert peak < 16 * MiB, f"{peak} bytes allocated at the peak"
    got = slave / "sparse.img"
    assert got.stat().st_size == size and on_disk(got) <= 2 * MiB
    with open(got, "rb") as f:
        f.seek(2048 * MiB)
        assert f.read(MiB) == data
        f.seek(2048 * MiB - 4096)
        assert f.read(4096) == bytes(4096)


async def test_a_tampered_block_on_the_slave_is_fetched_again(downloader, shared_dir, slave):
    data = bytearray(random_blocks(8))
    (shared_dir / "f.bin").write_bytes(data)
    await install(downloader, shared_dir, slave, "f.bin")
    with open(slave / "f.bin", "r+b") as f:  # someone writes into the slave's copy
        f.seek(2 * MiB + 10)
        f.write(b"tampered")
    data[5 * MiB:5 * MiB + 4] = b"edit"
    (shared_dir / "f.bin").write_bytes(data)
    assert await install(downloader, shared_dir, slave, "f.bin") == 2 * MiB


async def test_the_master_rewriting_the_file_mid_assembly_is_stale_and_the_work_is_kept(
        downloader, shared_dir, slave, monkeypatch):
    v1 = bytearray(random_blocks(12))
    (shared_dir / "f.bin").write_bytes(v1)
    await install(downloader, shared_dir, slave, "f.bin")
    v2 = bytearray(v1)
    for i in (2, 6, 10):  # three runs of missing blocks: three range requests
        v2[i * MiB:i * MiB + 8] = os.urandom(8)
    (shared_dir / "f.bin").write_bytes(v2)
    wanted = version_of(shared_dir / "f.bin")
    v3 = bytearray(v2)
    v3[10 * MiB:10 * MiB + 8] = os.urandom(8)

    fetch_run = Downloader._fetch_run
    runs = []

    async def master_moves_on_after_the_first_range(self, source, sink, version, first, end, etag, written):
        if runs:
            (shared_dir / "f.new").write_bytes(v3)
            os.utime(shared_dir / "f.new", ns=(MTIME + len(runs), MTIME + len(runs)))  # another ETag
            os.replace(shared_dir / "f.new", shared_dir / "f.bin")
        runs.append(etag)
        return await fetch_run(self, source, sink, version, first, end, etag, written)

    monkeypatch.setattr(Downloader, "_fetch_run", master_moves_on_after_the_first_range)
    with pytest.raises(StaleContent, match="412"):
        await downloader.install("f.bin", slave / "f.bin", wanted)
    assert runs[0] is None and runs[1] is not None, "the second range carries the first one's ETag"
    assert (slave / "f.bin").read_bytes() == v1, "the old copy stays until a verified version replaces it"
    assert not leftovers(slave)
    monkeypatch.setattr(Downloader, "_fetch_run", fetch_run)

    # The next attempt, for the master's newest version, reuses block 2 fetched by the first one.
    assert await install(downloader, shared_dir, slave, "f.bin") == 2 * MiB
    assert downloader.counters.blocks["other file"] == 1
    assert not list((slave / ".dlopbox" / "partial").iterdir()), "the kept blocks go once installed"


async def test_a_block_that_does_not_match_is_stale(downloader, shared_dir, slave):
    (shared_dir / "f.bin").write_bytes(random_blocks(4))
    promised = version_of(shared_dir / "f.bin")
    (shared_dir / "f.bin").write_bytes(random_blocks(4))  # same size, other bytes: nginx cannot tell
    with pytest.raises(StaleContent, match="does not match"):
        await downloader.install("f.bin", slave / "f.bin", promised)
    assert not (slave / "f.bin").exists()
    assert not leftovers(slave)


async def test_the_client_service_builds_a_copy_from_local_blocks_without_nginx(
        upstream, rabbit, nginx, shared_dir, client_queues, tmp_path):
    """End to end through RabbitMQ and the real client: the copy's bytes exist nowhere nginx could serve them."""
    m = upstream
    target = tmp_path / "client"
    settings = client_settings(rabbit, nginx, shared_dir, m.interface.url, m.interface.token, client_queues[0], target)
    data = bytearray(random_blocks(12, 999))
    await m.publish(m.mkdir("d"), m.write("d/orig.bin", bytes(data)))
    async with running(settings):
        await wait_equal(shared_dir, target)
        await m.publish(m.move("d", "e"))
        await wait_equal(shared_dir, target)
        copy = m.write("copy.bin", bytes(data))
        os.unlink(shared_dir / "copy.bin")  # nginx answers 404 for it from now on
        await m.publish(copy)
        await eventually(lambda: (target / "copy.bin").exists() and (target / "copy.bin").read_bytes() == data,
                         30, "the copy assembled from e/orig.bin")
        await m.publish(Event(Op.DELETE, "copy.bin"))
        data[5 * MiB:5 * MiB + 3] = b"new"
        await m.publish(m.write("e/orig.bin", bytes(data)))
        await wait_equal(shared_dir, target)
        assert not leftovers(target, state_too=False)


async def test_a_copy_still_as_installed_lends_its_blocks_without_hashing_them_again(downloader, shared_dir, slave):
    data = bytearray(random_blocks(16, 1234))
    (shared_dir / "f.bin").write_bytes(data)
    await install(downloader, shared_dir, slave, "f.bin")
    data[7 * MiB:7 * MiB + 4] = b"edit"
    (shared_dir / "f.bin").write_bytes(data)
    assert await install(downloader, shared_dir, slave, "f.bin") == MiB
    assert downloader.counters.blocks["unhashed"] == 16
    # The version just assembled is trusted in turn, and so is a copy of it under another name.
    (shared_dir / "copy.bin").write_bytes(data)
    assert await install(downloader, shared_dir, slave, "copy.bin") == 0
    assert downloader.counters.blocks["unhashed"] == 16 + 17


async def test_a_tampered_copy_whose_size_and_mtime_were_put_back_is_hashed_and_repaired(downloader, shared_dir, slave):
    data = bytearray(random_blocks(8))
    (shared_dir / "f.bin").write_bytes(data)
    await install(downloader, shared_dir, slave, "f.bin")
    with open(slave / "f.bin", "r+b") as f:
        f.seek(2 * MiB + 10)
        f.write(b"tampered")
    os.utime(slave / "f.bin", ns=(MTIME, MTIME))  # size and mtime as installed: only the ctime tells
    data[5 * MiB:5 * MiB + 4] = b"edit"
    (shared_dir / "f.bin").write_bytes(data)
    assert await install(downloader, shared_dir, slave, "f.bin") == 2 * MiB
    assert downloader.counters.blocks["unhashed"] == 0


def test_blocks_copied_unhashed_from_a_file_written_meanwhile_are_given_back(slave: Path):
    path = slave / "f.bin"
    path.write_bytes(random_blocks(4))
    _, blocks = file_version(path)
    index = BlockIndex(slave)
    try:
        index.put("f.bin", blocks.hashes, verified=path.stat())
        sources = LocalSources(slave, index)
        fd = sources.open("f.bin")
        assert sources.read(fd, 0, MiB, blocks.hashes[0]) is not None
        assert sources.read(fd, 3, MiB, blocks.hashes[1], at=1) is not None
        assert sources.written_meanwhile() == []
        with open(path, "r+b") as f:
            f.write(b"x")
        assert sources.written_meanwhile() == [0, 3]
        sources.close()
        assert index.verified_blocks("f.bin", path.stat()) is None  # and no longer trusted once reopened
        index.put("f.bin", file_version(path)[1].hashes, verified=path.stat())
        assert index.verified_blocks("f.bin", path.stat()) is not None
        path.rename(slave / "g.bin")  # a rename changes the ctime: hashed again before its blocks are trusted
        index.move("f.bin", "g.bin", is_dir=False)
        assert index.verified_blocks("g.bin", (slave / "g.bin").stat()) is None
    finally:
        index.close()
