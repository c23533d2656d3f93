"""`dlopbox client`: consume this slave's queue and keep its directory equal to the master's.

The queue is declared and bound before anything else, so that on a first start no event
can fall between the manifest and the queue (:mod:`~dlopbox.client.consume`). Each message
is a batch of consecutively numbered events; they are applied through a
:class:`~dlopbox.client.schedule.PathScheduler` (related paths in order, the rest in
parallel), and the message is acknowledged only once all its events are applied and the new
seq is on disk (:mod:`~dlopbox.client.acks`). A message that does not follow the last seq
is held briefly (redeliveries may arrive out of order), then a gap is repaired from the
manifest (:mod:`~dlopbox.client.order`). The slave's directory itself is watched, and what
anything else changes there is undone or kept and reported (:mod:`~dlopbox.client.local`).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp

from .. import broker
from ..api import InterfaceAPI
from ..settings import ClientSettings, SettingsError
from .acks import Acks, ProgressReports
from .apply import Applier
from .blocks import BlockIndex
from .consume import Consumer, Repairs, connect
from .download import Downloader
from .fate import FateFinder, UnexplainedWrites
from .installed import InstalledRecord
from .local import POLICIES, LocalChanges
from .order import JobRunner, Sequencer
from .resync import Resync
from .schedule import PathScheduler
from .state import ClientState, load_state, remove_temp_files

log = logging.getLogger(__name__)

#: Seconds in-flight work may finish after SIGTERM before it is abandoned (and redelivered later).
SHUTDOWN_GRACE = 1.0


async def run(settings: ClientSettings, *, stop: asyncio.Event) -> None:
    await Client(settings).run(stop)


class Client:
    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self.target = Path(settings.target).absolute()
        try:
            broker.queue_name(settings.client_id)
        except ValueError as exc:
            raise SettingsError(f"DLOPBOX_CLIENT_ID: {exc}") from None
        if settings.local_changes not in POLICIES:
            raise SettingsError(f"DLOPBOX_LOCAL_CHANGES={settings.local_changes!r}: expected one of {', '.join(POLICIES)}")
        self.scheduler = PathScheduler()

    async def run(self, stop: asyncio.Event) -> None:
        self.target.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(remove_temp_files, self.target)
        state = await asyncio.to_thread(load_state, self.target)
        record = await asyncio.to_thread(InstalledRecord, self.target)
        # Without a complete record nothing here can be judged: the manifest rebuilds it.
        fresh = state is None or not record.complete
        if state is not None and state.client_id != self.settings.client_id:
            log.warning("%s was last synced by client %r; continuing from its seq %d as %r",
                        self.target, state.client_id, state.seq, self.settings.client_id)
        connector = aiohttp.TCPConnector(limit=self.settings.downloads + 4)
        # nginx's access log then tells which slave fetched what.
        headers = {"User-Agent": f"dlopbox-client/{self.settings.client_id}"}
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False, headers=headers) as session:
            self._wire(session, state, record)
            try:
                connection = await connect(self.settings.amqp_url, stop)
                if connection is None:
                    return
                async with connection:
                    await self.consumer.open(connection, fresh=fresh)
                    await self._serve(stop, fresh, state)
            finally:
                # Files installed past the last state: durable too, and their descriptors closed.
                await asyncio.to_thread(self.downloader.unsynced.sync)
                if self.downloader.index is not None:
                    self.downloader.index.close()
                await asyncio.to_thread(record.close)
        log.info("client %s stopped at seq %d", self.settings.client_id, self.acks.persisted)

    def _wire(self, session: aiohttp.ClientSession, state: ClientState | None, record: InstalledRecord) -> None:
        settings = self.settings
        api = InterfaceAPI(session, settings.interface_url, settings.read_token)
        self.downloader = Downloader(session, settings.files_url, settings.chunk_bytes, settings.downloads,
                                     BlockIndex(self.target))
        self.acks = Acks(self.target, settings.client_id, self.downloader.unsynced, state, record.flush)
        finder = FateFinder(api)
        applier = Applier(self.target, self.downloader, finder, self.scheduler.wait_for_news, record)
        self.local = LocalChanges(self.target, record, applier, self.scheduler, api, settings.local_changes,
                                  settings.audit_interval)
        self.reports = ProgressReports(api, settings.client_id, self.acks, lambda: self.local.ledger.count)
        inbox: asyncio.Queue[object] = asyncio.Queue()
        repairs = Repairs(inbox, self.acks, self.scheduler,
                          Resync(self.target, api, applier, self.downloader, self.scheduler, record))
        self.unexplained = UnexplainedWrites(finder, repairs.request)
        runner = JobRunner(applier, self.acks, self.unexplained, repairs.request)
        sequencer = Sequencer(self.scheduler, runner, self.acks, finder.recent, self.unexplained, settings.prefetch)
        self.consumer = Consumer(settings, self.target, api, inbox, sequencer, repairs, self.acks, self.unexplained)

    async def _serve(self, stop: asyncio.Event, fresh: bool, state: ClientState | None) -> None:
        try:
            async with asyncio.TaskGroup() as tasks:
                helpers = [tasks.create_task(self.acks.persist_loop(), name="persist"),
                           tasks.create_task(self.reports.loop(), name="report"),
                           tasks.create_task(self.unexplained.loop(), name="unexplained"),
                           *(tasks.create_task(loop, name=name) for name, loop in self.local.loops().items())]
                work = tasks.create_task(self._resume(fresh, None if fresh else state), name="consume")
                await stop.wait()
                await self.consumer.stop()
                work.cancel()
                await asyncio.wait([work])
                await self._finish_jobs()  # while what completes is still persisted and acked
                for helper in helpers:
                    helper.cancel()
        finally:
            # After a task failed, the group has cancelled the others: stop as after a SIGTERM.
            await self.consumer.stop()
            await self._finish_jobs()
            await self.acks.persist()
            await self.reports.final()

    async def _resume(self, fresh: bool, state: ClientState | None) -> None:
        """The directory checked against the record (changes made while stopped), then the queue consumed."""
        await self.local.start(state)
        await self.consumer.run(fresh)

    async def _finish_jobs(self) -> None:
        """In-flight events get SHUTDOWN_GRACE to finish; the rest are abandoned (and redelivered later)."""
        if len(self.scheduler):
            try:
                async with asyncio.timeout(SHUTDOWN_GRACE):
                    await self.scheduler.drain()
            except TimeoutError:
                log.info("abandoning %d unfinished event(s); they will be redelivered", len(self.scheduler))
        await self.scheduler.cancel()
