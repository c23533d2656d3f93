"""Slaves stay mirrors: the slave's own directory is watched, and each change is judged against the record.

A change is anything that leaves a path different from what the client installed there
(:mod:`.installed`); the client's own writes leave every path equal to the record, so they are
never taken for local changes, whatever inotify says about them. Each part has one job:

- :class:`LocalWatch` reads inotify on every directory of the slave and names the paths touched,
  and the directories that arrive (made, or renamed in: by the client's own move too);
- :class:`Decider` judges each touched path once it is quiet and no event is pending for it
  (a path with events in the PathScheduler waits for them), and hands each real change on; a
  directory that arrived is audited below too, since a difference inside it (a file edited, then
  its directory moved by the master's event) travels with it and inotify names it no more;
- :class:`Ledger` logs and counts every change and holds the current differences, whose
  count the progress reports carry to the interface;
- :class:`~dlopbox.client.repair.Repairer` undoes a change (``DLOPBOX_LOCAL_CHANGES=revert``),
  as a job of the PathScheduler, so that a repair is ordered with the events of its path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from pathlib import Path

from asyncinotify import Event as InotifyEvent
from asyncinotify import Inotify, Mask, Watch

from ..api import InterfaceAPI
from ..paths import is_reserved, is_within
from ..settings import DEFAULT_IGNORE
from ..tree import Ignore
from .apply import Applier
from .audit import (
    Audits,
    Change,
    Kind,
    StartupCheck,
    Verdict,
    as_recorded,
    audit,
    judge,
)
from .installed import InstalledRecord
from .repair import Repairer
from .schedule import PathScheduler
from .state import ClientState

log = logging.getLogger(__name__)

WATCH_MASK = (Mask.CREATE | Mask.MODIFY | Mask.CLOSE_WRITE | Mask.ATTRIB | Mask.DELETE | Mask.MOVED_FROM
              | Mask.MOVED_TO | Mask.ONLYDIR | Mask.DONT_FOLLOW | Mask.EXCL_UNLINK)
_OVERFLOW, _IGNORED, _ISDIR = int(Mask.Q_OVERFLOW), int(Mask.IGNORED), int(Mask.ISDIR)
_ARRIVED, _LEFT = int(Mask.CREATE | Mask.MOVED_TO), int(Mask.DELETE | Mask.MOVED_FROM)
#: Seconds a touched path must stay quiet before it is judged: a writer's burst of events is judged once.
QUIET = 0.05

POLICIES = ("revert", "keep")


class LocalWatch:
    """A watch on every directory of the slave (not its state dir), telling ``decider`` of each path touched
    and of each directory that arrives or leaves."""

    def __init__(self, target: Path, decider: Decider, overflowed: Callable[[], None]) -> None:
        self.target = target
        self.decider = decider
        self.overflowed = overflowed
        self.ready = asyncio.Event()
        self._inotify: Inotify | None = None
        self._rel: dict[int, str] = {}  # wd -> the directory's path
        self._watches: dict[str, Watch] = {}

    def __len__(self) -> int:
        return len(self._watches)

    async def run(self) -> None:
        with Inotify(cache_size=512) as inotify:
            self._inotify = inotify
            self._watch_tree("")
            self.ready.set()
            async for event in inotify:
                self._on_event(event)

    def _on_event(self, event: InotifyEvent) -> None:
        mask = int(event.mask)
        if mask & _OVERFLOW:
            log.warning("inotify queue overflow on the slave's directory: auditing it")
            self.overflowed()
            return
        rel_dir = self._rel.get(event.watch.wd) if event.watch is not None else None
        if rel_dir is None:
            return
        if mask & _IGNORED:
            self._forget(rel_dir)  # the directory is gone: the kernel dropped its watch
            return
        if event.name is None:
            return
        name = str(event.name)
        if is_reserved(name):
            return  # the client's temp files, and its state dir
        rel = f"{rel_dir}/{name}" if rel_dir else name
        if mask & _ISDIR:
            if mask & _ARRIVED:
                self._watch_tree(rel)
                self.decider.arrived(rel)
            elif mask & _LEFT:
                self._forget(rel)
                self.decider.left(rel)
        self.decider.touched(rel)

    def _watch_tree(self, rel: str) -> None:
        """Watch ``rel`` and every directory below it, each before it is listed (on the loop, as the watcher does)."""
        assert self._inotify is not None
        stack = [rel]
        while stack:
            current = stack.pop()
            path = self.target / current if current else self.target
            try:
                watch = self._inotify.add_watch(path, WATCH_MASK)
            except OSError:
                continue  # gone already, or not a directory any more
            old = self._rel.get(watch.wd)
            if old is not None and old != current:
                self._watches.pop(old, None)
            self._rel[watch.wd] = current
            self._watches[current] = watch
            try:
                with os.scandir(path) as entries:
                    for entry in entries:
                        if not is_reserved(entry.name) and entry.is_dir(follow_symlinks=False):
                            stack.append(f"{current}/{entry.name}" if current else entry.name)
            except OSError:
                continue

    def _forget(self, rel: str) -> None:
        assert self._inotify is not None
        for path in [p for p in self._watches if is_within(p, rel)]:
            watch = self._watches.pop(path)
            if self._rel.get(watch.wd) == path:
                del self._rel[watch.wd]
                with contextlib.suppress(OSError, KeyError):
                    self._inotify.rm_watch(watch)


class Ledger:
    """Every local change logged and counted; the differences standing now, and how many."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.current: dict[str, tuple[Change, float]] = {}
        self.counts: Counter[str] = Counter()
        #: Set once the directory has been checked at start: until then the count is not known.
        self.known = False

    @property
    def count(self) -> int | None:
        return len(self.current) if self.known else None

    def found(self, change: Change) -> bool:
        """Note a change; True when it is new (else it was already standing, and is not logged again)."""
        old = self.current.get(change.path)
        if old is not None and (old[0].kind, old[0].dest) == (change.kind, change.dest):
            return False
        self.current[change.path] = (change, time.monotonic())
        if change.dest is not None:
            self.current.pop(change.dest, None)  # the "added" half of a rename is part of it
        self.counts["found"] += 1
        self.counts[change.kind.value] += 1
        if self.policy == "keep":
            self.counts["kept"] += 1
            log.warning("local change kept: %s; left as it is (DLOPBOX_LOCAL_CHANGES=keep)", change.describe())
        else:
            log.warning("local change: %s; undoing it", change.describe())
        return True

    def subsumed(self, path: str, by: str) -> None:
        """``path`` is judged as part of ``by`` now (an ancestor): a difference standing there is ``by``'s,
        or it left with its directory (moved by an event) and is found again where it went."""
        if self.current.pop(path, None) is not None:
            log.debug("local difference at %r is judged at %r now", path, by)

    def settled(self, path: str) -> None:
        """``path`` equals the record again (undone, or overwritten by an event)."""
        standing = self.current.pop(path, None)
        if standing is None:
            return
        change, since = standing
        if self.policy == "keep":
            log.info("local difference gone: %r equals what was installed again", path)
            return
        self.counts["undone"] += 1
        log.info("local change undone: %s, %.0f ms after it was seen", change.describe(),
                 (time.monotonic() - since) * 1000)


#: Called with each change found (the repairer's revert), or None to keep them.
Act = Callable[[Change], Awaitable[None]]


class Decider:
    """Judges touched paths against the record, once they are quiet and no event is pending for them."""

    def __init__(self, target: Path, record: InstalledRecord, scheduler: PathScheduler, ignore: Ignore,
                 ledger: Ledger, act: Act | None) -> None:
        self.target = target
        self.record = record
        self.scheduler = scheduler
        self.ignore = ignore
        self.ledger = ledger
        self.act = act
        self._root = os.fspath(target)
        self._paths: set[str] = set()
        self._trees: set[str] = set()  # directories that arrived: audited below once nothing is pending there
        self._wake = asyncio.Event()

    def touched(self, rel: str) -> None:
        self._paths.add(rel)
        self._wake.set()

    def arrived(self, rel: str) -> None:
        self._trees.add(rel)

    def left(self, rel: str) -> None:
        """The differences standing below a directory that left are judged again (moved with it, or gone)."""
        self.suspect([p for p in self.ledger.current if is_within(p, rel) and p != rel])

    def suspect(self, paths: Iterable[str]) -> None:
        self._paths.update(paths)
        if self._paths:
            self._wake.set()

    def audited(self, changes: list[Change]) -> None:
        """An audit's findings, and the differences it no longer finds, judged again."""
        self.suspect([c.path for c in changes])
        self.suspect(list(self.ledger.current))

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(QUIET)
            self._wake.clear()
            await self.decide()

    async def decide(self) -> None:
        """Judge every path touched so far; a path with a job pending waits for the next round."""
        paths, self._paths = self._paths, set()
        trees, self._trees = self._trees, set()
        if not self.record.complete:
            return  # a resync is making the directory equal to the manifest; an audit follows it
        ready, ready_trees = [], []
        for path in paths:
            if self.scheduler.busy(path):
                self._paths.add(path)
            elif self._as_installed(path):
                self.ledger.settled(path)  # the common case (the client's own install), decided on the loop
            else:
                ready.append(path)
        for tree in trees:
            (self._trees.add if self.scheduler.busy(tree) else ready_trees.append)(tree)
        if ready or ready_trees:
            judged, suspects = await asyncio.to_thread(self._judge_all, ready, ready_trees)
            self._paths.update(suspects)  # judged one by one next round
            changes = []
            seen: set[str] = set()
            for asked, verdict in judged:
                # The record or the disk may have moved under the thread: judged again next round.
                if self.record.get(verdict.path) is not verdict.want or self.scheduler.busy(verdict.path):
                    self._paths.add(asked)
                    continue
                if asked != verdict.path:
                    self.ledger.subsumed(asked, verdict.path)
                if verdict.path in seen:
                    continue  # the same verdict, reached from another path: handled once
                seen.add(verdict.path)
                if verdict.change is None:
                    self.ledger.settled(verdict.path)
                else:
                    changes.append(verdict.change)
            if self.act is not None:
                changes = pair_renames(changes)
            for change in changes:
                self.ledger.found(change)
                if self.act is not None:
                    await self.act(change)
        if self._paths or self._trees:
            self._wake.set()

    def _as_installed(self, path: str) -> bool:
        """Whether ``path`` is a file exactly as recorded: one lstat, no thread hop (a directory above it
        replaced by a link would be a change of that directory, judged on its own)."""
        want = self.record.get(path)
        if want is None or want.is_dir:
            return False
        try:
            st = os.lstat(f"{self._root}/{path}")
        except OSError:
            return False
        return as_recorded(st, want)

    def _judge_all(self, paths: list[str], trees: list[str]) -> tuple[list[tuple[str, Verdict]], set[str]]:
        """Each path's verdict, with the path asked; and the paths that differ below each tree (blocking)."""
        judged = []
        for path in paths:
            verdict = judge(self.target, path, self.record, self.ignore)
            if verdict is not None:
                judged.append((path, verdict))
        suspects: set[str] = set()
        for tree in trees:
            want = self.record.get(tree)
            if want is not None and want.is_dir:  # else its own verdict covers what is below it
                suspects.update(c.path for c in audit(self.target, self.record, self.ignore, tree))
        return judged, suspects


def pair_renames(changes: list[Change]) -> list[Change]:
    """A path gone and one added with its size and mtime (a file), or the one directory gone and the one
    added, are a rename on the slave: undone by renaming back, not by fetching it again."""
    added = {(c.found.st_size, c.found.st_mtime_ns): c for c in changes
             if c.kind is Kind.ADDED and c.found is not None and stat.S_ISREG(c.found.st_mode)}
    out: list[Change] = []
    used: set[str] = set()
    for change in changes:
        want = change.want
        twin = added.get((want.size, want.mtime_ns)) if change.kind is Kind.DELETED and want is not None else None
        if twin is not None and twin.path not in used:
            used.add(twin.path)
            out.append(Change(change.path, Kind.RENAMED, want, twin.found, f"to {twin.path!r}", twin.path))
            continue
        out.append(change)
    gone = [c for c in out if c.kind is Kind.REMOVED_DIR]
    new = [c for c in out if c.kind is Kind.ADDED_DIR]
    if len(gone) == 1 and len(new) == 1:
        used.add(new[0].path)
        out[out.index(gone[0])] = Change(gone[0].path, Kind.RENAMED, gone[0].want, new[0].found,
                                         f"to {new[0].path!r}", new[0].path)
    return [c for c in out if c.path not in used]


class LocalChanges:
    """The parts wired together: watch -> decider -> repairer (revert) or nothing (keep); the ledger; the audits."""

    def __init__(self, target: Path, record: InstalledRecord, applier: Applier, scheduler: PathScheduler,
                 api: InterfaceAPI, policy: str, audit_interval: float) -> None:
        ignore = Ignore(DEFAULT_IGNORE)  # what the watcher never syncs is not a difference here either
        self.record = record
        self.ledger = Ledger(policy)
        self.decider = Decider(target, record, scheduler, ignore, self.ledger, None)
        if policy == "revert":
            self.decider.act = Repairer(target, record, applier, scheduler, ignore, self.decider.suspect).revert
        self.audits = Audits(target, record, ignore, audit_interval, self._audited)
        self.watch = LocalWatch(target, self.decider, self.audits.now)
        self.startup = StartupCheck(target, record, api, ignore)

    def loops(self) -> dict[str, Coroutine[None, None, None]]:
        return {"local-watch": self.watch.run(), "local-decide": self.decider.run(), "audit": self.audits.loop(),
                "record": self.record.flush_loop()}

    async def start(self, state: ClientState | None) -> None:
        """Before the client resumes: the watch in place, then the directory checked against the record.

        Without a complete record (a first start, or a record lost) a resync comes first and builds
        it; the directory is audited as soon as it is complete.
        """
        await self.watch.ready.wait()
        if state is None or not self.record.complete:
            self.audits.now()  # once the resync has made the record complete
            return
        changes = await self.startup.run(state.seq)
        self.decider.suspect(c.path for c in changes)
        await self.decider.decide()
        self.ledger.known = True

    def _audited(self, changes: list[Change]) -> None:
        self.decider.audited(changes)
        self.ledger.known = True
