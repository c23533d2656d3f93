"""watcher.py on real inotify in temp dirs, posting to an in-test receiver.

Each test ends, at least, with the receiver's tree (every received event applied) equal to a
scan of the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dlopbox.events import BLOCK_SIZE, Entry, Event, Op
from dlopbox.settings import DEFAULT_IGNORE, WatcherSettings
from dlopbox.tree import Ignore, Tree, file_digest, file_version, scan
from dlopbox.watch.disk import open_for_writing
from dlopbox.watch.service import Watcher
from dlopbox.watch.settle import SETTLE_S
from tests.support.polling import eventually
from tests.support.receiver import Receiver

MAX_QUEUED_EVENTS = Path("/proc/sys/fs/inotify/max_queued_events")


def strip(tree: Tree) -> dict[str, Entry]:
    return {p: dataclasses.replace(e, seq=None) for p, e in tree.entries.items()}


async def disk(root: Path) -> dict[str, Entry]:
    return strip(await asyncio.to_thread(scan, root, Ignore(DEFAULT_IGNORE)))


async def wait_synced(receiver: Receiver, root: Path, timeout: float = 60.0) -> None:
    async def synced() -> bool:
        return strip(receiver.tree) == await disk(root)

    try:
        await eventually(synced, timeout, "the receiver's tree to equal the disk")
    except AssertionError:
        mine, theirs = await disk(root), strip(receiver.tree)
        missing = sorted(set(mine) - set(theirs))[:10]
        extra = sorted(set(theirs) - set(mine))[:10]
        differ = sorted(p for p in set(mine) & set(theirs) if mine[p] != theirs[p])[:10]
        raise AssertionError(f"not synced: missing {missing}, extra {extra}, different {differ}") from None


async def wait_quiet(receiver: Receiver, quiet: float = 0.4) -> None:
    """Until nothing has arrived for ``quiet`` seconds (no late or duplicate event follows)."""
    last = -1
    while receiver.posts != last:
        last = receiver.posts
        await asyncio.sleep(quiet)


@contextlib.asynccontextmanager
async def watching(root: Path, receiver: Receiver, on_inotify: Callable[[], object] | None = None,
                   **overrides: Any) -> AsyncIterator[Watcher]:
    """A running watcher; ``on_inotify`` is called as soon as its inotify instance exists."""
    settings = WatcherSettings(root=root, interface_url=receiver.url, token=receiver.token,
                               **{"batch_ms": 20.0, **overrides})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []  # exceptions in callbacks are only logged by asyncio: fail on them
    previous_handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        async with aiohttp.ClientSession() as session:
            watcher = Watcher(settings, session)
            task = asyncio.create_task(watcher.run(stop))
            try:
                if on_inotify is not None:
                    await eventually(lambda: hasattr(watcher, "watches") or task.done(), 30, "inotify")
                    on_inotify()
                await eventually(lambda: watcher.ready.is_set() or task.done(), 60, "the watcher to start")
                if task.done():
                    task.result()
                yield watcher
            finally:
                stop.set()
                await asyncio.wait_for(task, 15)
    finally:
        loop.set_exception_handler(previous_handler)
    assert not errors, errors


def sha256(path: Path) -> str:
    """The digest a write event gives the file (the SHA-256 of its block hashes past one block)."""
    return file_digest(path)


def plain(event: Event) -> dict[str, Any]:
    out = event.to_dict()
    out.pop("seq", None)
    out.pop("ts", None)
    return out


def write_of(root: Path, rel: str) -> dict[str, Any]:
    st = os.stat(root / rel)
    digest, blocks = file_version(root / rel)
    out = {"op": "write", "path": rel, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
           "mode": stat.S_IMODE(st.st_mode), "digest": digest}
    return out if blocks is None else {**out, "blocks": blocks.to_dict()}


def attrib_of(root: Path, rel: str) -> dict[str, Any]:
    st = os.stat(root / rel)
    return {"op": "attrib", "path": rel, "mtime_ns": st.st_mtime_ns, "mode": stat.S_IMODE(st.st_mode)}


def mkdir_of(root: Path, rel: str) -> dict[str, Any]:
    return {"op": "mkdir", "path": rel, "mode": stat.S_IMODE(os.stat(root / rel).st_mode), "is_dir": True}


async def test_each_operation_yields_its_events_in_order_with_metadata_and_digests(root: Path, tmp_path: Path,
                                                                                   receiver: Receiver):
    outside = tmp_path / "outside"
    outside.mkdir()
    a = root / "a.txt"

    async with watching(root, receiver, batch_ms=50.0):
        async def step(action: Callable[[], None], expected: Callable[[], list[dict[str, Any]]]) -> None:
            mark = receiver.seq
            action()
            await wait_synced(receiver, root)
            await wait_quiet(receiver)
            assert [plain(e) for e in receiver.events(mark)] == expected(), action.__doc__

        def create() -> None:
            """create"""
            a.write_bytes(b"hello")
        await step(create, lambda: [write_of(root, "a.txt")])

        def rewrite() -> None:
            """rewrite"""
            a.write_bytes(b"HELLO, world")
        await step(rewrite, lambda: [write_of(root, "a.txt")])

        def append() -> None:
            """append"""
            with a.open("ab") as f:
                f.write(b"!!")
        await step(append, lambda: [write_of(root, "a.txt")])

        def truncate() -> None:
            """truncate through an open file"""
            with a.open("r+b") as f:
                f.truncate(4)
        await step(truncate, lambda: [write_of(root, "a.txt")])

        def truncate_by_path() -> None:
            """truncate(2): no close event, only IN_MODIFY"""
            os.truncate(a, 2)
        await step(truncate_by_path, lambda: [write_of(root, "a.txt")])

        def chmod() -> None:
            """chmod"""
            a.chmod(0o600)
        await step(chmod, lambda: [attrib_of(root, "a.txt")])

        def set_mtime() -> None:
            """utime"""
            os.utime(a, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
        await step(set_mtime, lambda: [attrib_of(root, "a.txt")])

        def touch() -> None:
            """touch an existing file"""
            subprocess.run(["touch", str(a)], check=True)
        await step(touch, lambda: [attrib_of(root, "a.txt")])

        def touch_new() -> None:
            """touch a new file"""
            subprocess.run(["touch", str(root / "new")], check=True)
        await step(touch_new, lambda: [write_of(root, "new")])

        def hard_link() -> None:
            """a hard link: IN_CREATE and no close"""
            os.link(a, root / "link")
        await step(hard_link, lambda: [write_of(root, "link")])

        def mkdir() -> None:
            """mkdir"""
            (root / "d").mkdir(mode=0o750)
        await step(mkdir, lambda: [mkdir_of(root, "d")])

        def mkdir_p() -> None:
            """mkdir -p"""
            os.makedirs(root / "p/q/r")
        await step(mkdir_p, lambda: [mkdir_of(root, "p"), mkdir_of(root, "p/q"), mkdir_of(root, "p/q/r")])

        def rename_file() -> None:
            """rename a file"""
            os.rename(a, root / "d/b.txt")
        await step(rename_file, lambda: [{**write_of(root, "d/b.txt"), "op": "move", "path": "a.txt",
                                          "dest": "d/b.txt"}])

        def rename_dir() -> None:
            """rename a directory"""
            os.rename(root / "d", root / "e")
        await step(rename_dir, lambda: [{"op": "move", "path": "d", "dest": "e", "is_dir": True}])

        def chmod_dir() -> None:
            """chmod a directory (its mode is mirrored, its mtime is not)"""
            (root / "e").chmod(0o700)
        await step(chmod_dir, lambda: [{"op": "attrib", "path": "e", "mode": 0o700, "mtime_ns": 0, "is_dir": True}])

        (outside / "in/sub").mkdir(parents=True)
        (outside / "in/f1").write_bytes(b"one")
        (outside / "in/sub/f2").write_bytes(b"two")

        def move_in() -> None:
            """move a tree in from outside"""
            os.rename(outside / "in", root / "in")
        await step(move_in, lambda: [mkdir_of(root, "in"), write_of(root, "in/f1"), mkdir_of(root, "in/sub"),
                                     write_of(root, "in/sub/f2")])

        def move_dir_out() -> None:
            """move a directory out"""
            os.rename(root / "in", outside / "in-again")
        await step(move_dir_out, lambda: [{"op": "rmdir", "path": "in", "is_dir": True}])

        def move_file_out() -> None:
            """move a file out"""
            os.rename(root / "new", outside / "new")
        await step(move_file_out, lambda: [{"op": "delete", "path": "new"}])

        def delete() -> None:
            """delete a file"""
            (root / "e/b.txt").unlink()
        await step(delete, lambda: [{"op": "delete", "path": "e/b.txt"}])

        (root / "p/q/r/x").write_bytes(b"x")
        (root / "p/y").write_bytes(b"y")
        await wait_synced(receiver, root)

        def remove_tree() -> None:
            """rm -r a tree"""
            shutil.rmtree(root / "p")
        await step(remove_tree, lambda: [{"op": "rmdir", "path": "p", "is_dir": True}])

        def atomic_save() -> None:
            """write a temp file and rename it over the target (editors, rsync)"""
            tmp = root / ".link.tmp"
            tmp.write_bytes(b"saved")
            os.rename(tmp, root / "link")
        await step(atomic_save, lambda: [write_of(root, "link")])


async def test_symlinks_specials_and_ignored_names_are_never_sent(root: Path, tmp_path: Path, receiver: Receiver):
    target = tmp_path / "target"
    target.write_bytes(b"secret")
    async with watching(root, receiver):
        mark = receiver.seq
        os.symlink(target, root / "link")
        os.symlink(tmp_path, root / "dirlink")
        os.mkfifo(root / "fifo")
        (root / "x.swp").write_bytes(b"swap")
        (root / ".dlopbox-tmp-1").write_bytes(b"mine")
        (root / "ignored~").mkdir()
        (root / "ignored~" / "f").write_bytes(b"f")
        (root / "real").write_bytes(b"real")
        await wait_synced(receiver, root)
        await wait_quiet(receiver)
        assert [plain(e) for e in receiver.events(mark)] == [write_of(root, "real")]

        mark = receiver.seq
        os.rename(root / "x.swp", root / "from-swap")
        os.rename(root / "real", root / "real~")
        await wait_synced(receiver, root)
        await wait_quiet(receiver)
        assert [(e.op, e.path) for e in receiver.events(mark)] == [(Op.WRITE, "from-swap"), (Op.DELETE, "real")]


async def test_mkdir_p_then_immediate_writes_five_levels_deep_loses_no_file(root: Path, receiver: Receiver):
    def burst() -> None:
        for i in range(40):
            deepest = root / f"t{i}" / "a" / "b" / "c" / "d"
            os.makedirs(deepest)
            level = deepest
            while level != root:
                (level / f"f{i}").write_bytes(str(level).encode())
                level = level.parent

    async with watching(root, receiver):
        await asyncio.to_thread(burst)
        await wait_synced(receiver, root)
        assert len([p for p in receiver.tree.entries if p.endswith(tuple(f"/f{i}" for i in range(40)))]) == 200


async def test_a_directory_made_just_before_its_parent_is_renamed_is_watched_too(root: Path, receiver: Receiver):
    """Its creation is read after the rename, when watching it by its old path fails: the fault
    suite's master lost every later change inside such a directory (clients differed for good)."""
    (root / "a").mkdir()
    async with watching(root, receiver):
        await wait_synced(receiver, root)
        (root / "a" / "new").mkdir()
        (root / "a").rename(root / "b")  # no await in between: the watcher reads both events after the rename
        await wait_synced(receiver, root)
        (root / "b" / "new" / "later.txt").write_bytes(b"made after the rename")
        (root / "b" / "new" / "inner").mkdir()
        (root / "b" / "new" / "inner" / "deeper.txt").write_bytes(b"and below")
        await wait_synced(receiver, root)


async def test_renaming_a_directory_of_a_thousand_files_is_one_move(root: Path, receiver: Receiver):
    def fill() -> None:
        for s in range(10):
            (root / "big" / f"s{s}").mkdir(parents=True)
            for i in range(100):
                (root / "big" / f"s{s}" / f"f{i}").write_bytes(f"{s}-{i}".encode())

    async with watching(root, receiver):
        await asyncio.to_thread(fill)
        await wait_synced(receiver, root)
        mark = receiver.seq
        os.rename(root / "big", root / "renamed")
        await wait_synced(receiver, root)
        await wait_quiet(receiver)
        assert [plain(e) for e in receiver.events(mark)] == [
            {"op": "move", "path": "big", "dest": "renamed", "is_dir": True}]
        # The watches moved with it: a change deep inside is seen at its new path.
        mark = receiver.seq
        (root / "renamed/s3/f7").write_bytes(b"changed")
        await wait_synced(receiver, root)
        assert [plain(e) for e in receiver.events(mark)] == [write_of(root, "renamed/s3/f7")]


async def test_ten_thousand_files_in_a_burst_arrive_in_few_requests_none_missing_or_twice(root: Path,
                                                                                         receiver: Receiver):
    (root / "burst").mkdir()
    names = [f"burst/file-{i:05d}" for i in range(10_000)]

    def create() -> None:
        for name in names:
            fd = os.open(root / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, name.encode() * 4)
            os.close(fd)

    async with watching(root, receiver, batch_ms=5.0, batch_max=1000):
        await wait_synced(receiver, root)
        mark, posts = receiver.seq, receiver.posts
        started = time.monotonic()
        await asyncio.to_thread(create)
        created = time.monotonic()
        await eventually(lambda: all(n in receiver.tree for n in names), 120, "every file")
        arrived = time.monotonic()
        await wait_synced(receiver, root)
        writes = [e.path for e in receiver.events(mark) if e.op is Op.WRITE]
        assert sorted(writes) == names  # each exactly once
        requests = receiver.posts - posts
        assert receiver.duplicates == 0
        # Batches close 100 ms apart at most while a burst lasts: a slow writer makes more of them.
        assert requests <= 20 + 12 * (arrived - started)
        print(f"\n10,000 files: created in {created - started:.2f} s, all at the receiver after "
              f"{arrived - started:.2f} s, in {requests} requests")


@pytest.mark.parametrize("outage", ["down", "503"])
async def test_an_interface_outage_of_five_seconds_during_a_burst_loses_nothing_and_keeps_order(
        root: Path, receiver: Receiver, outage: str):
    versions = 200

    def burst() -> None:
        for i in range(versions):
            (root / f"f{i:04d}").write_bytes(b"x" * i)
            (root / "counter").write_bytes(str(i).encode())
            if i % 20 == 0:
                time.sleep(0.05)

    async with watching(root, receiver, batch_ms=5.0):
        mark = receiver.seq
        writer = asyncio.create_task(asyncio.to_thread(burst))
        await eventually(lambda: "f0010" in receiver.tree, 30, "the burst to start arriving")
        if outage == "down":
            await receiver.stop()
        else:
            receiver.status = 503
        await asyncio.sleep(5)
        if outage == "down":
            await receiver.start()
        else:
            receiver.status = None
        await writer
        await wait_synced(receiver, root)
        events = receiver.events(mark)
        assert receiver.duplicates == 0 or outage == "down"  # a POST cut by the outage may be retried
        written = [e.path for e in events if e.op is Op.WRITE and e.path != "counter"]
        assert sorted(written) == [f"f{i:04d}" for i in range(versions)]
        # The writer thread shares the GIL with the watcher: it can sit between a rewrite's
        # truncation and its write for milliseconds, and that empty file is a real state.
        digests = {hashlib.sha256(str(i).encode()).hexdigest(): i for i in range(versions)}
        digests[hashlib.sha256(b"").hexdigest()] = -1
        counter = [digests[e.digest] for e in events if e.path == "counter" and e.op is Op.WRITE]
        versions_seen = [v for v in counter if v >= 0]
        assert versions_seen == sorted(versions_seen) and counter[-1] == versions - 1
        seqs = [e.seq for e in events]
        assert seqs == sorted(seqs)


async def test_the_buffer_overflowing_while_the_interface_is_down_ends_in_a_reconcile(root: Path, tmp_path: Path,
                                                                                     receiver: Receiver):
    outside = tmp_path / "outside"
    outside.mkdir()
    for d in ("old", "leaving", "renamed"):
        (root / d).mkdir()
        for i in range(30):
            (root / d / f"o{i}").write_bytes(d.encode())
    async with watching(root, receiver, batch_max=10, buffer_max=50) as watcher:
        await wait_synced(receiver, root)
        await receiver.stop()
        for i in range(300):
            (root / f"n{i}").write_bytes(b"new")
        shutil.rmtree(root / "old")
        await eventually(lambda: watcher.delivery.lost, 30, "the buffer to overflow")
        # While it waits for the interface, what it reads is dropped (its reconcile will see it),
        # moves included: one not paired in time, then paired, must not upset it.
        for i in range(20):
            os.rename(root / "renamed", root / "renamed2")
            os.rename(root / "renamed2", root / "renamed")
            await asyncio.sleep(0.01)
        os.rename(root / "leaving", outside / "leaving")
        os.rename(root / "n1", outside / "n1")
        await asyncio.sleep(0.5)
        await receiver.start()
        await wait_synced(receiver, root)
        assert watcher.reconciles == 2
        (root / "renamed" / "after").write_bytes(b"still watched")
        await wait_synced(receiver, root)


def _set_max_queued_events(value: int) -> bool:
    try:
        MAX_QUEUED_EVENTS.write_text(f"{value}\n")
    except OSError:
        return False
    return True


async def test_a_kernel_queue_overflow_ends_with_the_receivers_tree_equal_to_the_disk(root: Path, receiver: Receiver):
    # The limit is read when an inotify instance is made, and it is global: lower it for as short
    # a time as possible.
    original = int(MAX_QUEUED_EVENTS.read_text())
    lowered = _set_max_queued_events(16)
    try:
        context = watching(root, receiver, on_inotify=lambda: _set_max_queued_events(original))
        watcher = await context.__aenter__()
    finally:
        if lowered:
            _set_max_queued_events(original)
    assert int(MAX_QUEUED_EVENTS.read_text()) == original
    try:
        (root / "d").mkdir()
        for i in range(50):
            (root / "d" / f"keep{i}").write_bytes(b"k")
        await wait_synced(receiver, root)

        def churn() -> None:
            for i in range(2000):
                (root / f"f{i}").write_bytes(b"x")
            for i in range(0, 2000, 3):
                (root / f"f{i}").unlink()
            os.rename(root / "d", root / "e")
            os.makedirs(root / "e/new/deeper")
            (root / "e/new/deeper/g").write_bytes(b"g")

        if not lowered:
            watcher.rescans.overflowed(time.time())  # no way to make the kernel overflow: simulate its event
        # On the loop, not in a thread: the reader cannot drain the 16-event queue meanwhile, so the
        # kernel overflows for sure (from a thread, the reader sometimes kept up and nothing overflowed).
        churn()
        await wait_synced(receiver, root)
        assert watcher.overflows >= 1
        print(f"\nkernel queue lowered: {lowered}; overflows handled: {watcher.overflows}")
        # The watches were rebuilt: later changes are still seen.
        (root / "e/new/deeper/h").write_bytes(b"h")
        await wait_synced(receiver, root)
    finally:
        await context.__aexit__(None, None, None)


async def test_a_stale_removal_read_after_the_file_is_back_never_deletes_it(root: Path, receiver: Receiver):
    """After a kernel queue overflow, events read after the rescan can be older than what it saw:
    a delete of a file that exists again must not be sent (nothing later would correct it)."""
    async with watching(root, receiver) as watcher:
        (root / "a").write_bytes(b"version 1")
        await wait_synced(receiver, root)
        (root / "a").write_bytes(b"version 2, recreated")
        await wait_synced(receiver, root)
        sent = receiver.seq
        await watcher.announcer.remove("a", time.time())  # as the stale IN_DELETE of version 1 would
        await asyncio.sleep(0.5)
        await wait_synced(receiver, root, timeout=5)
        assert receiver.events(sent) == []


async def test_a_restart_sends_the_changes_made_while_the_watcher_was_down(root: Path, receiver: Receiver):
    async with watching(root, receiver):
        for d in ("keep", "gone", "moved", "mode"):
            (root / d).mkdir()
            for i in range(5):
                (root / d / f"f{i}").write_bytes(f"{d}{i}".encode())
        await wait_synced(receiver, root)

    shutil.rmtree(root / "gone")
    os.rename(root / "moved", root / "moved-offline")
    (root / "mode").chmod(0o700)
    (root / "keep/f0").write_bytes(b"changed while down")
    (root / "keep/f1").unlink()
    (root / "keep/new").write_bytes(b"new")
    os.makedirs(root / "x/y")

    async with watching(root, receiver):
        await wait_synced(receiver, root)
    assert receiver.manifests >= 2


async def test_an_interface_down_at_start_is_waited_for(root: Path, receiver: Receiver):
    (root / "before").write_bytes(b"made before the watcher started")
    await receiver.stop()
    settings = WatcherSettings(root=root, interface_url=receiver.url, token=receiver.token)
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        watcher = Watcher(settings, session)
        task = asyncio.create_task(watcher.run(stop))
        await asyncio.sleep(1)
        (root / "while-down").write_bytes(b"made while the interface was down")
        await asyncio.sleep(0.5)
        assert not watcher.ready.is_set()
        await receiver.start()
        await wait_synced(receiver, root)
        (root / "after").write_bytes(b"after")
        await wait_synced(receiver, root)
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_sigterm_makes_the_cli_flush_and_exit_within_seconds(root: Path, receiver: Receiver):
    env = {**os.environ, "DLOPBOX_TOKEN": receiver.token, "DLOPBOX_ROOT": str(root),
           "DLOPBOX_INTERFACE_URL": receiver.url}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dlopbox", "watch", "--batch-ms", "600000", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        await eventually(lambda: receiver.manifests > 0, 30, "the watcher to read the manifest")
        await asyncio.sleep(0.5)
        (root / "last-words").write_bytes(b"bye")
        await asyncio.sleep(1)  # read, hashed and held in a batch that would stay open for ten minutes
        assert receiver.posts == 0
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), 10)
        assert time.monotonic() - started < 5
        assert process.returncode == 0, output.decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert [plain(e) for e in receiver.events()] == [write_of(root, "last-words")]


async def test_stop_flushes_what_is_buffered_and_exits_within_seconds(root: Path, receiver: Receiver):
    settings = WatcherSettings(root=root, interface_url=receiver.url, token=receiver.token, batch_ms=600_000.0)
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        watcher = Watcher(settings, session)
        task = asyncio.create_task(watcher.run(stop))
        await eventually(lambda: watcher.ready.is_set(), 30, "the watcher to start")
        (root / "last-words").write_bytes(b"bye")
        await eventually(lambda: watcher.delivery.buffered == 1, 30, "the event to be buffered")
        assert receiver.posts == 0
        started = time.monotonic()
        stop.set()
        await asyncio.wait_for(task, 10)
        assert time.monotonic() - started < 3
    assert [plain(e) for e in receiver.events()] == [write_of(root, "last-words")]


async def test_hashing_a_big_file_blocks_neither_the_loop_nor_other_files(root: Path, receiver: Receiver):
    size = 512 * 1024 * 1024
    async with watching(root, receiver):
        lags: list[float] = []

        async def tick() -> None:
            while True:
                before = time.monotonic()
                await asyncio.sleep(0.01)
                lags.append(time.monotonic() - before - 0.01)

        ticker = asyncio.create_task(tick())
        with (root / "big").open("wb") as f:
            # A byte in each block, the rest holes: every block is read and hashed, little is written.
            f.truncate(size)
            for offset in range(0, size, BLOCK_SIZE):
                f.seek(offset)
                f.write(b"x")
        (root / "small").write_bytes(b"after the big one")
        await wait_synced(receiver, root, timeout=120)
        ticker.cancel()
        writes = [e for e in receiver.events() if e.op is Op.WRITE]
        assert [e.path for e in writes] == ["small", "big"]  # the small file did not wait for the big digest
        assert writes[1].digest == file_digest(root / "big")
        assert max(lags) < 0.5, f"the event loop stalled {max(lags):.3f} s"


async def test_a_writer_stalling_with_its_file_open_is_not_sent_as_a_prefix(root: Path, receiver: Receiver):
    """A copy stalled past SETTLE_S (a loaded machine) goes out once, complete, when its writer closes it."""
    async with watching(root, receiver):
        mark = receiver.seq
        with open(root / "copy.bin", "wb") as f:
            f.write(b"a" * 100_000)
            f.flush()
            assert open_for_writing(str(root / "copy.bin")) is True
            await asyncio.sleep(SETTLE_S * 4)
            assert not receiver.events(mark), "a prefix went out while the writer still had the file open"
            f.write(b"b" * 100_000)
        assert open_for_writing(str(root / "copy.bin")) is False
        await wait_synced(receiver, root)
        await wait_quiet(receiver)
        assert [plain(e) for e in receiver.events(mark)] == [write_of(root, "copy.bin")]
        # truncate(2) leaves no writer: it still goes out after SETTLE_S, without a close.
        mark = receiver.seq
        os.truncate(root / "copy.bin", 10)
        await wait_synced(receiver, root)
        assert [plain(e) for e in receiver.events(mark)] == [write_of(root, "copy.bin")]


async def test_latency_of_one_small_file_is_milliseconds_plus_the_batch_window(root: Path, receiver: Receiver):
    latencies = []
    async with watching(root, receiver, batch_ms=5.0):
        for i in range(20):
            count = len(receiver.received)
            (root / f"one-{i}").write_bytes(b"x")
            closed = time.time()
            await eventually(lambda: len(receiver.received) > count, 10, "the POST")
            latencies.append(receiver.received[-1].at - closed)
            await asyncio.sleep(0.02)
    latencies.sort()
    print(f"\nclose() -> POST received, batch_ms=5: median {latencies[10] * 1000:.1f} ms, "
          f"max {latencies[-1] * 1000:.1f} ms")
    assert latencies[10] < 0.5
