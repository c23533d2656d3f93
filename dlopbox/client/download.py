"""Streaming downloads from nginx, verified and installed atomically.

A file is streamed in chunks into a hidden temp file next to its final name, hashed as it
arrives, checked against the event's size and SHA-256, given its mode and mtime and renamed
over its final name in the same thread hop: a slave never shows a partial or corrupt file,
and shows a good one as soon as it is verified. Durability is the acknowledgement's business,
not visibility's: an installed file stays open in :class:`Unsynced` until the client's next
state write, which fsyncs every such file (and its directory) first. Memory stays bounded by
a couple of chunks whatever the file size; writes, hashing and fsyncs run in threads so a
1 GiB file never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import stat
import threading
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import yarl

from ..errors import lstat_or_none
from ..paths import url_path
from ..retry import Backoff
from ..tree import file_digest
from .state import temp_name

log = logging.getLogger(__name__)

EMPTY_DIGEST = hashlib.sha256(b"").hexdigest()
#: nginx answers at once and streams without pause: 15 s without a byte is a dead connection (a
#: network cut leaves pooled keep-alive sockets that never answer), not a slow one.
_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=15)
MAX_BACKOFF = 5.0
#: Bytes written between two starts of writeback while a large file streams in.
WRITEBACK_BYTES = 8 * 2**20
#: aiohttp's read buffer: a 1 MiB one cost 0.18-0.28 CPU-s per 256 MiB received, 64-512 KiB ones 0.08-0.12
#: (measured alone against nginx); the kernel's socket buffer keeps receiving while the buffer is full.
READ_BUFFER = 256 * 1024
#: Installed files kept open until the next state write; past this many, a writer thread syncs them itself.
MAX_UNSYNCED = 256


class StaleContent(Exception):
    """nginx does not serve the expected bytes (404, other size or digest): the master moved on."""


class TransferError(Exception):
    """The transfer itself failed (connection, 5xx, truncated body): retried as is, with backoff."""


@dataclass(frozen=True, slots=True)
class FileVersion:
    """What a write promises: the content (size, digest) and the attributes to give it."""

    size: int
    digest: str
    mode: int
    mtime_ns: int


@dataclass(slots=True)
class Counters:
    files: int = 0
    bytes: int = 0


class Downloader:
    """Fetches file versions from the files URL, a bounded number at a time, over one session."""

    def __init__(self, session: aiohttp.ClientSession, files_url: str, chunk_bytes: int, concurrency: int) -> None:
        self.session = session
        self.files_url = files_url if files_url.endswith("/") else files_url + "/"
        self.chunk_bytes = max(4096, chunk_bytes)
        self.slots = asyncio.Semaphore(max(1, concurrency))
        self.counters = Counters()
        self.unsynced = Unsynced()

    def url(self, path: str) -> yarl.URL:
        # Already percent-encoded: re-quoting would turn %3F back into '?' (a query string).
        return yarl.URL(self.files_url + url_path(path), encoded=True)

    async def install(self, source: str, final: Path, version: FileVersion) -> None:
        """Download ``source`` (a relative path on the master) and install it at ``final``.

        Returns once the file stands verified under its final name (durable only after the next
        :meth:`Unsynced.sync`). Raises :class:`StaleContent` when nginx does not have these bytes;
        transfer failures are retried until they succeed (or the task is cancelled).
        """
        if version.size == 0 and version.digest == EMPTY_DIGEST:
            await self._seal(_TempFile(final, self.unsynced), [], version)
        else:
            # Nothing there (the common case): no thread hop; a file there is hashed in a thread.
            if lstat_or_none(final) is not None and await asyncio.to_thread(_already_there, final, version):
                return
            async with self.slots:
                # Retried while holding the slot: when nginx is down, only `downloads` requests are
                # in the air at a time, however many files wait.
                backoff = Backoff(0.2, MAX_BACKOFF)
                while True:
                    try:
                        await self._download(source, final, version)
                        break
                    except TransferError as exc:
                        log.warning("%s; retrying in %.1fs", exc, backoff.delay)
                        await backoff.wait()
        self.counters.files += 1

    async def _download(self, source: str, final: Path, version: FileVersion) -> None:
        try:
            async with self.session.get(self.url(source), headers={"Accept-Encoding": "identity"},
                                        timeout=_TIMEOUT, read_bufsize=READ_BUFFER) as response:
                if response.status >= 500 or response.status in (408, 429):
                    raise TransferError(f"{source!r}: nginx answered {response.status}")
                if response.status != 200:
                    # 404 mostly (the master moved on); 403 or 414 would not change on a retry either.
                    raise StaleContent(f"{source!r}: nginx answered {response.status}")
                if response.content_length is not None and response.content_length != version.size:
                    raise StaleContent(f"{source!r}: {response.content_length} bytes served, {version.size} expected")
                await self._stream_into(response, source, final, version)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransferError(f"{source!r}: {type(exc).__name__}: {exc}") from exc

    async def _stream_into(self, response: aiohttp.ClientResponse, source: str, final: Path,
                           version: FileVersion) -> None:
        """Stream the body into a temp file, then verify it and rename it into place."""
        sink = _TempFile(final, self.unsynced)
        busy: list[asyncio.Future[None]] = []  # the threads working on the previous chunk
        loop = asyncio.get_running_loop()
        try:
            pending: list[bytes] = []
            pending_size = received = 0
            async for piece, _ in response.content.iter_chunks():
                # The pieces as the socket delivered them: read(n) would join them into a copy.
                pending.append(piece)
                pending_size += len(piece)
                received += len(piece)
                self.counters.bytes += len(piece)
                if received > version.size:
                    raise StaleContent(f"{source!r}: more than the {version.size} bytes expected")
                if pending_size >= self.chunk_bytes and received < version.size:
                    # A pipeline: one thread hashes chunk N, another writes it, while chunk N+1 is received.
                    for future in busy:
                        await future
                    busy = [loop.run_in_executor(None, sink.digest, pending),
                            loop.run_in_executor(None, sink.write, pending)]
                    pending, pending_size = [], 0
            for future in busy:
                await future
        except BaseException:
            if any(not future.done() for future in busy):
                # A thread may still be using the descriptor: never close it under its feet.
                await asyncio.wait(busy)
            await asyncio.to_thread(sink.discard)
            raise
        try:
            await self._seal(sink, pending, version)
        except StaleContent as exc:
            raise StaleContent(f"{source!r}: {exc}") from None

    async def _seal(self, sink: _TempFile, pieces: list[bytes], version: FileVersion) -> None:
        """The last hop, in one thread: write the last pieces, check the file against ``version``, rename it."""
        await _settled(asyncio.get_running_loop().run_in_executor(None, sink.write, pieces, version), sink)


async def _settled(work: Awaitable[None], sink: _TempFile) -> None:
    """Await ``work`` on ``sink``; on failure or cancellation, wait for its thread, then remove the temp file."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.shield(task)
    except BaseException:
        if not task.done():
            await asyncio.wait([task])  # cancelled meanwhile: the thread still holds the file
        if not task.cancelled():
            task.exception()  # seen: what is raised here is the cancellation, or this very error
        if not sink.installed:
            await asyncio.to_thread(sink.discard)
        raise


class Unsynced:
    """Installed files not yet fsynced, each held open so that a later move or replace cannot hide it.

    A verified file is renamed into place at once: every reader sees the right bytes (the page
    cache is the file) without waiting for the disk. The client calls :meth:`sync` before each
    state write, so the seq it acknowledges covers only durable files. After a power loss a file
    not synced yet may be empty or missing, but then no state covers its event: the queue
    redelivers it, and the check of what is there (size, mtime, SHA-256) fetches it again.
    Thread-safe: writer threads add, the state writer's thread syncs.
    """

    def __init__(self, limit: int = MAX_UNSYNCED) -> None:
        self.limit = limit
        self._lock = threading.Lock()  # guards the two collections
        self._syncing = threading.Lock()  # one sync at a time: a sync returns after every earlier one
        self._fds: list[int] = []
        self._dirs: set[Path] = set()
        self.syncs = 0
        self.files = 0

    def __len__(self) -> int:
        return len(self._fds)

    def add(self, fd: int, directory: Path) -> None:
        """Take ownership of ``fd``, a file just installed in ``directory`` (blocking when the limit is reached)."""
        with self._lock:
            self._fds.append(fd)
            self._dirs.add(directory)
            full = len(self._fds) >= self.limit
        if full:
            # Far ahead of the state writes (a backlog): sync here rather than hold thousands of descriptors.
            self.sync()

    def sync(self) -> None:
        """fsync every file added so far, then their directories (blocking: call it in a thread)."""
        with self._syncing:
            with self._lock:
                fds, self._fds = self._fds, []
                dirs, self._dirs = self._dirs, set()
            error: OSError | None = None
            for fd in fds:
                try:
                    os.fsync(fd)
                except OSError as exc:  # EIO: these bytes may be lost; the state must not claim them
                    error = error or exc
                finally:
                    os.close(fd)
            for directory in dirs:
                try:
                    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                except (FileNotFoundError, NotADirectoryError):
                    continue  # removed or replaced since: nothing of ours left to make durable there
                try:
                    os.fsync(dir_fd)
                except OSError as exc:
                    error = error or exc
                finally:
                    os.close(dir_fd)
            self.syncs += 1
            self.files += len(fds)
            if error is not None:
                raise error


class _TempFile:
    """A hidden temp file next to ``final``, hashed as written (its methods block: call them in a thread)."""

    def __init__(self, final: Path, unsynced: Unsynced) -> None:
        self.final = final
        self.unsynced = unsynced
        self.path = final.parent / temp_name()
        self.fd: int | None = None
        self.created = False
        self.hash = hashlib.sha256()
        self.size = 0
        self.written_back = 0  # bytes whose writeback has been started
        self.installed = False

    def digest(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self.hash.update(piece)

    def write(self, pieces: list[bytes], last: FileVersion | None = None) -> None:
        """Append ``pieces``; with ``last`` (they end the file), also hash them, give the file its attributes,
        and rename it into place if it matches ``last`` (StaleContent otherwise)."""
        if self.fd is None:
            # Created in the writer thread: creating a file can wait for the journal another fsync commits.
            _prepare_parent(self.final)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            self.created = True
        if last is not None:
            self.digest(pieces)
        self._append(pieces)
        if last is None:
            if self.size - self.written_back >= WRITEBACK_BYTES:
                self._start_writeback()
            return
        if problem := self.mismatch(last):
            raise StaleContent(problem)
        os.fchmod(self.fd, last.mode)
        os.utime(self.fd, ns=(last.mtime_ns, last.mtime_ns))
        if self.written_back:
            self._start_writeback()  # the tail of a large file: its sync then finds little left to write
        _replace(self.path, self.final)
        self.installed = True
        fd, self.fd = self.fd, None
        self.unsynced.add(fd, self.final.parent)

    def _append(self, pieces: list[bytes]) -> None:
        assert self.fd is not None
        views = [memoryview(p) for p in pieces]
        while views:
            written = os.writev(self.fd, views)
            self.size += written
            while views and written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            if views and written:
                views[0] = views[0][written:]

    def _start_writeback(self) -> None:
        # Asynchronous: the dirty pages start going to disk now, so the install's fsync finds little left to do.
        assert self.fd is not None
        os.posix_fadvise(self.fd, self.written_back, 0, os.POSIX_FADV_DONTNEED)
        self.written_back = self.size

    def mismatch(self, version: FileVersion) -> str | None:
        """What differs between the bytes written and ``version``, or None."""
        if self.size != version.size:
            return f"{self.size} bytes received, {version.size} expected"
        digest = self.hash.hexdigest()
        if digest != version.digest:
            return f"digest {digest[:12]}... differs from the event's {version.digest[:12]}..."
        return None

    def discard(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.created and not self.installed:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def _prepare_parent(final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)


def _replace(tmp: Path, final: Path) -> None:
    """Rename over ``final``; a directory standing there (the master changed its type) goes first."""
    st = lstat_or_none(final)
    if st is not None and stat.S_ISDIR(st.st_mode):
        shutil.rmtree(final)
    os.replace(tmp, final)


def _already_there(final: Path, version: FileVersion) -> bool:
    """True when ``final`` already holds this version (a redelivered event): only the mode is fixed."""
    st = lstat_or_none(final)
    if st is None:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size != version.size or st.st_mtime_ns != version.mtime_ns:
        return False
    try:
        if file_digest(final) != version.digest:
            return False
    except OSError:
        return False
    if stat.S_IMODE(st.st_mode) != version.mode:
        os.chmod(final, version.mode)
    return True
