"""Where this slave already holds each block: the block index, and assembly from local blocks.

A new version of a file longer than one block is built block by block (Syncthing's puller does
the same): a block the current copy holds at the same offset is copied from it, a block of any
other local file is found through the index (block hash -> path and block number, in
``<target>/.dlopbox/blocks.sqlite``), an all-zero block is left a hole, and only the rest is
fetched (:mod:`dlopbox.client.download`). The index is a hint, never trusted: every block read
from a local file is hashed, and used only if it matches. So a stale row (a file changed behind
the client's back) costs a read, never a wrong byte, and the index needs no fsync of its own.
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
        #: The paths with rows: installing a small file, or removing one, then costs no query.
        self.paths = {row[0] for row in self._db.execute("SELECT DISTINCT path FROM blocks")}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def put(self, path: str, hashes: Iterable[str | None]) -> None:
        """``path`` now holds these blocks (None: a block not there); zero blocks need no source."""
        rows = [(bytes.fromhex(h), path, i) for i, h in enumerate(hashes) if h is not None and h != zero_digest(BLOCK_SIZE)]
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM blocks WHERE path = ?", (path,))
            self._db.executemany("INSERT INTO blocks (hash, path, idx) VALUES (?, ?, ?)", rows)
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
                renames = [(dest + p[len(src):], p) for p in moving]
                self._db.executemany("UPDATE blocks SET path = ? WHERE path = ?", renames)
            self.paths -= replaced | moving
            self.paths |= {new for new, _ in renames}

    def find(self, digest: str) -> list[tuple[str, int]]:
        with self._lock:
            return self._db.execute("SELECT path, idx FROM blocks WHERE hash = ? LIMIT ?",
                                    (bytes.fromhex(digest), MAX_CANDIDATES)).fetchall()

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


class LocalSources:
    """Reads a block from a local file, verified (blocking: its methods run in a thread)."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.buffer = bytearray(BLOCK_SIZE)
        self._fds: dict[str, int | None] = {}

    def close(self) -> None:
        for fd in self._fds.values():
            if fd is not None:
                os.close(fd)
        self._fds.clear()

    def open(self, rel: str, path: Path | None = None) -> int | None:
        if rel not in self._fds:
            try:
                fd = os.open(path or self.target / rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError:
                fd = None
            if fd is not None and not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                fd = None
            self._fds[rel] = fd
        return self._fds[rel]

    def read(self, fd: int, index: int, length: int, expected: str) -> memoryview | None:
        """Block ``index`` of ``fd`` if it is ``length`` bytes hashing to ``expected``."""
        offset = index * BLOCK_SIZE
        if next_data(fd, offset, offset + length) >= offset + length:
            return None  # a hole: only a zero block, and those are never looked for
        view = memoryview(self.buffer)[:length]
        got = 0
        while got < length:
            n = os.preadv(fd, [view[got:]], offset + got)
            if n == 0:
                return None
            got += n
        return view if hashlib.sha256(view).hexdigest() == expected else None


def assemble_local(fd: int, current: Path | None, size: int, blocks: Blocks, index: BlockIndex | None,
                   directory: Path, written: list[str | None]) -> dict[str, int]:
    """Write into ``fd`` every block of the new version found locally; fill ``written`` with what it holds.

    ``written[i]`` becomes the hash of block ``i`` as it now stands in ``fd`` (zero blocks are
    holes, left unwritten), None where the block must still be fetched. Returns how many blocks
    came from where. Blocking: run it in a thread; a big file is split between several threads,
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
    counts = {"hole": 0, "same file": 0, "other file": 0}
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
    sources = LocalSources(target)
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
                    if source is not None and (data := sources.read(source, idx, length, expected)) is not None:
                        counts["other file"] += 1
                        break
            if data is not None:
                os.pwrite(fd, data, i * BLOCK_SIZE)
                written[i] = expected
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
                data = sources.read(fd, first_at[expected], blocks.size_of(i, size), expected)
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
