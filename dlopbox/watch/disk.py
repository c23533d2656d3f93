"""The disk work, run in the hash pool: hashing a file, scanning a path, asking whether a file is open for writing.

These are plain functions of the disk as it is when they run. A digest is only kept if the
file's stat is the same before and after reading it: a file rewritten while read gives None,
and the event of that rewrite follows. :class:`DiskWork` runs them in the hash pool, so that
a 1 GiB digest blocks neither the event loop nor the other files.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import fcntl
import os
import stat
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ..errors import lstat_or_none
from ..events import Blocks, Entry
from ..paths import UnsafePathError, ancestors, check_relpath
from ..tree import Changed, Ignore, Tree, content_digest, entry_from_stat, scan

T = TypeVar("T")

#: A file this small is hashed on the event loop (tens of microseconds): cheaper than a thread hop.
INLINE_HASH_BYTES = 64 * 1024

def _same_version(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino, a.st_size, a.st_mtime_ns, a.st_ctime_ns, a.st_mode) == (
        b.st_dev, b.st_ino, b.st_size, b.st_mtime_ns, b.st_ctime_ns, b.st_mode)


def _digest(path: str | Path, expected: os.stat_result, abort: threading.Event) -> tuple[str, Blocks | None] | None:
    """The digest (and blocks) of the file at ``path`` if it is still the version ``expected``."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not _same_version(os.fstat(fd), expected):
            return None
        try:
            version = content_digest(fd, expected.st_size, abort)
        except Changed:
            return None
        # Two rewrites within one clock tick leave mtime and ctime alike: the length still tells.
        return version if os.fstat(fd).st_size == expected.st_size else None
    finally:
        os.close(fd)


def hash_file(path: str | Path, rel: str, abort: threading.Event) -> Entry | None:
    """The entry of the regular file at ``path``, its digest matching its stat; None if it is
    not a regular file, is gone, or kept changing while read (the event of that change follows).

    Raises PermissionError when the watcher may not read it: that is not silence, it is listed.
    """
    for _ in range(3):
        try:
            before = os.lstat(path)
            if not stat.S_ISREG(before.st_mode):
                return None
            version = _digest(path, before, abort)
            after = os.lstat(path)
        except PermissionError:
            raise
        except OSError:
            return None
        if abort.is_set():
            return None
        if version is not None and _same_version(before, after):
            return entry_from_stat(rel, before, version[0], blocks=version[1])
    return None


@dataclasses.dataclass(frozen=True, slots=True)
class Unreadable:
    """A file the watcher may not read (EACCES): listed as unsendable, read again when its mode changes."""

    reason: str


def unreadable(exc: OSError) -> Unreadable:
    return Unreadable(f"cannot read it: {exc.strerror or type(exc).__name__}")


def read_file(path: str | Path, rel: str, abort: threading.Event) -> Entry | Unreadable | None:
    """:func:`hash_file`, an unreadable file answered as such rather than raised."""
    try:
        return hash_file(path, rel, abort)
    except PermissionError as exc:
        return unreadable(exc)


def open_for_writing(path: str) -> bool | None:
    """Whether some process has the file at ``path`` open for writing; None when it cannot tell.

    The kernel refuses a read lease (EAGAIN) exactly then. The lease is dropped at once; a writer
    opening the file meanwhile makes the kernel send SIGIO, which the watcher ignores.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return True if exc.errno == errno.EAGAIN else None  # EACCES: not ours and no CAP_LEASE
    else:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


def same_content(a: Entry, b: Entry) -> bool:
    return (a.size, a.mtime_ns, a.digest) == (b.size, b.mtime_ns, b.digest)


def stat_matches(st: os.stat_result, entry: Entry) -> bool:
    return (st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode)) == (entry.size, entry.mtime_ns, entry.mode)


class _Below(Tree):
    """``previous`` as seen from directory ``rel``: what scan() consults to reuse known digests."""

    def __init__(self, previous: Tree, rel: str) -> None:
        super().__init__()
        self.previous = previous
        self.prefix = rel + "/"

    def get(self, path: str) -> Entry | None:
        return self.previous.get(self.prefix + path)


@dataclasses.dataclass
class ScanResult:
    tree: Tree
    #: files that changed while being read: their own events follow, so they are left as known
    unstable: set[str]
    #: what could not be taken (unsafe names, unreadable files), path -> why
    unsendable: dict[str, str] = dataclasses.field(default_factory=dict)


def scan_path(root: Path, rel: str, ignore: Ignore, previous: Tree, abort: threading.Event) -> ScanResult:
    """What is at ``rel`` now — it, and for a directory everything below it — with root-relative paths."""
    found = Tree()
    skipped: dict[str, str] = {}
    if not rel:
        found = scan(root, ignore, previous=previous, skipped=skipped)
        skipped.pop("", None)  # the root itself: its watch failing says so
    else:
        path = root / rel
        st = lstat_or_none(path, OSError)
        if st is None:
            return ScanResult(found, set())
        if stat.S_ISREG(st.st_mode):
            known = previous.get(rel)
            if known is not None and not known.is_dir and (known.size, known.mtime_ns) == (st.st_size, st.st_mtime_ns):
                found.entries[rel] = entry_from_stat(rel, st, known.digest, blocks=known.blocks)
                return ScanResult(found, set())
            try:
                entry = hash_file(path, rel, abort)
            except PermissionError as exc:
                return ScanResult(found, set(), {rel: unreadable(exc).reason})
            if entry is None:
                return ScanResult(found, {rel} if lstat_or_none(path, OSError) is not None else set())
            found.entries[rel] = entry
            return ScanResult(found, set())
        if not stat.S_ISDIR(st.st_mode):
            return ScanResult(found, set())
        found.entries[rel] = entry_from_stat(rel, st)
        prefix = rel + "/"
        below: dict[str, str] = {}
        for sub, entry in scan(path, ignore, previous=_Below(previous, rel), skipped=below).entries.items():
            if safe(prefix + sub):  # a scan of the whole tree skips what would be too long
                found.entries[prefix + sub] = dataclasses.replace(entry, path=prefix + sub)
            else:
                skipped[prefix + sub] = unsafe_reason(prefix + sub)
        skipped.update((f"{prefix}{sub}" if sub else rel, why) for sub, why in below.items())
        # Below a path too long to send, everything is too long: the top of it is what is listed.
        skipped = {p: why for p, why in skipped.items() if not any(a in skipped for a in ancestors(p))}
    unstable = set()
    for p, entry in found.entries.items():
        if entry.is_dir:
            continue
        known = previous.get(p)
        if known is not None and same_content(known, entry):
            continue  # digest reused, not read now
        st = lstat_or_none(root / p, OSError)
        if st is None or not stat_matches(st, entry):
            unstable.add(p)
    return ScanResult(found, unstable, skipped)



def safe(rel: str) -> bool:
    return not unsafe_reason(rel)


def unsafe_reason(rel: str) -> str:
    """Why ``rel`` cannot be sent ("" when it can)."""
    try:
        check_relpath(rel)
    except UnsafePathError as exc:
        return str(exc)
    return ""



class DiskWork:
    """The hash pool: the disk work an item needs starts the moment the item is read."""

    def __init__(self, root: Path, ignore: Ignore, workers: int) -> None:
        self.root = root
        self._root = str(root)
        self.ignore = ignore
        #: Set on stop: a digest or scan still running gives up.
        self.abort = threading.Event()
        self._loop = asyncio.get_running_loop()
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="dlopbox-hash")

    def close(self) -> None:
        self.abort.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def path(self, rel: str) -> str:
        return os.path.join(self._root, rel)

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        return self._loop.run_in_executor(self._pool, fn, *args)

    def scan(self, rel: str, previous: Tree) -> asyncio.Future[ScanResult]:
        return self.run(scan_path, self.root, rel, self.ignore, previous, self.abort)

    def submit_scan(self, rel: str, previous: Tree) -> Future[ScanResult]:
        """:meth:`scan`, as a pool future: it tells whether it has started running."""
        return self._pool.submit(scan_path, self.root, rel, self.ignore, previous, self.abort)

    def lstat(self, rel: str) -> asyncio.Future[os.stat_result | None]:
        return self._loop.run_in_executor(self._pool, lstat_or_none, os.path.join(self._root, rel), OSError)

    def read_version(self, rel: str) -> asyncio.Future[Entry | Unreadable | None]:
        """:func:`read_file` of ``rel``: at once for a small file, in the pool otherwise."""
        path = os.path.join(self._root, rel)
        st = lstat_or_none(path, OSError)
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_size <= INLINE_HASH_BYTES:
            done: asyncio.Future[Entry | Unreadable | None] = self._loop.create_future()
            done.set_result(read_file(path, rel, self.abort))
            return done
        return self._loop.run_in_executor(self._pool, read_file, path, rel, self.abort)

    async def current(self, rel: str, entry: Entry | Unreadable | None) -> Entry | Unreadable | None:
        """``entry`` if the file is still that version; else read it again (a rewrite raced the digest)."""
        for _ in range(2):
            if isinstance(entry, Unreadable):
                return entry
            st = lstat_or_none(self.path(rel), OSError) if entry is not None else None
            if st is None or entry is None:
                return None
            if stat_matches(st, entry):
                return entry
            entry = await self.run(read_file, self.path(rel), rel, self.abort)
        return entry
