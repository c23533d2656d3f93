"""Pairing the two halves of a rename: an IN_MOVED_FROM and the IN_MOVED_TO with its cookie.

A MOVED_FROM becomes a :class:`Move` item at once, in its place in the order; the item
resolves to the MOVED_TO's path when that is read (a rename inside the tree). When none has
come after PAIR_S and nothing is left to read, it was a move out of the tree: a removal. A
MOVED_TO without its MOVED_FROM is something moved in from outside: an arrival.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .announce import Announcer
from .pipeline import Item
from .watches import Dir, Watches

#: How long a MOVED_FROM waits for its MOVED_TO before it counts as a move out of the tree.
PAIR_S = 0.02
#: What a pending move resolves to besides its destination.
MOVED_OUT = None
RESCANNED = ""


class Move(Item):
    """A MOVED_FROM; ``job`` resolves to the MOVED_TO's path, MOVED_OUT, or RESCANNED."""

    __slots__ = ("is_dir",)

    def __init__(self, path: str, ts: float, job: asyncio.Future[str | None], is_dir: bool) -> None:
        super().__init__(path, ts, job)
        self.is_dir = is_dir

    def resolve(self, outcome: str | None) -> None:
        """Pair it (or not); a move discarded by a reconcile is still paired, for its watches' sake."""
        assert self.job is not None
        if not self.job.done():
            self.job.set_result(outcome)

    def paths(self) -> tuple[str, ...] | None:
        if not self.ready():
            return None
        assert self.job is not None
        dest = self.job.result() if not self.job.cancelled() else None
        return (self.path, dest) if dest else (self.path,)

    async def release(self, announcer: Announcer) -> None:
        assert self.job is not None
        dest = await self.job
        if dest is MOVED_OUT:
            await announcer.remove(self.path, self.ts)
        elif dest != RESCANNED:
            await announcer.move(self.path, dest, self.is_dir, self.ts)


class MovePairing:
    """The MOVED_FROMs waiting for their MOVED_TO, by cookie; a moved directory's watches follow it.

    ``unread()`` tells whether the kernel has events not read yet: a MOVED_TO may be among them.
    """

    def __init__(self, watches: Watches, unread: Callable[[], bool]) -> None:
        self._watches = watches
        self._unread = unread
        self._loop = asyncio.get_running_loop()
        self._waiting: dict[int, tuple[Move, Dir | None]] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def moved_from(self, node: Dir, name: str, rel: str, is_dir: bool, cookie: int, ts: float) -> Move:
        """The item of ``rel`` moved away from ``node``, to be released in its place in the order."""
        item = Move(rel, ts, self._loop.create_future(), is_dir)
        self._waiting[cookie] = (item, node.children.get(name) if is_dir else None)
        self._loop.call_later(PAIR_S, self._expired, cookie, False)
        return item

    def moved_to(self, node: Dir, name: str, rel: str, is_dir: bool, cookie: int, ignored: bool) -> bool:
        """Pair ``rel`` with its MOVED_FROM; False if there is none (it was moved in from outside)."""
        waiting = self._waiting.pop(cookie, None)
        if waiting is None:
            return False
        item, moved = waiting
        if ignored:
            if moved is not None:
                self._watches.forget(moved)
            item.resolve(MOVED_OUT)
            return True
        if is_dir:
            if moved is not None and self._watches.by_wd.get(moved.watch.wd) is moved:
                self._watches.move(moved, node, name)
            else:
                self._watches.watch_tree(rel)
        item.resolve(rel)
        return True

    def resolve_all(self, outcome: str | None) -> None:
        for item, _ in self._waiting.values():
            item.resolve(outcome)
        self._waiting.clear()

    def _expired(self, cookie: int, confirmed: bool) -> None:
        """No MOVED_TO yet: once nothing is left to read, the MOVED_FROM was a move out of the tree."""
        if cookie not in self._waiting:
            return
        if not confirmed:
            # Let a reader woken in this same loop iteration process what it read first.
            self._loop.call_soon(self._expired, cookie, True)
            return
        if self._unread():
            self._loop.call_later(PAIR_S, self._expired, cookie, False)
            return
        item, moved = self._waiting.pop(cookie)
        if moved is not None:
            self._watches.forget(moved)
        item.resolve(MOVED_OUT)
