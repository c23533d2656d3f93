"""What the slaves have been told: the announced tree, and the events that change it.

A released item looks at :attr:`Announcer.announced`, emits only what changes it, and hands
the events to :mod:`dlopbox.watch.delivery`. Every item reads the disk as it is when it runs,
and every later change has a later item, so the slaves' view always converges on the disk.
When an event and the disk disagree (a rename of something never announced, a removal of a
file that is there again), a scan of the path decides, never the event.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import lstat_or_none
from ..events import Entry, Event, Op
from ..paths import parent_of
from ..tree import Entries, Tree, diff
from .delivery import Delivery
from .disk import DiskWork, ScanResult
from .unsendable import UnsendablePaths
from .watches import Watches

log = logging.getLogger(__name__)

YIELD_EVERY = 256


class Announcer:
    """Keeps :attr:`announced` equal to what the events handed to delivery say."""

    def __init__(self, announced: Tree, delivery: Delivery, disk: DiskWork, watches: Watches,
                 scan_again: Callable[[str], None], unsendable: UnsendablePaths) -> None:
        #: What the slaves have been told, refilled (never replaced) from the manifest on a reconcile.
        self.announced = announced
        self._delivery = delivery
        self._disk = disk
        self._watches = watches
        self._scan_again = scan_again
        #: What the disk holds that cannot be told: scans and reads say what it is now.
        self._unsendable = unsendable

    def _emit(self, event: Event) -> None:
        created = (event.dest if event.op is Op.MOVE else event.path) not in self.announced
        self.announced.apply(event)
        self._delivery.add(event, created)

    async def _emit_all(self, events: list[Event], ts: float) -> None:
        delivery = self._delivery
        for i, event in enumerate(events):
            if i and i % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            if delivery.buffered >= delivery.buffer_max:
                await delivery.room()
            if delivery.lost:
                return  # a reconcile with the manifest follows
            self._emit(dataclasses.replace(event, ts=ts))

    async def set_entry(self, path: str, entry: Entry, ts: float) -> None:
        """The file at ``path`` is now ``entry``: a write, or an attrib if only mode or mtime changed."""
        self._unsendable.discard(path)
        if not self.announced.is_dir(parent_of(path)):
            return  # its directory is gone, or not announced yet: the directory's own item covers it
        old = self.announced.get(path)
        if old is not None and old.is_dir:
            self._emit(Event(Op.RMDIR, path, is_dir=True, ts=ts))
            old = None
        if old is None or (old.size, old.digest) != (entry.size, entry.digest):
            self._emit(Event(Op.WRITE, path, size=entry.size, mtime_ns=entry.mtime_ns, mode=entry.mode,
                            digest=entry.digest, ts=ts, blocks=entry.blocks))
        elif (old.mode, old.mtime_ns) != (entry.mode, entry.mtime_ns):
            self._emit(Event(Op.ATTRIB, path, mode=entry.mode, mtime_ns=entry.mtime_ns, ts=ts))

    def unreadable(self, path: str, reason: str) -> None:
        """The file at ``path`` could not be read: the slaves keep what they were told of it."""
        self._unsendable.add(path, reason)

    async def set_attributes(self, path: str, st: os.stat_result, ts: float) -> None:
        """chmod/touch: mode and mtime only, for an entry whose content is known."""
        old = self.announced.get(path)
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
        old = self.announced.get(path)
        if old is not None and lstat_or_none(self._disk.path(path), OSError) is not None:
            # There again: recreated since, or a stale kernel event read after a rescan already saw
            # the newer disk (inotify overflow). The disk decides, never the event.
            await self._reconcile_paths((path,), ts)
            return
        if old is not None:
            self._emit(Event(Op.RMDIR, path, is_dir=True, ts=ts) if old.is_dir else Event(Op.DELETE, path, ts=ts))

    async def move(self, src: str, dest: str, is_dir: bool, ts: float) -> None:
        """A rename inside the tree: one move event, then a check that the disk agrees."""
        old = self.announced.get(src)
        if old is None or old.is_dir != is_dir or not self.announced.is_dir(parent_of(dest)):
            # The source was never announced (a temp file renamed into place) or has changed since.
            await self._reconcile_paths((src, dest), ts)
            return
        file_fields: dict[str, Any] = {} if is_dir else {
            "size": old.size, "mtime_ns": old.mtime_ns, "mode": old.mode, "digest": old.digest, "blocks": old.blocks}
        self._emit(Event(Op.MOVE, src, dest=dest, is_dir=is_dir, ts=ts, **file_fields))
        # Items read before the rename may have been dropped because their path had moved: the
        # scan of the destination brings them (and normally emits nothing).
        await self._reconcile_paths((src, dest), ts)

    async def _reconcile_paths(self, paths: Iterable[str], ts: float) -> None:
        for rel in paths:
            if self._disk.ignore.path(rel) or not self.announced.is_dir(parent_of(rel)):
                continue
            # Watched before it is read, like an arrival: a directory made inside one renamed before its
            # creation was read has no watch (the watch by its old path failed), and a renamed tree
            # brings it along unwatched; every later change inside it would go unseen.
            self._watches.watch_tree(rel)
            result = await self._disk.scan(rel, self.announced)
            await self.apply_scan(rel, result, ts)

    async def apply_scan(self, rel: str, result: ScanResult, ts: float, check: bool = False) -> None:
        """Make what is announced at ``rel`` (and below) equal to what the scan found.

        Paths that changed while they were read are left as announced, for their own events; but
        after a kernel queue overflow those events may be lost, so ``rel`` is scanned again once
        it has been quiet for a moment, until a scan finds it still. ``check``: the scan after an
        overflow storm; what it finds, the scans during the storm missed, and the log says so.
        """
        self._unsendable.replace_below(rel, result.unsendable)
        if rel and not self.announced.is_dir(parent_of(rel)):
            return  # the parent's own item scans it
        new = self._stable(result)
        events = diff(Tree(self.announced.subtree(rel)), new)
        if check and events:
            log.warning("the scan after the inotify overflow found %d differences the scans during it missed, "
                        "sending them: %s", len(events), ", ".join(e.path for e in events[:10]))
        await self._emit_all(events, ts)
        if result.unstable:
            self._scan_again(rel)

    def _stable(self, result: ScanResult) -> Tree:
        """The scanned tree, with files that changed while read left as announced (their events follow)."""
        tree = result.tree
        for path in result.unstable:
            announced = self.announced.get(path)
            if announced is not None and not announced.is_dir:
                tree.entries[path] = announced
            else:
                tree.entries.pop(path, None)
        return tree

    async def reconcile(self, manifest: Tree) -> None:
        """The interface has ``manifest``: announce the differences between it and a scan of the disk."""
        previous: Tree = self.announced if len(self.announced) else manifest
        result = await self._disk.scan("", previous)
        self._unsendable.replace_below("", result.unsendable)
        self.announced.entries = Entries(manifest.entries.values())
        self._delivery.resume()
        events = diff(self.announced, self._stable(result))
        log.info("reconciled %s with the interface's %d entries: %d events to send",
                 self._disk.root, len(manifest), len(events))
        await self._emit_all(events, time.time())
