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
from collections import deque
from collections.abc import Iterable
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
from ..events import Batch, Event, EventError, Op
from ..paths import UnsafePathError, is_within
from ..settings import ClientSettings, SettingsError
from .apply import Applier, Fate, Outcome, Unexplained
from .download import Downloader
from .resync import Resync, ResyncFailed
from .schedule import Job, PathScheduler
from .state import ClientState, load_state, remove_temp_files, save_state

log = logging.getLogger(__name__)

#: Seconds a message following a gap is held, waiting for the missing one, before resyncing.
GAP_WAIT = 2.0
MAX_GAP_WAIT = 60.0
REPORT_EVERY = 1.0
#: Events remembered after dispatch, to explain a write whose bytes are gone.
RECENT_EVENTS = 10_000
#: Events read at once from the interface's log when a write's fate is not among the recent ones: a
#: client replaying a backlog asked once per write (a query on the log each: ~15 writes a second).
LOG_WINDOW = 500
#: Seconds a window that held the whole log answers "nothing logged yet" before it is read again.
LOG_WINDOW_FRESH = 0.5
#: Seconds a write's bytes may stay gone with nothing to explain it before the client resyncs.
STALE_PATIENCE = 20.0
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
        #: Writes whose bytes were gone with nothing to explain it yet: path -> (seq, deadline). A later
        #: event affecting the path explains it; past the deadline the client resyncs.
        self._unexplained: dict[str, tuple[int, float]] = {}
        #: The events dispatched last: one may already explain a write that finds its bytes gone.
        self._recent: deque[Event] = deque(maxlen=RECENT_EVENTS)
        #: The interface's log after some seq, read once for many lookups (see _logged_effect).
        self._log_window: _LogWindow | None = None
        self._log_window_lock = asyncio.Lock()
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
            self.applier = Applier(self.target, self.downloader, self.fate, self.scheduler.wait_for_news)
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
                   asyncio.create_task(self._unexplained_loop(), name="unexplained")]
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
            if self._unexplained:
                self._explained_by(event)
            self._recent.append(event)
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
            self._watch_for_explanation(exc.path, event.seq)
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
        self._unexplained.clear()  # the manifest brought whatever those writes were missing
        self._hold = None
        self._resync_requested = False
        self._synced = True
        self._changed.set()

    # -- what became of a write whose bytes are gone -----------------------------------------

    def _watch_for_explanation(self, path: str, seq: int) -> None:
        """Go on without the write; a newer event about ``path`` should follow, or the client resyncs."""
        if any(later.seq is not None and later.seq > seq and _explains(later, path) for later in self._recent):
            return  # it arrived meanwhile (applied already, or still waiting in the scheduler)
        deadline = asyncio.get_running_loop().time() + STALE_PATIENCE
        previous = self._unexplained.get(path)
        self._unexplained[path] = (seq, deadline if previous is None else min(previous[1], deadline))

    def _explained_by(self, event: Event) -> None:
        assert event.seq is not None
        for path, (seq, _) in list(self._unexplained.items()):
            if event.seq > seq and _explains(event, path):
                del self._unexplained[path]

    async def _unexplained_loop(self) -> None:
        """Resync once a write's bytes have stayed gone, unexplained, for STALE_PATIENCE."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            now = loop.time()
            overdue = [(path, seq) for path, (seq, deadline) in self._unexplained.items() if deadline <= now]
            if not overdue:
                continue
            for path, seq in overdue:
                # The interface's log may know what the queue has not delivered yet.
                fate = await self._follow(path, seq)
                if fate.superseded or fate.path != path:
                    self._unexplained.pop(path, None)
            overdue = [(path, seq) for path, seq in overdue if path in self._unexplained]
            if overdue:
                path, seq = min(overdue, key=lambda item: item[1])
                log.error("seq %d: the master's bytes of %r are gone and no newer event explains it after %.0fs; "
                          "resyncing from the manifest", seq, path, STALE_PATIENCE)
                for path, _ in overdue:
                    del self._unexplained[path]
                self._request_resync(seq)

    async def fate(self, event: Event) -> Fate:
        """Follow ``event.path`` through the later events held here, then those the interface logged."""
        assert event.seq is not None
        return await self._follow(event.path, event.seq)

    async def _follow(self, path: str, after: int) -> Fate:
        while True:
            # Every event dispatched lately, applied or still pending, then the interface's log.
            effect, cause = _first_effect(path, self._recent, after)
            if effect is None:
                try:
                    effect, cause = await self._logged_effect(path, after)
                except (aiohttp.ClientError, APIError, TimeoutError, OSError) as exc:
                    log.debug("cannot ask the interface about %r: %s", path, exc)
            if effect is None:
                return Fate(False, path)
            if effect is _GONE:
                return Fate(True, path)
            assert isinstance(effect, str) and cause is not None and cause.seq is not None
            path, after = effect, cause.seq

    async def _logged_effect(self, path: str, after: int) -> tuple[object, Event | None]:
        """What the interface's log says happened to ``path`` after ``after`` (see :func:`_first_effect`).

        One window of the log serves every lookup it covers: a client replaying a backlog asks about
        many writes at once. It is read again once it is older than LOG_WINDOW_FRESH (when it held the
        whole log) or when a lookup starts past its end (when it did not); a lookup it cannot answer
        asks about its path alone, as every lookup did before.
        """
        async with self._log_window_lock:  # concurrent lookups share one read
            now = asyncio.get_running_loop().time()
            window = self._log_window
            if (window is None or window.after > after or (window.full and after >= window.last_seq)
                    or (not window.full and now - window.read_at >= LOG_WINDOW_FRESH)):
                window = self._log_window = _LogWindow(after, now, await self.api.events_since(after, limit=LOG_WINDOW))
            effect, cause = _first_effect(path, window.events, after)
            if effect is not None or not window.full:
                return effect, cause  # found, or the whole log holds nothing about it yet
        logged = await self.api.events_since(after, prefix=path, limit=100)
        return _first_effect(path, logged, after)

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


_GONE = object()


class _LogWindow:
    """Events the interface logged after ``after``, as read at ``read_at`` (loop time)."""

    __slots__ = ("after", "read_at", "events", "full", "last_seq")

    def __init__(self, after: int, read_at: float, events: list[Event]) -> None:
        self.after, self.read_at, self.events = after, read_at, events
        self.full = len(events) >= LOG_WINDOW  # more may follow that it does not hold
        self.last_seq = max((e.seq for e in events if e.seq is not None), default=after)


def _explains(event: Event, path: str) -> bool:
    """Whether ``event`` can account for the master's bytes at ``path`` being gone or different."""
    return event.op is not Op.ATTRIB and event.op is not Op.MKDIR and event.affects(path)


def _first_effect(path: str, events: Iterable[Event], after: int) -> tuple[object, Event | None]:
    """The first of ``events`` past seq ``after`` that affects ``path``, and what it does to it."""
    for event in events:
        if event.seq is None or event.seq <= after:
            continue
        effect = _effect_on(path, event)
        if effect is not None:
            return effect, event
    return None, None


def _effect_on(path: str, event: Event) -> object:
    """What a later ``event`` does to the file at ``path``: None, _GONE, or its new path."""
    match event.op:
        case Op.WRITE | Op.DELETE if event.path == path:
            return _GONE
        case Op.RMDIR if is_within(path, event.path):
            return _GONE
        case Op.MOVE:
            assert event.dest is not None
            if is_within(path, event.path):
                return event.dest + path[len(event.path):]
            if is_within(path, event.dest):
                return _GONE  # something else now stands there
    return None


async def _settle(action: object) -> None:
    """Ack or reject; on a channel lost since delivery the broker redelivers, which is handled."""
    try:
        await action  # type: ignore[misc]
    except _AMQP_ERRORS as exc:
        log.debug("could not settle a message (it will be redelivered): %s", exc)
