"""The record of what this client installed, path by path: what a slave's directory is judged against.

Every path the apply path installs, moves, removes, creates or chmods is recorded here as it
left it (size, mtime, mode and digest of a file; the mode of a directory), so that anything
else that touches the directory shows as a difference from the record (:mod:`.local`,
:mod:`.audit`). It lives in memory for the running client and in
``<target>/.dlopbox/installed.sqlite`` (WAL) across restarts: each change is written by a
thread within milliseconds, and every state write flushes what is left first, so the seq on
disk never covers a change the record lacks. A row still lost (a kill within those
milliseconds) costs a digest check at start (:class:`~dlopbox.client.audit.StartupCheck`),
never a wrong "in sync": a path without a row is a difference, never an agreement.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import stat
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import lstat_or_none
from ..events import BLOCK_SCHEME, Blocks
from ..paths import parent_of
from .blocks import subtree_range
from .state import STATE_DIR

log = logging.getLogger(__name__)

RECORD_FILE = "installed.sqlite"
_INSERT = "INSERT OR REPLACE INTO installed VALUES (?, ?, ?, ?, ?, ?, ?)"


@dataclass(frozen=True, slots=True)
class Installed:
    """One path as the client left it: a directory (its mode) or a file (size, mtime, mode, digest)."""

    is_dir: bool
    mode: int
    size: int = 0
    mtime_ns: int = 0
    digest: str = ""
    #: The raw block hashes of a file longer than one block (32 bytes each), else empty.
    blocks: bytes = b""

    def block_list(self) -> Blocks | None:
        if not self.blocks:
            return None
        return Blocks(BLOCK_SCHEME, tuple(self.blocks[i:i + 32].hex() for i in range(0, len(self.blocks), 32)))


class InstalledRecord:
    """path -> :class:`Installed`, with each directory's children indexed (changed on the event loop only)."""

    def __init__(self, target: Path) -> None:
        """Open (or create) the record; blocking: call it in a thread."""
        self.target = target
        directory = target / STATE_DIR
        directory.mkdir(mode=0o700, exist_ok=True)
        self._db = sqlite3.connect(directory / RECORD_FILE, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS installed (path TEXT PRIMARY KEY, is_dir INTEGER NOT NULL, "
                         "mode INTEGER NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, "
                         "digest TEXT NOT NULL, blocks BLOB NOT NULL) WITHOUT ROWID")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        row = self._db.execute("SELECT value FROM meta WHERE key = 'complete'").fetchone()
        #: The record covers the whole directory (a resync built it); until then it cannot judge anything.
        self.complete = bool(row and row[0])
        self.rows: dict[str, Installed] = {}
        self.children: dict[str, set[str]] = {}
        for path, is_dir, mode, size, mtime_ns, digest, blocks in self._db.execute("SELECT * FROM installed"):
            self._set(path, Installed(bool(is_dir), mode, size, mtime_ns, digest, blocks))
        self._lock = threading.Lock()  # guards _ops and the connection
        self._ops: list[tuple[str, tuple[object, ...]]] = []
        self._dirty = asyncio.Event()

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, path: str) -> Installed | None:
        return self.rows.get(path)

    def below(self, directory: str) -> Iterator[str]:
        """Every recorded path strictly below ``directory``, parents before their children (a snapshot)."""
        found: list[str] = []
        stack = [directory]
        while stack:
            for child in tuple(self.children.get(stack.pop(), ())):
                found.append(child)
                stack.append(child)
        return iter(found)

    def names_in(self, directory: str) -> tuple[str, ...]:
        """The recorded paths directly in ``directory`` (safe to call from a thread: a copy made at once)."""
        return tuple(self.children.get(directory, ()))

    # -- changes, made by the apply path on the event loop --

    def put(self, path: str, entry: Installed) -> None:
        parent = parent_of(path)
        if parent and parent not in self.rows:
            self._parents_made(parent)
        old = self.rows.get(path)
        if old is not None and old.is_dir and not entry.is_dir:
            self.remove(path)
        self._set(path, entry)
        self._queue(_INSERT, _row(path, entry))

    def _parents_made(self, directory: str) -> None:
        """Directories the apply path made on its way (a write arriving before its parent's mkdir) are
        installed too: recorded as they stand, until their own event says more."""
        missing = [directory]
        while (parent := parent_of(missing[-1])) and parent not in self.rows:
            missing.append(parent)
        for rel in reversed(missing):
            st = lstat_or_none(self.target / rel)
            if st is not None and stat.S_ISDIR(st.st_mode):
                self._set(rel, Installed(True, stat.S_IMODE(st.st_mode)))
                self._queue(_INSERT, _row(rel, self.rows[rel]))

    def file(self, path: str, size: int, mtime_ns: int, mode: int, digest: str, blocks: Blocks | None = None) -> None:
        raw = b"".join(bytes.fromhex(h) for h in blocks.hashes) if blocks is not None else b""
        self.put(path, Installed(False, mode, size, mtime_ns, digest, raw))

    def directory(self, path: str, mode: int) -> None:
        self.put(path, Installed(True, mode))

    def attributes(self, path: str, mode: int, mtime_ns: int | None) -> None:
        old = self.rows.get(path)
        if old is None:
            return
        mtime = old.mtime_ns if old.is_dir or mtime_ns is None else mtime_ns
        self.put(path, Installed(old.is_dir, mode, old.size, mtime, old.digest, old.blocks))

    def remove(self, path: str) -> None:
        """``path`` and everything below it are gone."""
        if path in self.rows:
            for below in self.below(path):
                self._unset(below)
            self._unset(path)
        low, high = subtree_range(path)
        self._queue("DELETE FROM installed WHERE path = ? OR (path >= ? AND path < ?)", (path, low, high))

    def move(self, src: str, dest: str) -> None:
        """A rename: ``src`` and everything below it now stand at ``dest``, replacing what stood there."""
        moving = [src, *self.below(src)] if src in self.rows else []
        entries = [(p, self.rows[p]) for p in moving]
        self.remove(dest)
        self.remove(src)
        parent = parent_of(dest)
        if parent and parent not in self.rows:
            self._parents_made(parent)  # rename(2) onto a path whose parents the apply path just made
        for p, entry in entries:
            self._set(dest + p[len(src):], entry)
        self._queue_many(_INSERT, [_row(dest + p[len(src):], e) for p, e in entries])

    def retain(self, paths: set[str]) -> None:
        """After a resync: nothing but ``paths`` is installed."""
        gone = [p for p in self.rows if p not in paths]
        for p in gone:
            self._unset(p)
        self._queue_many("DELETE FROM installed WHERE path = ?", [(p,) for p in gone])

    def mark_complete(self) -> None:
        self.complete = True
        self._queue("INSERT OR REPLACE INTO meta VALUES ('complete', 1)", ())

    # -- persistence --

    async def flush_loop(self) -> None:
        """Write each change within milliseconds of it (in a thread)."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            await asyncio.to_thread(self.flush)

    def flush(self) -> None:
        """Write every change queued so far (blocking; thread-safe)."""
        with self._lock:
            ops, self._ops = self._ops, []
            if not ops:
                return
            with self._db:
                self._db.execute("BEGIN")
                for sql, params in ops:
                    if params and isinstance(params[0], tuple):
                        self._db.executemany(sql, params)  # type: ignore[arg-type]
                    else:
                        self._db.execute(sql, params)

    def close(self) -> None:
        self.flush()
        with self._lock:
            self._db.close()

    def _queue(self, sql: str, params: tuple[object, ...]) -> None:
        with self._lock:
            self._ops.append((sql, params))
        self._dirty.set()

    def _queue_many(self, sql: str, rows: Iterable[tuple[object, ...]]) -> None:
        rows = tuple(rows)
        if rows:
            self._queue(sql, rows)

    def _set(self, path: str, entry: Installed) -> None:
        if path not in self.rows:
            self.children.setdefault(parent_of(path), set()).add(path)
        self.rows[path] = entry

    def _unset(self, path: str) -> None:
        if self.rows.pop(path, None) is None:
            return
        parent = parent_of(path)
        siblings = self.children.get(parent)
        if siblings is not None:
            siblings.discard(path)
            if not siblings:
                del self.children[parent]
        self.children.pop(path, None)


def _row(path: str, entry: Installed) -> tuple[object, ...]:
    return (path, int(entry.is_dir), entry.mode, entry.size, entry.mtime_ns, entry.digest, entry.blocks)
