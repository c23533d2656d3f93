"""The dashboard's push channel: one hub fanning committed events and status out to viewers (SSE).

Ingestion only ever calls :meth:`Hub.committed` and :meth:`Hub.progress`, which never await:
each viewer has a bounded buffer, and a viewer whose buffer is full (a stuck or slow tab) is
dropped, not waited for. Its browser reconnects by itself with the Last-Event-ID it saw, and
the hub replays what it still holds after that seq (a bounded ring of recent batches).

A batch's message is serialised once, for every viewer, and only while someone is watching;
the status snapshot (clients, backends, rates) is built once a second, also only then.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import EllipsisType
from typing import Any, Protocol

from pymongo.errors import PyMongoError

from .. import broker
from ..errors import AMQP_ERRORS
from ..events import Batch
from .metrics import Metrics

log = logging.getLogger(__name__)

#: Events of one batch sent in full; a bigger batch sends its last ones and its count.
FEED_MAX = 200
#: Events kept for reconnecting tabs and for lag-in-seconds and transfer rates.
RING_EVENTS = 10_000
#: Bytes one viewer may have waiting before it is dropped.
VIEWER_BYTES = 256 * 1024
MAX_VIEWERS = 100
TICK = 1.0
#: Queue depths and consumers are read from RabbitMQ at most this often.
QUEUES_EVERY = 2.0
#: Seconds of history in the events-per-second series.
SERIES = 60
#: Window of a slave's transfer rate.
RATE_WINDOW = 5.0
RETRY_MS = 1000


def sse(data: Any, event: str, seq: int | None = None) -> bytes:
    head = f"id: {seq}\n" if seq is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


@dataclass
class Committed:
    first_seq: int
    last_seq: int
    at: float
    #: Bytes written by every event up to and including this batch (write sizes).
    bytes_through: int
    batch: Batch
    message: bytes | None = None

    def to_message(self) -> bytes:
        if self.message is None:
            events = self.batch.events[-FEED_MAX:]
            first = self.last_seq - len(events) + 1
            rows = [{**e.to_dict(), "seq": first + i} for i, e in enumerate(events)]
            self.message = sse({"first_seq": self.first_seq, "last_seq": self.last_seq, "at": self.at,
                                "count": self.last_seq - self.first_seq + 1, "events": rows}, "events", self.last_seq)
        return self.message


@dataclass(eq=False)
class Viewer:
    """One connected tab: what waits to be written to it, and whether it was dropped.

    A tab that reconnects first catches up by reading the ring itself, one batch per write
    (nothing is queued for it meanwhile, however far behind it is); once it has reached the
    ring's end it is offered live messages like any other.
    """

    #: Ends this viewer's connection at once, even while a write to it is stuck.
    close: Callable[[], None] | None
    sent_through: int = 0
    #: The ring this viewer is catching up from, until it has read it to the end.
    catching_up: Ring | None = None
    waiting: deque[tuple[int | None, bytes]] = field(default_factory=deque)
    waiting_bytes: int = 0
    dropped: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, seq: int | None, message: bytes) -> bool:
        """Queue a message; False (and nothing queued) when this viewer is already too far behind."""
        if seq is not None and self.catching_up is not None:
            return True  # it is in the ring, where this viewer will read it
        if self.waiting_bytes + len(message) > VIEWER_BYTES:
            return False
        self.waiting.append((seq, message))
        self.waiting_bytes += len(message)
        self.wake.set()
        return True

    async def next(self) -> bytes:
        while not self.dropped:
            while self.waiting:
                seq, message = self.waiting.popleft()
                self.waiting_bytes -= len(message)
                if seq is None:
                    return message
                if seq > self.sent_through:
                    self.sent_through = seq
                    return message
            if self.catching_up is not None:
                entry = self.catching_up.first_after(self.sent_through)
                if entry is None:
                    self.catching_up = None  # at the ring's end: live from now on
                    continue
                if entry.first_seq > self.sent_through + 1:
                    gap = sse({"first_seq": self.sent_through + 1, "last_seq": entry.first_seq - 1}, "gap")
                    self.sent_through = entry.first_seq - 1
                    return gap
                self.sent_through = entry.last_seq
                return entry.to_message()
            self.wake.clear()
            await self.wake.wait()
        raise ConnectionResetError("dropped: too far behind")


@dataclass
class Slave:
    """What the hub remembers of one client between progress reports."""

    seq: int = 0
    #: What the client last said of its directory's differences from the master (None: never said).
    local_differences: int | None = None
    #: The seq this client was at when it last fell behind: the 0 % of its completion.
    behind_from: int | None = None
    samples: deque[tuple[float, int]] = field(default_factory=deque)


class Ring:
    """Recent committed batches, bounded by their total of events."""

    def __init__(self, limit: int = RING_EVENTS) -> None:
        self.limit = limit
        self.batches: deque[Committed] = deque()
        self._lasts: deque[int] = deque()
        self.events = 0
        self.bytes_through = 0

    def add(self, batch: Batch, first: int, last: int, at: float) -> Committed:
        self.bytes_through += sum(e.size or 0 for e in batch.events if e.op.value == "write")
        entry = Committed(first, last, at, self.bytes_through, batch)
        self.batches.append(entry)
        self._lasts.append(last)
        self.events += last - first + 1
        while self.events > self.limit and len(self.batches) > 1:
            old = self.batches.popleft()
            self._lasts.popleft()
            self.events -= old.last_seq - old.first_seq + 1
        return entry

    def _index_after(self, seq: int) -> int:
        """Index of the first batch holding a seq above ``seq``."""
        return bisect.bisect_right(self._lasts, seq)

    def after(self, seq: int) -> list[Committed]:
        return list(self.batches)[self._index_after(seq):]

    def first_after(self, seq: int) -> Committed | None:
        i = self._index_after(seq)
        return self.batches[i] if i < len(self.batches) else None

    def committed_at(self, seq: int) -> float | None:
        """When the first seq above ``seq`` was committed, if still held."""
        i = self._index_after(seq)
        return self.batches[i].at if i < len(self.batches) else None

    def bytes_at(self, seq: int) -> int | None:
        """Bytes written through ``seq`` (at batch granularity), if still held."""
        i = self._index_after(seq)
        if i == 0:
            return None if self.batches and self.batches[0].first_seq <= seq else (0 if not self.batches else None)
        return self.batches[i - 1].bytes_through

    @property
    def first_seq(self) -> int | None:
        return self.batches[0].first_seq if self.batches else None


class Source(Protocol):
    """What the hub reads of the interface for its snapshots (:class:`dlopbox.interface.service.Ingest`)."""

    async def health(self) -> dict[str, Any]: ...

    async def client_progress(self) -> tuple[int, list[dict[str, Any]]]: ...

    async def queue_counts(self, names: list[str]) -> dict[str, tuple[int, int] | None]: ...


class Hub:
    """Viewers, the ring of recent batches, per-second counts and the slaves' rates."""

    def __init__(self, source: Source, metrics: Metrics) -> None:
        self.source = source
        self.metrics = metrics
        self.viewers: set[Viewer] = set()
        self.ring = Ring()
        self.last_seq = 0
        self.last_event: dict[str, Any] | None = None
        self.per_second: deque[list[int]] = deque(maxlen=SERIES)
        self.slaves: dict[str, Slave] = {}
        self._queues: dict[str, tuple[int, int] | None] = {}
        self._queues_read = 0.0
        self._status: bytes | None = None
        self._changed = asyncio.Event()
        self._closed = False
        self._stopping = asyncio.Event()

    # -- called by ingestion: never awaits --------------------------------------------------

    def committed(self, batch: Batch, first: int, last: int) -> None:
        if last <= self.last_seq:
            return  # a retried batch answered from memory
        now = time.time()
        self.last_seq = last
        entry = self.ring.add(batch, first, last, now)
        self._count(now, last - first + 1)
        tail = batch.events[-1]
        self.last_event = {"seq": last, "op": tail.op.value, "path": tail.path, "at": now}
        if self.viewers:
            self._broadcast(last, entry.to_message())

    def progress(self, client_id: str, seq: int, local_differences: int | None | EllipsisType = ...) -> None:
        """A progress report; ``local_differences`` left out (``...``) keeps the one reported before."""
        slave = self.slaves.setdefault(client_id, Slave())
        slave.seq = seq
        if not isinstance(local_differences, EllipsisType):
            slave.local_differences = local_differences
        done = self.ring.bytes_at(seq)
        now = time.monotonic()
        if done is not None:
            slave.samples.append((now, done))
        while slave.samples and now - slave.samples[0][0] > RATE_WINDOW:
            slave.samples.popleft()
        if self.viewers:
            row = {"last_seen": datetime.now(UTC), "local_differences": slave.local_differences}
            self._broadcast(None, sse(self._slave_row(client_id, slave, row), "client"))

    # -- viewers -----------------------------------------------------------------------------

    def subscribe(self, close: Callable[[], None] | None, since: int, resume: bool) -> Viewer | None:
        """A new viewer after ``since``; None when there are too many.

        A reconnecting tab (``resume``) catches up from the ring; a new one gets the most
        recent batches that fit in half its bound, after a ``gap`` message for the rest.
        """
        if len(self.viewers) >= MAX_VIEWERS:
            return None
        viewer = Viewer(close, sent_through=since)
        viewer.offer(None, f"retry: {RETRY_MS}\n\n".encode())
        if resume:
            viewer.catching_up = self.ring
        elif since < self.last_seq:
            backlog, size = [], 0
            for entry in reversed(self.ring.after(since)):
                size += len(entry.to_message())
                if size > VIEWER_BYTES // 2:
                    break
                backlog.append(entry)
            backlog.reverse()
            resumed = backlog[0].first_seq if backlog else self.last_seq + 1
            if resumed > since + 1:
                viewer.offer(None, sse({"first_seq": since + 1, "last_seq": resumed - 1}, "gap"))
            for entry in backlog:
                viewer.offer(entry.last_seq, entry.to_message())
        if self._status is not None:
            viewer.offer(None, self._status)
        self.viewers.add(viewer)
        self.metrics.live_viewers.set(len(self.viewers))
        self._changed.set()
        return viewer

    def close(self) -> None:
        """End every viewer's stream and the snapshot loop (the interface is stopping: browsers retry later)."""
        self._closed = True
        self._changed.set()
        self._stopping.set()
        for viewer in list(self.viewers):
            viewer.dropped = True
            viewer.wake.set()
            self.unsubscribe(viewer)

    def unsubscribe(self, viewer: Viewer) -> None:
        self.viewers.discard(viewer)
        self.metrics.live_viewers.set(len(self.viewers))

    def _broadcast(self, seq: int | None, message: bytes) -> None:
        for viewer in list(self.viewers):
            if not viewer.offer(seq, message):
                self._drop(viewer)

    def _drop(self, viewer: Viewer) -> None:
        """A viewer too far behind: close its stream; its browser reconnects from its last seq."""
        viewer.dropped = True
        self.unsubscribe(viewer)
        self.metrics.live_dropped.inc()
        log.info("dashboard viewer dropped: %d bytes waiting", viewer.waiting_bytes)
        viewer.waiting.clear()
        viewer.waiting_bytes = 0
        viewer.wake.set()
        if viewer.close is not None:
            viewer.close()

    # -- the status snapshot -----------------------------------------------------------------

    def _count(self, now: float, n: int) -> None:
        second = int(now)
        if self.per_second and self.per_second[-1][0] == second:
            self.per_second[-1][1] += n
        else:
            self.per_second.append([second, n])

    def series(self, now: float) -> list[int]:
        """Events per second over the last :data:`SERIES` seconds, oldest first."""
        counts = dict((s, n) for s, n in self.per_second)
        current = int(now)
        return [counts.get(s, 0) for s in range(current - SERIES + 1, current + 1)]

    async def run(self) -> None:
        """Build and push the status snapshot once a second while anyone watches, until :meth:`close`."""
        # A cancellation may be swallowed inside a client library mid-snapshot: the flag ends the loop anyway.
        while not self._closed:
            if not self.viewers:
                self._status = None
                self._changed.clear()
                await self._changed.wait()
            try:
                self._status = sse(await self.snapshot(), "status")
            except Exception:  # noqa: BLE001 - a snapshot must never end the push channel
                log.exception("building the dashboard snapshot failed")
            else:
                self._broadcast(None, self._status)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK):
                    await self._stopping.wait()

    async def snapshot(self) -> dict[str, Any]:
        now = time.time()
        health = await self.source.health()
        try:
            head, rows = await self.source.client_progress()
        except PyMongoError as exc:
            log.debug("client progress unavailable: %s", exc)
            head, rows = self.last_seq, [{"_id": name, "seq": s.seq, "last_seen": None,
                                          "local_differences": s.local_differences}
                                         for name, s in self.slaves.items()]
        await self._read_queues([r["_id"] for r in rows])
        clients = []
        for row in rows:
            slave = self.slaves.setdefault(row["_id"], Slave(seq=row["seq"]))
            slave.seq = max(slave.seq, row["seq"])
            slave.local_differences = row.get("local_differences")
            clients.append(self._slave_row(row["_id"], slave, row, head))
        series = self.series(now)
        return {"now": now, "head": head, "ready": health.get("ready"), "mongodb": health.get("mongodb"),
                "rabbitmq": health.get("rabbitmq"), "logged": health.get("logged"),
                "log_degraded": health.get("log_degraded"), "events_per_minute": sum(series),
                "events_per_second": series, "last_event": self.last_event, "viewers": len(self.viewers),
                "clients": clients}

    def _slave_row(self, client_id: str, slave: Slave, row: dict[str, Any], head: int | None = None
                   ) -> dict[str, Any]:
        head = self.last_seq if head is None else max(head, self.last_seq)
        lag = max(0, head - slave.seq)
        if lag == 0:
            slave.behind_from = None
        elif slave.behind_from is None or slave.behind_from > slave.seq:
            slave.behind_from = slave.seq
        complete = None
        if slave.behind_from is not None:
            complete = (slave.seq - slave.behind_from) / max(1, head - slave.behind_from)
        lag_seconds = 0.0
        if lag:
            at = self.ring.committed_at(slave.seq)
            lag_seconds = max(0.0, time.time() - at) if at is not None else None
        queue = self._queues.get(client_id)
        differences = row.get("local_differences")
        if not isinstance(differences, int) or isinstance(differences, bool):
            differences = None
        if queue is not None and queue[1] == 0:
            state = "offline"
        elif differences:
            state = "local differences"
        elif lag:
            state = "syncing"
        else:
            state = "in sync"
        last_seen = row.get("last_seen")
        out: dict[str, Any] = {"id": client_id, "seq": slave.seq, "lag": lag, "lag_seconds": lag_seconds,
                               "state": state, "complete": complete, "rate": self._rate(slave),
                               "queued": queue[0] if queue else None, "consumers": queue[1] if queue else None,
                               "local_differences": differences}
        if last_seen is not None:
            out["last_seen"] = last_seen.replace(tzinfo=UTC).isoformat()
        return out

    def _rate(self, slave: Slave) -> float:
        """Bytes per second this slave took over the last :data:`RATE_WINDOW` seconds."""
        now = time.monotonic()
        recent = [(t, b) for t, b in slave.samples if now - t <= RATE_WINDOW]
        if len(recent) < 2:
            return 0.0
        return max(0.0, (recent[-1][1] - recent[0][1]) / max(now - recent[0][0], 1.0))

    async def _read_queues(self, client_ids: list[str]) -> None:
        if time.monotonic() - self._queues_read < QUEUES_EVERY:
            return
        self._queues_read = time.monotonic()
        names = {}
        for client_id in client_ids:
            try:
                names[client_id] = broker.queue_name(client_id)
            except ValueError:
                continue
        try:
            counts = await self.source.queue_counts(list(names.values()))
        except AMQP_ERRORS as exc:
            log.debug("queue depths unavailable: %s", exc)
            counts = {}
        self._queues = {client_id: counts.get(name) for client_id, name in names.items()}
