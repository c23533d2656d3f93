"""Where this slave already holds each block: the block index, and assembly from local blocks.

A new version of a file longer than one block is built block by block (Syncthing's puller does
the same): a block the current copy holds at the same offset is copied from it, a block of any
other local file is found through the index (block hash -> path and block number, in
``<target>/.dlopbox/blocks.sqlite``), an all-zero block is left a hole, and only the rest is
fetched (:mod:`dlopbox.client.download`). The index is a hint: a block read from a local file is
hashed, and used only if it matches. So a stale row (a file changed behind the client's back)
costs a read, never a wrong byte, and the index needs no fsync of its own.

The one exception is a file still exactly as the client installed it: its signature (inode,
size, mtime and ctime in nanoseconds, as git's index keeps them) is recorded at install, and
while the open file still shows it, its blocks are the verified ones recorded with it and are
copied without hashing them again. Any write changes the ctime (which no program can set), a
replacement changes the inode; the signature is checked again once the copy is done, so a write
during the copy costs those blocks a fetch, never a wrong byte.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import stat
import threading
from collections.abc import Iterable
from pathlib import Path

from ..events import BLOCK_SIZE, Blocks
from ..tree import HASH_THREADS, PARALLEL_BLOCKS, hash_pool, next_data, zero_digest
from .state import STATE_DIR

log = logging.getLogger(__name__)

INDEX_FILE = "blocks.sqlite"
#: Verified blocks of an assembly the master overtook, kept for the next attempt (one file per path).
PARTIAL_DIR = "partial"
#: Candidates tried per block: each costs a read when the index is stale.
MAX_CANDIDATES = 4


def subtree_range(path: str) -> tuple[str, str]:
    """Bounds of every path strictly below ``path`` ("/" + 1 is "0" in byte order)."""
    return path + "/", path + "0"


class BlockIndex:
    """block hash -> (path, block number) of the multi-block files installed here (thread-safe)."""

    def __init__(self, target: Path) -> None:
        self.target = target
        directory = target / STATE_DIR
        directory.mkdir(mode=0o700, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(directory / INDEX_FILE, check_same_thread=False, isolation_level=None)
        # A lost row costs a fetch, a stale one a read: no need to pay for durability.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE IF NOT EXISTS blocks (hash BLOB NOT NULL, path TEXT NOT NULL, idx INTEGER NOT NULL)")
        self._db.execute("CREATE INDEX IF NOT EXISTS blocks_hash ON blocks (hash)")
        self._db.execute("CREATE INDEX IF NOT EXISTS blocks_path ON blocks (path)")
        self._db.execute("CREATE TABLE IF NOT EXISTS signatures (path TEXT PRIMARY KEY, ino INTEGER, size INTEGER, "
                         "mtime_ns INTEGER, ctime_ns INTEGER)")
        #: The paths with rows: installing a small file, or removing one, then costs no query.
        self.paths = {row[0] for row in self._db.execute("SELECT DISTINCT path FROM blocks")}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def put(self, path: str, hashes: Iterable[str | None], verified: os.stat_result | None = None) -> None:
        """``path`` now holds these blocks (None: a block not there); zero blocks need no source.

        ``verified``: the file's stat when every block listed was known to be in it (see :func:`signature`).
        """
        rows = [(bytes.fromhex(h), path, i) for i, h in enumerate(hashes) if h is not None and h != zero_digest(BLOCK_SIZE)]
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM blocks WHERE path = ?", (path,))
            self._db.execute("DELETE FROM signatures WHERE path = ?", (path,))
            self._db.executemany("INSERT INTO blocks (hash, path, idx) VALUES (?, ?, ?)", rows)
            if verified is not None and rows:
                self._db.execute("INSERT INTO signatures VALUES (?, ?, ?, ?, ?)", (path, *signature(verified)))
            if rows:
                self.paths.add(path)
            else:
                self.paths.discard(path)

    def remove(self, path: str, is_dir: bool = False) -> None:
        with self._lock:
            gone = {p for p in self.paths if p == path or (is_dir and p.startswith(path + "/"))}
            if not gone:
                return
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("DELETE FROM blocks WHERE path = ?", [(p,) for p in gone])
                self._db.executemany("DELETE FROM signatures WHERE path = ?", [(p,) for p in gone])
            self.paths -= gone

    def move(self, src: str, dest: str, is_dir: bool) -> None:
        """A rename: rows follow the file (or every file below the directory); whatever was at ``dest`` goes."""
        with self._lock:
            moving = {p for p in self.paths if p == src or (is_dir and p.startswith(src + "/"))}
            replaced = {p for p in self.paths if p == dest or p.startswith(dest + "/")} - moving
            if not moving and not replaced:
                return
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("DELETE FROM blocks WHERE path = ?", [(p,) for p in replaced])
                # A rename changes the ctime: a moved file is hashed again before its blocks are trusted.
                self._db.executemany("DELETE FROM signatures WHERE path = ?", [(p,) for p in replaced | moving])
                renames = [(dest + p[len(src):], p) for p in moving]
                self._db.executemany("UPDATE blocks SET path = ? WHERE path = ?", renames)
            self.paths -= replaced | moving
            self.paths |= {new for new, _ in renames}

    def find(self, digest: str) -> list[tuple[str, int]]:
        with self._lock:
            return self._db.execute("SELECT path, idx FROM blocks WHERE hash = ? LIMIT ?",
                                    (bytes.fromhex(digest), MAX_CANDIDATES)).fetchall()

    def verified_blocks(self, path: str, st: os.stat_result) -> dict[int, str] | None:
        """The blocks recorded for ``path`` (number -> hash) if ``st`` is still the signature they were
        recorded with; None otherwise."""
        with self._lock:
            row = self._db.execute("SELECT ino, size, mtime_ns, ctime_ns FROM signatures WHERE path = ?",
                                   (path,)).fetchone()
            if row is None or tuple(row) != signature(st):
                return None
            return {idx: h.hex() for h, idx in self._db.execute("SELECT hash, idx FROM blocks WHERE path = ?", (path,))}

    def partial_path(self, rel: str) -> tuple[str, Path]:
        """Where the verified blocks of an overtaken assembly of ``rel`` are kept: (index path, absolute path)."""
        name = hashlib.sha256(rel.encode()).hexdigest()[:24]
        index_path = f"{STATE_DIR}/{PARTIAL_DIR}/{name}"
        return index_path, self.target / index_path

    def keep_partial(self, rel: str, temp: Path, hashes: list[str | None]) -> None:
        """Keep the temp file of an overtaken assembly: its verified blocks serve the next attempt."""
        index_path, path = self.partial_path(rel)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        os.replace(temp, path)
        self.put(index_path, hashes)

    def drop_partial(self, rel: str) -> None:
        index_path, path = self.partial_path(rel)
        if index_path in self.paths:
            self.remove(index_path)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def signature(st: os.stat_result) -> tuple[int, int, int, int]:
    """What any write or replacement of a file changes: inode, size, mtime and ctime."""
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class LocalSources:
    """Reads a block from a local file, verified (blocking: its methods run in a thread)."""

    def __init__(self, target: Path, index: BlockIndex | None = None) -> None:
        self.target = target
        self.index = index
        self.buffer = bytearray(BLOCK_SIZE)
        self._fds: dict[str, int | None] = {}
        #: Per open file still as installed: its signature then, and its verified blocks.
        self._verified: dict[int, tuple[tuple[int, int, int, int], dict[int, str]]] = {}
        #: Blocks copied unhashed, by source: to undo if the source turns out written meanwhile.
        self.unhashed: dict[int, list[int]] = {}

    def close(self) -> None:
        for fd in self._fds.values():
            if fd is not None:
                os.close(fd)
        self._fds.clear()

    def open(self, rel: str, path: Path | None = None) -> int | None:
        """The file ``rel`` of the target (or at ``path``, ``rel`` then only its key), None if not a regular file."""
        if rel not in self._fds:
            absolute = path or self.target / rel
            try:
                fd = os.open(absolute, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError:
                fd = None
            st = os.fstat(fd) if fd is not None else None
            if fd is not None and st is not None and not stat.S_ISREG(st.st_mode):
                os.close(fd)
                fd = None
            elif (fd is not None and st is not None and self.index is not None
                  and (verified := self.index.verified_blocks(self._index_path(absolute), st)) is not None):
                self._verified[fd] = (signature(st), verified)
            self._fds[rel] = fd
        return self._fds[rel]

    def _index_path(self, absolute: Path) -> str:
        assert self.index is not None
        try:
            return absolute.relative_to(self.index.target).as_posix()
        except ValueError:
            return ""

    def read(self, fd: int, index: int, length: int, expected: str, at: int | None = None) -> memoryview | None:
        """Block ``index`` of the new version from block ``at`` (default: the same) of ``fd``, if it is
        ``length`` bytes hashing to ``expected`` (known to, for a file still as installed)."""
        at = index if at is None else at
        offset = at * BLOCK_SIZE
        if next_data(fd, offset, offset + length) >= offset + length:
            return None  # a hole: only a zero block, and those are never looked for
        known = self._verified.get(fd)
        trusted = known is not None and known[1].get(at) == expected
        view = memoryview(self.buffer)[:length]
        got = 0
        while got < length:
            n = os.preadv(fd, [view[got:]], offset + got)
            if n == 0:
                return None
            got += n
        if trusted:
            self.unhashed.setdefault(fd, []).append(index)
            return view
        return view if hashlib.sha256(view).hexdigest() == expected else None

    def written_meanwhile(self) -> list[int]:
        """The blocks copied unhashed from a file whose signature changed since it was opened: not to be used."""
        out = []
        for fd, blocks in self.unhashed.items():
            if signature(os.fstat(fd)) != self._verified[fd][0]:
                out.extend(blocks)
        return out


def assemble_local(fd: int, current: Path | None, size: int, blocks: Blocks, index: BlockIndex | None,
                   directory: Path, written: list[str | None]) -> dict[str, int]:
    """Write into ``fd`` every block of the new version found locally; fill ``written`` with what it holds.

    ``written[i]`` becomes the hash of block ``i`` as it now stands in ``fd`` (zero blocks are
    holes, left unwritten), None where the block must still be fetched. Returns how many blocks
    came from where (and how many were copied unhashed, from a file still as installed). Blocking: run it in a thread; a big file is split between several threads,
    each reading, verifying and writing its own blocks.
    """
    count = len(blocks.hashes)
    target = index.target if index is not None else directory
    if count < PARALLEL_BLOCKS or HASH_THREADS == 1:
        parts = [_local_blocks(fd, current, size, blocks, 0, count, index, target, written)]
    else:
        step = -(-count // HASH_THREADS)
        futures = [hash_pool().submit(_local_blocks, fd, current, size, blocks, start, min(count, start + step),
                                      index, target, written)
                   for start in range(0, count, step)]
        parts = [f.result() for f in futures]
    counts = {"hole": 0, "same file": 0, "other file": 0, "unhashed": 0}
    for part in parts:
        for kind, n in part.items():
            counts[kind] += n
    if any(h is None for h in written):
        _repeated_blocks(fd, size, blocks, written)
    return counts


def _local_blocks(fd: int, current: Path | None, size: int, blocks: Blocks, first: int, end: int,
                  index: BlockIndex | None, target: Path, written: list[str | None]) -> dict[str, int]:
    """Blocks ``first``..``end - 1``: a hole, else the current copy's block at the same offset, else any
    indexed local block with that hash."""
    counts = {"hole": 0, "same file": 0, "other file": 0}
    sources = LocalSources(target, index)
    try:
        old = sources.open("", current) if current is not None else None
        for i in range(first, end):
            expected = blocks.hashes[i]
            length = blocks.size_of(i, size)
            if expected == zero_digest(length):
                written[i] = expected
                counts["hole"] += 1
                continue
            data = sources.read(old, i, length, expected) if old is not None else None
            if data is not None:
                counts["same file"] += 1
            elif index is not None:
                for path, idx in index.find(expected):
                    source = sources.open(path)
                    if source is not None and (data := sources.read(source, i, length, expected, at=idx)) is not None:
                        counts["other file"] += 1
                        break
            if data is not None:
                os.pwrite(fd, data, i * BLOCK_SIZE)
                written[i] = expected
        undone = sources.written_meanwhile()
        for i in undone:
            written[i] = None  # copied unhashed from a file written during the copy: fetched instead
        counts["unhashed"] = sum(len(b) for b in sources.unhashed.values()) - len(undone)
    finally:
        sources.close()
    return counts


def _repeated_blocks(fd: int, size: int, blocks: Blocks, written: list[str | None]) -> None:
    """A block still missing whose hash is already in this file (written at another offset) is copied from there."""
    first_at = {h: i for i, h in reversed(list(enumerate(written))) if h is not None}
    sources = LocalSources(Path("."))
    try:
        for i, expected in enumerate(blocks.hashes):
            if written[i] is None and expected in first_at:
                data = sources.read(fd, i, blocks.size_of(i, size), expected, at=first_at[expected])
                if data is not None:
                    os.pwrite(fd, data, i * BLOCK_SIZE)
                    written[i] = expected
    finally:
        sources.close()


def missing_runs(written: list[str | None]) -> list[tuple[int, int]]:
    """The blocks still to fetch, as runs [first, end) of adjacent blocks: one range request each."""
    runs: list[tuple[int, int]] = []
    for i, h in enumerate(written):
        if h is not None:
            continue
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs
