"""Sequencer and Acks driven directly, with real messages from a real RabbitMQ queue and a real target.

Messages are taken off a queue of the test's own without being acknowledged; whether the code
acked them is read back from the broker: an unacked message returns to the queue when its
channel closes.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import aiohttp
import pytest
from aio_pika.abc import AbstractIncomingMessage

from dlopbox import broker
from dlopbox.api import InterfaceAPI
from dlopbox.client.acks import Acks
from dlopbox.client.apply import Applier
from dlopbox.client.download import Downloader
from dlopbox.client.fate import FateFinder, UnexplainedWrites
from dlopbox.client.order import GAP_WAIT, JobRunner, Sequencer
from dlopbox.client.schedule import PathScheduler
from dlopbox.client.state import STATE_DIR, STATE_FILE
from dlopbox.events import Batch, Event, Op

pytestmark = pytest.mark.timeout(60)


class Deliveries:
    """A queue of the test's own: batches published to it, then taken off unacknowledged."""

    def __init__(self, connection: aio_pika.abc.AbstractRobustConnection, name: str) -> None:
        self.connection = connection
        self.name = name
        self.channel: aio_pika.abc.AbstractChannel | None = None

    async def deliver(self, *batches: Batch) -> list[AbstractIncomingMessage]:
        if self.channel is None:
            self.channel = await self.connection.channel()
        queue = await self.channel.declare_queue(self.name, durable=True, arguments=broker.QUORUM)
        for batch in batches:
            await self.channel.default_exchange.publish(broker.batch_message(batch), routing_key=self.name)
        got = []
        while len(got) < len(batches):
            message = await queue.get(no_ack=False, fail=False, timeout=5)
            if message is None:
                await asyncio.sleep(0.02)
            else:
                got.append(message)
        return got

    async def unacked(self) -> list[int]:
        """Close the consuming channel and return the last_seq of every message it left unacked."""
        assert self.channel is not None
        await self.channel.close()
        self.channel = None
        channel = await self.connection.channel()
        queue = await channel.declare_queue(self.name, durable=True, arguments=broker.QUORUM)
        left = []
        while (message := await queue.get(no_ack=True, fail=False, timeout=5)) is not None:
            left.append(message.headers["last_seq"])
        await channel.close()
        return sorted(left)


@pytest.fixture
async def deliveries(amqp_admin, client_queues) -> AsyncIterator[Deliveries]:
    yield Deliveries(amqp_admin, broker.queue_name(client_queues[0]))


class Slave:
    """The client's ordering and acknowledging seams over a real target directory, without the consumer."""

    def __init__(self, target: Path, session: aiohttp.ClientSession, prefetch: int) -> None:
        self.target = target
        self.scheduler = PathScheduler()
        downloader = Downloader(session, "http://127.0.0.1:9/", 1 << 20, 2)  # directories only: never asked
        self.unsynced = downloader.unsynced
        self.acks = Acks(target, "order-test", downloader.unsynced, None)
        self.finder = FateFinder(InterfaceAPI(session, "http://127.0.0.1:9", "unused"))
        self.resyncs: list[int] = []
        unexplained = UnexplainedWrites(self.finder, self.resyncs.append)
        runner = JobRunner(Applier(target, downloader, self.finder), self.acks, unexplained, self.resyncs.append)
        self.sequencer = Sequencer(self.scheduler, runner, self.acks, self.finder.recent, unexplained, prefetch)

    def state_seq(self) -> int:
        return json.loads((self.target / STATE_DIR / STATE_FILE).read_text())["seq"]


@pytest.fixture
async def make_slave(tmp_path: Path) -> AsyncIterator:
    async with aiohttp.ClientSession() as session:
        def make(prefetch: int = 10) -> Slave:
            target = tmp_path / "slave"
            target.mkdir()
            return Slave(target, session, prefetch)
        yield make


def mkdirs(first: int, *paths: str) -> Batch:
    events = [Event(Op.MKDIR, p, is_dir=True, mode=0o755) for p in paths]
    return Batch(f"b{first}-{secrets.token_hex(3)}", tuple(events)).numbered(first)


async def test_messages_out_of_order_are_held_then_dispatched_in_seq_order(make_slave, deliveries: Deliveries):
    slave = make_slave()
    first, second, third = mkdirs(1, "a", "a/b"), mkdirs(3, "a/b/c"), mkdirs(4, "d", "e")
    m3, m2, m1 = await deliveries.deliver(third, second, first)
    await slave.sequencer.offer(third, m3)
    await slave.sequencer.offer(second, m2)
    assert slave.sequencer.dispatched == 0 and slave.sequencer.gap_deadline is not None
    await slave.scheduler.drain()
    assert not (slave.target / "a").exists() and not (slave.target / "d").exists()
    await slave.sequencer.offer(first, m1)
    await slave.scheduler.drain()
    assert [e.seq for e in slave.finder.recent] == [1, 2, 3, 4, 5]
    assert [e.path for e in slave.finder.recent] == ["a", "a/b", "a/b/c", "d", "e"]
    assert all((slave.target / p).is_dir() for p in ("a/b/c", "d", "e"))
    assert slave.sequencer.gap_deadline is None and slave.acks.applied == 5
    await slave.acks.persist()
    assert slave.state_seq() == 5
    assert await deliveries.unacked() == []


async def test_a_gap_gets_a_deadline_which_a_full_prefetch_makes_immediate(make_slave, deliveries: Deliveries):
    slave = make_slave(prefetch=2)
    later, last = mkdirs(3, "c"), mkdirs(4, "d")
    m3, m4 = await deliveries.deliver(later, last)
    loop = asyncio.get_running_loop()
    await slave.sequencer.offer(later, m3)
    deadline = slave.sequencer.gap_deadline
    assert deadline is not None and loop.time() < deadline <= loop.time() + GAP_WAIT
    await slave.sequencer.offer(last, m4)  # as many held as the broker will deliver: nothing else can come
    assert slave.sequencer.gap_deadline is not None and slave.sequencer.gap_deadline <= loop.time()
    assert slave.sequencer.first_held == 3
    # What a gap repair does once the manifest covered seq 3: the held messages go on from there.
    slave.sequencer.resynced(slave.acks.resynced(3))
    await slave.sequencer.gap_repaired()
    await slave.scheduler.drain()
    assert [e.seq for e in slave.finder.recent] == [4] and (slave.target / "d").is_dir()
    assert not (slave.target / "c").exists(), "seq 3 is the manifest's to bring, not the held message's"
    await slave.acks.persist()
    assert slave.state_seq() == 4 and await deliveries.unacked() == []


async def test_a_redelivery_below_what_was_dispatched_is_acked_and_not_applied_again(
        make_slave, deliveries: Deliveries):
    slave = make_slave()
    batch = mkdirs(1, "a", "b")
    first, again = await deliveries.deliver(batch, batch)
    await slave.sequencer.offer(batch, first)
    await slave.scheduler.drain()
    (slave.target / "a").rmdir()  # were it applied again, "a" would come back
    await slave.sequencer.offer(batch, again)
    await slave.scheduler.drain()
    assert [e.seq for e in slave.finder.recent] == [1, 2] and not (slave.target / "a").exists()
    await slave.acks.persist()
    assert await deliveries.unacked() == []


async def test_a_message_is_acked_only_once_all_its_events_are_applied_and_its_seq_is_on_disk(
        make_slave, deliveries: Deliveries):
    slave = make_slave()
    acks = slave.acks
    m2, m4 = await deliveries.deliver(mkdirs(1, "a", "b"), mkdirs(3, "c", "d"))
    acks.ack_later(2, m2)
    acks.ack_later(4, m4)
    acks.complete(1)
    acks.complete(3)  # out of order: seq 2 is still missing
    await acks.persist()
    assert acks.applied == 1 and slave.state_seq() == 1 and slave.unsynced.syncs == 1
    acks.complete(2)
    acks.complete(4)
    acks.hold_before(4)  # seq 4 failed: nothing from it on is claimed until a resync
    await acks.persist()
    assert acks.applied == 4 and slave.state_seq() == 3 and acks.persisted == 3
    acks.resynced(4)
    await acks.persist()
    assert slave.state_seq() == 4 and slave.unsynced.syncs == 3
    assert await deliveries.unacked() == []


async def test_unapplied_events_keep_their_message_unacked_and_off_the_state(make_slave, deliveries: Deliveries):
    slave = make_slave()
    acks = slave.acks
    m2, m4 = await deliveries.deliver(mkdirs(1, "a", "b"), mkdirs(3, "c", "d"))
    acks.ack_later(2, m2)
    acks.ack_later(4, m4)
    for seq in (1, 2, 4):
        acks.complete(seq)
    await acks.persist()
    assert slave.state_seq() == 2
    assert await deliveries.unacked() == [4]
