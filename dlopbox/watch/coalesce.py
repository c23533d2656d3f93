"""Coalescing: the events of one open batch that cancel or supersede each other are merged.

50 writes of one file are one write; a file created and deleted is nothing; a directory
created and removed takes what was done inside it along. Each event is added in order, and
the result says exactly what the slaves must do to reach the same state.
"""

from __future__ import annotations

import dataclasses

from ..events import Event, Op
from ..paths import is_within


class OpenBatch:
    """The events of the batch being filled, coalesced as they arrive.

    Dropped events leave a ``None`` in place so that the indexes in ``last`` stay valid.
    ``barrier`` is the index of the latest directory move or rmdir: it changes paths below
    it, so nothing before it is merged with anything after it.
    """

    def __init__(self) -> None:
        self.events: list[Event | None] = []
        self.created: list[bool] = []  # the event's path (a move's dest) did not exist for the slaves before it
        self.last: dict[str, int] = {}  # path -> index of the latest event naming it
        self.barrier = -1
        self.live = 0
        #: Block hashes added (an upper bound: merged events are not subtracted); they are most of a batch's bytes.
        self.block_hashes = 0

    def __len__(self) -> int:
        return self.live

    def events_out(self) -> tuple[Event, ...]:
        return tuple(e for e in self.events if e is not None)

    def add(self, event: Event, created: bool = False) -> None:
        """Append ``event``, merging it with an earlier event of the same path when that is exact."""
        path = event.path
        if event.blocks is not None:
            self.block_hashes += len(event.blocks.hashes)
        match event.op:
            case Op.WRITE:
                i = self._latest(path)
                if i is not None and self._op(i) in (Op.WRITE, Op.ATTRIB):
                    created = created or (self._op(i) is Op.WRITE and self.created[i])
                    self._drop(i)
            case Op.ATTRIB:
                i = self._latest(path)
                if i is not None:
                    prev = self.events[i]
                    assert prev is not None
                    if prev.op is Op.WRITE:
                        self.events[i] = dataclasses.replace(prev, mode=event.mode, mtime_ns=event.mtime_ns)
                        return
                    if prev.op is Op.MKDIR:
                        self.events[i] = dataclasses.replace(prev, mode=event.mode)
                        return
                    if prev.op is Op.ATTRIB:
                        self._drop(i)
            case Op.DELETE:
                i = self._latest(path)
                if i is not None and self._op(i) in (Op.WRITE, Op.ATTRIB):
                    was_created = self._op(i) is Op.WRITE and self.created[i]
                    self._drop(i)
                    if was_created:
                        return
            case Op.RMDIR:
                if self._drop_tail_within(path):
                    return
            case Op.MOVE if not event.is_dir:
                assert event.dest is not None
                i = self._latest(path)
                if i is not None and self._op(i) is Op.WRITE and self.created[i]:
                    # A new file renamed into place (the usual atomic save): announce it where it landed.
                    prev = self.events[i]
                    assert prev is not None
                    self._drop(i)
                    event = dataclasses.replace(prev, path=event.dest, ts=event.ts)
        self._append(event, created)

    def _op(self, index: int) -> Op:
        event = self.events[index]
        assert event is not None
        return event.op

    def _latest(self, path: str) -> int | None:
        """The latest live event naming ``path`` with nothing since that could have moved it."""
        i = self.last.get(path)
        if i is None or i <= self.barrier or self.events[i] is None:
            return None
        return i

    def _drop_tail_within(self, directory: str) -> bool:
        """Drop the trailing events that only touch ``directory``'s subtree; True if it was created in them."""
        j = len(self.events) - 1
        while j >= 0:
            event = self.events[j]
            if event is not None:
                if not all(is_within(p, directory) for p in event.paths()):
                    return False
                self._drop(j)
                if event.op is Op.MKDIR and event.path == directory:
                    return True
            j -= 1
        return False

    def _drop(self, index: int) -> None:
        self.events[index] = None
        self.live -= 1

    def _append(self, event: Event, created: bool) -> None:
        index = len(self.events)
        self.events.append(event)
        self.created.append(created)
        for p in event.paths():
            self.last[p] = index
        if event.op is Op.RMDIR or (event.op is Op.MOVE and event.is_dir):
            self.barrier = index
        self.live += 1
