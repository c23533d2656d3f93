"""`dlopbox watch`: every change below the master's directory becomes one event, in order.

The :class:`Watcher` reads inotify and hands each kernel event to the part whose rule it is;
each part is a module of this package:

- :mod:`.watches`: one watch per directory (inotify is not recursive);
- :mod:`.disk`: the digests, stats and scans, run in a thread pool;
- :mod:`.moves`: pairing the two halves of a rename by cookie;
- :mod:`.settle`: which file is quiet enough to read while it is still being written;
- :mod:`.pipeline`: items released in the order they were read, unrelated ones overtaking a slow one;
- :mod:`.rescan`: the scans that let the disk decide (arrivals, IN_Q_OVERFLOW);
- :mod:`.announce`: what the slaves have been told, and the events that change it;
- :mod:`.delivery`: batching those events and POSTing them to the interface.

Whenever events may have been lost (at start-up, on IN_Q_OVERFLOW, when the delivery buffer
overflowed), a scan of the disk is diffed against what was announced, which emits exactly the
differences. Every item reads the disk as it is when it runs, and every later change has a
later item, so the slaves' view always converges on the disk.

Reading is synchronous per event, so that timers always see a consistent state; a burst
brings ~30,000 events a second, so the dispatch stays a few plain-int tests per event.

Symlinks, FIFOs, sockets and devices are skipped and never followed; names starting with
``.dlopbox`` and the ``DLOPBOX_IGNORE`` patterns are ignored.
"""

from __future__ import annotations

import asyncio
import logging
import select
import signal
import threading
import time
from pathlib import Path

import aiohttp
from asyncinotify import Event as InotifyEvent
from asyncinotify import Inotify, Mask

from ..settings import WatcherSettings
from ..tree import Ignore, Tree
from .announce import Announcer
from .delivery import Delivery
from .disk import DiskWork
from .moves import RESCANNED, MovePairing
from .pipeline import Attrib, Pending, Pipeline, Remove
from .report import MasterReporter
from .rescan import Rescans
from .settle import QuietFiles
from .unsendable import LEAVE_OR_ATTRIB, UnsendableEvents, UnsendablePaths
from .watches import Watches, safe_name

log = logging.getLogger(__name__)

# Plain ints: testing an IntFlag member per event is slow, and a burst brings ~30,000 events a second.
_CREATE, _MODIFY, _CLOSE_WRITE, _ATTRIB = int(Mask.CREATE), int(Mask.MODIFY), int(Mask.CLOSE_WRITE), int(Mask.ATTRIB)
_DELETE, _MOVED_FROM, _MOVED_TO, _ISDIR = int(Mask.DELETE), int(Mask.MOVED_FROM), int(Mask.MOVED_TO), int(Mask.ISDIR)
_IGNORED, _Q_OVERFLOW, _SELF = int(Mask.IGNORED), int(Mask.Q_OVERFLOW), int(Mask.DELETE_SELF | Mask.MOVE_SELF)
#: On SIGTERM, how long to finish releasing and sending what was read.
SHUTDOWN_S = 5.0
READ_EVENTS = 512


async def run(settings: WatcherSettings, *, stop: asyncio.Event) -> None:
    """The `dlopbox watch` service: watch ``settings.root`` and post every change until ``stop``."""
    # MAX_IN_FLIGHT batches, GET /manifest and PUT /master.
    connector = aiohttp.TCPConnector(limit=5, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector) as session:
        await Watcher(settings, session).run(stop)


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


class Watcher:
    """inotify -> the parts: each kernel event goes to the part whose rule it is."""

    def __init__(self, settings: WatcherSettings, session: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.root = Path(settings.root)
        self.ignore = Ignore(settings.ignore)
        self._pending = Pending()
        self.delivery = Delivery(session, settings.interface_url, settings.token, batch_ms=settings.batch_ms,
                                 batch_max=settings.batch_max, buffer_max=settings.buffer_max,
                                 on_lost=self._pending.wake, on_recovered=self._interface_back)
        #: The paths it cannot send: logged, counted and listed in the master's report.
        self.unsendable = UnsendablePaths()
        self._unsendable_paths = self.unsendable.paths  # tested per event: a dict's truth is cheap
        #: Set once the disk has been reconciled with the interface's manifest at start-up.
        self.ready = asyncio.Event()
        # The parts below are made by run(), on its event loop and inotify instance.
        self.watches: Watches
        self.announcer: Announcer
        self.rescans: Rescans
        self._disk: DiskWork
        self._moves: MovePairing
        self._quiet: QuietFiles
        self._writing: dict[str, tuple[asyncio.TimerHandle, float]]  # QuietFiles.writing, tested per event
        self._pipeline: Pipeline
        self._not_sent: UnsendableEvents
        self.reporter: MasterReporter | None = None

    @property
    def overflows(self) -> int:
        return self.rescans.overflows

    @property
    def reconciles(self) -> int:
        return self._pipeline.reconciles

    async def run(self, stop: asyncio.Event) -> None:
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root} is not a directory")
        leases = threading.current_thread() is threading.main_thread()
        if leases:
            signal.signal(signal.SIGIO, signal.SIG_IGN)  # a lease broken by a writer must not kill us
        self._disk = DiskWork(self.root, self.ignore, self.settings.hash_workers)
        try:
            with Inotify(cache_size=READ_EVENTS) as inotify:
                self._assemble(inotify, leases)
                self.watches.watch_tree("")
                if self.watches.top is None:
                    raise OSError(f"cannot watch {self.root}")
                log.info("watching %d directories below %s", len(self.watches), self.root)
                try:
                    async with asyncio.TaskGroup() as tasks:
                        reader = tasks.create_task(self._read(inotify))
                        releaser = tasks.create_task(self._pipeline.run())
                        sender = tasks.create_task(self.delivery.run())
                        assert self.reporter is not None
                        reporter = tasks.create_task(self.reporter.run())
                        await stop.wait()
                        reader.cancel()
                        await self._finish()
                        releaser.cancel()
                        sender.cancel()
                        reporter.cancel()
                finally:
                    self._quiet.stop()
                    self.rescans.stop()
        finally:
            self._disk.close()

    def _assemble(self, inotify: Inotify, leases: bool) -> None:
        """Make the parts, each handed the collaborators it works with."""
        announced = Tree()
        self.watches = Watches(inotify, self.root, self.ignore)
        self._moves = MovePairing(self.watches, lambda: _readable(inotify.fd))
        self._quiet = QuietFiles(self._disk, self._pending, leases)
        self._writing = self._quiet.writing
        self.rescans = Rescans(announced, self._disk, self.watches, self._moves, self._pending)
        self.announcer = Announcer(announced, self.delivery, self._disk, self.watches, self.rescans.again_later,
                                   self.unsendable)
        self._pipeline = Pipeline(self._pending, self.announcer, self.delivery, self.ready)
        self._not_sent = UnsendableEvents(self.unsendable, self.ignore, self.rescans.arrived, self._quiet.closed)
        rescans = self.rescans
        self.reporter = MasterReporter(self.delivery.api, lambda: len(self.watches), lambda: rescans.overflows,
                                       self.unsendable)

    def _interface_back(self) -> None:
        if self.reporter is not None:
            self.reporter.resend()

    async def _finish(self) -> None:
        """After SIGTERM: release what was read and send it, for at most SHUTDOWN_S."""
        self._quiet.stop()
        self._moves.resolve_all(RESCANNED)  # the next start's reconcile sees where they went
        try:
            async with asyncio.timeout(SHUTDOWN_S):
                await self._pending.drained.wait()
                self.delivery.flush_soon()
                await self.delivery.wait_idle()
        except TimeoutError:
            log.warning("stopping with %d events not delivered; the next start will reconcile them",
                        self.delivery.buffered + len(self._pending))
        else:
            log.info("stopped: every change seen was delivered")

    # -- reading inotify (synchronous per event, so timers always see a consistent state) --

    async def _read(self, inotify: Inotify) -> None:
        async for event in inotify:
            self._on_event(event)

    def _on_event(self, event: InotifyEvent) -> None:
        mask = int(event.mask)
        ts = time.time()
        if mask & _Q_OVERFLOW:
            self.rescans.overflowed(ts)
            return
        watch = event.watch
        node = self.watches.by_wd.get(watch.wd) if watch is not None else None
        if node is None:
            return  # a watch already forgotten
        if mask & _IGNORED:
            if node is self.watches.top:
                log.error("%s is no longer watched (removed or unmounted)", self.root)
            self.watches.forget(node)
            return
        if event.name is None:
            if node is self.watches.top and mask & _SELF:
                log.error("%s itself was removed or moved: nothing more can be seen there", self.root)
            return
        name = str(event.name)
        rel = f"{node.rel}/{name}" if node.rel else name
        if mask & _MODIFY and rel in self._writing:
            return  # the commonest event of all: more of a write already noted
        ignored = self.ignore(name) or not safe_name(rel, name)
        is_dir = bool(mask & _ISDIR)
        if ignored:
            self._not_sent.ignored(rel, name, mask, is_dir)
        elif self._unsendable_paths and mask & LEAVE_OR_ATTRIB:
            self._not_sent.sendable(rel, mask, is_dir, ts)
        if mask & _MOVED_FROM:
            self._quiet.gone(rel)
            if not ignored:  # if it lands inside the tree, it arrives as something new
                self._pending.add(self._moves.moved_from(node, name, rel, is_dir, event.cookie, ts))
        elif mask & _MOVED_TO:
            if not self._moves.moved_to(node, name, rel, is_dir, event.cookie, ignored) and not ignored:
                self.rescans.arrived(rel, is_dir, ts)
        elif ignored:
            return
        elif mask & _CLOSE_WRITE:
            self._quiet.closed(rel, ts)
        elif mask & (_CREATE | _MODIFY):
            if is_dir:
                self.rescans.arrived(rel, True, ts)
            else:
                self._quiet.modified(rel)
        elif mask & _ATTRIB:
            self._pending.add(Attrib(rel, ts, self._disk.lstat(rel)))
        elif mask & _DELETE:
            self._quiet.gone(rel)
            if is_dir and (child := node.children.get(name)) is not None:
                self.watches.forget(child)
            self._pending.add(Remove(rel, ts))

