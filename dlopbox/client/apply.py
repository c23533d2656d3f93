"""Applying one event to the slave's directory, atomically and without ever leaving it.

Every path goes through :func:`dlopbox.paths.resolve`, which refuses a symlinked parent;
a symlink standing at the final name is replaced or removed, never followed. Writes are
downloaded into a temp file and renamed over the final name (see :mod:`dlopbox.client.download`);
moves are local renames, so a renamed 1 GiB file is not transferred again.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import shutil
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from ..errors import lstat_or_none
from ..events import Event, Op
from ..paths import resolve
from .blocks import BlockIndex
from .download import Downloader, FileVersion, StaleContent
from .fate import FateFinder
from .installed import InstalledRecord

log = logging.getLogger(__name__)

#: Seconds a write whose bytes are gone waits here (for news) before it is left to the client to watch:
#: holding its place longer would hold every later acknowledgement, so the queue would stop
#: delivering (prefetch) the very event that explains it.
EXPLAIN_WAIT = 1.0


class Outcome(enum.Enum):
    APPLIED = "applied"
    SKIPPED = "skipped"  # superseded: a newer event brings the newer state
    RESYNC = "resync"  # the local tree cannot follow this event: make it equal to the manifest


class Unexplained(Exception):
    """A write's bytes are gone from the master and no newer event explains it yet: one should
    follow (the caller watches for it). ``path`` is where the bytes were last known to be."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


#: Waits up to a timeout for news about a path (a later event touching it); asyncio.sleep will do.
NewsWaiter = Callable[[str, float], Awaitable[None]]


async def _sleep(path: str, timeout: float) -> None:
    await asyncio.sleep(timeout)


class Applier:
    def __init__(self, target: Path, downloader: Downloader, finder: FateFinder | None = None,
                 news: NewsWaiter = _sleep, record: InstalledRecord | None = None) -> None:
        self.target = target
        self.downloader = downloader
        self.finder = finder  # says what became of a write's content on the master since
        self.news = news
        #: What was installed where, kept as each event leaves the directory (see :mod:`.installed`).
        self.record = record

    async def apply(self, event: Event, *, resync: bool = False) -> Outcome:
        """Apply one event; raises UnsafePathError for a path that would leave the target."""
        match event.op:
            case Op.WRITE:
                return await self.write(event, resync=resync)
            case Op.MOVE:
                return await self.move(event, resync=resync)
            case Op.DELETE | Op.RMDIR:
                return await self.remove(event)
            case Op.MKDIR:
                return self.mkdir(event)
            case Op.ATTRIB:
                return self.attrib(event)
        raise AssertionError(event.op)

    async def write(self, event: Event, *, resync: bool = False) -> Outcome:
        """Install the event's version; raises :class:`Unexplained` if its bytes are gone and nothing
        known yet says why."""
        assert event.size is not None and event.digest is not None and event.mode is not None
        assert event.mtime_ns is not None
        final = resolve(self.target, event.path)
        version = FileVersion(event.size, event.digest, event.mode, event.mtime_ns, event.blocks)
        source = event.path
        stale_since: float | None = None
        delay = 0.1
        while True:
            try:
                await self.downloader.install(source, final, version)
                if self.record is not None:
                    self.record.file(event.path, version.size, version.mtime_ns, version.mode, version.digest,
                                     version.blocks)
                return Outcome.APPLIED
            except StaleContent as exc:
                if resync or self.finder is None:
                    # A manifest's file changed since: the queue holds the event that changed it.
                    log.info("skipped %s: %s (newer events follow)", event.path, exc)
                    return Outcome.SKIPPED
                fate = await self.finder.fate(event)
                if fate.superseded:
                    log.debug("skipped seq %s %s: %s; a newer event replaces it", event.seq, event.path, exc)
                    return Outcome.SKIPPED
                if fate.path != source:
                    log.debug("seq %s %s: the master moved it to %s since; fetching it there",
                              event.seq, event.path, fate.path)
                    source = fate.path
                    continue
                now = time.monotonic()
                stale_since = now if stale_since is None else stale_since
                if now - stale_since > EXPLAIN_WAIT:
                    log.info("seq %s write %s: %s; no newer event explains it yet, watching for one",
                             event.seq, event.path, exc)
                    raise Unexplained(source)
                # Most likely its newer event is still on its way: wake as soon as it arrives.
                log.debug("seq %s %s: %s; no newer event known yet, retrying within %.1fs", event.seq, event.path,
                          exc, delay)
                await self.news(source, delay)
                delay *= 2  # 0.1, 0.2, 0.4, 0.8: within EXPLAIN_WAIT

    async def move(self, event: Event, *, resync: bool = False) -> Outcome:
        assert event.dest is not None
        src = resolve(self.target, event.path)
        dst = resolve(self.target, event.dest)
        st = lstat_or_none(src)
        if event.is_dir:
            if st is None or not stat.S_ISDIR(st.st_mode):
                log.warning("seq %s: cannot move directory %s: it is missing here; will resync", event.seq, event.path)
                return Outcome.RESYNC
            await asyncio.to_thread(_rename_over, src, dst, True)
            await self._moved(event.path, event.dest, True)
            if self.record is not None:
                self.record.move(event.path, event.dest)
            return Outcome.APPLIED
        have_it = st is not None and stat.S_ISREG(st.st_mode) and (
            event.size is None or (st.st_size == event.size and st.st_mtime_ns == event.mtime_ns))
        if have_it:
            await asyncio.to_thread(_rename_over, src, dst, False)
            await self._moved(event.path, event.dest, False)
            if self.record is not None:
                self.record.move(event.path, event.dest)
            if event.mode is not None and st is not None and stat.S_IMODE(st.st_mode) != event.mode:
                os.chmod(dst, event.mode)
                if self.record is not None:
                    self.record.attributes(event.dest, event.mode, None)
            return Outcome.APPLIED
        if st is not None and not stat.S_ISDIR(st.st_mode):
            os.unlink(src)  # an outdated copy: the master no longer has anything at the source
        if self.record is not None and (st is None or not stat.S_ISDIR(st.st_mode)):
            self.record.remove(event.path)
        if event.size is None or event.digest is None or event.mode is None or event.mtime_ns is None:
            log.warning("seq %s: cannot move %s: no up-to-date copy here and no digest to fetch one; will resync",
                        event.seq, event.path)
            return Outcome.RESYNC
        log.info("seq %s: %s is not here as expected; fetching %s instead", event.seq, event.path, event.dest)
        as_write = Event(Op.WRITE, event.dest, size=event.size, mtime_ns=event.mtime_ns, mode=event.mode,
                         digest=event.digest, seq=event.seq, ts=event.ts, blocks=event.blocks)
        return await self.write(as_write, resync=resync)

    async def _moved(self, src: str, dest: str, is_dir: bool) -> None:
        """The block index follows a local rename: the moved file's blocks still serve other files."""
        index = self.downloader.index
        if index is not None and index.paths and (src in index.paths or dest in index.paths or is_dir):
            await asyncio.to_thread(index.move, src, dest, is_dir)

    async def remove(self, event: Event) -> Outcome:
        final = resolve(self.target, event.path)
        st = lstat_or_none(final)
        index = self.downloader.index
        if index is not None and index.paths and (event.path in index.paths or event.is_dir
                                                  or index.partial_path(event.path)[0] in index.paths):
            await asyncio.to_thread(_forget, index, event.path, event.is_dir)
        if st is not None and stat.S_ISDIR(st.st_mode):
            await asyncio.to_thread(shutil.rmtree, final)
        elif st is not None:
            _unlink(final)
        if self.record is not None:
            self.record.remove(event.path)
        return Outcome.APPLIED

    def mkdir(self, event: Event) -> Outcome:
        assert event.mode is not None
        final = resolve(self.target, event.path)
        st = lstat_or_none(final)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            _unlink(final)  # a file or a foreign symlink stands where the master has a directory
            st = None
        if st is None:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(final, 0o700)
        os.chmod(final, event.mode)  # a real directory: lstat said so, or it was just made
        if self.record is not None:
            self.record.directory(event.path, event.mode)
        return Outcome.APPLIED

    def attrib(self, event: Event) -> Outcome:
        assert event.mode is not None
        final = resolve(self.target, event.path)
        st = lstat_or_none(final)
        if st is None:
            # The write that creates it is superseded or still to come, and carries its attributes.
            log.debug("seq %s: attrib of %s, which is not here (yet)", event.seq, event.path)
            return Outcome.APPLIED
        if stat.S_ISLNK(st.st_mode):
            log.warning("seq %s: %s is a symlink here, not what the master has; will resync", event.seq, event.path)
            return Outcome.RESYNC
        if stat.S_ISDIR(st.st_mode) != event.is_dir:
            log.debug("seq %s: attrib of %s, whose type differs here; a later event fixes it", event.seq, event.path)
            return Outcome.APPLIED
        if stat.S_IMODE(st.st_mode) != event.mode:
            os.chmod(final, event.mode)
        if not event.is_dir and event.mtime_ns is not None and st.st_mtime_ns != event.mtime_ns:
            os.utime(final, ns=(event.mtime_ns, event.mtime_ns), follow_symlinks=False)
        if self.record is not None:
            self.record.attributes(event.path, event.mode, None if event.is_dir else event.mtime_ns)
        return Outcome.APPLIED


def _forget(index: BlockIndex, path: str, is_dir: bool) -> None:
    index.remove(path, is_dir)
    index.drop_partial(path)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _is_empty(directory: Path) -> bool:
    with os.scandir(directory) as entries:
        return next(entries, None) is None


def _rename_over(src: Path, dst: Path, is_dir: bool) -> None:
    """rename(2) ``src`` onto ``dst`` as the master did; whatever stood at ``dst`` is replaced (blocking)."""
    st = lstat_or_none(dst)
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            if not is_dir or not _is_empty(dst):
                shutil.rmtree(dst)
        elif is_dir:
            os.unlink(dst)  # a file or symlink where the directory goes: rename(2) would refuse
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.rename(src, dst)
