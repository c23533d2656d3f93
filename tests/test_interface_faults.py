"""The interface while RabbitMQ or MongoDB is down: nothing acknowledged is lost, nothing applied twice.

These tests stop and restart the session's RabbitMQ and SecantusDB nodes (same port, same
data), so they live in their own file and always restore the node before returning.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator

import aio_pika
import aiohttp
import pymongo
import pytest
from pymongo.errors import PyMongoError

from dlopbox import broker
from dlopbox.events import Batch, Entry, Event, Op
from dlopbox.interface.eventlog import EventLog
from dlopbox.tree import Tree
from tests.support.interface_harness import (
    READ,
    WRITE,
    batch_body,
    bound_queues,
    message_seqs,
    mongo_reader,
    numbered_events,
    post_batch,
    running,
    settings_for,
    write_event,
)
from tests.support.polling import eventually

pytestmark = pytest.mark.usefixtures("clean_journal")


@contextlib.asynccontextmanager
async def stopped(node) -> AsyncIterator[None]:
    """Stop a session node for the duration of the block; it is running again afterwards, whatever happens."""
    await asyncio.to_thread(node.stop)
    try:
        yield
    finally:
        if not node.running:
            await asyncio.to_thread(node.start)


async def journal_depth(rabbit, expected: int) -> bool:
    connection = await aio_pika.connect(rabbit.admin_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(broker.JOURNAL_QUEUE, passive=True)
        return queue.declaration_result.message_count == expected


async def health(http: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
    async with http.get(url + "/healthz") as r:
        return r.status, await r.json()


async def test_with_rabbitmq_stopped_posts_get_503_and_the_retried_batch_lands_once(rabbit, mongo, mongo_db,
                                                                                     client_queues):
    async with bound_queues(rabbit, client_queues[:2]):
        pass  # declared and bound; read again after the broker's restart
    first = [write_event("before.txt", b"1"), Event(Op.MKDIR, "dir", is_dir=True, mode=0o755)]
    retried = [write_event("dir/during.txt", b"2"), Event(Op.DELETE, "before.txt")]
    async with running(settings_for(rabbit, mongo, mongo_db)) as svc, mongo_reader(mongo, mongo_db) as db, \
            aiohttp.ClientSession() as http:
        assert (await post_batch(http, svc.url, first, "first"))[0] == 200
        async with stopped(rabbit):
            for _ in range(3):
                status, reply = await post_batch(http, svc.url, retried, "retried")
                assert status == 503, reply
            async with http.post(svc.url + "/events", data=batch_body(retried, "retried"), headers=WRITE) as r:
                assert r.status == 503 and r.headers["Retry-After"]
            status, body = await health(http, svc.url)
            assert status == 503 and body["rabbitmq"] == "down" and body["mongodb"] == "ok"
            # Nothing of the refused batch is anywhere: not numbered, not logged, not in the state.
            assert await db.seqs() == [1, 2]
            assert set(await db.state()) == {"before.txt", "dir"}
            assert body["head"] == 2
        # The broker is back: the watcher's retry lands, once, right after the first batch.
        async def retry() -> dict | None:
            status, reply = await post_batch(http, svc.url, retried, "retried")
            return reply if status == 200 else None
        reply = await eventually(retry, timeout=90, interval=0.5, what="the retried batch accepted")
        assert (reply["first_seq"], reply["last_seq"], reply["logged"]) == (3, 4, True)
        status, again = await post_batch(http, svc.url, retried, "retried")
        assert (status, again) == (200, reply)
        status, after = await post_batch(http, svc.url, [write_event("after.txt")], "after")
        assert (status, after["first_seq"]) == (200, 5)
        assert await db.seqs() == [1, 2, 3, 4, 5]
        assert set(await db.state()) == {"dir", "dir/during.txt", "after.txt"}
        # The journal keeper consumes again after the broker's restart.
        await eventually(lambda: journal_depth(rabbit, 0), timeout=30, what="the journal consumed")
        async with bound_queues(rabbit, []) as queues:
            for name in ("dlopbox.client." + i for i in client_queues[:2]):
                messages = await queues.take(name, 3)
                assert [m.message_id for m in messages] == ["first", "retried", "after"]
                assert message_seqs(messages) == [1, 2, 3, 4, 5]


async def test_with_mongodb_stopped_sync_keeps_flowing_and_the_log_catches_up(rabbit, mongo, mongo_db,
                                                                                client_queues):
    batches = [[write_event(f"b{i}/f{j}", bytes([i, j])) for j in range(3)] for i in range(6)]
    batches[3].append(Event(Op.MOVE, "b0/f0", dest="moved"))
    batches[4].append(Event(Op.DELETE, "b1/f1"))
    ends = [sum(len(b) for b in batches[:i + 1]) for i in range(len(batches))]  # last seq of each batch
    async with bound_queues(rabbit, client_queues[:1]) as queues, \
            running(settings_for(rabbit, mongo, mongo_db)) as svc, aiohttp.ClientSession() as http:
        status, reply = await post_batch(http, svc.url, batches[0], "m0")
        assert (status, reply["logged"]) == (200, True)
        async with stopped(mongo):
            for i in (1, 2, 3):
                status, reply = await post_batch(http, svc.url, batches[i], f"m{i}")
                assert status == 200, reply
                assert reply["logged"] is False, "MongoDB is down: the batch is durable in RabbitMQ only"
            # Clients keep receiving while the log is down.
            messages = await queues.take(queues.names[0], 4)
            assert message_seqs(messages) == list(range(1, ends[3] + 1))
            status, body = await health(http, svc.url)
            assert status == 503 and body["mongodb"].startswith("down") and body["log_degraded"] is True
            assert (body["head"], body["logged"]) == (ends[3], ends[0])

            async def manifest() -> tuple[int, str]:
                async with http.get(svc.url + "/manifest", headers=READ) as r:
                    return r.status, r.headers.get("X-Dlopbox-Seq", "")

            # A client resyncing now is held until the log has caught up, not sent away to back off.
            resyncing = asyncio.create_task(manifest())
            await asyncio.sleep(0.5)
            assert not resyncing.done()
        assert await asyncio.wait_for(resyncing, 60) == (200, str(ends[3]))
        # MongoDB is back: the journal keeper writes the log in order, then direct writes resume.
        async def caught_up() -> bool:
            status, body = await health(http, svc.url)
            return status == 200 and body["logged"] == ends[3] and not body["log_degraded"]
        await eventually(caught_up, timeout=90, interval=0.3, what="the log caught up")
        for i in (4, 5):
            status, reply = await post_batch(http, svc.url, batches[i], f"m{i}")
            assert (status, reply["logged"]) == (200, True)
        messages = await queues.take(queues.names[0], 2)
        assert message_seqs(messages) == list(range(ends[3] + 1, ends[5] + 1))
    async with mongo_reader(mongo, mongo_db) as db:
        assert await db.seqs() == list(range(1, ends[5] + 1)), "every seq exactly once"
        expected = Tree()
        for seq, e in enumerate((e for b in batches for e in b), 1):
            expected.apply(e.with_seq(seq))
        state = await db.state()
        assert Tree(Entry(p, d["is_dir"], d.get("size"), d.get("mtime_ns"), d.get("mode"), d.get("digest"), d.get("seq"))
                    for p, d in state.items()) == expected


async def test_a_restart_while_mongodb_is_down_loses_nothing(rabbit, mongo, mongo_db, client_queues):
    settings = settings_for(rabbit, mongo, mongo_db)
    async with bound_queues(rabbit, client_queues[:1]) as queues, aiohttp.ClientSession() as http:
        async with running(settings) as svc:
            assert (await post_batch(http, svc.url, [write_event("a")], "r0"))[0] == 200
            async with stopped(mongo):
                status, reply = await post_batch(http, svc.url, [write_event("b"), write_event("c")], "r1")
                assert (status, reply["logged"]) == (200, False)
                await svc.shutdown()
        # MongoDB is back before the interface: it drains its journal into the log first.
        async with running(settings) as svc:
            status, reply = await post_batch(http, svc.url, [write_event("b"), write_event("c")], "r1")
            assert (status, reply) == (200, {"batch_id": "r1", "first_seq": 2, "last_seq": 3, "logged": True})
            status, reply = await post_batch(http, svc.url, [write_event("d")], "r2")
            assert (status, reply["first_seq"], reply["logged"]) == (200, 4, True)
        messages = await queues.take(queues.names[0], 3)
        assert [m.message_id for m in messages] == ["r0", "r1", "r2"]
        assert [e.path for e in numbered_events(messages)] == ["a", "b", "c", "d"]
    async with mongo_reader(mongo, mongo_db) as db:
        assert await db.seqs() == [1, 2, 3, 4]
        assert set(await db.state()) == {"a", "b", "c", "d"}


async def test_a_frozen_broker_leaves_the_batch_pending_and_never_half_logged(rabbit, mongo, mongo_db,
                                                                               client_queues):
    """No confirm arrives (the broker is frozen, its sockets open): the batch is numbered but
    not logged (its transaction waits for the confirm, then aborts) and blocks every later
    batch until it is published; its retry keeps its seqs."""
    settings = settings_for(rabbit, mongo, mongo_db, backend_timeout=1.0)
    async with bound_queues(rabbit, client_queues[:1]) as queues, running(settings) as svc, \
            mongo_reader(mongo, mongo_db) as db, aiohttp.ClientSession() as http:
        assert (await post_batch(http, svc.url, [write_event("first")], "first"))[0] == 200
        os.killpg(rabbit.proc.pid, signal.SIGSTOP)
        try:
            status, reply = await post_batch(http, svc.url, [write_event("frozen-1"), write_event("frozen-2")], "frozen")
            assert status == 503, reply
            assert await db.seqs() == [1], "a batch RabbitMQ did not confirm must not be logged"
            status, body = await health(http, svc.url)
            assert body["pending"] is True and body["head"] == 1
            status, reply = await post_batch(http, svc.url, [write_event("other")], "other")
            assert status == 503, "a later batch must not overtake the pending one"
            assert await db.seqs() == [1]
        finally:
            os.killpg(rabbit.proc.pid, signal.SIGCONT)

        async def retry() -> dict | None:
            status, reply = await post_batch(http, svc.url, [write_event("frozen-1"), write_event("frozen-2")], "frozen")
            return reply if status == 200 else None
        reply = await eventually(retry, timeout=60, interval=0.5, what="the pending batch published")
        assert (reply["first_seq"], reply["last_seq"], reply["logged"]) == (2, 3, True)
        status, reply = await post_batch(http, svc.url, [write_event("other")], "other")
        assert (status, reply["first_seq"]) == (200, 4)
        assert await db.seqs() == [1, 2, 3, 4]
        # Republishing an unconfirmed batch may deliver it twice, always with the same seqs.
        messages = await queues.take(queues.names[0], 3)
        distinct = {}
        for m in messages:
            distinct.setdefault(m.message_id, m.body)
            assert m.body == distinct[m.message_id]
        assert list(distinct) == ["first", "frozen", "other"]
        assert sorted(set(message_seqs(messages))) == [1, 2, 3, 4]


# -- transactions left open ------------------------------------------------------------------

KILLED_WRITER = r"""
import asyncio, sys
from dlopbox.interface.eventlog import EventLog
from dlopbox.events import Batch, Event, Op

async def main():
    log = EventLog(sys.argv[1], sys.argv[2], 5.0)
    async def hang():
        print("staged", flush=True)
        await asyncio.sleep(3600)
        return True
    event = Event(Op.WRITE, "killed", size=1, mtime_ns=1, mode=0o644, digest="0" * 64)
    await log.write(Batch("killed-writer", (event,)).numbered(1), hang)

asyncio.run(main())
"""


def one_write(first: int, path: str) -> Batch:
    return Batch(f"b{first}-{path}", (write_event(path),)).numbered(first)


async def test_a_new_interface_ends_the_transaction_a_killed_one_left_open(mongo, mongo_db):
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", KILLED_WRITER, mongo.url, mongo_db,
                                                stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"staged\n"
    proc.kill()  # SIGKILL mid-transaction: nothing ends its session
    await proc.wait()
    log = EventLog(mongo.url, mongo_db, 5.0)
    try:
        async with log.client.start_session() as other:
            # The open transaction holds what it wrote (for a minute, left alone): batch record 1.
            with pytest.raises(PyMongoError), pymongo.timeout(1.5):
                async with await other.start_transaction():
                    await log.batches.insert_one({"_id": 1, "probe": True}, session=other)
        with pymongo.timeout(3.0):
            assert await log.write(one_write(1, "after"))
            assert [e["path"] for e in await log.events_since(0, None, 10)] == ["after"]
    finally:
        await log.close()


async def test_the_journal_is_drained_in_seq_order_whatever_order_it_comes_back_in(rabbit, mongo, mongo_db):
    """A batch requeued by an interrupted start can come back behind later ones; the log and state
    must still be written in seq order (here the move would otherwise be applied before the write)."""
    written = Batch("drain-1", (write_event("a", b"1"),)).numbered(1)
    moved = Batch("drain-2", (Event(Op.MOVE, "a", dest="b", size=1, mtime_ns=written.events[0].mtime_ns,
                                    mode=0o644, digest=written.events[0].digest),)).numbered(2)
    connection = await aio_pika.connect(rabbit.admin_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        for batch in (moved, written):  # out of order
            await channel.default_exchange.publish(broker.batch_message(batch), routing_key=broker.JOURNAL_QUEUE)
    async with running(settings_for(rabbit, mongo, mongo_db)):
        pass  # the start drains the journal
    async with mongo_reader(mongo, mongo_db) as db:
        assert await db.seqs() == [1, 2]
        assert sorted(await db.state()) == ["b"]
    assert await journal_depth(rabbit, 0)
