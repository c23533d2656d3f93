"""The journal keeper: consume ``dlopbox.journal``, write what the log lacks, and keep the journal mark.

The journal queue gets a copy of every published batch. While log-degraded, commits only
publish and the keeper writes the log from here, in seq order; otherwise it acks copies the
direct writes logged already. The mark (the last seq seen in the journal, so known to be
published) tells the next start which logged batches it must publish again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aio_pika
import pymongo
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from pymongo.errors import PyMongoError

from .. import broker
from ..errors import AMQP_ERRORS
from ..events import Batch, EventError
from ..retry import Backoff
from ..settings import InterfaceSettings
from .backends import Amqp
from .eventlog import EventLog
from .metrics import Metrics
from .sequence import Sequence, seqs

log = logging.getLogger(__name__)

#: The keeper's writes may be big (a large rmdir or move); give them longer than a commit.
KEEPER_TIMEOUT_FACTOR = 12
#: Seconds between two writes of the journal mark (the last seq the keeper has seen in the journal). A mark
#: that lags after a crash only makes the next start republish a few batches the clients then skip.
JOURNAL_MARK_EVERY = 1.0


def parse_journal_message(message: AbstractIncomingMessage) -> Batch | None:
    """The numbered batch a journal message carries, or None (logged) when it is malformed."""
    try:
        return broker.parse_message(message.body)
    except EventError as exc:
        log.error("dropping a malformed journal message %s: %s", message.message_id, exc)
        return None


def header_seqs(message: AbstractIncomingMessage) -> tuple[int, int] | None:
    """(first_seq, last_seq) from a queued batch's headers, or None when they are missing or odd."""
    headers = message.headers or {}
    first, last = headers.get("first_seq"), headers.get("last_seq")
    if type(first) is int and type(last) is int and 0 < first <= last:
        return first, last
    return None


class JournalKeeper:
    """Writes journalled batches the log lacks, in order; remembers (and marks) how far it has read."""

    def __init__(self, settings: InterfaceSettings, metrics: Metrics, sequence: Sequence, eventlog: EventLog,
                 amqp: Amqp, log_lock: asyncio.Lock, closing: asyncio.Event) -> None:
        self.settings = settings
        self.metrics = metrics
        self.sequence = sequence
        self.eventlog = eventlog
        self.amqp = amqp
        self.log_lock = log_lock
        #: Set on stop: a cancellation can surface as a connection error from the consumer being
        #: closed, and no retry loop must take it for an outage and carry on.
        self.closing = closing
        #: The last seq seen in the journal, and the last one written as the journal mark.
        self.journaled = self.journal_marked = 0

    def resume(self, journaled: int) -> None:
        """Start from the journal mark found in the log (every batch up to it was published)."""
        self.journaled = self.journal_marked = journaled

    async def keep(self) -> None:
        """Consume the journal for ever: write what the log lacks, then ack."""
        while not self.closing.is_set():
            journal = self.amqp.journal
            messages = None
            try:
                if journal is None:
                    raise aio_pika.exceptions.ChannelInvalidStateError("journal queue not declared")
                messages = journal.iterator()
                async with messages:
                    async for message in messages:
                        await self.take(message)
            except AMQP_ERRORS as exc:
                if self.closing.is_set():
                    raise
                log.warning("journal consumer interrupted (%s: %s); resuming", type(exc).__name__, exc)
                await _forget_consumer(journal, messages)
                await asyncio.sleep(1.0)

    async def take(self, message: AbstractIncomingMessage) -> None:
        """Log one journal message's batch unless the log has it, then ack it (or reject it if malformed)."""
        seqs_in_headers = header_seqs(message)
        if seqs_in_headers is not None and seqs_in_headers[1] <= self.sequence.logged_through:
            # The common case: the direct write logged it already; its headers say so without parsing it.
            self.journaled = max(self.journaled, seqs_in_headers[1])
            await message.ack()
            return
        batch = parse_journal_message(message)
        if batch is None:
            await message.reject(requeue=False)
            return
        first, last = seqs(batch)
        if last >= self.sequence.next_seq:
            # Published by an earlier run and missed by its drain: never reuse these seqs.
            log.warning("journal batch %s (seqs %d-%d) is past the head; numbering resumes after it",
                        batch.batch_id, first, last)
            self.sequence.skip_past(batch.batch_id, first, last)
        backoff = Backoff(0.2, 5.0)
        while True:
            try:
                await self._write_unless_logged(batch)
                break
            except PyMongoError as exc:
                if self.closing.is_set():
                    raise
                self.metrics.errors.labels("mongodb", "journal").inc()
                log.warning("journal keeper cannot write batch %s yet (%s: %s); retrying in %.1f s",
                            batch.batch_id, type(exc).__name__, exc, backoff.delay)
                await backoff.wait()
        await message.ack()

    async def _write_unless_logged(self, batch: Batch) -> None:
        """Write a journalled batch unless the log has it; never holds the commit lock.

        In log-degraded mode commits do not write, so only the keeper does; otherwise a direct
        write of this batch holds the log lock, and once it is released the batch is logged.
        """
        last = seqs(batch)[1]
        if last > self.sequence.logged_through:
            await self.eventlog.ping()  # fail fast, without the log lock, while MongoDB is down
            async with self.log_lock:
                if last > self.sequence.logged_through:
                    await self._write(batch, self.settings.backend_timeout * KEEPER_TIMEOUT_FACTOR)
        self.journaled = max(self.journaled, last)

    async def _write(self, batch: Batch, timeout: float) -> None:
        started = time.perf_counter()
        with pymongo.timeout(timeout):
            await self.eventlog.write(batch)
        self.metrics.log_seconds.observe(time.perf_counter() - started)
        self.sequence.logged(*seqs(batch))

    async def mark_now_and_then(self) -> None:
        """Write the journal mark now and then: once per batch, it was a MongoDB write per batch."""
        while True:
            await asyncio.sleep(JOURNAL_MARK_EVERY)
            await self.write_mark()

    async def write_mark(self, timeout: float | None = None) -> None:
        """Record the last seq seen in the journal, if it moved; a MongoDB failure leaves it for next time."""
        seen = self.journaled
        if seen <= self.journal_marked:
            return
        try:
            with pymongo.timeout(timeout or self.settings.backend_timeout):
                await self.eventlog.mark_journaled(seen)
        except PyMongoError as exc:
            log.debug("cannot write the journal mark (seq %d) yet: %s: %s", seen, type(exc).__name__, exc)
            return
        self.journal_marked = max(self.journal_marked, seen)


async def _forget_consumer(queue: AbstractQueue | None, messages: Any) -> None:
    """Cancel an interrupted iterator's consumer, so that it is not restored beside the next one.

    An iterator closed on a dead channel skips Basic.Cancel, and aio-pika's robust queue then
    restores its consumer on reconnect: a ghost taking every other journal message, which
    the keeper would never see (and would log the rest ahead of them, out of order).
    """
    tag = getattr(messages, "consumer_tag", None)
    if queue is None or tag is None:
        return
    try:
        await queue.cancel(tag, nowait=True)  # forgets it for restoration even when the channel is dead
    except AMQP_ERRORS as exc:
        log.debug("cancelling the interrupted journal consumer: %s", exc)
