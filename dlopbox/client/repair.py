"""Undoing a local change (``DLOPBOX_LOCAL_CHANGES=revert``) through the apply path, in order with the events.

Each repair is a job of the PathScheduler: it starts only after every event pending for its
path, and an event arriving meanwhile waits for it, so a repair never installs a version older
than an event already applied. It judges the path again when it starts (what it undoes is what
is there then) and puts back what the record says: a file is fetched and verified as any
download (the block assembly reuses what is local, the current copy first), a mode or mtime is
set back, a directory is made again and its content checked, an addition is removed, and a
rename is renamed back. When nginx no longer has the recorded version, the master has moved on
and its event brings the new one: the repair leaves the path to it. A path that keeps changing
is left alone for a while, so that the client never fights another writer in a loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import stat
from collections import deque
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

from ..errors import lstat_or_none
from ..events import Event, Op
from ..paths import UnsafePathError, resolve
from ..tree import Ignore, file_digest
from .apply import Applier, Outcome
from .audit import Change, Kind, judge
from .installed import Installed, InstalledRecord
from .schedule import Job, PathScheduler

log = logging.getLogger(__name__)

#: Repairs of one path within FIGHT_WINDOW seconds past which it is left alone for HOLD seconds.
FIGHT_REPAIRS = 5
FIGHT_WINDOW = 10.0
HOLD = 30.0
#: Seconds before a repair the master overtook (nginx has a newer version) is looked at again.
OVERTAKEN_RETRY = 2.0


class Repairer:
    """Puts a path back as the record has it, as a job of the PathScheduler."""

    def __init__(self, target: Path, record: InstalledRecord, applier: Applier, scheduler: PathScheduler,
                 ignore: Ignore, recheck: Callable[[Iterable[str]], None]) -> None:
        self.target = target
        self.record = record
        self.applier = applier
        self.scheduler = scheduler
        self.ignore = ignore
        self.recheck = recheck
        self._recent: dict[str, deque[float]] = {}
        self._held: dict[str, float] = {}  # path -> loop time until which it is left alone

    async def revert(self, change: Change) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._held.get(change.path, 0.0) > now:
            return
        recent = self._recent.setdefault(change.path, deque(maxlen=FIGHT_REPAIRS))
        if len(recent) == FIGHT_REPAIRS and now - recent[0] < FIGHT_WINDOW:
            log.warning("%r was changed locally %d times in %.0f s: leaving it alone for %.0f s", change.path,
                        FIGHT_REPAIRS, now - recent[0], HOLD)
            self._hold(change.path, HOLD)
            recent.clear()
            return
        recent.append(now)
        if change.dest is not None:
            key = Event(Op.MOVE, change.dest, dest=change.path)
        else:
            key = Event(Op.DELETE, change.path)
        await self.scheduler.submit(key, partial(self._run, change))

    def _hold(self, path: str, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        self._held[path] = loop.time() + seconds
        loop.call_later(seconds, self._release, path)

    def _release(self, path: str) -> None:
        self._held.pop(path, None)
        self.recheck([path])

    async def _run(self, change: Change, job: Job) -> None:
        try:
            if change.dest is not None and await self._rename_back(change):
                return
            verdict = await asyncio.to_thread(judge, self.target, change.path, self.record, self.ignore)
            if verdict is None or verdict.change is None:
                return  # equal again meanwhile
            if not await self._undo(verdict.change):
                self._hold(verdict.path, OVERTAKEN_RETRY)
        except (OSError, UnsafePathError) as exc:
            log.error("cannot undo the local change %s: %s", change.describe(), exc)

    async def _undo(self, change: Change) -> bool:
        """Put ``change.path`` back as recorded; False when the master has moved on (its event follows)."""
        final = resolve(self.target, change.path)
        want = change.want
        match change.kind:
            case Kind.ADDED | Kind.ADDED_DIR:
                await asyncio.to_thread(_remove, final)
                return True
            case Kind.ATTRIBUTES | Kind.DIR_MODE:
                assert want is not None
                self.applier.attrib(Event(Op.ATTRIB, change.path, is_dir=want.is_dir, mode=want.mode,
                                          mtime_ns=want.mtime_ns))
                return True
            case Kind.REPLACED:
                await asyncio.to_thread(_remove, final)
        assert want is not None
        return await self._restore(change.path, want)

    async def _restore(self, path: str, want: Installed) -> bool:
        if want.is_dir:
            self.applier.mkdir(Event(Op.MKDIR, path, is_dir=True, mode=want.mode))
            self.recheck(self.record.names_in(path))  # what it held is judged (and restored) in turn
            return True
        outcome = await self.applier.write(Event(Op.WRITE, path, size=want.size, mtime_ns=want.mtime_ns,
                                                 mode=want.mode, digest=want.digest, blocks=want.block_list()),
                                           resync=True)
        return outcome is Outcome.APPLIED

    async def _rename_back(self, change: Change) -> bool:
        """A rename on the slave renamed back, when what stands at its destination is what was recorded."""
        assert change.dest is not None and change.want is not None
        src, dest = resolve(self.target, change.path), resolve(self.target, change.dest)
        if not await asyncio.to_thread(_is_recorded_copy, dest, change.want, self.record.names_in(change.path)):
            return False
        if lstat_or_none(src) is not None:
            return False
        await asyncio.to_thread(os.rename, dest, src)
        if change.want.is_dir:
            self.recheck([change.path, *self.record.below(change.path)])
        else:
            self.recheck([change.path])  # its mode, if that changed too
        return True


def _is_recorded_copy(path: Path, want: Installed, recorded_names: tuple[str, ...]) -> bool:
    """Whether ``path`` holds the recorded file (same digest) or a directory with the recorded names (blocking)."""
    st = lstat_or_none(path)
    if st is None:
        return False
    if want.is_dir:
        if not stat.S_ISDIR(st.st_mode):
            return False
        names = {rel.rpartition("/")[2] for rel in recorded_names}
        with os.scandir(path) as entries:
            present = {entry.name for entry in entries}
        return len(names & present) * 2 >= len(names)
    if not stat.S_ISREG(st.st_mode) or st.st_size != want.size:
        return False
    try:
        return file_digest(path) == want.digest
    except OSError:
        return False


def _remove(path: Path) -> None:
    """Remove a file, a link or a whole directory standing at ``path``, never following a link (blocking)."""
    st = lstat_or_none(path)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
