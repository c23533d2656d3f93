"""Committing a batch: number it, publish it (confirm awaited) and write it to the log, in order.

One lock (the commit lock) serialises numbering and publication, so numbering order and
publication order agree; it is released once the batch is confirmed, so the next batch is
published while this one is still being logged. Direct log writes are chained (each starts
after the previous one ended), so log order agrees too. A retried batch_id is answered with
the seqs it was given, and nothing is numbered or published again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import pymongo
from pymongo.errors import PyMongoError

from ..errors import AMQP_ERRORS
from ..events import Batch
from ..settings import InterfaceSettings
from .backends import Amqp, Unavailable
from .eventlog import EventLog, Unconfirmed
from .metrics import Metrics
from .sequence import Pending, Sequence, seqs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Committed:
    batch_id: str
    first_seq: int
    last_seq: int
    logged: bool

    def to_json(self) -> dict[str, Any]:
        return {"batch_id": self.batch_id, "first_seq": self.first_seq, "last_seq": self.last_seq,
                "logged": self.logged}


class Committer:
    """The commit path: numbering, fan-out, the pending batch, direct log writes in seq order."""

    def __init__(self, settings: InterfaceSettings, metrics: Metrics, sequence: Sequence, eventlog: EventLog,
                 amqp: Amqp, log_lock: asyncio.Lock, ready: asyncio.Event) -> None:
        self.settings = settings
        self.metrics = metrics
        self.sequence = sequence
        self.eventlog = eventlog
        self.amqp = amqp
        #: Serialises every write to the log and state (direct or from the journal) and snapshots.
        self.log_lock = log_lock
        self.ready = ready
        #: Serialises commits: numbering, publication and the direct log write of one batch.
        self.lock = asyncio.Lock()
        #: The direct log write of the batch published last; the next one starts after it ends.
        self._log_tail: asyncio.Future[bool] | None = None

    async def commit(self, batch: Batch) -> Committed:
        """Number, publish and log one batch (see :meth:`accept`); ``logged`` once its write ended."""
        accepted, logged = await self.accept(batch)
        return dataclasses.replace(accepted, logged=await asyncio.shield(logged))

    async def accept(self, batch: Batch) -> tuple[Committed, asyncio.Future[bool]]:
        """Number and publish one batch; raise :class:`Unavailable` if it is not durable yet.

        Returns once RabbitMQ has confirmed it, with the future of its log write (True once
        the batch is in the log): the commit lock is not held while that write commits.
        """
        if not self.ready.is_set():
            raise Unavailable("starting: waiting for MongoDB and RabbitMQ")
        sequence = self.sequence
        async with self.lock:
            if sequence.pending is not None:
                await self._complete(sequence.pending)
            recalled = sequence.recall(batch.batch_id)
            if recalled is not None:
                self.metrics.replays.inc()
                return (Committed(batch.batch_id, *recalled, logged=recalled[1] <= sequence.logged_through),
                        asyncio.ensure_future(self._logged_after_tail(recalled[1])))
            if not self.amqp.up():
                raise Unavailable("RabbitMQ is unreachable")
            pending = sequence.number(batch)
            first, last = seqs(pending.batch)
            logged = await self._complete(pending)
            return Committed(batch.batch_id, first, last, logged=last <= sequence.logged_through), logged

    async def finish(self, timeout: float) -> None:
        """Let the last direct log write end, for at most ``timeout`` seconds (then cancel it)."""
        tail = self._log_tail
        if tail is not None and not tail.done():
            await asyncio.wait([tail], timeout=timeout)
            tail.cancel()
            await asyncio.gather(tail, return_exceptions=True)

    async def _logged_after_tail(self, last: int) -> bool:
        tail = self._log_tail
        if tail is not None:
            await asyncio.wait([tail])
        return last <= self.sequence.logged_through

    async def _complete(self, pending: Pending) -> asyncio.Future[bool]:
        """Publish a numbered batch and start its log write; raise Unavailable until it is published.

        The MongoDB transaction stages its writes while the publish is in flight and commits
        only once RabbitMQ has confirmed, so a batch that was not published is not logged
        either: a 503 leaves nothing half-applied. Returns the log write's future.
        """
        batch = pending.batch
        publish: asyncio.Future[bool] | None = None
        if not pending.published:
            publish = asyncio.ensure_future(self._try_publish(batch))
        logged = self._log_in_turn(pending, publish)
        try:
            if publish is not None:
                pending.published = await publish
        finally:
            if publish is not None and not publish.done():
                publish.cancel()
        if not pending.published:
            await asyncio.wait([logged])  # its transaction aborts: nothing of the batch is in the log
            self.sequence.update_gauges()
            raise Unavailable("RabbitMQ did not confirm the batch; retry")
        self.sequence.published()
        return logged

    def _log_in_turn(self, pending: Pending, publish: asyncio.Future[bool] | None) -> asyncio.Future[bool]:
        """Start the batch's direct log write once the previous batch's write has ended."""
        previous = self._log_tail
        logged = asyncio.ensure_future(self._log_after(previous, pending, publish))
        self._log_tail = logged
        return logged

    async def _log_after(self, previous: asyncio.Future[bool] | None, pending: Pending,
                         publish: asyncio.Future[bool] | None) -> bool:
        if previous is not None:
            await asyncio.wait([previous])
        batch = pending.batch
        first, last = seqs(batch)
        sequence = self.sequence
        if pending.logged or last <= sequence.logged_through:
            pending.logged = True  # the journal keeper wrote it first
            return True
        if sequence.degraded:
            return False  # the journal keeper writes it, in order
        if first > sequence.logged_through + 1:
            # An earlier batch is not in the log: writing this one would leave a gap.
            sequence.degrade(first)
            return False
        pending.logged = await self._write_confirmed(batch, publish)
        if not pending.logged and publish is not None:
            await asyncio.wait([publish])
        confirmed = publish is None or (publish.done() and not publish.cancelled() and publish.result())
        if not pending.logged and confirmed:
            sequence.degrade(first)
        return pending.logged

    async def _write_confirmed(self, batch: Batch, publish: asyncio.Future[bool] | None) -> bool:
        async def confirmed() -> bool:
            return True if publish is None else await asyncio.shield(publish)

        started = time.perf_counter()
        try:
            # The publish's own timeout bounds the wait for its confirm inside the transaction.
            async with self.log_lock:
                with pymongo.timeout(2 * self.settings.backend_timeout):
                    await self.eventlog.write(batch, confirmed)
        except Unconfirmed:
            return False
        except PyMongoError as exc:
            self.metrics.errors.labels("mongodb", "write").inc()
            log.warning("MongoDB write of batch %s failed: %s: %s", batch.batch_id, type(exc).__name__, exc)
            return False
        self.metrics.log_seconds.observe(time.perf_counter() - started)
        self.sequence.logged(*seqs(batch))
        return True

    async def _try_publish(self, batch: Batch) -> bool:
        try:
            await self.amqp.publish(batch)
        except AMQP_ERRORS as exc:
            self.metrics.errors.labels("rabbitmq", "publish").inc()
            log.warning("publishing batch %s failed: %s: %s", batch.batch_id, type(exc).__name__, exc)
            return False
        return True
