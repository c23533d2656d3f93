"""The interface's RabbitMQ side: the confirmed publishing channel, the exchange and the journal queue."""

from __future__ import annotations

import time

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractQueue,
    AbstractRobustConnection,
)

from .. import broker
from ..events import Batch
from ..settings import InterfaceSettings
from .metrics import Metrics

JOURNAL_PREFETCH = 64


class Unavailable(Exception):
    """A backend cannot take the batch now; the watcher retries later (503)."""


class Amqp:
    """One robust connection: a publisher-confirm channel to the exchange and a consumer channel on the journal."""

    def __init__(self, settings: InterfaceSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.connection: AbstractRobustConnection | None = None
        self.channel: AbstractChannel | None = None
        self.exchange: AbstractExchange | None = None
        self.journal: AbstractQueue | None = None
        #: For reading client queues' depths: a passive declare of a missing queue closes its channel.
        self._inspect: AbstractChannel | None = None

    async def open(self) -> None:
        timeout = self.settings.backend_timeout
        self.connection = await aio_pika.connect_robust(broker.amqp_url(self.settings.amqp_url), timeout=timeout,
                                                        reconnect_interval=1)
        self.channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        # The exchange comes from the broker definitions: only check that it is there.
        self.exchange = await self.channel.get_exchange(self.settings.exchange, ensure=True)
        consumer = await self.connection.channel()
        await consumer.set_qos(prefetch_count=JOURNAL_PREFETCH)
        self.journal = await consumer.declare_queue(broker.JOURNAL_QUEUE, durable=True, arguments=broker.QUORUM)
        await self.journal.bind(self.settings.exchange, routing_key="")

    async def close(self) -> None:
        connection, self.connection = self.connection, None
        self.channel = self.exchange = self.journal = self._inspect = None
        if connection is not None:
            await connection.close()

    def up(self) -> bool:
        connection, channel = self.connection, self.channel
        return (connection is not None and channel is not None and not connection.is_closed
                and connection.connected.is_set() and not channel.is_closed)

    async def queue_counts(self, names: list[str]) -> dict[str, tuple[int, int] | None]:
        """(messages ready, consumers) of each queue, None for a queue that does not exist."""
        counts: dict[str, tuple[int, int] | None] = {}
        for name in names:
            if self.connection is None or not self.up():
                break
            if self._inspect is None or self._inspect.is_closed:
                self._inspect = await self.connection.channel()
            try:
                # Not robust: a robust channel answers a passive declare it has seen from its cache.
                queue = await self._inspect.declare_queue(name, passive=True, robust=False,
                                                          timeout=self.settings.backend_timeout)
            except aio_pika.exceptions.ChannelClosed:
                counts[name] = None
                self._inspect = None
                continue
            result = queue.declaration_result
            counts[name] = (result.message_count or 0, result.consumer_count or 0)
        return counts

    async def publish(self, batch: Batch) -> None:
        """Publish a numbered batch and wait for its confirm (bounded by the backend timeout)."""
        if self.exchange is None:
            raise aio_pika.exceptions.ChannelInvalidStateError("not connected to RabbitMQ")
        started = time.perf_counter()
        await self.exchange.publish(broker.batch_message(batch), routing_key="", timeout=self.settings.backend_timeout)
        self.metrics.publish_seconds.observe(time.perf_counter() - started)
