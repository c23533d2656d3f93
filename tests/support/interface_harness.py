"""Run the real interface in-process on a free port, and read what it left in MongoDB and RabbitMQ."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aiohttp
from pymongo import AsyncMongoClient

from dlopbox import broker
from dlopbox.events import Batch, Event, Op
from dlopbox.interface import service
from dlopbox.settings import InterfaceSettings
from tests.support.polling import eventually
from tests.support.services import free_port

TOKEN = "write-" + secrets.token_hex(8)
READ_TOKEN = "read-" + secrets.token_hex(8)
WRITE = {"Authorization": f"Bearer {TOKEN}"}
READ = {"Authorization": f"Bearer {READ_TOKEN}"}


def settings_for(rabbit: Any, mongo: Any, mongo_db: str, **overrides: Any) -> InterfaceSettings:
    values = dict(host="127.0.0.1", port=free_port(), token=TOKEN, read_token=READ_TOKEN, mongo_url=mongo.url,
                  mongo_db=mongo_db, amqp_url=rabbit.interface_url, backend_timeout=2.0)
    return InterfaceSettings(**{**values, **overrides})


class Running:
    """One interface process-equivalent: ``run(settings, stop=...)`` in a task."""

    def __init__(self, settings: InterfaceSettings) -> None:
        self.settings = settings
        self.url = f"http://127.0.0.1:{settings.port}"
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self, *, wait_ready: bool = True) -> None:
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(service.run(self.settings, stop=self.stop))
        async with aiohttp.ClientSession() as session:
            async def listening() -> bool:
                assert self.task is not None
                if self.task.done():
                    self.task.result()
                try:
                    async with session.get(self.url + "/healthz") as r:
                        return r.status == 200 or not wait_ready
                except aiohttp.ClientConnectionError:
                    return False
            await eventually(listening, what="interface ready")

    async def shutdown(self) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 60)


@contextlib.asynccontextmanager
async def running(settings: InterfaceSettings, *, wait_ready: bool = True) -> AsyncIterator[Running]:
    service = Running(settings)
    await service.start(wait_ready=wait_ready)
    try:
        yield service
    finally:
        await service.shutdown()


def write_event(path: str, content: bytes = b"x", mode: int = 0o644) -> Event:
    return Event(Op.WRITE, path, size=len(content), mtime_ns=1_700_000_000_000_000_000, mode=mode,
                 digest=hashlib.sha256(content).hexdigest())


def batch_body(events: list[Event], batch_id: str | None = None) -> bytes:
    return Batch(batch_id or "b-" + secrets.token_hex(8), tuple(events)).to_json()


async def post_batch(session: aiohttp.ClientSession, url: str, events: list[Event], batch_id: str | None = None
                     ) -> tuple[int, dict[str, Any]]:
    async with session.post(url + "/events", data=batch_body(events, batch_id), headers=WRITE) as r:
        return r.status, await r.json()


class Mongo:
    """Direct reads of the interface's database, for assertions."""

    def __init__(self, url: str, db: str) -> None:
        self.client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(url, serverSelectionTimeoutMS=5000)
        self.db = self.client[db]

    async def seqs(self) -> list[int]:
        return [d["seq"] async for d in self.db.events.find({}, {"seq": 1}).sort("seq", 1)]

    async def counts(self) -> dict[str, int]:
        return {name: await self.db[name].count_documents({}) for name in ("events", "state", "batches")}

    async def state(self) -> dict[str, dict[str, Any]]:
        return {d["_id"]: d async for d in self.db.state.find()}

    async def close(self) -> None:
        await self.client.close()


@contextlib.asynccontextmanager
async def mongo_reader(mongo: Any, db: str) -> AsyncIterator[Mongo]:
    reader = Mongo(mongo.url, db)
    try:
        yield reader
    finally:
        await reader.close()


class ClientQueues:
    """Queues bound to the exchange with the clients' (consume-only) user, as real clients do."""

    def __init__(self, connection: aio_pika.abc.AbstractConnection, names: list[str]) -> None:
        self.connection = connection
        self.names = names

    async def depth(self, name: str) -> int:
        channel = await self.connection.channel()
        async with channel:
            queue = await channel.declare_queue(name, passive=True)
            assert queue.declaration_result.message_count is not None
            return queue.declaration_result.message_count

    async def take(self, name: str, count: int, timeout: float = 60.0) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Exactly ``count`` messages (acked), then check that no further one arrives."""
        channel = await self.connection.channel()
        async with channel:
            queue = await channel.declare_queue(name, passive=True)
            got: list[aio_pika.abc.AbstractIncomingMessage] = []

            async def enough() -> bool:
                while (message := await queue.get(no_ack=True, fail=False)) is not None:
                    got.append(message)
                return len(got) >= count

            await eventually(enough, timeout=timeout, what=f"{count} messages in {name}")
            await asyncio.sleep(0.3)
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                got.append(message)
            return got


@contextlib.asynccontextmanager
async def bound_queues(rabbit: Any, ids: list[str], exchange: str = "dlopbox.events") -> AsyncIterator[ClientQueues]:
    connection = await aio_pika.connect(rabbit.client_url)
    async with connection:
        channel = await connection.channel()
        names = [broker.queue_name(i) for i in ids]
        for name in names:
            queue = await broker.declare_bound_queue(channel, exchange, name)
            await queue.purge()
        yield ClientQueues(connection, names)


def message_seqs(messages: list[aio_pika.abc.AbstractIncomingMessage]) -> list[int]:
    """Every seq carried by these messages, in the order received (checking each message's headers)."""
    seqs: list[int] = []
    for m in messages:
        batch = broker.parse_message(m.body)
        assert m.message_id == batch.batch_id
        assert (m.headers["first_seq"], m.headers["last_seq"]) == (batch.first_seq, batch.last_seq)
        seqs.extend(e.seq for e in batch.events if e.seq is not None)
    return seqs


def numbered_events(messages: list[aio_pika.abc.AbstractIncomingMessage]) -> list[Event]:
    return [e for m in messages for e in broker.parse_message(m.body).events]


def without_seq(events: list[Event]) -> list[dict[str, Any]]:
    return [{k: v for k, v in e.to_dict().items() if k != "seq"} for e in events]


def ndjson(text: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def replace(event: Event, **changes: Any) -> Event:
    return dataclasses.replace(event, **changes)
