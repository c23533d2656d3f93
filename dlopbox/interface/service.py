"""`dlopbox interface`: the ingestion API (port 5000).

Every accepted batch gets gap-free seqs and is, concurrently, published to RabbitMQ
(publisher confirm awaited) and written to the MongoDB log and tree state; the MongoDB
transaction commits only after the confirm. One lock (the commit lock) serialises numbering
and publication, so numbering order and publication order agree; it is released once the
batch is confirmed, so the next batch is published while this one is still being logged.
Direct log writes are chained (each starts after the previous one ended), so log order
agrees too; a second lock (the log lock) serialises them with the journal keeper's writes
and with manifest snapshots. POST /events sends its 200 status line and headers once the
batch is published (durable in the client queues and the journal) and its body once the
log write ended, so a watcher may send its next batch before this one is logged.

When a backend fails:
- RabbitMQ down: POST /events answers 503 before numbering anything. A batch whose publish
  failed after it was numbered stays *pending* and is completed before any other commit (or
  by the watcher's retry of the same batch_id); republishing is harmless, clients skip seqs
  they have applied.
- MongoDB down: a published batch is durable in RabbitMQ (client queues and the journal), so
  the reply is 200 with ``logged: false`` and the interface turns *log-degraded*: commits only
  publish, and the journal keeper writes the log from the journal queue in seq order; once
  it has caught up, direct writes resume.
- Restart: the journal is drained into the log, logged batches the journal never saw are
  published again, and numbering resumes after the highest logged seq.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import tempfile
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC
from importlib import resources
from typing import IO, Any

import aio_pika
import pymongo
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aiohttp import web
from pymongo.errors import PyMongoError

from .. import broker
from ..events import INT64_MAX, Batch, EventError
from ..paths import UnsafePathError, check_relpath
from ..settings import InterfaceSettings
from .eventlog import EventLog, Unconfirmed, entry_from_doc
from .metrics import Metrics

log = logging.getLogger(__name__)

#: What aio-pika raises when the broker or the connection fails, plus a confirm timeout.
AMQP_ERRORS: tuple[type[BaseException], ...] = (*aio_pika.exceptions.CONNECTION_EXCEPTIONS, TimeoutError)
#: Batch ids remembered for idempotent retries (a watcher retries within seconds).
RECENT_BATCHES = 100_000
EVENTS_LIMIT = 1000
EVENTS_LIMIT_MAX = 10_000
JOURNAL_PREFETCH = 64
#: The keeper's writes may be big (a large rmdir or move); give them longer than a commit.
KEEPER_TIMEOUT_FACTOR = 12
#: Seconds between two writes of the journal mark (the last seq the keeper has seen in the journal). A mark
#: that lags after a crash only makes the next start republish a few batches the clients then skip.
JOURNAL_MARK_EVERY = 1.0
SPOOL_MEMORY = 1024 * 1024
#: How many backend timeouts a manifest request waits for the log to hold what was published.
MANIFEST_CATCH_UP_FACTOR = 6
MANIFEST_YIELD_EVERY = 1000
STREAM_CHUNK = 256 * 1024
SHUTDOWN_TIMEOUT = 15.0
RETRY_AFTER = "1"


def openapi_spec() -> str:
    """The OpenAPI description of this API, shipped as package data."""
    return resources.files(__package__).joinpath("openapi.yaml").read_text(encoding="utf-8")


class Unavailable(Exception):
    """A backend cannot take the batch now; the watcher retries later (503)."""


@dataclass
class Pending:
    """A numbered batch not yet confirmed by RabbitMQ; nothing else commits before it."""

    batch: Batch
    published: bool = False
    logged: bool = False


@dataclass(frozen=True)
class Committed:
    batch_id: str
    first_seq: int
    last_seq: int
    logged: bool

    def to_json(self) -> dict[str, Any]:
        return {"batch_id": self.batch_id, "first_seq": self.first_seq, "last_seq": self.last_seq,
                "logged": self.logged}


def _seqs(batch: Batch) -> tuple[int, int]:
    assert batch.first_seq is not None and batch.last_seq is not None
    return batch.first_seq, batch.last_seq


def _header_seqs(message: AbstractIncomingMessage) -> tuple[int, int] | None:
    """(first_seq, last_seq) from a queued batch's headers, or None when they are missing or odd."""
    headers = message.headers or {}
    first, last = headers.get("first_seq"), headers.get("last_seq")
    if type(first) is int and type(last) is int and 0 < first <= last:
        return first, last
    return None


class Ingest:
    """The commit path: numbering, fan-out, pending and log-degraded states, the journal keeper."""

    def __init__(self, settings: InterfaceSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.log = EventLog(settings.mongo_url, settings.mongo_db, settings.backend_timeout)
        #: Serialises commits: numbering, publication and the direct log write of one batch.
        self.lock = asyncio.Lock()
        #: Serialises every write to the log and state (direct or from the journal) and snapshots.
        self.log_lock = asyncio.Lock()
        self.ready = asyncio.Event()
        self.next_seq = 1
        #: Every seq up to this one is in the MongoDB log (and the state reflects exactly them).
        self.logged_through = 0
        self.pending: Pending | None = None
        self.degraded = False
        self.known: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self.connection: AbstractRobustConnection | None = None
        self.channel: AbstractChannel | None = None
        self.exchange: AbstractExchange | None = None
        self.journal: AbstractQueue | None = None
        self._task: asyncio.Task[None] | None = None
        #: The direct log write of the batch published last; the next one starts after it ends.
        self._log_tail: asyncio.Future[bool] | None = None
        self._closing = False
        #: The last seq seen in the journal, and the last one written as the journal mark.
        self._journaled = self._journal_marked = 0

    # -- lifetime ----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._serve(), name="dlopbox-interface-backends")

    async def close(self) -> None:
        # A cancellation can surface as a connection error from the consumer being closed:
        # the flag makes sure no retry loop takes it for an outage and carries on.
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except (PyMongoError, *AMQP_ERRORS) as exc:
                log.info("backend task ended while closing: %s: %s", type(exc).__name__, exc)
        tail = self._log_tail
        if tail is not None and not tail.done():
            # Handlers await their own writes; this only bounds a write nobody waits for any more.
            await asyncio.wait([tail], timeout=2 * self.settings.backend_timeout)
            tail.cancel()
            await asyncio.gather(tail, return_exceptions=True)
        await self._write_journal_mark(timeout=min(1.0, self.settings.backend_timeout))
        await self._close_amqp()
        await self.log.close()

    async def _serve(self) -> None:
        await self._connect()
        self.ready.set()
        self.metrics.ready.set(1)
        marker = asyncio.create_task(self._journal_mark_loop(), name="dlopbox-journal-mark")
        try:
            await self._keep_journal()
        finally:
            marker.cancel()
            await asyncio.gather(marker, return_exceptions=True)

    async def _connect(self) -> None:
        """Retry until both backends answer and the journal is recovered; never crash-loop."""
        delay = 0.2
        while True:
            try:
                await self._open()
                return
            except (PyMongoError, *AMQP_ERRORS) as exc:
                if self._closing:
                    raise
                log.warning("backends not ready (%s: %s); retrying in %.1f s", type(exc).__name__, exc, delay)
                await self._close_amqp()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _open(self) -> None:
        timeout = self.settings.backend_timeout
        await self.log.ping()
        await self.log.ensure_indexes()
        self.connection = await aio_pika.connect_robust(broker.amqp_url(self.settings.amqp_url), timeout=timeout,
                                                        reconnect_interval=1)
        self.channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        # The exchange comes from the broker definitions: only check that it is there.
        self.exchange = await self.channel.get_exchange(self.settings.exchange, ensure=True)
        consumer = await self.connection.channel()
        await consumer.set_qos(prefetch_count=JOURNAL_PREFETCH)
        self.journal = await consumer.declare_queue(broker.JOURNAL_QUEUE, durable=True, arguments=broker.QUORUM)
        await self.journal.bind(self.settings.exchange, routing_key="")
        await self._recover()

    async def _close_amqp(self) -> None:
        connection, self.connection = self.connection, None
        self.channel = self.exchange = self.journal = None
        if connection is not None:
            await connection.close()

    async def _recover(self) -> None:
        """Drain the journal into the log, republish what it never saw, resume numbering."""
        assert self.journal is not None
        head = await self.log.head()
        journaled = await self.log.journaled_through()
        # Taken whole, then written in seq order: a batch requeued by an interrupted earlier attempt
        # may come back after the ones behind it.
        messages: list[AbstractIncomingMessage] = []
        batches: list[Batch] = []
        while (message := await self.journal.get(no_ack=False, fail=False, timeout=self.settings.backend_timeout)):
            messages.append(message)
            batch = await self._parse(message)
            if batch is not None:
                batches.append(batch)
        batches.sort(key=lambda b: _seqs(b)[0])
        for batch in batches:
            first, last = _seqs(batch)
            if first > head + 1:
                log.error("journal batch %s (seqs %d-%d) does not follow the log head %d: seqs %d-%d are lost",
                          batch.batch_id, first, last, head, head + 1, first - 1)
            await self.log.write(batch)
            await self.log.mark_journaled(last)
            head, journaled = max(head, last), max(journaled, last)
        for message in messages:
            await message.ack()
        drained = len(batches)
        self.next_seq = head + 1
        self.logged_through = head
        self._journaled = self._journal_marked = journaled
        self.known.clear()
        for batch_id, first, last in await self.log.recent_batches(RECENT_BATCHES):
            self._remember(batch_id, first, last)
        republished = 0
        async for batch in self.log.batches_after(journaled):
            await self._publish(batch)
            republished += 1
        self.metrics.head.set(head)
        self.metrics.logged.set(head)
        log.info("interface ready: log head %d, %d batches drained from the journal, %d republished",
                 head, drained, republished)

    # -- committing --------------------------------------------------------------------------

    def rabbit_up(self) -> bool:
        connection, channel = self.connection, self.channel
        return (connection is not None and channel is not None and not connection.is_closed
                and connection.connected.is_set() and not channel.is_closed)

    @property
    def head(self) -> int:
        """The last seq acknowledged (or acknowledgeable) to the watcher: published, in order."""
        if self.pending is not None:
            return _seqs(self.pending.batch)[0] - 1
        return self.next_seq - 1

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
        async with self.lock:
            if self.pending is not None:
                await self._complete(self.pending)
            known = self.known.get(batch.batch_id)
            if known is not None:
                self.metrics.replays.inc()
                return (Committed(batch.batch_id, *known, logged=known[1] <= self.logged_through),
                        asyncio.ensure_future(self._logged_after_tail(known[1])))
            if not self.rabbit_up():
                raise Unavailable("RabbitMQ is unreachable")
            numbered = batch.numbered(self.next_seq)
            first, last = _seqs(numbered)
            self.next_seq = last + 1
            self._remember(batch.batch_id, first, last)
            self.metrics.batches.inc()
            self.metrics.events.inc(len(numbered.events))
            self.pending = Pending(numbered)
            logged = await self._complete(self.pending)
            return Committed(batch.batch_id, first, last, logged=last <= self.logged_through), logged

    async def _logged_after_tail(self, last: int) -> bool:
        tail = self._log_tail
        if tail is not None:
            await asyncio.wait([tail])
        return last <= self.logged_through

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
            self._update_gauges()
            raise Unavailable("RabbitMQ did not confirm the batch; retry")
        self.pending = None
        self._update_gauges()
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
        first, last = _seqs(batch)
        if pending.logged or last <= self.logged_through:
            pending.logged = True  # the journal keeper wrote it first
            return True
        if self.degraded:
            return False  # the journal keeper writes it, in order
        if first > self.logged_through + 1:
            # An earlier batch is not in the log: writing this one would leave a gap.
            self._degrade(first)
            return False
        pending.logged = await self._write_confirmed(batch, publish)
        if not pending.logged and publish is not None:
            await asyncio.wait([publish])
        confirmed = publish is None or (publish.done() and not publish.cancelled() and publish.result())
        if not pending.logged and confirmed:
            self._degrade(first)
        return pending.logged

    def _degrade(self, first: int) -> None:
        if not self.degraded:
            self.degraded = True
            log.warning("MongoDB write failed: log-degraded from seq %d; the journal keeper will catch up", first)
        self._update_gauges()

    async def _write_confirmed(self, batch: Batch, publish: asyncio.Future[bool] | None) -> bool:
        async def confirmed() -> bool:
            return True if publish is None else await asyncio.shield(publish)

        started = time.perf_counter()
        try:
            # The publish's own timeout bounds the wait for its confirm inside the transaction.
            async with self.log_lock:
                with pymongo.timeout(2 * self.settings.backend_timeout):
                    await self.log.write(batch, confirmed)
        except Unconfirmed:
            return False
        except PyMongoError as exc:
            self.metrics.errors.labels("mongodb", "write").inc()
            log.warning("MongoDB write of batch %s failed: %s: %s", batch.batch_id, type(exc).__name__, exc)
            return False
        self.metrics.log_seconds.observe(time.perf_counter() - started)
        self._logged(batch)
        return True

    async def _try_publish(self, batch: Batch) -> bool:
        try:
            await self._publish(batch)
        except AMQP_ERRORS as exc:
            self.metrics.errors.labels("rabbitmq", "publish").inc()
            log.warning("publishing batch %s failed: %s: %s", batch.batch_id, type(exc).__name__, exc)
            return False
        return True

    async def _publish(self, batch: Batch) -> None:
        if self.exchange is None:
            raise aio_pika.exceptions.ChannelInvalidStateError("not connected to RabbitMQ")
        started = time.perf_counter()
        await self.exchange.publish(broker.batch_message(batch), routing_key="", timeout=self.settings.backend_timeout)
        self.metrics.publish_seconds.observe(time.perf_counter() - started)

    async def _write(self, batch: Batch, timeout: float) -> None:
        started = time.perf_counter()
        with pymongo.timeout(timeout):
            await self.log.write(batch)
        self.metrics.log_seconds.observe(time.perf_counter() - started)
        self._logged(batch)

    def _logged(self, batch: Batch) -> None:
        first, last = _seqs(batch)
        if first > self.logged_through + 1:
            log.error("the log has a gap: seqs %d-%d are missing", self.logged_through + 1, first - 1)
        self.logged_through = max(self.logged_through, last)
        if self.degraded and self.logged_through >= self.next_seq - 1:
            self.degraded = False
            log.info("log caught up at seq %d: direct MongoDB writes resume", self.logged_through)
        self._update_gauges()

    def _remember(self, batch_id: str, first: int, last: int) -> None:
        self.known[batch_id] = (first, last)
        self.known.move_to_end(batch_id)
        while len(self.known) > RECENT_BATCHES:
            self.known.popitem(last=False)

    def _update_gauges(self) -> None:
        m = self.metrics
        m.head.set(self.head)
        m.logged.set(self.logged_through)
        m.backlog.set(max(0, self.head - self.logged_through))
        m.pending.set(0 if self.pending is None else 1)
        m.degraded.set(1 if self.degraded else 0)

    # -- the journal keeper ------------------------------------------------------------------

    async def _keep_journal(self) -> None:
        """Consume the journal for ever: write what the log lacks, then ack."""
        while not self._closing:
            journal = self.journal
            messages = None
            try:
                if journal is None:
                    raise aio_pika.exceptions.ChannelInvalidStateError("journal queue not declared")
                messages = journal.iterator()
                async with messages:
                    async for message in messages:
                        await self._from_journal(message)
            except AMQP_ERRORS as exc:
                if self._closing:
                    raise
                log.warning("journal consumer interrupted (%s: %s); resuming", type(exc).__name__, exc)
                await _forget_consumer(journal, messages)
                await asyncio.sleep(1.0)

    async def _parse(self, message: AbstractIncomingMessage) -> Batch | None:
        try:
            return broker.parse_message(message.body)
        except EventError as exc:
            log.error("dropping a malformed journal message %s: %s", message.message_id, exc)
            return None

    async def _from_journal(self, message: AbstractIncomingMessage) -> None:
        seqs = _header_seqs(message)
        if seqs is not None and seqs[1] <= self.logged_through:
            # The common case: the direct write logged it already; its headers say so without parsing it.
            self._journaled = max(self._journaled, seqs[1])
            await message.ack()
            return
        batch = await self._parse(message)
        if batch is None:
            await message.reject(requeue=False)
            return
        first, last = _seqs(batch)
        if last >= self.next_seq:
            # Published by an earlier run and missed by its drain: never reuse these seqs.
            log.warning("journal batch %s (seqs %d-%d) is past the head; numbering resumes after it",
                        batch.batch_id, first, last)
            self.next_seq = last + 1
            self._remember(batch.batch_id, first, last)
        delay = 0.2
        while True:
            try:
                await self._journal_batch(batch)
                break
            except PyMongoError as exc:
                if self._closing:
                    raise
                self.metrics.errors.labels("mongodb", "journal").inc()
                log.warning("journal keeper cannot write batch %s yet (%s: %s); retrying in %.1f s",
                            batch.batch_id, type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        await message.ack()

    async def _journal_batch(self, batch: Batch) -> None:
        """Write a journalled batch unless the log has it; never holds the commit lock.

        In log-degraded mode commits do not write, so only the keeper does; otherwise a direct
        write of this batch holds the log lock, and once it is released the batch is logged.
        """
        last = _seqs(batch)[1]
        if last > self.logged_through:
            await self.log.ping()  # fail fast, without the log lock, while MongoDB is down
            async with self.log_lock:
                if last > self.logged_through:
                    await self._write(batch, self.settings.backend_timeout * KEEPER_TIMEOUT_FACTOR)
        self._journaled = max(self._journaled, last)

    async def _journal_mark_loop(self) -> None:
        """Write the journal mark now and then: once per batch, it was a MongoDB write per batch."""
        while True:
            await asyncio.sleep(JOURNAL_MARK_EVERY)
            await self._write_journal_mark()

    async def _write_journal_mark(self, timeout: float | None = None) -> None:
        seen = self._journaled
        if seen <= self._journal_marked:
            return
        try:
            with pymongo.timeout(timeout or self.settings.backend_timeout):
                await self.log.mark_journaled(seen)
        except PyMongoError as exc:
            log.debug("cannot write the journal mark (seq %d) yet: %s: %s", seen, type(exc).__name__, exc)
            return
        self._journal_marked = max(self._journal_marked, seen)

    # -- reading -----------------------------------------------------------------------------

    async def _log_reaches(self, seq: int, timeout: float) -> None:
        """Wait until every batch numbered so far is in the log.

        A client binds its queue, then asks for the manifest: each event must be in one or the
        other. A batch published before the bind but logged after the snapshot would be in
        neither, since publication runs ahead of the log. While log-degraded the journal keeper
        is catching up: the request waits for it too (answering 503 at once only made every
        client back off, and converge that much later once the log had caught up).
        """
        deadline = time.monotonic() + timeout
        while self.logged_through < seq:
            if time.monotonic() > deadline:
                raise Unavailable(f"the log is catching up (at seq {self.logged_through} of {seq})")
            await asyncio.sleep(0.01 if not self.degraded else 0.1)

    async def manifest(self) -> tuple[IO[bytes], int, int]:
        """A consistent snapshot, spooled under the log lock: (NDJSON entries, seq, count)."""
        if not self.ready.is_set():
            raise Unavailable("starting: waiting for MongoDB and RabbitMQ")
        await self._log_reaches(self.next_seq - 1, MANIFEST_CATCH_UP_FACTOR * self.settings.backend_timeout)
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)
        try:
            async with self.log_lock:
                seq, count = self.logged_through, 0
                async for doc in self.log.state_cursor():
                    line = json.dumps(entry_from_doc(doc).to_dict(), ensure_ascii=False, separators=(",", ":"))
                    spool.write(line.encode() + b"\n")
                    count += 1
                    if count % MANIFEST_YIELD_EVERY == 0:
                        await asyncio.sleep(0)  # a cursor batch is decoded at once: let other requests run
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        return spool, seq, count


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


# -- HTTP -----------------------------------------------------------------------------------

SETTINGS = web.AppKey("settings", InterfaceSettings)
INGEST = web.AppKey("ingest", Ingest)
METRICS = web.AppKey("metrics", Metrics)


def _error(status: int, message: str, **extra: Any) -> web.Response:
    headers = {"Retry-After": RETRY_AFTER} if status == 503 else None
    return web.json_response({"error": message, **extra}, status=status, headers=headers)


@web.middleware
async def json_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
    """Every refusal is a JSON body and is counted; 503 carries Retry-After."""
    metrics = request.app[METRICS]
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        metrics.rejected.labels(str(exc.status)).inc()
        response = _error(exc.status, exc.text if exc.content_type == "text/plain" and exc.text else exc.reason)
        for name in ("WWW-Authenticate", "Allow"):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
    except Unavailable as exc:
        response = _error(503, str(exc))
    except PyMongoError as exc:
        log.warning("MongoDB unavailable for %s %s: %s", request.method, request.path, exc)
        response = _error(503, f"MongoDB is unavailable: {type(exc).__name__}")
    if response.status >= 400:
        metrics.rejected.labels(str(response.status)).inc()
    return response


def _authorize(request: web.Request, *tokens: str) -> None:
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    presented = presented.strip()
    if scheme.lower() != "bearer" or not presented:
        raise web.HTTPUnauthorized(text="a bearer token is required", headers={"WWW-Authenticate": 'Bearer realm="dlopbox"'})
    given = presented.encode()
    if not any(token and hmac.compare_digest(given, token.encode()) for token in tokens):
        raise web.HTTPForbidden(text="this token is not allowed here")


def _write_auth(request: web.Request) -> None:
    _authorize(request, request.app[SETTINGS].token)


def _read_auth(request: web.Request) -> None:
    settings = request.app[SETTINGS]
    _authorize(request, settings.read_token, settings.token)


async def post_events(request: web.Request) -> web.Response:
    _write_auth(request)
    settings = request.app[SETTINGS]
    if request.content_length is not None and request.content_length > settings.max_body:
        raise web.HTTPRequestEntityTooLarge(max_size=settings.max_body, actual_size=request.content_length)
    body = await request.read()
    try:
        batch = Batch.from_json(body, sequenced=False)
    except EventError as exc:
        return web.json_response(exc.to_json(), status=400)
    started = time.perf_counter()
    accepted, logged = await request.app[INGEST].accept(batch)
    # Published, so durable: the status line goes out now, and the body once the log write ended.
    response = web.StreamResponse(headers={"Content-Type": "application/json; charset=utf-8"})
    await response.prepare(request)
    committed = dataclasses.replace(accepted, logged=await asyncio.shield(logged))
    await response.write(json.dumps(committed.to_json()).encode())
    await response.write_eof()
    request.app[METRICS].commit_seconds.observe(time.perf_counter() - started)
    return response


def _int_param(request: web.Request, name: str, default: int, minimum: int, maximum: int | None = None) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be an integer") from None
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise web.HTTPBadRequest(text=f"{name} must be {bounds}")
    return value


async def get_events(request: web.Request) -> web.Response:
    _read_auth(request)
    since = _int_param(request, "since", 0, 0, INT64_MAX)
    limit = _int_param(request, "limit", EVENTS_LIMIT, 1, EVENTS_LIMIT_MAX)
    prefix = request.query.get("prefix")
    if prefix is not None:
        try:
            check_relpath(prefix)
        except UnsafePathError as exc:
            raise web.HTTPBadRequest(text=f"prefix: {exc}") from None
    events = await request.app[INGEST].log.events_since(since, prefix, limit)
    return web.json_response({"events": events, "next": events[-1]["seq"] if events else since},
                             dumps=lambda obj: json.dumps(obj, ensure_ascii=False))


async def get_manifest(request: web.Request) -> web.StreamResponse:
    _read_auth(request)
    spool, seq, count = await request.app[INGEST].manifest()
    with spool:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson; charset=utf-8",
                                               "X-Dlopbox-Seq": str(seq)})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(json.dumps({"seq": seq, "count": count}).encode() + b"\n")
        while chunk := await asyncio.to_thread(spool.read, STREAM_CHUNK):
            await response.write(chunk)
        await response.write_eof()
    return response


async def post_progress(request: web.Request) -> web.Response:
    _read_auth(request)
    client_id = request.match_info["client_id"]
    try:
        broker.queue_name(client_id)
    except ValueError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text="body must be JSON: {\"seq\": N}") from None
    seq = body.get("seq") if isinstance(body, dict) else None
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= INT64_MAX or set(body) != {"seq"}:
        raise web.HTTPBadRequest(text="body must be {\"seq\": N} with N a non-negative 64-bit integer")
    with pymongo.timeout(request.app[SETTINGS].backend_timeout):
        await request.app[INGEST].log.set_progress(client_id, seq)
    return web.Response(status=204)


async def get_clients(request: web.Request) -> web.Response:
    _read_auth(request)
    ingest = request.app[INGEST]
    head = ingest.head
    with pymongo.timeout(request.app[SETTINGS].backend_timeout):
        rows = await ingest.log.client_progress()
    # MongoDB hands datetimes back naive (they are UTC): RFC 3339, as the OpenAPI says, needs the offset.
    clients = [{"id": r["_id"], "seq": r["seq"], "last_seen": r["last_seen"].replace(tzinfo=UTC).isoformat(),
                "lag": max(0, head - r["seq"])} for r in rows]
    return web.json_response({"head": head, "clients": clients})


async def get_healthz(request: web.Request) -> web.Response:
    ingest = request.app[INGEST]
    try:
        await ingest.log.ping()
        mongo = "ok"
    except PyMongoError as exc:
        mongo = f"down: {type(exc).__name__}"
    rabbit = "ok" if ingest.rabbit_up() else "down"
    healthy = ingest.ready.is_set() and mongo == "ok" and rabbit == "ok"
    body = {"status": "ok" if healthy else "unavailable", "ready": ingest.ready.is_set(), "mongodb": mongo,
            "rabbitmq": rabbit, "head": ingest.head, "logged": ingest.logged_through,
            "log_degraded": ingest.degraded, "pending": ingest.pending is not None}
    return web.json_response(body, status=200 if healthy else 503)


async def get_metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    return web.Response(body=metrics.render(), headers={"Content-Type": metrics.content_type})


async def _backends(app: web.Application) -> AsyncIterator[None]:
    ingest = app[INGEST]
    ingest.start()
    yield
    await ingest.close()


def create_app(settings: InterfaceSettings) -> web.Application:
    app = web.Application(client_max_size=settings.max_body, middlewares=[json_errors])
    metrics = Metrics()
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[INGEST] = Ingest(settings, metrics)
    app.cleanup_ctx.append(_backends)
    app.router.add_post("/events", post_events)
    app.router.add_get("/events", get_events, allow_head=False)
    app.router.add_get("/manifest", get_manifest, allow_head=False)
    app.router.add_post("/clients/{client_id}/progress", post_progress)
    app.router.add_get("/clients", get_clients, allow_head=False)
    app.router.add_get("/healthz", get_healthz, allow_head=False)
    app.router.add_get("/metrics", get_metrics, allow_head=False)
    return app


async def run(settings: InterfaceSettings, *, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set; then stop accepting, finish in-flight commits, close backends."""
    runner = web.AppRunner(create_app(settings), shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        log.info("interface listening on %s:%d", settings.host, settings.port)
        await stop.wait()
        log.info("interface stopping")
    finally:
        await runner.cleanup()
