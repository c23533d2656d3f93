"""The parts wired as the watcher wires them, but with nobody reading inotify: the test is the kernel.

What each test hands the pipeline stands for events read (or lost); what reaches the receiver
is what the slaves would be told.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from asyncinotify import Inotify

from dlopbox.events import Entry, Event, Op
from dlopbox.settings import DEFAULT_IGNORE
from dlopbox.tree import Ignore, Tree, diff, scan
from dlopbox.watch.announce import Announcer
from dlopbox.watch.delivery import Delivery
from dlopbox.watch.disk import DiskWork, ScanResult, scan_path
from dlopbox.watch.moves import MovePairing
from dlopbox.watch.pipeline import Attrib, Pending, Pipeline, Reconcile, Remove
from dlopbox.watch.rescan import CHECK_AFTER_S, Rescans
from dlopbox.watch.unsendable import UnsendablePaths
from dlopbox.watch.watches import Watches
from tests.support.polling import eventually
from tests.support.receiver import Receiver


@dataclasses.dataclass
class Parts:
    pending: Pending
    watches: Watches
    moves: MovePairing
    rescans: Rescans
    announcer: Announcer
    delivery: Delivery


@contextlib.asynccontextmanager
async def wired(root: Path, receiver: Receiver) -> AsyncIterator[Parts]:
    ignore = Ignore(DEFAULT_IGNORE)
    async with aiohttp.ClientSession() as session:
        with Inotify() as inotify:
            disk = DiskWork(root, ignore, 2)
            pending = Pending()
            delivery = Delivery(session, receiver.url, receiver.token, batch_ms=5, batch_max=1000,
                                buffer_max=10_000, on_lost=pending.wake)
            watches = Watches(inotify, root, ignore)
            watches.watch_tree("")
            moves = MovePairing(watches, unread=lambda: False)
            announced = Tree()
            rescans = Rescans(announced, disk, watches, moves, pending)
            announcer = Announcer(announced, delivery, disk, watches, rescans.again_later, UnsendablePaths())
            ready = asyncio.Event()
            pipeline = Pipeline(pending, announcer, delivery, ready)
            tasks = [asyncio.create_task(pipeline.run()), asyncio.create_task(delivery.run())]
            try:
                await asyncio.wait_for(ready.wait(), 30)  # the start-up reconcile with the (empty) manifest
                yield Parts(pending, watches, moves, rescans, announcer, delivery)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                rescans.stop()
                disk.close()


def strip(tree: Tree) -> dict[str, Entry]:
    return {p: dataclasses.replace(e, seq=None) for p, e in tree.entries.items()}


async def synced(receiver: Receiver, root: Path) -> None:
    async def check() -> bool:
        return strip(receiver.tree) == strip(await asyncio.to_thread(scan, root, Ignore(DEFAULT_IGNORE)))
    await eventually(check, 30, "the receiver's tree to equal the disk")


def plain(event: Event) -> str:
    out = event.to_dict()
    out.pop("seq", None)
    out.pop("ts", None)
    return json.dumps(out, sort_keys=True)


async def test_unrelated_items_overtake_a_slow_head_and_related_ones_never_do(root: Path, receiver: Receiver):
    (root / "d").mkdir()
    (root / "d" / "x").write_bytes(b"x")
    (root / "a").write_bytes(b"a")
    (root / "b").write_bytes(b"b")
    async with wired(root, receiver) as parts:
        await synced(receiver, root)
        mark = receiver.seq
        slow: asyncio.Future[os.stat_result | None] = asyncio.get_running_loop().create_future()
        (root / "d").chmod(0o700)
        parts.pending.add(Attrib("d", time.time(), slow))  # the head: its disk work takes long
        (root / "d" / "x").unlink()
        parts.pending.add(Remove("d/x", time.time()))  # below the head's path: keeps its place
        (root / "a").unlink()
        parts.pending.add(Remove("a", time.time()))  # unrelated: goes first
        await eventually(lambda: receiver.events(mark), 10, "the unrelated removal")
        await asyncio.sleep(0.3)
        assert [(e.op, e.path) for e in receiver.events(mark)] == [(Op.DELETE, "a")]

        slow.set_result(os.lstat(root / "d"))
        await synced(receiver, root)
        assert [(e.op, e.path) for e in receiver.events(mark)] == [(Op.DELETE, "a"), (Op.ATTRIB, "d"),
                                                                   (Op.DELETE, "d/x")]

        # An item that may touch anything (a scan of the root) lets nothing after it go first.
        mark = receiver.seq
        head: asyncio.Future[os.stat_result | None] = asyncio.get_running_loop().create_future()
        whole: asyncio.Future[ScanResult] = asyncio.get_running_loop().create_future()
        parts.pending.add(Attrib("d", time.time(), head))
        parts.pending.add(Reconcile("", time.time(), whole))
        (root / "b").unlink()
        parts.pending.add(Remove("b", time.time()))
        await asyncio.sleep(0.5)
        assert receiver.events(mark) == []
        head.set_result(None)
        whole.set_result(await asyncio.to_thread(scan_path, root, "", Ignore(DEFAULT_IGNORE),
                                                 parts.announcer.announced, threading.Event()))
        await synced(receiver, root)
        assert [(e.op, e.path) for e in receiver.events(mark)] == [(Op.DELETE, "b")]


def _scan_result(root: Path, parts: Parts) -> object:
    import threading

    from dlopbox.watch.disk import scan_path
    return scan_path(root, "", Ignore(DEFAULT_IGNORE), parts.announcer.announced, threading.Event())


async def test_an_overflow_rescans_and_emits_exactly_the_differences(root: Path, receiver: Receiver):
    (root / "keep").write_bytes(b"keep")
    (root / "old").write_bytes(b"old")
    (root / "d").mkdir()
    (root / "d" / "f").write_bytes(b"f")
    async with wired(root, receiver) as parts:
        await synced(receiver, root)
        before = Tree(parts.announcer.announced.entries.values())
        mark = receiver.seq
        # Changes whose events are lost: nobody reads this inotify instance.
        (root / "old").unlink()
        (root / "new").write_bytes(b"new")
        (root / "d" / "f").write_bytes(b"changed")
        os.makedirs(root / "e" / "g")
        (root / "e" / "g" / "h").write_bytes(b"h")
        parts.rescans.overflowed(time.time())  # IN_Q_OVERFLOW
        parts.rescans.overflowed(time.time())  # another one before the rescan ran: nothing twice
        await synced(receiver, root)
        await asyncio.wait_for(parts.delivery.wait_idle(), 10)
        await asyncio.sleep(0.3)
        expected = diff(before, await asyncio.to_thread(scan, root, Ignore(DEFAULT_IGNORE)))
        assert sorted(plain(e) for e in receiver.events(mark)) == sorted(plain(e) for e in expected)
        assert parts.rescans.overflows == 2
        # Directories made while events were dropped are watched now.
        assert parts.watches.find("e/g") is not None


async def test_after_an_overflow_storm_a_scan_of_the_quiet_tree_sends_what_the_scans_during_it_missed(
        root: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture):
    (root / "a").write_bytes(b"a")
    async with wired(root, receiver) as parts:
        await synced(receiver, root)
        started = time.monotonic()
        parts.rescans.overflowed(time.time())
        queued = parts.rescans._queued
        assert queued is not None
        await asyncio.wait_for(asyncio.wrap_future(queued), 10)
        await asyncio.wait_for(parts.pending.drained.wait(), 10)  # the storm's own scan is released
        assert time.monotonic() - started < CHECK_AFTER_S, "too slow to test the scan after the storm"
        mark = receiver.seq
        # Changes that neither an event nor the storm's scan reported.
        (root / "late").write_bytes(b"late")
        (root / "a").unlink()
        await synced(receiver, root)
        assert sorted((e.op, e.path) for e in receiver.events(mark)) == sorted([(Op.WRITE, "late"), (Op.DELETE, "a")])
        assert "the scan after the inotify overflow found 2 differences" in caplog.text


async def test_moves_paired_or_not_are_a_move_a_removal_and_an_arrival(root: Path, tmp_path: Path,
                                                                       receiver: Receiver):
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "a").write_bytes(b"a")
    (root / "b").write_bytes(b"b")
    (outside / "z").write_bytes(b"z")
    async with wired(root, receiver) as parts:
        await synced(receiver, root)
        mark = receiver.seq
        top = parts.watches.top
        assert top is not None
        now = time.time()
        os.rename(root / "a", root / "c")
        parts.pending.add(parts.moves.moved_from(top, "a", "a", False, 1, now))
        assert parts.moves.moved_to(top, "c", "c", False, 1, ignored=False)
        os.rename(root / "b", outside / "b")
        parts.pending.add(parts.moves.moved_from(top, "b", "b", False, 2, now))  # never paired
        os.rename(outside / "z", root / "z")
        assert not parts.moves.moved_to(top, "z", "z", False, 3, ignored=False)
        parts.rescans.arrived("z", False, now)  # what the watcher does with a MOVED_TO alone
        await synced(receiver, root)
        events = receiver.events(mark)
        assert [(e.op, e.path, e.dest) for e in events] == [(Op.MOVE, "a", "c"), (Op.DELETE, "b", None),
                                                            (Op.WRITE, "z", None)]
