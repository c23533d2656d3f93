"""Seq numbering and how far the log is written: the one owner of the interface's seq state.

Every accepted batch gets the next gap-free seqs. The log (MongoDB) may run behind what was
published: ``logged_through`` says how far it is contiguous. When a direct write fails the
interface turns *log-degraded* until the journal keeper has written everything numbered.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from ..events import Batch
from .metrics import Metrics

log = logging.getLogger(__name__)

#: Batch ids remembered for idempotent retries (a watcher retries within seconds).
RECENT_BATCHES = 100_000


def seqs(batch: Batch) -> tuple[int, int]:
    """(first_seq, last_seq) of a numbered batch."""
    assert batch.first_seq is not None and batch.last_seq is not None
    return batch.first_seq, batch.last_seq


@dataclass
class Pending:
    """A numbered batch not yet confirmed by RabbitMQ; nothing else commits before it."""

    batch: Batch
    published: bool = False
    logged: bool = False


class Sequence:
    """Numbering, the pending batch, the recent batch ids, how far the log is written, log-degraded."""

    def __init__(self, metrics: Metrics, recent_limit: int = RECENT_BATCHES) -> None:
        self.metrics = metrics
        self.recent_limit = recent_limit
        self._next_seq = 1
        #: Every seq up to this one is in the MongoDB log (and the state reflects exactly them).
        self._logged_through = 0
        self._pending: Pending | None = None
        self._degraded = False
        #: batch_id -> (first_seq, last_seq) of the batches numbered last, oldest first.
        self._recent_batches: OrderedDict[str, tuple[int, int]] = OrderedDict()

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def logged_through(self) -> int:
        return self._logged_through

    @property
    def pending(self) -> Pending | None:
        return self._pending

    @property
    def degraded(self) -> bool:
        return self._degraded

    @property
    def head(self) -> int:
        """The last seq acknowledged (or acknowledgeable) to the watcher: published, in order."""
        if self._pending is not None:
            return seqs(self._pending.batch)[0] - 1
        return self._next_seq - 1

    def resume(self, head: int, recent_batches: Iterable[tuple[str, int, int]]) -> None:
        """Start after a log whose last seq is ``head``; ``recent_batches`` as (batch_id, first, last)."""
        self._next_seq = head + 1
        self._logged_through = head
        self._recent_batches.clear()
        for batch_id, first, last in recent_batches:
            self._remember(batch_id, first, last)
        self.metrics.head.set(head)
        self.metrics.logged.set(head)

    def recall(self, batch_id: str) -> tuple[int, int] | None:
        """The seqs a recent batch of this id was given, or None."""
        return self._recent_batches.get(batch_id)

    def number(self, batch: Batch) -> Pending:
        """Give ``batch`` the next seqs; it stays pending until :meth:`published`."""
        numbered = batch.numbered(self._next_seq)
        first, last = seqs(numbered)
        self._next_seq = last + 1
        self._remember(batch.batch_id, first, last)
        self.metrics.batches.inc()
        self.metrics.events.inc(len(numbered.events))
        self._pending = Pending(numbered)
        return self._pending

    def published(self) -> None:
        """The pending batch is confirmed by RabbitMQ."""
        self._pending = None
        self.update_gauges()

    def skip_past(self, batch_id: str, first: int, last: int) -> None:
        """A batch numbered by an earlier run is past the head: never give its seqs again."""
        self._next_seq = max(self._next_seq, last + 1)
        self._remember(batch_id, first, last)

    def logged(self, first: int, last: int) -> None:
        """Seqs ``first``-``last`` are in the log; leaves log-degraded once the log has caught up."""
        if first > self._logged_through + 1:
            log.error("the log has a gap: seqs %d-%d are missing", self._logged_through + 1, first - 1)
        self._logged_through = max(self._logged_through, last)
        if self._degraded and self._logged_through >= self._next_seq - 1:
            self._degraded = False
            log.info("log caught up at seq %d: direct MongoDB writes resume", self._logged_through)
        self.update_gauges()

    def degrade(self, first: int) -> None:
        """The direct write of the batch from ``first`` failed: the journal keeper writes from now on."""
        if not self._degraded:
            self._degraded = True
            log.warning("MongoDB write failed: log-degraded from seq %d; the journal keeper will catch up", first)
        self.update_gauges()

    def update_gauges(self) -> None:
        m = self.metrics
        m.head.set(self.head)
        m.logged.set(self._logged_through)
        m.backlog.set(max(0, self.head - self._logged_through))
        m.pending.set(0 if self._pending is None else 1)
        m.degraded.set(1 if self._degraded else 0)

    def _remember(self, batch_id: str, first: int, last: int) -> None:
        self._recent_batches[batch_id] = (first, last)
        self._recent_batches.move_to_end(batch_id)
        while len(self._recent_batches) > self.recent_limit:
            self._recent_batches.popitem(last=False)
