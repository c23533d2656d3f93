"""Bootstrap and gap repair: make the slave's directory equal to the interface's manifest.

The manifest is spooled to ``<target>/.dlopbox/`` and read back a batch at a time; each
entry is compared with a scan of the local tree (size and mtime decide, like rsync's quick
check: every file dlopbox installs carries the master's mtime), and the differences are
applied through the same scheduler as live events, downloads in parallel. What the master
no longer has is removed last. Files that changed on the master since the manifest was cut
are skipped: their newer events are already waiting in the queue.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..api import InterfaceAPI, read_spooled_entries
from ..errors import HTTP_ERRORS, APIError
from ..events import Entry, Event, Op
from ..paths import UnsafePathError
from ..retry import Backoff
from ..tree import Tree, diff, scan
from .apply import Applier, Outcome
from .download import Downloader
from .installed import Installed, InstalledRecord
from .progress import Progress
from .schedule import Job, PathScheduler
from .state import STATE_DIR

log = logging.getLogger(__name__)

MAX_FETCH_BACKOFF = 5.0  # the interface itself holds a manifest request while its log catches up


class ResyncFailed(RuntimeError):
    """Some differences could not be applied (the reasons are logged); try again later."""


@dataclass(slots=True)
class _Tally:
    changes: int = 0
    failures: int = 0


class Resync:
    def __init__(self, target: Path, api: InterfaceAPI, applier: Applier, downloader: Downloader,
                 scheduler: PathScheduler, record: InstalledRecord | None = None) -> None:
        self.target = target
        self.api = api
        self.applier = applier
        self.downloader = downloader
        self.scheduler = scheduler
        #: Made equal to the manifest too: what the directory holds now is what was installed.
        self.record = record

    async def run(self, at_least: int) -> int:
        """Make the target equal to a manifest at seq >= ``at_least``; return that seq."""
        state_dir = self.target / STATE_DIR
        await asyncio.to_thread(state_dir.mkdir, 0o700, False, True)
        with tempfile.TemporaryFile(dir=state_dir, prefix=".dlopbox-tmp-manifest-") as spool:
            seq, count = await self._fetch(spool, at_least)
            await asyncio.to_thread(spool.seek, 0)
            local = await asyncio.to_thread(scan, self.target, None, None, False)
            log.info("resync: manifest at seq %d with %d entries; %d entries here", seq, count, len(local))
            tally = _Tally()
            progress = Progress("catching up", self.downloader.counters, 0, 0)
            with progress:
                batches = read_spooled_entries(spool)
                seen = 0
                paths: set[str] = set()
                while (batch := await asyncio.to_thread(next, batches, None)) is not None:
                    for want in batch:
                        seen += 1
                        paths.add(want.path)
                        await self._converge(local, want, tally, progress)
                # What the master no longer has goes last, each removed subtree as one rmdir.
                for event in diff(local, Tree()):
                    await self._submit(event, tally)
                await self.scheduler.drain()
            if seen != count:
                raise APIError(f"manifest announced {count} entries but sent {seen}")
        if self.record is not None:
            self.record.retain(paths)
        if tally.failures:
            raise ResyncFailed(f"{tally.failures} of {tally.changes} changes failed")
        if self.record is not None and not self.record.complete:
            self.record.mark_complete()
        log.info("resync: done, %d changes applied; now at seq %d", tally.changes, seq)
        return seq

    async def _fetch(self, spool: BinaryIO, at_least: int) -> tuple[int, int]:
        backoff = Backoff(0.5, MAX_FETCH_BACKOFF)
        while True:
            try:
                seq, count = await self.api.spool_manifest(spool)
                if seq >= at_least:
                    return seq, count
                log.info("manifest is at seq %d, behind seq %d already applied here; asking again", seq, at_least)
            except HTTP_ERRORS as exc:
                log.warning("cannot fetch the manifest: %s; retrying in %.1fs", exc, backoff.delay)
            await asyncio.to_thread(_rewind, spool)
            await backoff.wait()

    async def _converge(self, local: Tree, want: Entry, tally: _Tally, progress: Progress) -> None:
        have = local.entries.pop(want.path, None)
        if have is not None and have.is_dir and not want.is_dir:
            for below in list(local.below(want.path)):  # removed with it by the rmdir below
                del local.entries[below]
        events = diff(Tree([have]) if have is not None else Tree(), Tree([want]))
        if not events:
            self._record(want)  # equal here already (size and mtime): installed as it stands
        for event in events:
            if event.op is Op.WRITE:
                progress.total_files += 1
                progress.total_bytes += event.size or 0
            await self._submit(event, tally, want if event.op is Op.ATTRIB else None)

    def _record(self, entry: Entry) -> None:
        if self.record is None:
            return
        if entry.is_dir:
            assert entry.mode is not None
            if self.record.get(entry.path) != Installed(True, entry.mode):
                self.record.directory(entry.path, entry.mode)
        elif entry.digest is not None and entry.size is not None and entry.mtime_ns is not None and entry.mode is not None:
            old = self.record.get(entry.path)
            if old is None or (old.is_dir, old.size, old.mtime_ns, old.mode, old.digest) != (
                    False, entry.size, entry.mtime_ns, entry.mode, entry.digest):
                self.record.file(entry.path, entry.size, entry.mtime_ns, entry.mode, entry.digest, entry.blocks)

    async def _submit(self, event: Event, tally: _Tally, then_record: Entry | None = None) -> None:
        """Apply ``event`` as a job; once it is applied, ``then_record`` is what stands at its path."""
        tally.changes += 1

        async def run(job: Job) -> None:
            try:
                outcome = await self.applier.apply(event, resync=True)
            except UnsafePathError as exc:
                log.error("resync: refused %s %r: %s", event.op, event.path, exc)
                tally.failures += 1
            except OSError as exc:
                log.error("resync: cannot %s %r: %s", event.op, event.path, exc)
                tally.failures += 1
            except Exception:
                log.exception("resync: failed to %s %r", event.op, event.path)
                tally.failures += 1
            else:
                if outcome is Outcome.RESYNC:
                    tally.failures += 1
                elif outcome is Outcome.APPLIED and then_record is not None:
                    self._record(then_record)

        await self.scheduler.submit(event, run)


def _rewind(spool: BinaryIO) -> None:
    spool.seek(0)
    spool.truncate()
