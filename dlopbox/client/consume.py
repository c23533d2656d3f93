"""Consuming this slave's queue: connect, declare and bind it, and feed its messages to the Sequencer.

The queue is declared and bound before anything else, so that on a first start no event
can fall between the manifest and the queue. A resync (first start, a lost queue, a gap,
an event that could not be applied) runs in the same loop as the messages, between two.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aio_pika
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from .. import broker
from ..api import InterfaceAPI
from ..errors import AMQP_ERRORS, HTTP_ERRORS, APIError
from ..events import EventError
from ..retry import Backoff
from ..settings import ClientSettings
from .acks import Acks, ack_or_reject
from .fate import UnexplainedWrites
from .order import Sequencer
from .resync import Resync, ResyncFailed
from .schedule import PathScheduler

log = logging.getLogger(__name__)

MAX_BACKOFF = 30.0
#: A resync waits on the interface (its manifest); retried often, so that it ends soon after that is back.
RESYNC_MAX_DELAY = 5.0

RESYNC = object()  # an inbox item: apply failed somewhere, repair from the manifest


async def connect(amqp_url: str, stop: asyncio.Event) -> AbstractRobustConnection | None:
    """The first connection, retried until it works: later reconnections are aio-pika's."""
    backoff = Backoff(0.5, MAX_BACKOFF, stop)
    while not stop.is_set():
        try:
            return await aio_pika.connect_robust(broker.amqp_url(amqp_url))
        except AMQP_ERRORS as exc:
            log.warning("cannot connect to RabbitMQ: %s; retrying in %.1fs", exc, backoff.delay)
        if not await backoff.wait():
            break
    return None


class Repairs:
    """Resyncs asked for (an event could not be applied) and resyncs run (the target made equal to the manifest)."""

    def __init__(self, inbox: asyncio.Queue[object], acks: Acks, scheduler: PathScheduler, resync: Resync) -> None:
        self.inbox = inbox
        self.acks = acks
        self.scheduler = scheduler
        self.resync = resync
        self.requested = False  # a RESYNC is in the inbox and no resync has run since

    def request(self, failed_seq: int) -> None:
        self.acks.hold_before(failed_seq)
        if not self.requested:
            self.requested = True
            self.inbox.put_nowait(RESYNC)

    async def run(self, reason: str) -> int:
        """Drain in-flight work, then make the target equal to the manifest; retried until it works.

        Returns the seq the target now reflects."""
        await self.scheduler.drain()
        self.requested = False
        log.info("resyncing from the manifest (%s)", reason)
        backoff = Backoff(1.0, RESYNC_MAX_DELAY)
        while True:
            try:
                seq = await self.resync.run(at_least=self.acks.applied)
                break
            except (ResyncFailed, APIError, OSError) as exc:
                log.error("resync failed: %s; retrying in %.0fs", exc, backoff.delay)
                await backoff.wait()
        self.requested = False
        return self.acks.resynced(seq)


class Consumer:
    """Takes this slave's messages off its queue, one at a time, with the resyncs between them."""

    def __init__(self, settings: ClientSettings, target: Path, api: InterfaceAPI, inbox: asyncio.Queue[object],
                 sequencer: Sequencer, repairs: Repairs, acks: Acks, unexplained: UnexplainedWrites) -> None:
        self.settings = settings
        self.target = target
        self.queue_name = broker.queue_name(settings.client_id)
        self.api = api
        self.inbox = inbox
        self.sequencer = sequencer
        self.repairs = repairs
        self.acks = acks
        self.unexplained = unexplained
        self._queue: AbstractQueue | None = None
        self._tags: list[str] = []  # of the consumer, once started

    async def open(self, connection: AbstractRobustConnection, fresh: bool) -> None:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=self.settings.prefetch)
        # Bound before the manifest is read: every event after the manifest's seq is in the queue.
        self._queue = await broker.declare_bound_queue(channel, self.settings.exchange, self.queue_name)
        log.info("client %s: queue %s, target %s, at seq %s", self.settings.client_id, self.queue_name,
                 self.target, "none (first start)" if fresh else self.acks.applied)

    async def run(self, fresh: bool) -> None:
        queue = self._queue
        assert queue is not None
        if fresh:
            await self._resync("first start")
        elif await self._queue_was_lost(queue):
            await self._resync("the queue is empty but the master is ahead")
        self._tags.append(await queue.consume(self._on_message))
        loop = asyncio.get_running_loop()
        sequencer = self.sequencer
        while True:
            deadline = sequencer.gap_deadline
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                async with asyncio.timeout(timeout):  # not wait_for, which can swallow a cancellation on 3.11
                    item = await self.inbox.get()
            except TimeoutError:
                log.warning("seq %d..%d never arrived; repairing the gap from the manifest",
                            sequencer.dispatched + 1, sequencer.first_held - 1)
                await self._resync("gap")
                await sequencer.gap_repaired()
                continue
            if item is RESYNC:
                if self.repairs.requested:  # not already done by a gap repair meanwhile
                    await self._resync("an event could not be applied")
                    await sequencer.release_held()
            else:
                assert isinstance(item, AbstractIncomingMessage)
                await self._receive(item)

    async def stop(self) -> None:
        """No more deliveries: what is still in flight is redelivered to the next consumer."""
        queue = self._queue
        if queue is None:
            return
        for tag in self._tags:
            try:
                async with asyncio.timeout(2):
                    await queue.cancel(tag)
            except AMQP_ERRORS as exc:
                log.debug("cancelling the consumer: %s", exc)
        self._tags.clear()

    async def _resync(self, reason: str) -> None:
        seq = await self.repairs.run(reason)
        self.sequencer.resynced(seq)
        self.unexplained.clear()  # the manifest brought whatever those writes were missing

    async def _queue_was_lost(self, queue: AbstractQueue) -> bool:
        """An empty queue while the log is ahead: it was deleted or recreated since our last ack."""
        result = queue.declaration_result
        if result is None or result.message_count:
            return False
        try:
            head = (await self.api.clients()).get("head")
        except HTTP_ERRORS as exc:
            log.debug("cannot ask the interface for its head seq: %s", exc)
            return False
        return isinstance(head, int) and head > self.acks.applied

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self.inbox.put_nowait(message)

    async def _receive(self, message: AbstractIncomingMessage) -> None:
        try:
            batch = broker.parse_message(message.body)
        except EventError as exc:
            log.error("REFUSED message %s: %s; it is dropped. Body: %.2000r", message.message_id, exc, message.body)
            await ack_or_reject(message.reject(requeue=False))
            return
        await self.sequencer.offer(batch, message)
