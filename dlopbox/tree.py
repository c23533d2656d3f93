"""The state of a tree as a map of path -> Entry: scanned from disk, changed by events, compared.

The watcher keeps one (what the slaves have been told), the client builds one from its
disk and from the manifest, and both reconcile with :func:`diff`, which turns any tree
into any other with the fewest plain events.
"""

from __future__ import annotations

import dataclasses
import errno
import fnmatch
import hashlib
import os
import re
import stat
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .events import (
    BLOCK_SCHEME,
    BLOCK_SIZE,
    Blocks,
    Entry,
    Event,
    Op,
    block_count,
    blocks_digest,
)
from .paths import (
    RESERVED_REASON,
    UnsafePathError,
    ancestors,
    check_relpath,
    is_reserved,
    parent_of,
)

HASH_CHUNK = 1024 * 1024
#: The SHA-256 of an all-zero block: such a block is a hole, never read nor sent.
ZERO_BLOCK = hashlib.sha256(bytes(BLOCK_SIZE)).hexdigest()
#: A file of at least this many blocks is hashed by several threads at once.
PARALLEL_BLOCKS = 16
HASH_THREADS = max(1, min(4, os.cpu_count() or 1))
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


class Changed(Exception):
    """The file got shorter while it was read: its event follows."""


def zero_digest(length: int) -> str:
    return ZERO_BLOCK if length == BLOCK_SIZE else hashlib.sha256(bytes(length)).hexdigest()


def next_data(fd: int, offset: int, size: int) -> int:
    """Where the next byte of data lies from ``offset`` (``size`` past the last): holes are skipped unread."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return size
        raise


def hash_blocks(fd: int, size: int, first: int, last: int, abort: threading.Event | None = None,
                holes: bool = True) -> list[str]:
    """SHA-256 of blocks ``first``..``last - 1`` of the open file; a block lying in a hole is not read
    (unless ``holes`` is False: a file of one block is read at once, without asking where its data is)."""
    out: list[str] = []
    buffer = bytearray(BLOCK_SIZE)
    data_at = -1
    for index in range(first, last):
        if abort is not None and abort.is_set():
            raise Changed("aborted")
        offset = index * BLOCK_SIZE
        length = min(BLOCK_SIZE, size - offset)
        if not holes:
            data_at = offset
        elif data_at < offset:
            data_at = next_data(fd, offset, size)
        if data_at >= offset + length:
            if os.fstat(fd).st_size < offset + length:
                raise Changed(f"{size} bytes expected, {os.fstat(fd).st_size} found")
            out.append(zero_digest(length))
            continue
        view = memoryview(buffer)[:length]
        got = 0
        while got < length:
            n = os.preadv(fd, [view[got:]], offset + got)
            if n == 0:
                raise Changed(f"{size} bytes expected, {offset + got} found")
            got += n
        out.append(hashlib.sha256(view).hexdigest())
    return out


def hash_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=HASH_THREADS, thread_name_prefix="dlopbox-blocks")
        return _pool


def content_digest(fd: int, size: int, abort: threading.Event | None = None) -> tuple[str, Blocks | None]:
    """The digest of ``size`` bytes of the open file, and its blocks if it has more than one.

    A file of one block is hashed whole, as it always was; a longer one block by block (several
    threads for a big one), its digest the SHA-256 of the block hashes. Raises :class:`Changed`
    when the file turns out shorter than ``size`` (blocking: call it from a thread).
    """
    count = block_count(size)
    if count <= 1:
        hashes = hash_blocks(fd, size, 0, count, abort, holes=False) if size else []
        return (hashes[0] if hashes else hashlib.sha256(b"").hexdigest()), None
    if count < PARALLEL_BLOCKS or HASH_THREADS == 1:
        hashes = hash_blocks(fd, size, 0, count, abort)
    else:
        step = -(-count // HASH_THREADS)
        parts = [hash_pool().submit(hash_blocks, fd, size, start, min(count, start + step), abort)
                 for start in range(0, count, step)]
        hashes = [h for part in parts for h in part.result()]
    blocks = Blocks(BLOCK_SCHEME, tuple(hashes))
    return blocks_digest(blocks.hashes), blocks


def file_version(path: str | os.PathLike[str]) -> tuple[str, Blocks | None]:
    """:func:`content_digest` of the file at ``path`` as it is (blocking: call it from a thread)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        return content_digest(fd, size)
    finally:
        os.close(fd)


def file_digest(path: str | os.PathLike[str]) -> str:
    """The digest a write event would give the file at ``path`` (blocking: call it from a thread)."""
    return file_version(path)[0]


class Ignore:
    """Glob patterns matched against each name (not the whole path), plus dlopbox's own names."""

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self.patterns = tuple(patterns)
        joined = "|".join(fnmatch.translate(p) for p in self.patterns)
        self._regex = re.compile(joined) if joined else None

    def __call__(self, name: str) -> bool:
        return is_reserved(name) or (self._regex is not None and self._regex.match(name) is not None)

    def path(self, path: str) -> bool:
        """True when any component of a relative path is ignored."""
        return any(self(part) for part in path.split("/"))


def entry_from_stat(path: str, st: os.stat_result, digest: str | None = None, seq: int | None = None,
                    blocks: Blocks | None = None) -> Entry:
    if stat.S_ISDIR(st.st_mode):
        # Directory mtimes change with every entry inside; only their mode is mirrored.
        return Entry(path, is_dir=True, mode=stat.S_IMODE(st.st_mode), seq=seq)
    return Entry(path, is_dir=False, size=st.st_size, mtime_ns=st.st_mtime_ns, mode=stat.S_IMODE(st.st_mode),
                 digest=digest, seq=seq, blocks=blocks if digest is not None else None)


class Entries(dict[str, Entry]):
    """path -> Entry, with each directory's children indexed as entries come and go.

    Every way of changing the dict keeps the index, so a subtree is found without a scan of
    every path (a directory moved or removed in a tree of 10^5 entries).
    """

    def __init__(self, entries: Iterable[Entry] = ()) -> None:
        super().__init__()
        self.children: dict[str, set[str]] = {}
        for entry in entries:
            self[entry.path] = entry

    def __setitem__(self, path: str, entry: Entry) -> None:
        if path not in self:
            self.children.setdefault(parent_of(path), set()).add(path)
        super().__setitem__(path, entry)

    def __delitem__(self, path: str) -> None:
        super().__delitem__(path)
        self._unindex(path)

    def pop(self, path: str, *default: Any) -> Any:  # type: ignore[override]
        if path in self:
            self._unindex(path)
        return super().pop(path, *default)

    def popitem(self) -> tuple[str, Entry]:
        path, entry = super().popitem()
        self._unindex(path)
        return path, entry

    def setdefault(self, path: str, default: Entry) -> Entry:  # type: ignore[override]
        if path not in self:
            self[path] = default
        return self[path]

    def update(self, *args: Any, **kwargs: Any) -> None:
        for path, entry in dict(*args, **kwargs).items():
            self[path] = entry

    def clear(self) -> None:
        super().clear()
        self.children.clear()

    def _unindex(self, path: str) -> None:
        parent = parent_of(path)
        siblings = self.children.get(parent)
        if siblings is not None:
            siblings.discard(path)
            if not siblings:
                del self.children[parent]


class Tree:
    """Entries by relative path; every parent of an entry is itself an entry."""

    def __init__(self, entries: Iterable[Entry] = ()) -> None:
        self.entries = Entries(entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, path: str) -> bool:
        return path in self.entries

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tree) and self.entries == other.entries

    def get(self, path: str) -> Entry | None:
        return self.entries.get(path)

    def below(self, directory: str) -> Iterator[str]:
        """Every path strictly below ``directory``, parents before their children (a snapshot)."""
        found: list[str] = []
        stack = [directory]
        children = self.entries.children
        while stack:
            for child in children.get(stack.pop(), ()):
                found.append(child)
                stack.append(child)
        return iter(found)

    def subtree(self, path: str) -> list[Entry]:
        """The entry at ``path`` and every entry below it ("" is the whole tree)."""
        if not path:
            return list(self.entries.values())
        top = self.entries.get(path)
        if top is None:
            return []
        return [top, *(self.entries[p] for p in self.below(path))]

    def is_dir(self, path: str) -> bool:
        """True for "" (the root) and for known directories."""
        if not path:
            return True
        entry = self.entries.get(path)
        return entry is not None and entry.is_dir

    def apply(self, event: Event) -> None:
        """Change the tree as the master did; idempotent, and tolerant of missing entries."""
        path = event.path
        match event.op:
            case Op.WRITE:
                self.entries[path] = Entry(path, False, event.size, event.mtime_ns, event.mode, event.digest, event.seq,
                                           event.blocks)
            case Op.MKDIR:
                self.entries[path] = Entry(path, True, mode=event.mode, seq=event.seq)
            case Op.ATTRIB:
                old = self.entries.get(path)
                if old is not None:
                    mtime = None if old.is_dir else event.mtime_ns
                    self.entries[path] = dataclasses.replace(old, mode=event.mode, mtime_ns=mtime, seq=event.seq)
            case Op.DELETE:
                self.entries.pop(path, None)
            case Op.RMDIR:
                self.entries.pop(path, None)
                for p in self.below(path):
                    del self.entries[p]
            case Op.MOVE:
                assert event.dest is not None
                self._move(path, event.dest, event.seq)

    def _move(self, src: str, dest: str, seq: int | None) -> None:
        old = self.entries.get(dest)
        if old is not None and old.is_dir:
            for p in self.below(dest):
                del self.entries[p]
        moving = [src, *self.below(src)] if src in self.entries else []
        for p in moving:
            entry = self.entries.pop(p)
            new = dest + p[len(src):]
            self.entries[new] = dataclasses.replace(entry, path=new, seq=seq if seq is not None else entry.seq)

    def sorted_entries(self) -> list[Entry]:
        """Parents before children."""
        return [self.entries[p] for p in sorted(self.entries, key=lambda p: p.split("/"))]


def scan(root: str | os.PathLike[str], ignore: Ignore | None = None, previous: Tree | None = None,
         hash_files: bool = True, skipped: dict[str, str] | None = None) -> Tree:
    """Walk ``root`` without following links and return its tree (blocking: run in a thread).

    Symlinks, sockets, FIFOs and devices are skipped, never followed. A file whose size and
    mtime match ``previous`` keeps its known digest instead of being hashed again. What could
    not be taken (an unsafe or reserved name, a file or directory it may not read) is put in
    ``skipped``, path -> why, when given.
    """
    skip = skipped if skipped is not None else {}
    ignore = ignore or Ignore()
    root_path = Path(root)
    tree = Tree()
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            it = os.scandir(root_path / rel_dir if rel_dir else root_path)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:  # EACCES, or too long for the kernel (ENAMETOOLONG); "" is the root itself
            skip[rel_dir] = f"cannot list it: {exc.strerror or type(exc).__name__}"
            continue
        with it:
            for item in it:
                rel = f"{rel_dir}/{item.name}" if rel_dir else item.name
                if ignore(item.name):
                    if is_reserved(item.name):
                        skip[rel] = RESERVED_REASON
                    continue
                try:
                    check_relpath(rel)
                    st = item.stat(follow_symlinks=False)
                except UnsafePathError as exc:
                    skip[rel] = str(exc)
                    continue
                except OSError as exc:  # gone, or too long for the kernel
                    if exc.errno == errno.ENAMETOOLONG:
                        skip[rel] = f"cannot read it: {exc.strerror}"
                    continue
                if stat.S_ISDIR(st.st_mode):
                    tree.entries[rel] = entry_from_stat(rel, st)
                    stack.append(rel)
                elif stat.S_ISREG(st.st_mode):
                    digest, blocks = None, None
                    known = previous.get(rel) if previous is not None else None
                    if known is not None and not known.is_dir and known.size == st.st_size and known.mtime_ns == st.st_mtime_ns:
                        digest, blocks = known.digest, known.blocks
                    if digest is None and hash_files:
                        try:
                            digest, blocks = _scanned_version(item.path, st)
                        except PermissionError as exc:
                            skip[rel] = f"cannot read it: {exc.strerror}"
                            continue
                        except (OSError, Changed):
                            continue
                    tree.entries[rel] = entry_from_stat(rel, st, digest, blocks=blocks)
    return tree


def _scanned_version(path: str, st: os.stat_result) -> tuple[str, Blocks | None]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return content_digest(fd, st.st_size)
    finally:
        os.close(fd)


def diff(old: Tree, new: Tree) -> list[Event]:
    """The events that turn ``old`` into ``new``, in an order safe to apply one by one.

    Removals come first (one rmdir for the top of each removed subtree), then creations and
    changes with every parent before its children. A path that changed type is removed and
    created again. Digests decide content changes; when either side lacks a digest, size
    and mtime do.
    """
    events: list[Event] = []
    removed_dirs: set[str] = set()
    for path in sorted(old.entries, key=lambda p: p.split("/")):
        before = old.entries[path]
        after = new.entries.get(path)
        if after is not None and after.is_dir == before.is_dir:
            continue
        if any(ancestor in removed_dirs for ancestor in ancestors(path)):
            continue
        if before.is_dir:
            removed_dirs.add(path)
            events.append(Event(Op.RMDIR, path, is_dir=True))
        else:
            events.append(Event(Op.DELETE, path))
    for after in new.sorted_entries():
        before = old.entries.get(after.path)
        if before is not None and before.is_dir != after.is_dir:
            before = None
        if after.is_dir:
            if before is None:
                events.append(Event(Op.MKDIR, after.path, is_dir=True, mode=after.mode))
            elif before.mode != after.mode:
                events.append(Event(Op.ATTRIB, after.path, is_dir=True, mode=after.mode, mtime_ns=0))
            continue
        if before is None or _content_differs(before, after):
            events.append(Event(Op.WRITE, after.path, size=after.size, mtime_ns=after.mtime_ns, mode=after.mode,
                                digest=after.digest, blocks=after.blocks))
        elif before.mode != after.mode or before.mtime_ns != after.mtime_ns:
            events.append(Event(Op.ATTRIB, after.path, mode=after.mode, mtime_ns=after.mtime_ns))
    return events


def _content_differs(a: Entry, b: Entry) -> bool:
    if a.size != b.size:
        return True
    if a.digest is not None and b.digest is not None:
        return a.digest != b.digest
    return a.mtime_ns != b.mtime_ns
