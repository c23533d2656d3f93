"""The interface's commit, journal keeper and recovery driven directly, against real RabbitMQ and SecantusDB."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aio_pika
import pytest

from dlopbox import broker
from dlopbox.events import Batch
from dlopbox.interface.backends import Amqp, Unavailable
from dlopbox.interface.commit import Committed, Committer
from dlopbox.interface.eventlog import EventLog
from dlopbox.interface.journal import JournalKeeper
from dlopbox.interface.metrics import Metrics
from dlopbox.interface.recovery import recover
from dlopbox.interface.sequence import Sequence
from dlopbox.settings import InterfaceSettings
from tests.support.interface_harness import (
    bound_queues,
    message_seqs,
    mongo_reader,
    settings_for,
    write_event,
)
from tests.support.polling import eventually


@pytest.fixture
async def journal_emptied_after(rabbit, clean_journal) -> AsyncIterator[None]:
    """These tests publish without a keeper: leave no copies in the journal for the next test."""
    yield
    connection = await aio_pika.connect(rabbit.admin_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(broker.JOURNAL_QUEUE, durable=True, arguments=broker.QUORUM)
        await queue.purge()


pytestmark = pytest.mark.usefixtures("journal_emptied_after")


@dataclass
class Parts:
    settings: InterfaceSettings
    metrics: Metrics
    eventlog: EventLog
    amqp: Amqp
    sequence: Sequence
    log_lock: asyncio.Lock


@contextlib.asynccontextmanager
async def connected(settings: InterfaceSettings) -> AsyncIterator[Parts]:
    """The interface's collaborators, connected as its start-up connects them (no recovery)."""
    metrics = Metrics()
    eventlog = EventLog(settings.mongo_url, settings.mongo_db, settings.backend_timeout)
    amqp = Amqp(settings, metrics)
    try:
        await eventlog.ping()
        await eventlog.ensure_indexes()
        await amqp.open()
        yield Parts(settings, metrics, eventlog, amqp, Sequence(metrics), asyncio.Lock())
    finally:
        await amqp.close()
        await eventlog.close()


def batch(batch_id: str, *names: str) -> Batch:
    return Batch(batch_id, tuple(write_event(name) for name in names))


async def test_a_retried_batch_id_gets_the_seqs_it_was_given_and_is_published_and_logged_once(
        rabbit, mongo, mongo_db, client_queues):
    settings = settings_for(rabbit, mongo, mongo_db)
    async with bound_queues(rabbit, client_queues[:1]) as queues, connected(settings) as p, \
            mongo_reader(mongo, mongo_db) as db:
        ready = asyncio.Event()
        committer = Committer(settings, p.metrics, p.sequence, p.eventlog, p.amqp, p.log_lock, ready)
        with pytest.raises(Unavailable):
            await committer.commit(batch("early", "e"))
        ready.set()
        first = await committer.commit(batch("retried", "a", "b"))
        again = await committer.commit(batch("retried", "a", "b"))
        other = await committer.commit(batch("next", "c"))
        assert first == again == Committed("retried", 1, 2, logged=True)
        assert other == Committed("next", 3, 3, logged=True)
        assert await db.seqs() == [1, 2, 3]
        assert (await db.counts())["batches"] == 2
        assert message_seqs(await queues.take(queues.names[0], 2)) == [1, 2, 3], "the retry is not published again"
        assert p.metrics.registry.get_sample_value("dlopbox_batch_replays_total") == 1
        assert p.sequence.recall("early") is None, "refused before numbering: no seqs spent"


async def test_recovery_republishes_what_the_journal_never_saw_then_drains_it_and_resumes_numbering(
        rabbit, mongo, mongo_db, client_queues):
    settings = settings_for(rabbit, mongo, mongo_db)
    async with connected(settings) as p, mongo_reader(mongo, mongo_db) as db, \
            bound_queues(rabbit, client_queues[:1]) as queues:
        await p.eventlog.write(batch("seen", "a", "b").numbered(1))
        await p.eventlog.mark_journaled(2)
        await p.eventlog.write(batch("never-journaled", "c").numbered(3))
        # A start: the journal is empty, and the batch past the journal mark is published again.
        assert await recover(p.eventlog, p.amqp, p.sequence, settings.backend_timeout) == 2
        assert message_seqs(await queues.take(queues.names[0], 1)) == [3]
        assert (p.sequence.next_seq, p.sequence.logged_through) == (4, 3)
        # The next start: a batch that reached the journal only (MongoDB was down) is drained into the log,
        # with the republished copy of seq 3 (logged already: written once).
        await p.amqp.publish(batch("journal-only", "d", "e").numbered(4))
        await queues.take(queues.names[0], 1)
        sequence = Sequence(p.metrics)
        assert await recover(p.eventlog, p.amqp, sequence, settings.backend_timeout) == 5
        assert await db.seqs() == [1, 2, 3, 4, 5] and (await db.counts())["batches"] == 3
        assert (sequence.next_seq, sequence.logged_through) == (6, 5)
        assert [sequence.recall(b) for b in ("seen", "never-journaled", "journal-only")] == [(1, 2), (3, 3), (4, 5)]
        assert await p.eventlog.journaled_through() == 5
        assert p.amqp.journal is not None
        assert await p.amqp.journal.get(fail=False, timeout=settings.backend_timeout) is None, "the drain acked all"
        assert await queues.depth(queues.names[0]) == 0, "nothing republished past the new mark"


@contextlib.asynccontextmanager
async def keeping(p: Parts) -> AsyncIterator[JournalKeeper]:
    closing = asyncio.Event()
    keeper = JournalKeeper(p.settings, p.metrics, p.sequence, p.eventlog, p.amqp, p.log_lock, closing)
    task = asyncio.create_task(keeper.keep())
    try:
        yield keeper
    finally:
        closing.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_keeper_writes_what_the_log_lacks_leaves_log_degraded_and_marks_the_journal(rabbit, mongo, mongo_db):
    settings = settings_for(rabbit, mongo, mongo_db)
    async with connected(settings) as p, mongo_reader(mongo, mongo_db) as db:
        p.sequence.resume(0, [])
        for name in ("one", "two"):
            pending = p.sequence.number(batch(name, f"{name}-a", f"{name}-b"))
            await p.amqp.publish(pending.batch)
            p.sequence.published()
        p.sequence.degrade(1)  # the direct writes failed: only the keeper writes now
        async with keeping(p) as keeper:
            await eventually(lambda: p.sequence.logged_through == 4, timeout=30, what="the keeper logging both")
            assert not p.sequence.degraded
            assert keeper.journaled == 4
            await keeper.write_mark()
        assert await db.seqs() == [1, 2, 3, 4]
        assert await p.eventlog.journaled_through() == 4


async def test_the_keeper_never_numbers_again_what_an_earlier_run_published(rabbit, mongo, mongo_db):
    settings = settings_for(rabbit, mongo, mongo_db)
    async with connected(settings) as p, mongo_reader(mongo, mongo_db) as db:
        p.sequence.resume(0, [])
        await p.amqp.publish(batch("earlier-run", "x", "y", "z").numbered(1))
        async with keeping(p):
            await eventually(lambda: p.sequence.logged_through == 3, timeout=30, what="the keeper logging it")
        assert p.sequence.next_seq == 4 and p.sequence.recall("earlier-run") == (1, 3)
        assert await db.seqs() == [1, 2, 3]
