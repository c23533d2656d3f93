"""`dlopbox interface`: the ingestion API (port 5000).

Every accepted batch gets gap-free seqs (sequence.py) and is, concurrently, published to
RabbitMQ (publisher confirm awaited) and written to the MongoDB log and tree state; the MongoDB
transaction commits only after the confirm (commit.py). The log lock, created here, serialises
direct log writes with the journal keeper's writes (journal.py) and with manifest snapshots
(manifest.py). Start-up recovery is recovery.py, the routes http.py. POST /events sends its
200 status line and headers once the batch is published (durable in the client queues and
the journal) and its body once the log write ended, so a watcher may send its next batch
before this one is logged.

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
import logging
from types import EllipsisType
from typing import IO, Any

import pymongo
from aiohttp import web
from pymongo.errors import PyMongoError

from ..errors import AMQP_ERRORS
from ..events import Batch
from ..retry import Backoff
from ..settings import InterfaceSettings
from . import http
from .backends import Amqp, Unavailable
from .commit import Committed, Committer
from .eventlog import EventLog
from .journal import JournalKeeper
from .manifest import snapshot
from .master import MasterReport, MasterReports
from .metrics import Metrics
from .recovery import recover
from .sequence import Sequence

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT = 15.0


class Ingest:
    """The interface's parts wired together, and the facade the HTTP handlers call (:class:`http.Ingestion`)."""

    def __init__(self, settings: InterfaceSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.eventlog = EventLog(settings.mongo_url, settings.mongo_db, settings.backend_timeout)
        self.amqp = Amqp(settings, metrics)
        self.sequence = Sequence(metrics)
        #: Serialises every write to the log and state (direct or from the journal) and snapshots.
        self.log_lock = asyncio.Lock()
        self.ready = asyncio.Event()
        self.closing = asyncio.Event()
        self.committer = Committer(settings, metrics, self.sequence, self.eventlog, self.amqp, self.log_lock,
                                   self.ready)
        self.keeper = JournalKeeper(settings, metrics, self.sequence, self.eventlog, self.amqp, self.log_lock,
                                    self.closing)
        self.masters = MasterReports(self.eventlog, metrics, settings.backend_timeout)

    # -- lifetime ----------------------------------------------------------------------------

    async def serve(self) -> None:
        """Connect and recover, then keep the journal until cancelled (after :attr:`closing` is set)."""
        try:
            await self._connect()
            self.ready.set()
            self.metrics.ready.set(1)
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.keeper.mark_now_and_then(), name="dlopbox-journal-mark")
                tasks.create_task(self.keeper.keep(), name="dlopbox-journal-keeper")
        except* (PyMongoError, *AMQP_ERRORS) as group:
            if not self.closing.is_set():
                raise
            exc = group.exceptions[0]
            log.info("backend task ended while closing: %s: %s", type(exc).__name__, exc)

    async def _connect(self) -> None:
        """Retry until both backends answer and the journal is recovered; never crash-loop."""
        backoff = Backoff(0.2, 5.0)
        while True:
            try:
                await self._open()
                return
            except (PyMongoError, *AMQP_ERRORS) as exc:
                if self.closing.is_set():
                    raise
                log.warning("backends not ready (%s: %s); retrying in %.1f s", type(exc).__name__, exc,
                            backoff.delay)
                await self.amqp.close()
                await backoff.wait()

    async def _open(self) -> None:
        await self.eventlog.ping()
        await self.eventlog.ensure_indexes()
        await self.masters.last()  # the gauge says what the last report said, before the watcher reports again
        await self.amqp.open()
        self.keeper.resume(await recover(self.eventlog, self.amqp, self.sequence, self.settings.backend_timeout))

    async def close(self) -> None:
        """After :meth:`serve` ended: bound the last log write, write the journal mark, close the backends."""
        # Handlers await their own writes; this only bounds a write nobody waits for any more.
        await self.committer.finish(timeout=2 * self.settings.backend_timeout)
        await self.keeper.write_mark(timeout=min(1.0, self.settings.backend_timeout))
        await self.amqp.close()
        await self.eventlog.close()

    async def __aenter__(self) -> Ingest:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- what the HTTP handlers call ---------------------------------------------------------

    async def accept(self, batch: Batch) -> tuple[Committed, asyncio.Future[bool]]:
        return await self.committer.accept(batch)

    async def manifest(self) -> tuple[IO[bytes], int, int]:
        if not self.ready.is_set():
            raise Unavailable("starting: waiting for MongoDB and RabbitMQ")
        return await snapshot(self.sequence, self.eventlog, self.log_lock, self.settings.backend_timeout)

    async def events_since(self, since: int, prefix: str | None, limit: int) -> list[dict[str, Any]]:
        return await self.eventlog.events_since(since, prefix, limit)

    async def set_progress(self, client_id: str, seq: int, local_differences: int | None | EllipsisType = ...
                           ) -> None:
        with pymongo.timeout(self.settings.backend_timeout):
            await self.eventlog.set_progress(client_id, seq, local_differences)

    async def set_master(self, body: Any) -> MasterReport:
        return await self.masters.store(body)

    async def master(self) -> MasterReport | None:
        return await self.masters.last()

    async def client_progress(self) -> tuple[int, list[dict[str, Any]]]:
        """The head, and every client's reported progress by client id."""
        head = self.sequence.head
        with pymongo.timeout(self.settings.backend_timeout):
            return head, await self.eventlog.client_progress()

    async def queue_counts(self, names: list[str]) -> dict[str, tuple[int, int] | None]:
        return await self.amqp.queue_counts(names)

    async def health(self) -> dict[str, Any]:
        try:
            await self.eventlog.ping()
            mongo = "ok"
        except PyMongoError as exc:
            mongo = f"down: {type(exc).__name__}"
        sequence = self.sequence
        return {"ready": self.ready.is_set(), "mongodb": mongo, "rabbitmq": "ok" if self.amqp.up() else "down",
                "head": sequence.head, "logged": sequence.logged_through, "log_degraded": sequence.degraded,
                "pending": sequence.pending is not None}


async def run(settings: InterfaceSettings, *, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set; then stop accepting, finish in-flight commits, close backends."""
    metrics = Metrics()
    async with Ingest(settings, metrics) as ingest, asyncio.TaskGroup() as tasks:
        background = tasks.create_task(ingest.serve(), name="dlopbox-interface-backends")
        runner = web.AppRunner(http.create_app(settings, ingest, metrics), shutdown_timeout=SHUTDOWN_TIMEOUT)
        await runner.setup()
        try:
            site = web.TCPSite(runner, settings.host, settings.port)
            await site.start()
            log.info("interface listening on %s:%d", settings.host, settings.port)
            await stop.wait()
            log.info("interface stopping")
        finally:
            await runner.cleanup()  # stops accepting, and lets in-flight commits finish
            ingest.closing.set()
            background.cancel()
