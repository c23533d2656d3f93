"""Found by the fault suite, pinned on the host: the journal keeper after a RabbitMQ restart.

After a broker restart the keeper's queue iterator closed on a dead channel, which skips
Basic.Cancel, so aio-pika's robust queue restored that consumer on reconnect next to the
keeper's new one: the journal was split between a live consumer and a ghost nobody read.
The keeper then logged every other batch as it came, ahead of the batch before it ("the
log has a gap"), and the state collection (and so the manifest) was computed out of order.
"""

from __future__ import annotations

import asyncio
import logging

import aio_pika
import aiohttp
import pytest

from dlopbox import broker
from dlopbox.events import Event, Op
from dlopbox.tree import Tree
from tests.support.interface_harness import (
    mongo_reader,
    post_batch,
    running,
    settings_for,
    write_event,
)
from tests.support.polling import eventually
from tests.test_interface_faults import stopped

pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("clean_journal")]


async def journal_consumers(rabbit) -> int:
    connection = await aio_pika.connect(rabbit.admin_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(broker.JOURNAL_QUEUE, passive=True)
        return queue.declaration_result.consumer_count


async def test_after_a_rabbitmq_restart_the_journal_has_one_consumer_and_the_log_stays_in_order(
        rabbit, mongo, mongo_db, caplog):
    caplog.set_level(logging.INFO, logger="dlopbox.interface")
    async with running(settings_for(rabbit, mongo, mongo_db)) as svc, mongo_reader(mongo, mongo_db) as db, \
            aiohttp.ClientSession() as http:
        await eventually(lambda: _equals(journal_consumers(rabbit), 1), timeout=30, what="the keeper consuming")
        # The keeper must be busy when the broker goes away: its ack then fails on the dead channel.
        stop = asyncio.Event()

        async def keep_posting() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                batch = [write_event(f"busy/{n}/{j}", bytes([j])) for j in range(50)]
                while (await post_batch(http, svc.url, batch, f"busy-{n}"))[0] != 200:
                    await asyncio.sleep(0.2)

        poster = asyncio.create_task(keep_posting())
        await asyncio.sleep(2)
        async with stopped(rabbit):
            await asyncio.sleep(1)
        await asyncio.sleep(2)
        stop.set()
        await poster

        async def healthy() -> bool:
            async with http.get(svc.url + "/healthz") as r:
                return r.status == 200
        await eventually(healthy, timeout=90, interval=0.5, what="the interface healthy again")
        await asyncio.sleep(3)  # aio-pika restores consumers a moment after the reconnect
        assert await journal_consumers(rabbit) == 1, "a ghost consumer shares the journal with the keeper"

        # Batches that depend on each other: each moves the directory the previous one filled.
        model = Tree([])
        for i in range(40):
            events = [Event(Op.MKDIR, f"d{i}", is_dir=True, mode=0o755), write_event(f"d{i}/f", bytes([i]))]
            if i:
                events.append(Event(Op.MOVE, f"d{i - 1}", dest=f"d{i}/prev", is_dir=True))
            status, reply = await post_batch(http, svc.url, events)
            assert status == 200, reply
            for e in events:
                model.apply(e)
        await eventually(lambda: _logged(db, reply["last_seq"]), timeout=60, what="every batch logged")
        gaps = [r.getMessage() for r in caplog.records if r.name.startswith("dlopbox.interface") and "gap" in r.getMessage()]
        assert gaps == []
        state = {path: (doc["is_dir"], doc.get("digest")) for path, doc in (await db.state()).items()
                 if not path.startswith("busy")}
        assert state == {p: (e.is_dir, e.digest) for p, e in model.entries.items()}


async def _equals(value, expected) -> bool:
    return await value == expected


async def _logged(db, last: int) -> bool:
    return await db.seqs() == list(range(1, last + 1))
