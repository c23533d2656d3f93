"""The watcher's way to the interface: coalesce events into batches, POST them in order, retry until durable.

Events arrive one by one from the watcher, already in order. :class:`~dlopbox.watch.coalesce.OpenBatch` merges the
ones that cancel or supersede each other while the batch is open (50 writes of one file are
one write; a file created and deleted is nothing). :class:`Delivery` closes a batch
``batch_ms`` after its first event — or at once at ``batch_max`` events — and POSTs the
batches in order over kept-alive connections: the next batch is posted once the interface's
200 status line for the previous one has arrived — it is then numbered and published, so
durable — while the body, sent once that batch is in the MongoDB log, is read in the
background (at most MAX_IN_FLIGHT batches at a time). While events keep coming (a batch starts right after the previous one closed) the
window doubles, up to BURST_WINDOW_MAX_S, so a burst goes out in few large batches while a
lone change still leaves after ``batch_ms``. A failed POST is retried with the same
``batch_id`` (the interface applies it once), with backoff, for as long as it takes;
meanwhile new events wait in a bounded buffer. Past ``buffer_max`` the buffer is dropped
and :attr:`Delivery.lost` tells the watcher to reconcile the disk with the interface's
manifest instead, which sends exactly what is missing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable

import aiohttp

from ..api import InterfaceAPI
from ..errors import HTTP_ERRORS, APIError
from ..events import Batch, Event
from ..retry import Backoff
from ..tree import Tree
from .coalesce import OpenBatch

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 2.0
#: Answers worth retrying: the interface (or what is in front of it) is not ready yet.
RETRY_STATUSES = frozenset({401, 403, 408, 425, 429})
FAILURE_LOG_EVERY_S = 10.0
#: The longest a batch stays open while a burst lasts.
BURST_WINDOW_MAX_S = 0.1
#: Batches published whose reply body (sent once logged) is still awaited; the watcher's
#: session keeps one more connection for GET /manifest.
MAX_IN_FLIGHT = 3
#: A batch is sealed once its events carry this many block hashes (67 bytes of JSON each, 64 GiB of
#: files): about 4 MiB, far below the interface's body limit, however big the files in it.
MAX_BATCH_BLOCKS = 64 * 1024


class Outage:
    """How long the interface has failed: logged when it starts, every FAILURE_LOG_EVERY_S, and when it ends."""

    def __init__(self, on_recovered: Callable[[], None] = lambda: None) -> None:
        self.since: float | None = None
        self._last_log = 0.0
        self.on_recovered = on_recovered

    def failed(self, message: str) -> None:
        now = time.monotonic()
        if self.since is None:
            self.since = self._last_log = now
            log.warning("%s; retrying with backoff", message)
        elif now - self._last_log >= FAILURE_LOG_EVERY_S:
            self._last_log = now
            log.warning("%s; still retrying after %.0f s", message, now - self.since)

    def recovered(self, attempts: int) -> None:
        if self.since is not None:
            log.info("the interface answers again after %.1f s (%d attempts)", time.monotonic() - self.since, attempts)
            self.since = None
            self.on_recovered()


class Delivery:
    """Batches events and POSTs them to the interface in order, one request at a time."""

    def __init__(self, session: aiohttp.ClientSession, interface_url: str, token: str, *, batch_ms: float,
                 batch_max: int, buffer_max: int, on_lost: Callable[[], None] = lambda: None,
                 on_recovered: Callable[[], None] = lambda: None) -> None:
        self.api = InterfaceAPI(session, interface_url, token)
        self.batch_s = batch_ms / 1000
        self.batch_max = max(1, batch_max)
        self.buffer_max = max(self.batch_max, buffer_max)
        self.on_lost = on_lost
        self.run_id = secrets.token_hex(6)
        #: True once buffered events were dropped: only a reconcile with the manifest can catch up.
        self.lost = False
        self.requests = 0
        self.events_sent = 0
        self._counter = 0
        self._open = OpenBatch()
        self._sealed: deque[Batch] = deque()
        self._sealed_events = 0
        self._in_flight: list[Batch] = []
        self._in_flight_events = 0
        self._slot = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._due = False
        self._window = self.batch_s
        self._sealed_at = float("-inf")
        self.outage = Outage(on_recovered)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._progress = asyncio.Event()

    @property
    def buffered(self) -> int:
        """Events accepted and not yet acknowledged by the interface."""
        return len(self._open) + self._sealed_events + self._in_flight_events

    @property
    def failing(self) -> bool:
        return self.outage.since is not None

    def add(self, event: Event, created: bool = False) -> None:
        """Queue one event; ``created``: the slaves had nothing at its path (at its ``dest`` for a move)."""
        if self.lost:
            return
        self._idle.clear()
        self._open.add(event, created)
        if len(self._open) >= self.batch_max or self._open.block_hashes >= MAX_BATCH_BLOCKS:
            self._seal()
        elif self._timer is None and not self._due:
            loop = asyncio.get_running_loop()
            if loop.time() - self._sealed_at <= self._window:
                self._window = min(self._window * 2, max(self.batch_s, BURST_WINDOW_MAX_S))
            else:
                self._window = self.batch_s
            self._timer = loop.call_later(self._window, self._on_timer)
        if self.buffered > self.buffer_max and self.failing:
            self._drop_buffer()  # while the interface answers, room() holds the watcher back instead

    def flush_soon(self) -> None:
        """Send what is open without waiting for the batch window (shutdown)."""
        self._on_timer()

    def resume(self) -> None:
        """The watcher has reconciled with the manifest: accept events again."""
        self.lost = False

    async def room(self) -> None:
        """Wait while the buffer is full but the interface is draining it (backpressure).

        While the interface fails, return at once: the buffer then overflows into a reconcile
        rather than stalling the watcher for an outage of unknown length.
        """
        while self.buffered >= self.buffer_max and not self.failing and not self.lost:
            self._progress.clear()
            await self._progress.wait()

    async def wait_idle(self) -> None:
        """Until every accepted event is acknowledged (or dropped) and nothing is in flight."""
        await self._idle.wait()

    async def run(self) -> None:
        """The sender: POST sealed batches in order, forever; replies are read by tasks of their own."""
        async with asyncio.TaskGroup() as replies:
            while True:
                while len(self._in_flight) >= MAX_IN_FLIGHT:
                    self._slot.clear()
                    await self._slot.wait()
                batch = await self._next_batch()
                self._in_flight.append(batch)
                self._in_flight_events += len(batch.events)
                response = None
                try:
                    response = await self._post(batch)
                finally:
                    if response is None:
                        self._landed(batch)
                if response is not None:
                    replies.create_task(self._read_reply(batch, response))

    async def _read_reply(self, batch: Batch, response: aiohttp.ClientResponse) -> None:
        """The body of a 200: it comes once the batch is logged (the batch is durable already)."""
        try:
            await response.read()
        except HTTP_ERRORS as exc:
            log.warning("batch %s was published, but its reply was cut short (%s: %s); the interface's "
                        "journal logs it", batch.batch_id, type(exc).__name__, exc)
        finally:
            response.release()
            self._landed(batch)

    def _landed(self, batch: Batch) -> None:
        """``batch`` needs nothing more from the sender."""
        self._in_flight.remove(batch)
        self._in_flight_events -= len(batch.events)
        self._slot.set()
        self._progress.set()
        if not self._in_flight and not self._sealed and not len(self._open):
            self._idle.set()

    async def _next_batch(self) -> Batch:
        while True:
            if self._sealed:
                batch = self._sealed.popleft()
                self._sealed_events -= len(batch.events)
                return batch
            if self._due:
                self._due = False
                if len(self._open):
                    self._seal()
                    continue
                self._open = OpenBatch()  # everything in it cancelled out
            if not len(self._open) and not self._in_flight:
                self._idle.set()
            self._wake.clear()
            await self._wake.wait()

    def _on_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due = True
        self._wake.set()

    def _seal(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due = False
        self._sealed_at = asyncio.get_running_loop().time()
        events = self._open.events_out()
        self._open = OpenBatch()
        if events:
            self._enqueue(events)

    def _enqueue(self, events: tuple[Event, ...], *, front: bool = False) -> None:
        self._counter += 1
        batch = Batch(f"{self.run_id}-{self._counter}", events)
        if front:
            self._sealed.appendleft(batch)
        else:
            self._sealed.append(batch)
        self._sealed_events += len(events)
        self._wake.set()

    def _drop_buffer(self) -> None:
        dropped = len(self._open) + self._sealed_events
        log.warning("more than %d events buffered while the interface is unreachable: dropping %d; "
                    "will reconcile with its manifest when it is back", self.buffer_max, dropped)
        self.lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due = False
        self._open = OpenBatch()
        self._sealed.clear()
        self._sealed_events = 0
        if not self._in_flight:
            self._idle.set()
        self._progress.set()
        self.on_lost()

    async def _post(self, batch: Batch) -> aiohttp.ClientResponse | None:
        """POST one batch until the interface has it (or refuses it for good).

        Returns the open response of a 200, whose body is still to be read, or None.
        """
        body = batch.to_json()
        backoff = Backoff(BACKOFF_FIRST_S, BACKOFF_MAX_S)
        attempts = 0
        while True:
            attempts += 1
            try:
                response = await self.api.post_events(body)
                status = response.status
                if status == 200:
                    self.outage.recovered(attempts)
                    self.requests += 1
                    self.events_sent += len(batch.events)
                    return response
                async with response:
                    text = await response.text(errors="replace")
            except HTTP_ERRORS as exc:
                self._failed(f"POST /events failed: {type(exc).__name__}: {exc}")
            else:
                if status == 413 and len(batch.events) > 1:
                    half = len(batch.events) // 2
                    log.warning("batch %s of %d events is too large for the interface; splitting it",
                                batch.batch_id, len(batch.events))
                    self._enqueue(batch.events[half:], front=True)
                    self._enqueue(batch.events[:half], front=True)
                    return None
                if status == 400:
                    self._refused(batch, text)
                    return None
                if status >= 500 or status in RETRY_STATUSES:
                    self._failed(f"POST /events answered {status}: {text[:300]}")
                else:
                    log.error("the interface refused batch %s of %d events for good (%d): %s", batch.batch_id,
                              len(batch.events), status, text[:1000])
                    return None
            await backoff.wait()

    def _refused(self, batch: Batch, text: str) -> None:
        """A 400: drop the one event the interface names and send the others, in order."""
        try:
            index = json.loads(text).get("index")
        except (ValueError, AttributeError):
            index = None
        if not isinstance(index, int) or not 0 <= index < len(batch.events):
            log.error("the interface refused batch %s (%d events) without naming an event; dropping it: %s",
                      batch.batch_id, len(batch.events), text[:1000])
            return
        log.error("the interface refused event %s of batch %s; dropping that event: %s",
                  batch.events[index].to_json()[:500], batch.batch_id, text[:500])
        rest = batch.events[:index] + batch.events[index + 1:]
        if rest:
            self._enqueue(rest, front=True)

    def _failed(self, message: str) -> None:
        self.outage.failed(message)
        self._progress.set()

    async def fetch_manifest(self) -> Tree:
        """GET /manifest, retrying with backoff until the interface answers it in full."""
        backoff = Backoff(BACKOFF_FIRST_S, BACKOFF_MAX_S)
        while True:
            try:
                return await self._manifest_once()
            except APIError as exc:
                self._failed(f"GET /manifest: {exc}")
            except HTTP_ERRORS as exc:
                self._failed(f"GET /manifest failed: {type(exc).__name__}: {exc}")
            await backoff.wait()

    async def _manifest_once(self) -> Tree:
        tree = (await self.api.manifest()).tree
        self.outage.recovered(1)
        return tree
