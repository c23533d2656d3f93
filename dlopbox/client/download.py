"""Streaming downloads from nginx, verified and installed atomically.

A file is streamed in chunks into a hidden temp file next to its final name, hashed as it
arrives, checked against the event's size and SHA-256, given its mode and mtime and renamed
over its final name in the same thread hop (a small file, received whole, on the event loop
itself): a slave never shows a partial or corrupt file, and shows a good one as soon as it is
verified. Durability is the acknowledgement's business,
not visibility's: an installed file stays open in :class:`Unsynced` until the client's next
state write, which fsyncs every such file (and its directory) first. Memory stays bounded by
a couple of chunks whatever the file size; writes, hashing and fsyncs of large files run in
threads so a 1 GiB file never blocks the event loop.
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
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yarl

from ..errors import lstat_or_none
from ..events import BLOCK_SIZE, Blocks, blocks_digest
from ..paths import url_path
from ..retry import Backoff
from ..tree import file_digest
from .blocks import BlockIndex, assemble_local, missing_runs
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
#: Installed files kept open until the next state write; past this many, they are synced (in a thread) at once.
MAX_UNSYNCED = 256
#: Files up to this size are received whole and installed on the event loop: their open, write, hash and
#: rename cost tens of microseconds, while a thread hop per file made the GIL's hand-offs the slowest part
#: of a burst (70 futex calls per file in a 20,000-file first sync, half the client's CPU in the kernel).
INLINE_MAX = 64 * 1024


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
    #: A file longer than one block is assembled block by block (see :mod:`dlopbox.client.blocks`).
    blocks: Blocks | None = None


@dataclass(slots=True)
class Counters:
    files: int = 0
    bytes: int = 0  #: received from nginx
    #: blocks of assembled files: left a hole, copied from the file's old copy, from another local file, fetched;
    #: "unhashed": of those copied, how many came from a file still as installed, without hashing them again
    blocks: dict[str, int] = field(default_factory=lambda: {"hole": 0, "same file": 0, "other file": 0, "fetched": 0,
                                                            "unhashed": 0})


class Downloader:
    """Fetches file versions from the files URL, a bounded number at a time, over one session."""

    def __init__(self, session: aiohttp.ClientSession, files_url: str, chunk_bytes: int, concurrency: int,
                 index: BlockIndex | None = None) -> None:
        self.session = session
        #: Where this slave holds which block; None: assembly uses the file's old copy and holes only.
        self.index = index
        self.files_url = files_url if files_url.endswith("/") else files_url + "/"
        self.chunk_bytes = max(4096, chunk_bytes)
        self.slots = asyncio.Semaphore(max(1, concurrency))
        self.counters = Counters()
        self.unsynced = Unsynced()
        self._syncing: asyncio.Task[None] | None = None

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
            await self._install_inline(_TempFile(final, self.unsynced), [], version, source)
        else:
            # Nothing there (the common case): no thread hop; a file there is hashed in a thread.
            if (st := lstat_or_none(final)) is not None and await asyncio.to_thread(_already_there, final, version):
                if version.blocks is not None and self.index is not None:
                    # Hashed whole just now: the stat taken before is the signature of those blocks.
                    await asyncio.to_thread(self.index.put, self._rel(final), version.blocks.hashes, st)
                return
            async with self.slots:
                # Retried while holding the slot: when nginx is down, only `downloads` requests are
                # in the air at a time, however many files wait.
                backoff = Backoff(0.2, MAX_BACKOFF)
                while True:
                    try:
                        if version.blocks is not None:
                            await self._assemble(source, final, version)
                        else:
                            await self._download(source, final, version)
                        break
                    except TransferError as exc:
                        log.warning("%s; retrying in %.1fs", exc, backoff.delay)
                        await backoff.wait()
        if version.blocks is None and self.index is not None and self.index.paths and self._rel(final) in self.index.paths:
            await asyncio.to_thread(self.index.remove, self._rel(final))
        self.counters.files += 1

    def _rel(self, final: Path) -> str:
        assert self.index is not None
        return final.relative_to(self.index.target).as_posix()

    async def _assemble(self, source: str, final: Path, version: FileVersion) -> None:
        """Build ``version`` from local blocks, then fetch the rest with range requests, and install it.

        When the master moves on meanwhile (412, a short answer, a block that does not match) this
        raises :class:`StaleContent` like a whole download would; the blocks verified so far are
        kept for the next attempt (:meth:`BlockIndex.keep_partial`).
        """
        assert version.blocks is not None
        sink = _BlockFile(final, self.unsynced)
        written: list[str | None] = [None] * len(version.blocks.hashes)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self._assemble_local, sink, final, version, written)
            etag: str | None = None
            for first, end in missing_runs(written):
                etag = await self._fetch_run(source, sink, version, first, end, etag, written)
            await _settled(loop.run_in_executor(None, sink.seal, version, written, self.index), sink)
        except (StaleContent, TransferError) as exc:
            if not sink.installed:
                await asyncio.to_thread(sink.keep, self.index, written)
            if isinstance(exc, StaleContent):
                raise StaleContent(f"{source!r}: {exc}") from None
            raise
        except BaseException:
            await asyncio.to_thread(sink.discard)
            raise

    def _assemble_local(self, sink: _BlockFile, final: Path, version: FileVersion, written: list[str | None]) -> None:
        assert version.blocks is not None
        sink.create()
        assert sink.fd is not None
        st = lstat_or_none(final)
        current = final if st is not None and stat.S_ISREG(st.st_mode) else None
        counts = assemble_local(sink.fd, current, version.size, version.blocks, self.index, final.parent, written)
        for kind, n in counts.items():
            self.counters.blocks[kind] += n

    async def _fetch_run(self, source: str, sink: _BlockFile, version: FileVersion, first: int, end: int,
                         etag: str | None, written: list[str | None]) -> str | None:
        """Fetch blocks ``first``..``end - 1`` with one range request, verifying each before it is written.

        ``If-Match`` carries the ETag of the previous range: a file replaced in between answers 412.
        Returns the ETag nginx gave.
        """
        assert version.blocks is not None
        blocks = version.blocks
        start, stop = first * BLOCK_SIZE, min(end * BLOCK_SIZE, version.size)
        headers = {"Accept-Encoding": "identity", "Range": f"bytes={start}-{stop - 1}"}
        if etag is not None:
            headers["If-Match"] = etag
        loop = asyncio.get_running_loop()
        busy: list[asyncio.Future[None]] = []
        try:
            async with self.session.get(self.url(source), headers=headers, timeout=_TIMEOUT,
                                        read_bufsize=READ_BUFFER) as response:
                if response.status >= 500 or response.status in (408, 429):
                    raise TransferError(f"{source!r}: nginx answered {response.status}")
                if response.status != 206:
                    # 412: replaced since the previous range; 416: shorter now; 404: gone; 200: no ranges.
                    raise StaleContent(f"nginx answered {response.status} to a range request")
                expected_range = f"bytes {start}-{stop - 1}/{version.size}"
                if response.headers.get("Content-Range") != expected_range:
                    raise StaleContent(f"nginx sent {response.headers.get('Content-Range')}, not {expected_range}")
                index, pending, pending_size = first, [], 0
                need = blocks.size_of(index, version.size)
                async for piece, _ in response.content.iter_chunks():
                    self.counters.bytes += len(piece)
                    view = memoryview(piece)
                    while view:
                        if index == end:
                            raise StaleContent("more bytes than the range asked for")
                        take = min(len(view), need - pending_size)
                        pending.append(view[:take])
                        pending_size += take
                        view = view[take:]
                        if pending_size == need:
                            # One thread hashes block N, another writes it, while block N+1 arrives.
                            for future in busy:
                                await future
                            busy = [loop.run_in_executor(None, sink.check_block, index, pending, blocks.hashes[index],
                                                         written),
                                    loop.run_in_executor(None, sink.write_block, index, pending)]
                            self.counters.blocks["fetched"] += 1
                            index, pending, pending_size = index + 1, [], 0
                            need = blocks.size_of(index, version.size) if index < end else 0
                for future in busy:
                    await future
                if index != end:
                    raise StaleContent(f"a short answer: {index - first} of {end - first} blocks")
                return response.headers.get("ETag", etag)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransferError(f"{source!r}: {type(exc).__name__}: {exc}") from exc
        finally:
            if any(not future.done() for future in busy):
                await asyncio.wait(busy)  # a thread still uses the temp file
            for future in busy:
                if not future.cancelled():
                    future.exception()  # seen: what is raised here is the first error

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
                if version.size <= INLINE_MAX:
                    pieces = await self._receive_small(response, source, version)
                else:
                    await self._stream_into(response, source, final, version)
                    return
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransferError(f"{source!r}: {type(exc).__name__}: {exc}") from exc
        await self._install_inline(_TempFile(final, self.unsynced), pieces, version, source)

    async def _receive_small(self, response: aiohttp.ClientResponse, source: str, version: FileVersion) -> list[bytes]:
        pieces: list[bytes] = []
        received = 0
        async for piece, _ in response.content.iter_chunks():
            pieces.append(piece)
            received += len(piece)
            self.counters.bytes += len(piece)
            if received > version.size:
                raise StaleContent(f"{source!r}: more than the {version.size} bytes expected")
        return pieces

    async def _install_inline(self, sink: _TempFile, pieces: list[bytes], version: FileVersion, source: str) -> None:
        """Verify and install a small file on the loop (no await until it stands under its final name)."""
        try:
            full = sink.write(pieces, version, sync_when_full=False)
        except BaseException as exc:
            sink.discard()
            if isinstance(exc, StaleContent):
                raise StaleContent(f"{source!r}: {exc}") from None
            raise
        while full:
            # Bounded descriptors: the sync runs in a thread, shared by every install that finds the limit reached.
            if self._syncing is None or self._syncing.done():
                self._syncing = asyncio.get_running_loop().create_task(asyncio.to_thread(self.unsynced.sync))
            await asyncio.shield(self._syncing)
            full = len(self.unsynced) >= self.unsynced.limit

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

    def add(self, fd: int, directory: Path) -> bool:
        """Take ownership of ``fd``, a file just installed in ``directory``; True once the limit is reached
        (far ahead of the state writes, a backlog: the caller syncs rather than hold thousands of descriptors)."""
        with self._lock:
            self._fds.append(fd)
            self._dirs.add(directory)
            return len(self._fds) >= self.limit

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
                except FileNotFoundError:
                    pass  # removed since (some file systems say so): nothing of it to make durable
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
                except FileNotFoundError:
                    # Removed between the open and the fsync: seen in a container under churn, where
                    # it stopped the client (every task of its group cancelled) until Docker restarted it.
                    pass
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

    def write(self, pieces: list[bytes], last: FileVersion | None = None, *, sync_when_full: bool = True) -> bool:
        """Append ``pieces``; with ``last`` (they end the file), also hash them, give the file its attributes,
        and rename it into place if it matches ``last`` (StaleContent otherwise).

        Past :class:`Unsynced`'s limit it syncs, or with ``sync_when_full=False`` returns True for the caller to."""
        if self.fd is None:
            self.fd = _create(self.path, self.final, os.O_WRONLY)
            self.created = True
        if last is not None:
            self.digest(pieces)
        self._append(pieces)
        if last is None:
            if self.size - self.written_back >= WRITEBACK_BYTES:
                self._start_writeback()
            return False
        if problem := self.mismatch(last):
            raise StaleContent(problem)
        os.fchmod(self.fd, last.mode)
        os.utime(self.fd, ns=(last.mtime_ns, last.mtime_ns))
        if self.written_back:
            self._start_writeback()  # the tail of a large file: its sync then finds little left to write
        _replace(self.path, self.final)
        self.installed = True
        fd, self.fd = self.fd, None
        full = self.unsynced.add(fd, self.final.parent)
        if full and sync_when_full:
            self.unsynced.sync()
            return False
        return full

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


class _BlockFile(_TempFile):
    """The temp file of an assembly: blocks written at their offsets, each verified first (methods block)."""

    def create(self) -> None:
        # Read and write: a block repeated in the file is copied from where it was first written.
        self.fd = _create(self.path, self.final, os.O_RDWR)
        self.created = True

    def check_block(self, index: int, pieces: list[memoryview], expected: str, written: list[str | None]) -> None:
        sha = hashlib.sha256()
        for piece in pieces:
            sha.update(piece)
        if sha.hexdigest() != expected:
            raise StaleContent(f"block {index} does not match its hash")
        written[index] = expected  # only now: a block written but not verified is never used

    def write_block(self, index: int, pieces: list[memoryview]) -> None:
        assert self.fd is not None
        start = offset = index * BLOCK_SIZE
        for piece in pieces:
            offset += os.pwrite(self.fd, piece, offset)
        self.size += offset - start
        if self.size - self.written_back >= WRITEBACK_BYTES:
            # A run's blocks arrive in order: the bytes since the last writeback end here.
            span = self.size - self.written_back
            os.posix_fadvise(self.fd, max(0, offset - span), span, os.POSIX_FADV_DONTNEED)
            self.written_back = self.size

    def seal(self, version: FileVersion, written: list[str | None], index: BlockIndex | None) -> None:
        """Check the whole file (the SHA-256 of the hashes of the blocks it holds), give it its attributes,
        rename it into place and index its blocks."""
        assert self.fd is not None
        if any(h is None for h in written) or blocks_digest(tuple(written)) != version.digest:  # type: ignore[arg-type]
            raise StaleContent("the assembled blocks do not make the event's digest")
        os.ftruncate(self.fd, version.size)  # trailing zero blocks stay a hole
        os.fchmod(self.fd, version.mode)
        os.utime(self.fd, ns=(version.mtime_ns, version.mtime_ns))
        _replace(self.path, self.final)
        self.installed = True
        fd, self.fd = self.fd, None
        installed = os.fstat(fd)  # after the rename, which changes the ctime
        if self.unsynced.add(fd, self.final.parent):
            self.unsynced.sync()
        if index is not None:
            rel = self.final.relative_to(index.target).as_posix()
            index.put(rel, written, verified=installed)
            index.drop_partial(rel)

    def keep(self, index: BlockIndex | None, written: list[str | None]) -> None:
        """An overtaken assembly: keep what it verified for the next attempt, or discard it."""
        if index is None or self.fd is None or not any(h is not None for h in written):
            self.discard()
            return
        os.close(self.fd)
        self.fd = None
        index.keep_partial(self.final.relative_to(index.target).as_posix(), self.path, written)
        self.created = False


def _create(path: Path, final: Path, access: int) -> int:
    """Create the temp file ``path`` next to ``final``, and ``final``'s parents first if they are missing."""
    flags = access | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o600)
    except FileNotFoundError:
        final.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, flags, 0o600)


def _replace(tmp: Path, final: Path) -> None:
    """Rename over ``final``; a directory standing there (the master changed its type) goes first."""
    try:
        os.replace(tmp, final)
    except IsADirectoryError:
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
