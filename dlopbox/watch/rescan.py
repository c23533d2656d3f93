"""Scans that let the disk decide: an arrival, a kernel queue overflow, a path that changed while read.

Whenever events may have been lost (on IN_Q_OVERFLOW; at start-up and when the delivery
buffer overflowed, see :meth:`~dlopbox.watch.pipeline.Pipeline.run`), a scan of the disk is
diffed against what was announced, which emits exactly the differences. A scan is an item
of the ordered pipeline like any other, so it is released in its place.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Future

from ..errors import lstat_or_none
from ..tree import Tree
from .disk import DiskWork, ScanResult
from .moves import RESCANNED, MovePairing
from .pipeline import Pending, Reconcile
from .settle import SETTLE_S
from .watches import Watches

log = logging.getLogger(__name__)

#: Overflows are logged at most this often.
OVERFLOW_LOG_EVERY_S = 10
#: After an overflow, the whole tree is scanned once more when none has come for this long: the
#: scans during the storm raced it, this one reads a quiet tree, and what it finds is logged.
CHECK_AFTER_S = 2.0


class Rescans:
    """Queues the scans of what arrived or may have been missed, watching new directories first."""

    def __init__(self, announced: Tree, disk: DiskWork, watches: Watches, moves: MovePairing,
                 pending: Pending) -> None:
        self._announced = announced
        self._disk = disk
        self._watches = watches
        self._moves = moves
        self._pending = pending
        self._loop = asyncio.get_running_loop()
        self.overflows = 0
        self._overflow_logged = float("-inf")
        self._queued: Future[ScanResult] | None = None  # the latest scan of the whole tree
        self._check: asyncio.TimerHandle | None = None  # the scan after the storm
        #: Scans to run again (by path) because the disk changed while they read it.
        self._again: dict[str, asyncio.TimerHandle] = {}

    def arrived(self, rel: str, is_dir: bool, ts: float, check: bool = False) -> None:
        """A directory was made, or something was moved in: watch it, then scan it (``check``: see Reconcile)."""
        if is_dir:
            self._watches.watch_tree(rel)
        self._pending.add(Reconcile(rel, ts, self._disk.scan(rel, self._announced), check=check))

    def overflowed(self, ts: float) -> None:
        """The kernel dropped events: rebuild the watches and rescan the whole tree."""
        self.overflows += 1
        now = time.monotonic()
        if now - self._overflow_logged >= OVERFLOW_LOG_EVERY_S:
            self._overflow_logged = now
            log.warning("the kernel dropped inotify events (queue overflow, %d so far): rescanning %s",
                        self.overflows, self._disk.root)
        self._moves.resolve_all(RESCANNED)
        self._watches.watch_tree("")  # directories made while events were dropped have no watch yet
        if self._check is not None:
            self._check.cancel()
        self._check = self._loop.call_later(CHECK_AFTER_S, self._check_after_storm)
        if self._queued is not None and not self._queued.running() and not self._queued.done():
            return  # the rescan already queued has not started: it sees what was just lost too
        self._queued = self._disk.submit_scan("", self._announced)
        self._pending.add(Reconcile("", ts, asyncio.wrap_future(self._queued)))

    def again_later(self, rel: str) -> None:
        """``rel`` changed while it was scanned: scan it again once it has been quiet for a moment."""
        if rel not in self._again and not self._disk.abort.is_set():
            self._again[rel] = self._loop.call_later(SETTLE_S, self._scan_again, rel)

    def stop(self) -> None:
        for timer in self._again.values():
            timer.cancel()
        if self._check is not None:
            self._check.cancel()

    def _check_after_storm(self) -> None:
        self._check = None
        if not self._disk.abort.is_set():
            self.arrived("", True, time.time(), check=True)

    def _scan_again(self, rel: str) -> None:
        self._again.pop(rel, None)
        if self._disk.abort.is_set() or (rel and lstat_or_none(self._disk.path(rel), OSError) is None):
            return  # stopping, or gone: its removal has its own event or rescan
        self.arrived(rel, self._announced.is_dir(rel), time.time())
