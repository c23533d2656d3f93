"""`dlopbox client`: consume this slave's queue and keep its directory equal to the master's.

The queue is declared and bound before anything else, so that on a first start no event
can fall between the manifest and the queue. Each message is a batch of consecutively
numbered events; they are applied through a :class:`~dlopbox.client.schedule.PathScheduler`
(related paths in order, the rest in parallel), and the message is acknowledged only once
all its events are applied and the new seq is on disk. A message that does not follow the
last seq is held briefly (redeliveries may arrive out of order), then a gap is repaired
from the manifest.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from pathlib import Path

import aio_pika
import aiohttp
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from .. import broker
from ..api import APIError, InterfaceAPI
from ..events import Batch, EventError
from ..paths import UnsafePathError
from ..settings import ClientSettings, SettingsError
from .apply import Applier, Outcome, Unexplained
from .download import Downloader
from .fate import FateFinder, UnexplainedWrites
from .resync import Resync, ResyncFailed
from .schedule import Job, PathScheduler
from .state import ClientState, load_state, remove_temp_files, save_state

log = logging.getLogger(__name__)

#: Seconds a message following a gap is held, waiting for the missing one, before resyncing.
GAP_WAIT = 2.0
MAX_GAP_WAIT = 60.0
REPORT_EVERY = 1.0
#: Seconds between a change and the state write that covers it and everything applied meanwhile (it first
#: fsyncs the files installed since the last one, then writes the seq: two more fsyncs).
PERSIST_EVERY = 0.02
#: Seconds in-flight work may finish after SIGTERM before it is abandoned (and redelivered later).
SHUTDOWN_GRACE = 1.0
MAX_BACKOFF = 30.0
#: A resync waits on the interface (its manifest); retried often, so that it ends soon after that is back.
RESYNC_MAX_DELAY = 5.0

_RESYNC = object()  # an inbox item: apply failed somewhere, repair from the manifest
_AMQP_ERRORS = (aio_pika.exceptions.AMQPError, ConnectionError, OSError, RuntimeError)


async def run(settings: ClientSettings, *, stop: asyncio.Event) -> None:
    await Client(settings).run(stop)


class Client:
    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self.target = Path(settings.target).absolute()
        try:
            self.queue_name = broker.queue_name(settings.client_id)
        except ValueError as exc:
            raise SettingsError(f"DLOPBOX_CLIENT_ID: {exc}") from None
        self.scheduler = PathScheduler()
        self.applied = 0  # every seq <= applied is reflected in the target
        self.dispatched = 0  # every seq <= dispatched is in the scheduler, applied, or covered by a manifest
        self.persisted = 0  # the seq on disk; messages up to it are acknowledged
        self._done: set[int] = set()  # seqs applied out of order, above ``applied``
        self._hold: int | None = None  # after a failure, nothing past this is persisted until a resync
        self._resync_requested = False
        self._acks: list[tuple[int, int, AbstractIncomingMessage]] = []  # heap by last_seq
        self._held: list[tuple[int, int, Batch, AbstractIncomingMessage]] = []  # heap by first_seq
        self._gap_deadline: float | None = None
        self._gap_wait = GAP_WAIT
        self._counter = itertools.count()
        self._changed = asyncio.Event()
        self._saved = False  # a state file exists: a restart resumes instead of resyncing
        self._synced = False  # the target reflects some seq (a state was loaded or a resync done)
        self.inbox: asyncio.Queue[object] = asyncio.Queue()

    # -- life cycle ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self.target.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(remove_temp_files, self.target)
        state = await asyncio.to_thread(load_state, self.target)
        if state is not None:
            if state.client_id != self.settings.client_id:
                log.warning("%s was last synced by client %r; continuing from its seq %d as %r",
                            self.target, state.client_id, state.seq, self.settings.client_id)
            self.applied = self.dispatched = self.persisted = state.seq
            self._saved = self._synced = True
        connector = aiohttp.TCPConnector(limit=self.settings.downloads + 4)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            self.api = InterfaceAPI(session, self.settings.interface_url, self.settings.read_token)
            self.downloader = Downloader(session, self.settings.files_url, self.settings.chunk_bytes,
                                         self.settings.downloads)
            self.finder = FateFinder(self.api)
            self.unexplained = UnexplainedWrites(self.finder, self._request_resync)
            self.applier = Applier(self.target, self.downloader, self.finder, self.scheduler.wait_for_news)
            self.resync = Resync(self.target, self.api, self.applier, self.downloader, self.scheduler)
            connection = await self._connect(stop)
            if connection is None:
                return
            try:
                async with connection:
                    await self._serve(connection, stop, fresh=state is None)
            finally:
                # Files installed past the last state: durable too, and their descriptors closed.
                await asyncio.to_thread(self.downloader.unsynced.sync)
        log.info("client %s stopped at seq %d", self.settings.client_id, self.persisted)

    async def _connect(self, stop: asyncio.Event) -> AbstractRobustConnection | None:
        """The first connection, retried until it works: later reconnections are aio-pika's."""
        delay = 0.5
        while not stop.is_set():
            try:
                return await aio_pika.connect_robust(broker.amqp_url(self.settings.amqp_url))
            except _AMQP_ERRORS as exc:
                log.warning("cannot connect to RabbitMQ: %s; retrying in %.1fs", exc, delay)
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass
            delay = min(delay * 2, MAX_BACKOFF)
        return None

    async def _serve(self, connection: AbstractRobustConnection, stop: asyncio.Event, fresh: bool) -> None:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=self.settings.prefetch)
        # Bound before the manifest is read: every event after the manifest's seq is in the queue.
        queue = await broker.declare_bound_queue(channel, self.settings.exchange, self.queue_name)
        log.info("client %s: queue %s, target %s, at seq %s", self.settings.client_id, self.queue_name,
                 self.target, "none (first start)" if fresh else self.applied)
        consumer: list[str] = []
        work = asyncio.create_task(self._work(queue, fresh, consumer), name="consume")
        helpers = [asyncio.create_task(self._persist_loop(), name="persist"),
                   asyncio.create_task(self._report_loop(), name="report"),
                   asyncio.create_task(self.unexplained.loop(), name="unexplained")]
        stopping = asyncio.create_task(stop.wait(), name="stop")
        try:
            await asyncio.wait({work, stopping, *helpers}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await self._shutdown(queue, consumer, work, helpers, stopping)
        if work.done() and not work.cancelled() and work.exception() is not None:
            raise work.exception()  # type: ignore[misc]
        for helper in helpers:
            if helper.done() and not helper.cancelled() and helper.exception() is not None:
                raise helper.exception()  # type: ignore[misc]

    async def _shutdown(self, queue: AbstractQueue, consumer: list[str], work: asyncio.Task[None],
                        helpers: list[asyncio.Task[None]], stopping: asyncio.Task[bool]) -> None:
        for tag in consumer:
            try:
                await asyncio.wait_for(queue.cancel(tag), 2)
            except (*_AMQP_ERRORS, TimeoutError) as exc:
                log.debug("cancelling the consumer: %s", exc)
        work.cancel()
        await asyncio.wait([work])
        if len(self.scheduler):
            try:
                await asyncio.wait_for(self.scheduler.drain(), SHUTDOWN_GRACE)
            except TimeoutError:
                log.info("abandoning %d unfinished event(s); they will be redelivered", len(self.scheduler))
        await self.scheduler.cancel()
        stopping.cancel()
        for helper in helpers:
            helper.cancel()
        await asyncio.wait([stopping, *helpers])
        await self._persist()
        try:
            await asyncio.wait_for(self.api.report_progress(self.settings.client_id, self.persisted), 2)
        except (aiohttp.ClientError, APIError, TimeoutError, OSError) as exc:
            log.debug("final progress report failed: %s", exc)

    # -- consuming -------------------------------------------------------------------------

    async def _work(self, queue: AbstractQueue, fresh: bool, consumer: list[str]) -> None:
        if fresh:
            await self._resync("first start")
        elif await self._queue_was_lost(queue):
            await self._resync("the queue is empty but the master is ahead")
        consumer.append(await queue.consume(self._on_message))
        loop = asyncio.get_running_loop()
        while True:
            timeout = None if self._gap_deadline is None else max(0.0, self._gap_deadline - loop.time())
            try:
                item = await asyncio.wait_for(self.inbox.get(), timeout)
            except TimeoutError:
                first = self._held[0][0]
                log.warning("seq %d..%d never arrived; repairing the gap from the manifest",
                            self.dispatched + 1, first - 1)
                await self._resync("gap")
                self._gap_wait = min(self._gap_wait * 2, MAX_GAP_WAIT)
                await self._release_held()
                continue
            if item is _RESYNC:
                if self._resync_requested:  # not already done by a gap repair meanwhile
                    await self._resync("an event could not be applied")
                    await self._release_held()
            else:
                assert isinstance(item, AbstractIncomingMessage)
                await self._receive(item)

    async def _queue_was_lost(self, queue: AbstractQueue) -> bool:
        """An empty queue while the log is ahead: it was deleted or recreated since our last ack."""
        result = queue.declaration_result
        if result is None or result.message_count:
            return False
        try:
            head = (await self.api.clients()).get("head")
        except (aiohttp.ClientError, APIError, TimeoutError, OSError) as exc:
            log.debug("cannot ask the interface for its head seq: %s", exc)
            return False
        return isinstance(head, int) and head > self.applied

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self.inbox.put_nowait(message)

    async def _receive(self, message: AbstractIncomingMessage) -> None:
        try:
            batch = broker.parse_message(message.body)
        except EventError as exc:
            log.error("REFUSED message %s: %s; it is dropped. Body: %.2000r", message.message_id, exc, message.body)
            await _settle(message.reject(requeue=False))
            return
        assert batch.first_seq is not None and batch.last_seq is not None
        if batch.last_seq <= self.dispatched:
            self._ack_later(batch.last_seq, message)  # a redelivery, or already in a manifest
        elif batch.first_seq > self.dispatched + 1:
            heapq.heappush(self._held, (batch.first_seq, next(self._counter), batch, message))
            if self._gap_deadline is None:
                self._gap_deadline = asyncio.get_running_loop().time() + self._gap_wait
            if len(self._held) >= self.settings.prefetch:
                self._gap_deadline = asyncio.get_running_loop().time()  # nothing more can arrive
        else:
            await self._dispatch(batch, message)
            self._gap_wait = GAP_WAIT
            await self._release_held()

    async def _release_held(self) -> None:
        while self._held and self._held[0][0] <= self.dispatched + 1:
            _, _, batch, message = heapq.heappop(self._held)
            assert batch.last_seq is not None
            if batch.last_seq <= self.dispatched:
                self._ack_later(batch.last_seq, message)
            else:
                await self._dispatch(batch, message)
        self._gap_deadline = asyncio.get_running_loop().time() + self._gap_wait if self._held else None

    async def _dispatch(self, batch: Batch, message: AbstractIncomingMessage) -> None:
        for event in batch.events:
            assert event.seq is not None
            if event.seq <= self.dispatched:
                continue
            if self.unexplained.writes:
                self.unexplained.explained_by(event)
            self.finder.recent.append(event)
            await self.scheduler.submit(event, self._apply)
            self.dispatched = event.seq
        assert batch.last_seq is not None
        self._ack_later(batch.last_seq, message)

    async def _apply(self, job: Job) -> None:
        event = job.event
        assert event.seq is not None
        try:
            outcome = await self.applier.apply(event)
        except Unexplained as exc:
            self.unexplained.watch(exc.path, event.seq)
            outcome = Outcome.SKIPPED
        except UnsafePathError as exc:
            log.error("REFUSED seq %d %s %r%s: %s", event.seq, event.op, event.path,
                      f" -> {event.dest!r}" if event.dest else "", exc)
            outcome = Outcome.RESYNC
        except OSError as exc:
            log.error("seq %d: cannot %s %r: %s", event.seq, event.op, event.path, exc)
            outcome = Outcome.RESYNC
        except Exception:
            log.exception("seq %d: failed to %s %r", event.seq, event.op, event.path)
            outcome = Outcome.RESYNC
        if outcome is Outcome.RESYNC:
            self._request_resync(event.seq)
        self._complete(event.seq)

    def _complete(self, seq: int) -> None:
        self._done.add(seq)
        while self.applied + 1 in self._done:
            self.applied += 1
            self._done.remove(self.applied)
        self._changed.set()

    def _request_resync(self, failed_seq: int) -> None:
        self._hold = failed_seq - 1 if self._hold is None else min(self._hold, failed_seq - 1)
        if not self._resync_requested:
            self._resync_requested = True
            self.inbox.put_nowait(_RESYNC)

    async def _resync(self, reason: str) -> None:
        """Drain in-flight work, then make the target equal to the manifest; retried until it works."""
        await self.scheduler.drain()
        self._resync_requested = False
        log.info("resyncing from the manifest (%s)", reason)
        delay = 1.0
        while True:
            try:
                seq = await self.resync.run(at_least=self.applied)
                break
            except (ResyncFailed, APIError, OSError) as exc:
                log.error("resync failed: %s; retrying in %.0fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESYNC_MAX_DELAY)
        self.applied = self.dispatched = max(self.applied, seq)
        self._done.clear()
        self.unexplained.clear()
        self._hold = None
        self._resync_requested = False
        self._synced = True
        self._changed.set()

    # -- persistence, acknowledgements, progress --------------------------------------------

    def _ack_later(self, last_seq: int, message: AbstractIncomingMessage) -> None:
        heapq.heappush(self._acks, (last_seq, next(self._counter), message))
        self._changed.set()

    async def _persist_loop(self) -> None:
        while True:
            await self._changed.wait()
            # A window, like a batch's: what completes meanwhile shares this write, and the files that
            # other slaves on this disk are fsyncing right now do not wait for our journal commits.
            await asyncio.sleep(PERSIST_EVERY)
            self._changed.clear()
            await self._persist()

    async def _persist(self) -> None:
        seq = self.applied if self._hold is None else min(self.applied, self._hold)
        if seq != self.persisted or (not self._saved and self._hold is None and self._synced):
            await asyncio.to_thread(self._save, seq)
            self.persisted = seq
            self._saved = True
        while self._acks and self._acks[0][0] <= self.persisted:
            _, _, message = heapq.heappop(self._acks)
            await _settle(message.ack())

    def _save(self, seq: int) -> None:
        """The files installed so far made durable, then the seq that claims them (blocking)."""
        self.downloader.unsynced.sync()
        save_state(self.target, ClientState(self.settings.client_id, seq))

    async def _report_loop(self) -> None:
        reported: int | None = None
        failing = False
        while True:
            await asyncio.sleep(REPORT_EVERY)
            if self.persisted == reported:
                continue
            try:
                await self.api.report_progress(self.settings.client_id, self.persisted)
                reported = self.persisted
                failing = False
            except (aiohttp.ClientError, APIError, TimeoutError, OSError) as exc:
                if not failing:
                    log.warning("cannot report progress to the interface: %s", exc)
                failing = True


async def _settle(action: object) -> None:
    """Ack or reject; on a channel lost since delivery the broker redelivers, which is handled."""
    try:
        await action  # type: ignore[misc]
    except _AMQP_ERRORS as exc:
        log.debug("could not settle a message (it will be redelivered): %s", exc)
