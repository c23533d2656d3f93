"""Judging the slave's directory against the record of what the client installed.

:func:`judge` decides one path (the local watch asks it for every path inotify names);
:func:`audit` walks the whole directory with ``os.scandir`` and compares each entry's size,
mtime and mode with the record, hashing a file only where those differ (a ``touch`` is an
attribute change, an edit keeping the size is a content change). Both block: they run in a
thread. :class:`StartupCheck` audits the directory before the client resumes, and
:class:`Audits` again every ``DLOPBOX_AUDIT_INTERVAL`` seconds (and at once after an inotify
overflow), for what inotify cannot see.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ..api import InterfaceAPI
from ..errors import HTTP_ERRORS, lstat_or_none
from ..events import Event, Op
from ..paths import (
    UnsafePathError,
    check_relpath,
    is_reserved,
    is_within,
    parent_of,
    resolve,
)
from ..tree import Ignore, file_digest
from .installed import Installed, InstalledRecord

log = logging.getLogger(__name__)

_ABSENT = (FileNotFoundError, NotADirectoryError)
#: At start, the differences checked against the interface's log (the client's own installs whose rows were lost).
ADOPT_MAX = 200
RECORD_POLL = 0.2


class Kind(enum.StrEnum):
    DELETED = "deleted"
    MODIFIED = "modified"
    ATTRIBUTES = "attributes changed"
    ADDED = "added"
    ADDED_DIR = "directory added"
    REMOVED_DIR = "directory removed"
    DIR_MODE = "directory mode changed"
    REPLACED = "type changed"
    RENAMED = "renamed"


@dataclass(frozen=True, slots=True)
class Change:
    """How ``path`` differs from the record: ``want`` is what was installed there, ``found`` what is there now."""

    path: str
    kind: Kind
    want: Installed | None
    found: os.stat_result | None = None
    detail: str = ""
    #: For a rename undone: where the file or directory now stands.
    dest: str | None = None

    def describe(self) -> str:
        return f"{self.path!r} {self.kind}" + (f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True, slots=True)
class Verdict:
    """:func:`judge`'s answer about the path a touched path comes down to (``change`` None: equal to the record)."""

    path: str
    want: Installed | None
    change: Change | None


def judge(target: Path, rel: str, record: InstalledRecord, ignore: Ignore) -> Verdict | None:
    """Compare what is at ``rel`` with the record; None for a name dlopbox never syncs (blocking).

    A path inside an added directory, below a removed one or below a directory replaced by
    something else comes down to that directory: one change, judged there.
    """
    try:
        check_relpath(rel)
    except UnsafePathError:
        return None  # a name no event could carry (not UTF-8, too long): not ours to judge
    while True:
        want = record.get(rel)
        parent = parent_of(rel)
        if want is None and parent and record.get(parent) is None:
            rel = parent
            continue
        try:
            final = resolve(target, rel)
        except UnsafePathError:
            rel = parent  # an ancestor is no longer a directory: that is the change
            continue
        st = lstat_or_none(final, _ABSENT)
        if st is None and want is not None and parent and lstat_or_none(final.parent, _ABSENT) is None:
            rel = parent
            continue
        return Verdict(rel, want, compare(final, rel, want, st, ignore))


def compare(final: Path, rel: str, want: Installed | None, st: os.stat_result | None, ignore: Ignore) -> Change | None:
    """The difference between the record's ``want`` and what ``st`` says is at ``final`` (may hash it)."""
    if want is None:
        if st is None or ignore.path(rel):
            return None
        kind = Kind.ADDED_DIR if stat.S_ISDIR(st.st_mode) else Kind.ADDED
        return Change(rel, kind, None, st, _what(st))
    if st is None:
        return Change(rel, Kind.REMOVED_DIR if want.is_dir else Kind.DELETED, want)
    mode = stat.S_IMODE(st.st_mode)
    if want.is_dir:
        if not stat.S_ISDIR(st.st_mode):
            return Change(rel, Kind.REPLACED, want, st, f"a {_what(st)} where a directory was")
        if mode != want.mode:
            return Change(rel, Kind.DIR_MODE, want, st, f"mode {want.mode:o} -> {mode:o}")
        return None
    if not stat.S_ISREG(st.st_mode):
        return Change(rel, Kind.REPLACED, want, st, f"a {_what(st)} where a file was")
    if st.st_size != want.size:
        return Change(rel, Kind.MODIFIED, want, st, f"size {want.size} -> {st.st_size}")
    if st.st_mtime_ns == want.mtime_ns:
        if mode == want.mode:
            return None
        return Change(rel, Kind.ATTRIBUTES, want, st, f"mode {want.mode:o} -> {mode:o}")
    try:
        digest = file_digest(final)
    except OSError:
        return Change(rel, Kind.MODIFIED, want, st, "unreadable")
    if digest != want.digest:
        return Change(rel, Kind.MODIFIED, want, st, "content replaced")
    detail = "mtime" + (f", mode {want.mode:o} -> {mode:o}" if mode != want.mode else "")
    return Change(rel, Kind.ATTRIBUTES, want, st, detail)


def _what(st: os.stat_result) -> str:
    if stat.S_ISDIR(st.st_mode):
        return "directory"
    if stat.S_ISREG(st.st_mode):
        return f"file of {st.st_size} bytes"
    if stat.S_ISLNK(st.st_mode):
        return "symlink"
    return "special file"


def as_recorded(st: os.stat_result, want: Installed) -> bool:
    """Whether ``st`` is the recorded file's: a regular file of its size, mtime and mode (no hashing)."""
    return (not want.is_dir and stat.S_ISREG(st.st_mode) and st.st_size == want.size
            and st.st_mtime_ns == want.mtime_ns and stat.S_IMODE(st.st_mode) == want.mode)


def audit(target: Path, record: InstalledRecord, ignore: Ignore, top: str = "") -> list[Change]:
    """Every difference between the directory (or the recorded directory ``top`` in it) and the
    record (blocking: run it in a thread).

    Safe while the event loop changes the record: each lookup is atomic, and whatever it
    reports is judged again before anything is done about it.
    """
    changes: list[Change] = []
    stack = [top]
    while stack:
        rel_dir = stack.pop()
        recorded_here = 0
        try:
            entries = os.scandir(target / rel_dir if rel_dir else target)
        except OSError:
            continue
        with entries:
            for item in entries:
                if is_reserved(item.name):
                    continue
                rel = f"{rel_dir}/{item.name}" if rel_dir else item.name
                want = record.get(rel)
                try:
                    st = item.stat(follow_symlinks=False)
                except OSError:
                    st = None
                if want is None:
                    if st is not None and not ignore(item.name) and _safe(rel):
                        changes.append(Change(rel, Kind.ADDED_DIR if stat.S_ISDIR(st.st_mode) else Kind.ADDED, None,
                                              st, _what(st)))
                    continue
                recorded_here += 1
                if st is not None and as_recorded(st, want):
                    continue  # the common case, decided without a call
                change = compare(Path(item.path), rel, want, st, ignore)
                if change is not None:
                    changes.append(change)
                if want.is_dir and st is not None and stat.S_ISDIR(st.st_mode):
                    stack.append(rel)
        names = record.names_in(rel_dir)
        if recorded_here < len(names):
            for rel in names:
                want = record.get(rel)
                if want is not None and lstat_or_none(target / rel, _ABSENT) is None:
                    changes.append(Change(rel, Kind.REMOVED_DIR if want.is_dir else Kind.DELETED, want))
    return changes


def _safe(rel: str) -> bool:
    try:
        check_relpath(rel)
    except UnsafePathError:
        return False
    return True


class StartupCheck:
    """Before the client resumes: what changed in the directory while it was stopped.

    A difference that the interface's log explains (an install the client made just before it
    was killed, whose row did not reach the record) is the client's own: its digest checked, it
    is adopted into the record instead of being taken for a local change.
    """

    def __init__(self, target: Path, record: InstalledRecord, api: InterfaceAPI, ignore: Ignore) -> None:
        self.target = target
        self.record = record
        self.api = api
        self.ignore = ignore

    async def run(self, since_seq: int) -> list[Change]:
        started = time.monotonic()
        changes = await asyncio.to_thread(audit, self.target, self.record, self.ignore)
        adopted = 0
        for change in changes[:ADOPT_MAX]:
            try:
                logged = await self.api.events_since(since_seq, prefix=change.path, limit=100)
            except HTTP_ERRORS as exc:
                log.info("cannot ask the interface about the differences found at start (%s): all are local", exc)
                break
            adoption = await asyncio.to_thread(self._adoption, change, logged) if logged else None
            if adoption is not None:
                adoption()  # the record is changed on the event loop only
                adopted += 1
        if adopted:
            changes = await asyncio.to_thread(audit, self.target, self.record, self.ignore)
        log.info("startup check: %d entries recorded, %d local differences (%d install(s) of our own adopted) "
                 "in %.2fs", len(self.record), len(changes), adopted, time.monotonic() - started)
        return changes

    def _adoption(self, change: Change, logged: list[Event]) -> Callable[[], None] | None:
        """How to record what is at the path, if it is what the last logged event about it put there (blocking)."""
        last = next((e for e in reversed(logged) if any(is_within(change.path, p) for p in e.paths())), None)
        if last is None:
            return None
        final = self.target / change.path
        st = lstat_or_none(final, _ABSENT)
        lands_here = (last.dest if last.op is Op.MOVE else last.path) == change.path
        if st is None:
            if last.op in (Op.DELETE, Op.RMDIR) or (last.op is Op.MOVE and last.path == change.path):
                return partial(self.record.remove, change.path)
            return None
        if not lands_here:
            return None
        if last.op is Op.MKDIR and stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == last.mode:
            return partial(self.record.directory, change.path, last.mode)
        if last.op in (Op.WRITE, Op.MOVE) and last.digest is not None and stat.S_ISREG(st.st_mode) and (
                st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode)) == (last.size, last.mtime_ns, last.mode):
            try:
                if file_digest(final) != last.digest:
                    return None
            except OSError:
                return None
            assert last.size is not None and last.mtime_ns is not None and last.mode is not None
            return partial(self.record.file, change.path, last.size, last.mtime_ns, last.mode, last.digest,
                           last.blocks)
        return None


class Audits:
    """The directory audited every ``interval`` seconds, or at once when asked (after an inotify overflow)."""

    def __init__(self, target: Path, record: InstalledRecord, ignore: Ignore, interval: float,
                 found: Callable[[list[Change]], None]) -> None:
        self.target = target
        self.record = record
        self.ignore = ignore
        self.interval = interval
        self.found = found
        self._now = asyncio.Event()
        self.runs = 0

    def now(self) -> None:
        self._now.set()

    async def loop(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.interval if self.interval > 0 else None):
                    await self._now.wait()
            except TimeoutError:
                pass
            self._now.clear()
            while not self.record.complete:
                await asyncio.sleep(RECORD_POLL)  # a resync is building it: nothing can be judged yet
            started = time.monotonic()
            changes = await asyncio.to_thread(audit, self.target, self.record, self.ignore)
            self.runs += 1
            log.info("audit: %d entries recorded, %d differences, in %.2fs", len(self.record), len(changes),
                     time.monotonic() - started)
            self.found(changes)
