"""Which version of a file to read: the quiet-file rules for files still being written.

A file modified but not closed (a hard link, truncate(2), a writer keeping it open) is read
once it has been quiet for SETTLE_S; while some process still holds it open for writing (a
read lease is refused exactly then), only once quiet for OPEN_QUIET_S, so a copy slowed down
by a loaded machine is not sent as a prefix. A closed version whose file is already being
written again is skipped for the next one, and 50 writes in a row are read once.
"""

from __future__ import annotations

import asyncio
import stat
import time
from typing import Any

from ..errors import lstat_or_none
from .announce import Announcer
from .disk import DiskWork, Unreadable, open_for_writing
from .pipeline import Item, Pending

#: A file created or modified but not closed is read once its mtime has been this old, or at the
#: latest after BUSY_MAX_S.
SETTLE_S = 0.5
#: A version whose file is already being rewritten is skipped for the next one, but not for longer.
BUSY_MAX_S = 2.0
#: The same two for a file some process still holds open for writing: a log kept open still goes out.
OPEN_QUIET_S = 5.0
OPEN_BUSY_MAX_S = 30.0


class Write(Item):
    """A file was closed after writing (or is quiet): read its new version."""

    __slots__ = ("superseded", "files")

    def __init__(self, path: str, ts: float, job: asyncio.Future[Any], files: QuietFiles) -> None:
        super().__init__(path, ts, job)
        self.superseded = False  # a later write of the same path will read it again
        self.files = files

    def discard(self) -> None:
        super().discard()
        self.files.released(self)

    async def release(self, announcer: Announcer) -> None:
        files = self.files
        files.released(self)
        assert self.job is not None
        if self.superseded:
            return
        entry = await files.disk.current(self.path, await self.job)
        if isinstance(entry, Unreadable):
            announcer.unreadable(self.path, entry.reason)
        elif entry is not None and not files.busy(self.path):
            await announcer.set_entry(self.path, entry, self.ts)


class QuietFiles:
    """Turns closes and quiet files into :class:`Write` items, one pending per path."""

    def __init__(self, disk: DiskWork, pending: Pending, leases: bool) -> None:
        self.disk = disk
        self._pending = pending
        self._leases = leases  # open_for_writing() is usable: SIGIO ignored
        self._loop = asyncio.get_running_loop()
        #: Modified, not closed: path -> (the timer of its next check, since when).
        self.writing: dict[str, tuple[asyncio.TimerHandle, float]] = {}
        self._skipped: dict[str, float] = {}  # path -> when a version of it was first skipped as busy
        self._latest: dict[str, Write] = {}  # path -> its latest pending write item

    def modified(self, rel: str) -> None:
        if rel not in self.writing:
            self.writing[rel] = (self._loop.call_later(SETTLE_S, self._read_when_quiet, rel), time.monotonic())

    def closed(self, rel: str, ts: float) -> None:
        self._stop_checking(rel)
        self._write(rel, ts)

    def gone(self, rel: str) -> None:
        """Deleted or moved away: nothing of it is left to wait for."""
        self._stop_checking(rel)
        self._skipped.pop(rel, None)

    def stop(self) -> None:
        for timer, _ in self.writing.values():
            timer.cancel()
        self.writing.clear()

    def busy(self, rel: str) -> bool:
        """True when the file is being written again: its next version follows, so skip this one.

        This spares the slaves the empty file between a rewrite's truncation and its write;
        a file that never stops being rewritten still goes out every BUSY_MAX_S.
        """
        if rel not in self.writing:
            self._skipped.pop(rel, None)
            return False
        first = self._skipped.setdefault(rel, time.monotonic())
        if time.monotonic() - first < BUSY_MAX_S:
            return True
        del self._skipped[rel]
        return False

    def released(self, item: Write) -> None:
        if self._latest.get(item.path) is item:
            del self._latest[item.path]

    def _stop_checking(self, rel: str) -> None:
        writing = self.writing.pop(rel, None)
        if writing is not None:
            writing[0].cancel()

    def _read_when_quiet(self, rel: str) -> None:
        """A file changed without being closed: read it once it has been quiet for SETTLE_S."""
        _, since = self.writing.pop(rel)
        path = self.disk.path(rel)
        st = lstat_or_none(path, OSError)
        if st is None or not stat.S_ISREG(st.st_mode):
            return
        quiet, patience = SETTLE_S, BUSY_MAX_S
        if self._leases and open_for_writing(path):
            quiet, patience = OPEN_QUIET_S, OPEN_BUSY_MAX_S
        busy = 0 <= time.time_ns() - st.st_mtime_ns < quiet * 1e9
        if busy and time.monotonic() - since < patience:
            self.writing[rel] = (self._loop.call_later(SETTLE_S, self._read_when_quiet, rel), since)
            return
        self._write(rel, time.time())

    def _write(self, rel: str, ts: float) -> None:
        earlier = self._latest.get(rel)
        if earlier is not None:
            # 50 writes in a row are read once: each version is dropped when the next one is closed.
            earlier.superseded = True
            earlier.discard()
        item = self._latest[rel] = Write(rel, ts, self.disk.read_version(rel), self)
        self._pending.add(item)
