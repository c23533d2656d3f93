"""`dlopbox watch`: every change below the master's directory becomes one event, in order.

inotify is not recursive: :class:`Watches` keeps one watch per directory and the current
path of each, adding a watch the moment a directory appears and only then listing it, so
nothing written into it early is missed. Each kernel event becomes an item of one ordered
pipeline; the disk work an item needs (a digest, a stat, a scan) starts at once in a thread
pool, and items are released in the order they were read. The one exception: when the oldest
item's work takes long (a 1 GiB digest), items touching none of its paths, nor their
ancestors, go first — each path's own history stays in order. A released item looks at
:attr:`Watcher.known` — what the slaves have been told — emits only what changes it, and
hands the events to :mod:`dlopbox.watch.delivery`.

Whenever events may have been lost (at start-up, on IN_Q_OVERFLOW, when the delivery buffer
overflowed), a scan of the disk is diffed against what is known, which emits exactly the
differences. Every item reads the disk as it is when it runs, and every later change has a
later item, so the slaves' view always converges on the disk.

A file modified but not closed is read once it has been quiet for SETTLE_S; while some
process still holds it open for writing (a read lease is refused exactly then), only once
quiet for OPEN_QUIET_S, so a copy slowed down by a loaded machine is not sent as a prefix.

Symlinks, FIFOs, sockets and devices are skipped and never followed; names starting with
``.dlopbox`` and the ``DLOPBOX_IGNORE`` patterns are ignored.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import select
import signal
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from asyncinotify import Event as InotifyEvent
from asyncinotify import Inotify, Mask

from ..errors import lstat_or_none
from ..events import Entry, Event, Op
from ..paths import is_within, parent_of
from ..settings import WatcherSettings
from ..tree import Ignore, Tree, diff
from .delivery import Delivery
from .disk import ScanResult, hash_file, open_for_writing, scan_path, stat_matches
from .watches import Dir, Watches, safe_name

log = logging.getLogger(__name__)

T = TypeVar("T")

# Plain ints: testing an IntFlag member per event is slow, and a burst brings ~30,000 events a second.
_CREATE, _MODIFY, _CLOSE_WRITE, _ATTRIB = int(Mask.CREATE), int(Mask.MODIFY), int(Mask.CLOSE_WRITE), int(Mask.ATTRIB)
_DELETE, _MOVED_FROM, _MOVED_TO, _ISDIR = int(Mask.DELETE), int(Mask.MOVED_FROM), int(Mask.MOVED_TO), int(Mask.ISDIR)
_IGNORED, _Q_OVERFLOW, _SELF = int(Mask.IGNORED), int(Mask.Q_OVERFLOW), int(Mask.DELETE_SELF | Mask.MOVE_SELF)
#: A file created or modified but not closed (a hard link, truncate(2), a writer keeping it open)
#: is read once its mtime has been this old, or at the latest after BUSY_MAX_S.
SETTLE_S = 0.5
#: A version whose file is already being rewritten is skipped for the next one, but not for longer.
BUSY_MAX_S = 2.0
#: The same two for a file some process still holds open for writing: a log kept open still goes out.
OPEN_QUIET_S = 5.0
OPEN_BUSY_MAX_S = 30.0
#: How long a MOVED_FROM waits for its MOVED_TO before it counts as a move out of the tree.
PAIR_S = 0.02
#: How long the oldest item may hold back later items that touch none of its paths (a big digest).
OVERTAKE_AFTER_S = 0.1
#: On SIGTERM, how long to finish releasing and sending what was read.
SHUTDOWN_S = 5.0
READ_EVENTS = 512
#: A file this small is hashed on the event loop (tens of microseconds): cheaper than a thread hop.
INLINE_HASH_BYTES = 64 * 1024
YIELD_EVERY = 256


async def run(settings: WatcherSettings, *, stop: asyncio.Event) -> None:
    """The `dlopbox watch` service: watch ``settings.root`` and post every change until ``stop``."""
    connector = aiohttp.TCPConnector(limit=4, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector) as session:
        await Watcher(settings, session).run(stop)


# -- what the slaves have been told -------------------------------------------------------------


# -- the ordered pipeline -----------------------------------------------------------------------------


class _Item:
    """One change read from inotify; ``job`` is its disk work, started when it was read."""

    __slots__ = ("path", "ts", "job")

    def __init__(self, path: str, ts: float, job: asyncio.Future[Any] | None = None) -> None:
        self.path = path
        self.ts = ts
        self.job = job

    def ready(self) -> bool:
        return self.job is None or self.job.done()

    def paths(self) -> tuple[str, ...] | None:
        """What the item may change; None for everything (the root, or a move not paired yet)."""
        return (self.path,) if self.path else None

    def discard(self) -> None:
        if self.job is not None:
            self.job.cancel()

    async def release(self, watcher: Watcher) -> None:
        raise NotImplementedError


class _Write(_Item):
    """A file was closed after writing (or settled): read its new version."""

    __slots__ = ("superseded",)

    def __init__(self, path: str, ts: float, job: asyncio.Future[Any]) -> None:
        super().__init__(path, ts, job)
        self.superseded = False  # a later write of the same path will read it again

    async def release(self, watcher: Watcher) -> None:
        watcher.released_write(self)
        assert self.job is not None
        if self.superseded:
            return
        entry = await watcher.current(self.path, await self.job)
        if entry is not None and not watcher.busy(self.path):
            await watcher.set_entry(self.path, entry, self.ts)


class _Attrib(_Item):
    async def release(self, watcher: Watcher) -> None:
        assert self.job is not None
        st = await self.job
        if st is not None:
            await watcher.set_attributes(self.path, st, self.ts)


class _Remove(_Item):
    async def release(self, watcher: Watcher) -> None:
        await watcher.remove(self.path, self.ts)


class _Reconcile(_Item):
    async def release(self, watcher: Watcher) -> None:
        assert self.job is not None
        await watcher.apply_scan(self.path, await self.job, self.ts)


#: What a pending move resolves to besides its destination.
MOVED_OUT = None
RESCANNED = ""


class _Move(_Item):
    """A MOVED_FROM; ``job`` resolves to the MOVED_TO's path, MOVED_OUT, or RESCANNED."""

    __slots__ = ("is_dir",)

    def __init__(self, path: str, ts: float, job: asyncio.Future[Any], is_dir: bool) -> None:
        super().__init__(path, ts, job)
        self.is_dir = is_dir

    def resolve(self, outcome: str | None) -> None:
        """Pair it (or not); a move discarded by a reconcile is still paired, for its watches' sake."""
        assert self.job is not None
        if not self.job.done():
            self.job.set_result(outcome)

    def paths(self) -> tuple[str, ...] | None:
        if not self.ready():
            return None
        assert self.job is not None
        dest = self.job.result() if not self.job.cancelled() else None
        return (self.path, dest) if dest else (self.path,)

    async def release(self, watcher: Watcher) -> None:
        assert self.job is not None
        dest = await self.job
        if dest is MOVED_OUT:
            await watcher.remove(self.path, self.ts)
        elif dest != RESCANNED:
            await watcher.move(self.path, dest, self.is_dir, self.ts)


class _Wake(_Item):
    """Nothing: wakes the releaser so that it sees the delivery buffer was dropped."""

    def paths(self) -> tuple[str, ...] | None:
        return ()

    async def release(self, watcher: Watcher) -> None:
        return None


def _related(a: str, b: str) -> bool:
    return is_within(a, b) or is_within(b, a)


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


class Watcher:
    """inotify -> ordered items -> events applied to :attr:`known` and handed to :attr:`delivery`."""

    def __init__(self, settings: WatcherSettings, session: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.root = Path(settings.root)
        self._root = str(self.root)
        self.ignore = Ignore(settings.ignore)
        self.known = Tree()
        self.delivery = Delivery(session, settings.interface_url, settings.token, batch_ms=settings.batch_ms,
                                 batch_max=settings.batch_max, buffer_max=settings.buffer_max,
                                 on_lost=self._wake_releaser)
        #: Set once the disk has been reconciled with the interface's manifest at start-up.
        self.ready = asyncio.Event()
        self.overflows = 0
        self.reconciles = 0
        self._pending: deque[_Item] = deque()  # read, not yet released, in read order
        self._arrival = asyncio.Event()
        self._drained = asyncio.Event()  # nothing pending and nothing being released
        self._dirty: dict[str, tuple[asyncio.TimerHandle, float]] = {}  # modified, not closed: (timer, since)
        self._skipped: dict[str, float] = {}  # path -> when a version of it was first skipped as busy
        self._last_write: dict[str, _Write] = {}  # path -> its latest pending write item
        self._moves: dict[int, tuple[_Move, Dir | None]] = {}
        self._abort = threading.Event()
        self._rescan: Future[ScanResult] | None = None
        self._overflow_logged = float("-inf")
        #: Scans to run again (by path) because the disk changed while they read it.
        self._rescans: dict[str, asyncio.TimerHandle] = {}
        self._needs_manifest = True
        self._leases = False  # open_for_writing() is usable: SIGIO ignored
        self._pool: ThreadPoolExecutor
        self._inotify: Inotify
        self._watches: Watches
        self._loop: asyncio.AbstractEventLoop

    async def run(self, stop: asyncio.Event) -> None:
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root} is not a directory")
        self._loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGIO, signal.SIG_IGN)  # a lease broken by a writer must not kill us
            self._leases = True
        workers = max(1, self.settings.hash_workers)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dlopbox-hash")
        try:
            with Inotify(cache_size=READ_EVENTS) as inotify:
                self._inotify = inotify
                self._watches = Watches(inotify, self.root, self.ignore)
                self._watches.watch_tree("")
                if self._watches.top is None:
                    raise OSError(f"cannot watch {self.root}")
                log.info("watching %d directories below %s", len(self._watches), self.root)
                async with asyncio.TaskGroup() as tasks:
                    reader = tasks.create_task(self._read(inotify))
                    releaser = tasks.create_task(self._release())
                    sender = tasks.create_task(self.delivery.run())
                    await stop.wait()
                    reader.cancel()
                    await self._finish()
                    releaser.cancel()
                    sender.cancel()
        finally:
            self._abort.set()
            for timer, _ in self._dirty.values():
                timer.cancel()
            for timer in self._rescans.values():
                timer.cancel()
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def _finish(self) -> None:
        """After SIGTERM: release what was read and send it, for at most SHUTDOWN_S."""
        for timer, _ in self._dirty.values():
            timer.cancel()
        self._dirty.clear()
        self._resolve_moves(RESCANNED)  # the next start's reconcile sees where they went
        try:
            async with asyncio.timeout(SHUTDOWN_S):
                await self._drained.wait()
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
            self._overflowed(ts)
            return
        watch = event.watch
        node = self._watches.by_wd.get(watch.wd) if watch is not None else None
        if node is None:
            return  # a watch already forgotten
        if mask & _IGNORED:
            if node is self._watches.top:
                log.error("%s is no longer watched (removed or unmounted)", self.root)
            self._watches.forget(node)
            return
        if event.name is None:
            if node is self._watches.top and mask & _SELF:
                log.error("%s itself was removed or moved: nothing more can be seen there", self.root)
            return
        name = str(event.name)
        rel = f"{node.rel}/{name}" if node.rel else name
        if mask & _MODIFY and rel in self._dirty:
            return  # the commonest event of all: more of a write already noted
        ignored = self.ignore(name) or not safe_name(rel, name)
        is_dir = bool(mask & _ISDIR)
        if mask & _MOVED_FROM:
            self._moved_from(node, name, rel, is_dir, event.cookie, ts, ignored)
        elif mask & _MOVED_TO:
            self._moved_to(node, name, rel, is_dir, event.cookie, ts, ignored)
        elif ignored:
            return
        elif mask & _CLOSE_WRITE:
            self._clean(rel)
            self._enqueue_write(rel, ts)
        elif mask & (_CREATE | _MODIFY):
            if is_dir:
                self._arrived(rel, True, ts)
            else:
                self._mark_dirty(rel)
        elif mask & _ATTRIB:
            self._enqueue(_Attrib(rel, ts, self._in_pool(lstat_or_none, self._path(rel), OSError)))
        elif mask & _DELETE:
            self._clean(rel)
            self._skipped.pop(rel, None)
            if is_dir and (child := node.children.get(name)) is not None:
                self._watches.forget(child)
            self._enqueue(_Remove(rel, ts))

    def _moved_from(self, node: Dir, name: str, rel: str, is_dir: bool, cookie: int, ts: float, ignored: bool) -> None:
        self._clean(rel)
        self._skipped.pop(rel, None)
        if ignored:
            return  # if it lands inside the tree, it arrives as something new
        item = _Move(rel, ts, self._loop.create_future(), is_dir)
        self._moves[cookie] = (item, node.children.get(name) if is_dir else None)
        self._enqueue(item)
        self._loop.call_later(PAIR_S, self._pair_expired, cookie, False)

    def _moved_to(self, node: Dir, name: str, rel: str, is_dir: bool, cookie: int, ts: float, ignored: bool) -> None:
        pending = self._moves.pop(cookie, None)
        if pending is None:
            if not ignored:
                self._arrived(rel, is_dir, ts)
            return
        item, moved = pending
        assert item.job is not None
        if ignored:
            if moved is not None:
                self._watches.forget(moved)
            item.resolve(MOVED_OUT)
            return
        if is_dir:
            if moved is not None and self._watches.by_wd.get(moved.watch.wd) is moved:
                self._watches.move(moved, node, name)
            else:
                self._watches.watch_tree(rel)
        item.resolve(rel)

    def _pair_expired(self, cookie: int, confirmed: bool) -> None:
        """No MOVED_TO yet: once nothing is left to read, the MOVED_FROM was a move out of the tree."""
        if cookie not in self._moves:
            return
        if not confirmed:
            # Let a reader woken in this same loop iteration process what it read first.
            self._loop.call_soon(self._pair_expired, cookie, True)
            return
        if _readable(self._inotify.fd):
            self._loop.call_later(PAIR_S, self._pair_expired, cookie, False)
            return
        item, moved = self._moves.pop(cookie)
        if moved is not None:
            self._watches.forget(moved)
        item.resolve(MOVED_OUT)

    def _arrived(self, rel: str, is_dir: bool, ts: float) -> None:
        """A directory was made, or something was moved in: watch it, then scan it."""
        if is_dir:
            self._watches.watch_tree(rel)
        scanned = self._in_pool(scan_path, self.root, rel, self.ignore, self.known, self._abort)
        self._enqueue(_Reconcile(rel, ts, scanned))

    def _overflowed(self, ts: float) -> None:
        self.overflows += 1
        now = time.monotonic()
        if now - self._overflow_logged >= 10:
            self._overflow_logged = now
            log.warning("the kernel dropped inotify events (queue overflow, %d so far): rescanning %s",
                        self.overflows, self.root)
        self._resolve_moves(RESCANNED)
        self._watches.watch_tree("")  # directories made while events were dropped have no watch yet
        if self._rescan is not None and not self._rescan.running() and not self._rescan.done():
            return  # the rescan already queued has not started: it sees what was just lost too
        self._rescan = self._pool.submit(scan_path, self.root, "", self.ignore, self.known, self._abort)
        self._enqueue(_Reconcile("", ts, asyncio.wrap_future(self._rescan)))

    def _resolve_moves(self, outcome: str) -> None:
        for item, _ in self._moves.values():
            item.resolve(outcome)
        self._moves.clear()

    def _mark_dirty(self, rel: str) -> None:
        if rel not in self._dirty:
            self._dirty[rel] = (self._loop.call_later(SETTLE_S, self._settle, rel), time.monotonic())

    def _clean(self, rel: str) -> None:
        dirty = self._dirty.pop(rel, None)
        if dirty is not None:
            dirty[0].cancel()

    def _path(self, rel: str) -> str:
        return os.path.join(self._root, rel)

    def _settle(self, rel: str) -> None:
        """A file changed without being closed: read it once it has been quiet for SETTLE_S."""
        _, since = self._dirty.pop(rel)
        path = self._path(rel)
        st = lstat_or_none(path, OSError)
        if st is None or not stat.S_ISREG(st.st_mode):
            return
        quiet, patience = SETTLE_S, BUSY_MAX_S
        if self._leases and open_for_writing(path):
            quiet, patience = OPEN_QUIET_S, OPEN_BUSY_MAX_S
        busy = 0 <= time.time_ns() - st.st_mtime_ns < quiet * 1e9
        if busy and time.monotonic() - since < patience:
            self._dirty[rel] = (self._loop.call_later(SETTLE_S, self._settle, rel), since)
            return
        self._enqueue_write(rel, time.time())

    async def current(self, rel: str, entry: Entry | None) -> Entry | None:
        """``entry`` if the file is still that version; else read it again (a rewrite raced the digest)."""
        for _ in range(2):
            st = lstat_or_none(self._path(rel), OSError) if entry is not None else None
            if st is None or entry is None:
                return None
            if stat_matches(st, entry):
                return entry
            entry = await self._in_pool(hash_file, self._path(rel), rel, self._abort)
        return entry

    def busy(self, rel: str) -> bool:
        """True when the file is being written again: its next version follows, so skip this one.

        This spares the slaves the empty file between a rewrite's truncation and its write;
        a file that never stops being rewritten still goes out every BUSY_MAX_S.
        """
        if rel not in self._dirty:
            self._skipped.pop(rel, None)
            return False
        first = self._skipped.setdefault(rel, time.monotonic())
        if time.monotonic() - first < BUSY_MAX_S:
            return True
        del self._skipped[rel]
        return False

    def _enqueue_write(self, rel: str, ts: float) -> None:
        earlier = self._last_write.get(rel)
        if earlier is not None:
            # 50 writes in a row are read once: each version is dropped when the next one is closed.
            earlier.superseded = True
            earlier.discard()
        item = self._last_write[rel] = _Write(rel, ts, self._read_version(rel))
        self._enqueue(item)

    def _read_version(self, rel: str) -> asyncio.Future[Entry | None]:
        """:func:`hash_file` of ``rel``: at once for a small file, in the pool otherwise."""
        path = self._path(rel)
        st = lstat_or_none(path, OSError)
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_size <= INLINE_HASH_BYTES:
            done: asyncio.Future[Entry | None] = self._loop.create_future()
            done.set_result(hash_file(path, rel, self._abort))
            return done
        return self._in_pool(hash_file, path, rel, self._abort)

    def released_write(self, item: _Write) -> None:
        if self._last_write.get(item.path) is item:
            del self._last_write[item.path]

    def _enqueue(self, item: _Item) -> None:
        self._pending.append(item)
        self._drained.clear()
        self._arrival.set()

    def _in_pool(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        return self._loop.run_in_executor(self._pool, fn, *args)

    def _wake_releaser(self) -> None:
        self._enqueue(_Wake("", time.time()))

    # -- releasing, in order --

    async def _release(self) -> None:
        released = 0
        while True:
            if self._needs_manifest or self.delivery.lost:
                await self._reconcile_with_interface()
                continue
            if not self._pending:
                self._drained.set()
                self._arrival.clear()
                await self._arrival.wait()
                continue
            head = self._pending[0]
            if not head.ready():
                await self._wait_or_overtake(head)
                continue
            self._pending.popleft()
            await self._release_one(head)
            released += 1
            if released % YIELD_EVERY == 0:
                await asyncio.sleep(0)

    async def _release_one(self, item: _Item) -> None:
        await self.delivery.room()
        if self.delivery.lost:
            item.discard()  # a reconcile with the manifest follows and sees it
        else:
            await item.release(self)

    async def _wait_or_overtake(self, head: _Item) -> None:
        """The oldest item waits for its disk work; after OVERTAKE_AFTER_S, let unrelated ones by.

        A 1 GiB digest takes seconds: changes to other paths go out meanwhile, while anything
        touching the same path or one of its ancestors keeps its place behind it.
        """
        assert head.job is not None
        await asyncio.wait({head.job}, timeout=OVERTAKE_AFTER_S)
        while not head.ready() and not (self._needs_manifest or self.delivery.lost):
            await self._release_unrelated()
            await asyncio.wait({head.job}, timeout=0.01)

    async def _release_unrelated(self) -> None:
        blocked: list[str] = []
        i = 0
        while i < len(self._pending):
            item = self._pending[i]
            paths = item.paths()
            if paths is None:
                return  # it may touch anything: nothing after it goes first
            if item.ready() and not any(_related(p, b) for p in paths for b in blocked):
                del self._pending[i]
                await self._release_one(item)
                if self._needs_manifest or self.delivery.lost:
                    return
                continue
            blocked.extend(paths)
            i += 1

    def _discard_queued(self) -> None:
        while self._pending:
            self._pending.popleft().discard()
        self._last_write.clear()

    async def _reconcile_with_interface(self) -> None:
        """Make the interface's tree equal to the disk, whatever it missed (start-up, dropped buffer)."""
        self._needs_manifest = True
        state = asyncio.ensure_future(self._interface_tree())
        try:
            while not state.done():
                # Whatever is read before the scan starts, the scan sees.
                self._discard_queued()
                await asyncio.wait({state}, timeout=0.05)
            manifest = state.result()
        finally:
            state.cancel()
        self._discard_queued()
        previous: Tree = self.known if len(self.known) else manifest
        result = await self._in_pool(scan_path, self.root, "", self.ignore, previous, self._abort)
        self.known = Tree(manifest.entries.values())
        self._needs_manifest = False
        self.delivery.resume()
        self.reconciles += 1
        events = diff(self.known, self._stable(result))
        log.info("reconciled %s with the interface's %d entries: %d events to send",
                 self.root, len(manifest), len(events))
        await self._emit_all(events, time.time())
        self.ready.set()

    async def _interface_tree(self) -> Tree:
        await self.delivery.wait_idle()  # a batch still in flight must land before the manifest is read
        return await self.delivery.fetch_manifest()

    def _stable(self, result: ScanResult) -> Tree:
        """The scanned tree, with files that changed while read left as known (their events follow)."""
        tree = result.tree
        for path in result.unstable:
            known = self.known.get(path)
            if known is not None and not known.is_dir:
                tree.entries[path] = known
            else:
                tree.entries.pop(path, None)
        return tree

    def _emit(self, event: Event) -> None:
        created = (event.dest if event.op is Op.MOVE else event.path) not in self.known
        self.known.apply(event)
        self.delivery.add(event, created)

    async def _emit_all(self, events: list[Event], ts: float) -> None:
        for i, event in enumerate(events):
            if i and i % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            if self.delivery.buffered >= self.delivery.buffer_max:
                await self.delivery.room()
            if self.delivery.lost:
                return  # a reconcile with the manifest follows
            self._emit(dataclasses.replace(event, ts=ts))

    async def set_entry(self, path: str, entry: Entry, ts: float) -> None:
        """The file at ``path`` is now ``entry``: a write, or an attrib if only mode or mtime changed."""
        if not self.known.is_dir(parent_of(path)):
            return  # its directory is gone, or not announced yet: the directory's own item covers it
        old = self.known.get(path)
        if old is not None and old.is_dir:
            self._emit(Event(Op.RMDIR, path, is_dir=True, ts=ts))
            old = None
        if old is None or (old.size, old.digest) != (entry.size, entry.digest):
            self._emit(Event(Op.WRITE, path, size=entry.size, mtime_ns=entry.mtime_ns, mode=entry.mode,
                             digest=entry.digest, ts=ts))
        elif (old.mode, old.mtime_ns) != (entry.mode, entry.mtime_ns):
            self._emit(Event(Op.ATTRIB, path, mode=entry.mode, mtime_ns=entry.mtime_ns, ts=ts))

    async def set_attributes(self, path: str, st: os.stat_result, ts: float) -> None:
        """chmod/touch: mode and mtime only, for an entry whose content is known."""
        old = self.known.get(path)
        if old is None:
            return
        mode = stat.S_IMODE(st.st_mode)
        if old.is_dir and stat.S_ISDIR(st.st_mode):
            if mode != old.mode:
                self._emit(Event(Op.ATTRIB, path, is_dir=True, mode=mode, mtime_ns=0, ts=ts))
        elif not old.is_dir and stat.S_ISREG(st.st_mode) and st.st_size == old.size:
            if (mode, st.st_mtime_ns) != (old.mode, old.mtime_ns):
                self._emit(Event(Op.ATTRIB, path, mode=mode, mtime_ns=st.st_mtime_ns, ts=ts))
        # else its content or type is changing: the events of that change follow

    async def remove(self, path: str, ts: float) -> None:
        old = self.known.get(path)
        if old is not None and lstat_or_none(self._path(path), OSError) is not None:
            # There again: recreated since, or a stale kernel event read after a rescan already saw
            # the newer disk (inotify overflow). The disk decides, never the event.
            await self._reconcile_paths((path,), ts)
            return
        if old is not None:
            self._emit(Event(Op.RMDIR, path, is_dir=True, ts=ts) if old.is_dir else Event(Op.DELETE, path, ts=ts))

    async def move(self, src: str, dest: str, is_dir: bool, ts: float) -> None:
        """A rename inside the tree: one move event, then a check that the disk agrees."""
        old = self.known.get(src)
        if old is None or old.is_dir != is_dir or not self.known.is_dir(parent_of(dest)):
            # The source was never announced (a temp file renamed into place) or has changed since.
            await self._reconcile_paths((src, dest), ts)
            return
        file_fields: dict[str, Any] = {} if is_dir else {
            "size": old.size, "mtime_ns": old.mtime_ns, "mode": old.mode, "digest": old.digest}
        self._emit(Event(Op.MOVE, src, dest=dest, is_dir=is_dir, ts=ts, **file_fields))
        # Items read before the rename may have been dropped because their path had moved: the
        # scan of the destination brings them (and normally emits nothing).
        await self._reconcile_paths((src, dest), ts)

    async def _reconcile_paths(self, paths: Iterable[str], ts: float) -> None:
        for rel in paths:
            if self.ignore.path(rel) or not self.known.is_dir(parent_of(rel)):
                continue
            # Watched before it is read, like an arrival: a directory made inside one renamed before its
            # creation was read has no watch (the watch by its old path failed), and a renamed tree
            # brings it along unwatched; every later change inside it would go unseen.
            self._watches.watch_tree(rel)
            result = await self._in_pool(scan_path, self.root, rel, self.ignore, self.known, self._abort)
            await self.apply_scan(rel, result, ts)

    async def apply_scan(self, rel: str, result: ScanResult, ts: float) -> None:
        """Make what is known at ``rel`` (and below) equal to what the scan found.

        Paths that changed while they were read are left as known, for their own events; but
        after a kernel queue overflow those events may be lost, so ``rel`` is scanned again once
        it has been quiet for a moment, until a scan finds it still.
        """
        if rel and not self.known.is_dir(parent_of(rel)):
            return  # the parent's own item scans it
        new = self._stable(result)
        await self._emit_all(diff(Tree(self.known.subtree(rel)), new), ts)
        if result.unstable and rel not in self._rescans and not self._abort.is_set():
            self._rescans[rel] = self._loop.call_later(SETTLE_S, self._scan_again, rel)

    def _scan_again(self, rel: str) -> None:
        self._rescans.pop(rel, None)
        if self._abort.is_set() or (rel and lstat_or_none(self._path(rel), OSError) is None):
            return  # stopping, or gone: its removal has its own event or rescan
        self._arrived(rel, self.known.is_dir(rel), time.time())
