"""The ordered release of what was read: items go out in the order inotify reported them.

Each kernel event becomes an item; the disk work it needs (a digest, a stat, a scan) starts at
once in the hash pool, and items are released in the order they were read. The one exception:
when the oldest item's work takes long (a 1 GiB digest), items touching none of its paths, nor
their ancestors, go first — each path's own history stays in order. A released item is handed
the :class:`~dlopbox.watch.announce.Announcer`, which emits only what changes the slaves' view.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from typing import Any

from ..paths import is_within
from ..tree import Tree
from .announce import Announcer
from .delivery import Delivery

log = logging.getLogger(__name__)

#: How long the oldest item may hold back later items that touch none of its paths (a big digest).
OVERTAKE_AFTER_S = 0.1
YIELD_EVERY = 256


class Item:
    """One change read from inotify; ``job`` is its disk work, started when it was read."""

    __slots__ = ("path", "ts", "job")

    def __init__(self, path: str, ts: float, job: asyncio.Future[Any] | None = None) -> None:
        self.path = path
        self.ts = ts
        self.job = job

    def ready(self) -> bool:
        return self.job is None or self.job.done()

    def paths(self) -> tuple[str, ...] | None:
        """What the item may change; None for everything (the root, or a move not paired yet)."""
        return (self.path,) if self.path else None

    def discard(self) -> None:
        if self.job is not None:
            self.job.cancel()

    async def release(self, announcer: Announcer) -> None:
        raise NotImplementedError


class Attrib(Item):
    async def release(self, announcer: Announcer) -> None:
        assert self.job is not None
        st: os.stat_result | None = await self.job
        if st is not None:
            await announcer.set_attributes(self.path, st, self.ts)


class Remove(Item):
    async def release(self, announcer: Announcer) -> None:
        await announcer.remove(self.path, self.ts)


class Reconcile(Item):
    """A scan of ``path`` (an arrival, or everything after an overflow): its differences go out.

    ``check``: the scan after an overflow storm, whose differences earlier scans should have found.
    """

    __slots__ = ("check",)

    def __init__(self, path: str, ts: float, job: asyncio.Future[Any] | None = None, check: bool = False) -> None:
        super().__init__(path, ts, job)
        self.check = check

    async def release(self, announcer: Announcer) -> None:
        assert self.job is not None
        await announcer.apply_scan(self.path, await self.job, self.ts, check=self.check)


class Wake(Item):
    """Nothing: wakes the releaser so that it sees the delivery buffer was dropped."""

    def paths(self) -> tuple[str, ...] | None:
        return ()

    async def release(self, announcer: Announcer) -> None:
        return None


def related(a: str, b: str) -> bool:
    return is_within(a, b) or is_within(b, a)


class Pending:
    """The items read and not yet released, in read order: what the reader fills and the releaser empties."""

    def __init__(self) -> None:
        self.items: deque[Item] = deque()
        self.arrival = asyncio.Event()
        self.drained = asyncio.Event()  # nothing pending and nothing being released

    def __len__(self) -> int:
        return len(self.items)

    def add(self, item: Item) -> None:
        self.items.append(item)
        self.drained.clear()
        self.arrival.set()

    def wake(self) -> None:
        self.add(Wake("", time.time()))

    def discard_all(self) -> None:
        items = self.items
        while items:
            items.popleft().discard()


class Pipeline:
    """Releases the pending items in order, letting unrelated ones overtake a slow head."""

    def __init__(self, pending: Pending, announcer: Announcer, delivery: Delivery, ready: asyncio.Event) -> None:
        self._pending = pending
        self._items = pending.items
        self._announcer = announcer
        self._delivery = delivery
        #: Set once the disk has been reconciled with the interface's manifest at start-up.
        self.ready = ready
        self.reconciles = 0
        self._needs_manifest = True

    async def run(self) -> None:
        released = 0
        pending = self._pending
        while True:
            if self._needs_manifest or self._delivery.lost:
                await self._reconcile_with_interface()
                continue
            if not self._items:
                pending.drained.set()
                pending.arrival.clear()
                await pending.arrival.wait()
                continue
            head = self._items[0]
            if not head.ready():
                await self._wait_or_overtake(head)
                continue
            self._items.popleft()
            await self._release_one(head)
            released += 1
            if released % YIELD_EVERY == 0:
                await asyncio.sleep(0)

    async def _release_one(self, item: Item) -> None:
        await self._delivery.room()
        if self._delivery.lost:
            item.discard()  # a reconcile with the manifest follows and sees it
        else:
            await item.release(self._announcer)

    async def _wait_or_overtake(self, head: Item) -> None:
        """The oldest item waits for its disk work; after OVERTAKE_AFTER_S, let unrelated ones by.

        A 1 GiB digest takes seconds: changes to other paths go out meanwhile, while anything
        touching the same path or one of its ancestors keeps its place behind it.
        """
        assert head.job is not None
        await asyncio.wait({head.job}, timeout=OVERTAKE_AFTER_S)
        while not head.ready() and not (self._needs_manifest or self._delivery.lost):
            await self._release_unrelated()
            await asyncio.wait({head.job}, timeout=0.01)

    async def _release_unrelated(self) -> None:
        items = self._items
        blocked: list[str] = []
        i = 0
        while i < len(items):
            item = items[i]
            paths = item.paths()
            if paths is None:
                return  # it may touch anything: nothing after it goes first
            if item.ready() and not any(related(p, b) for p in paths for b in blocked):
                del items[i]
                await self._release_one(item)
                if self._needs_manifest or self._delivery.lost:
                    return
                continue
            blocked.extend(paths)
            i += 1

    async def _reconcile_with_interface(self) -> None:
        """Make the interface's tree equal to the disk, whatever it missed (start-up, dropped buffer)."""
        self._needs_manifest = True
        state = asyncio.ensure_future(self._interface_tree())
        try:
            while not state.done():
                # Whatever is read before the scan starts, the scan sees.
                self._pending.discard_all()
                await asyncio.wait({state}, timeout=0.05)
            manifest = state.result()
        finally:
            state.cancel()
        self._pending.discard_all()
        await self._announcer.reconcile(manifest)
        self._needs_manifest = False
        self.reconciles += 1
        self.ready.set()

    async def _interface_tree(self) -> Tree:
        await self._delivery.wait_idle()  # a batch still in flight must land before the manifest is read
        return await self._delivery.fetch_manifest()
