"""Streaming downloads from nginx, verified and installed atomically.

A file is streamed in chunks into a hidden temp file next to its final name, hashed as it
arrives, checked against the event's size and SHA-256 and given its mode and mtime. Then it
waits for the next install round: every file verified by then is fsynced, back to back (the
first fsync commits the filesystem journal for all of them), and only then renamed over its
final name: a slave never shows a partial, corrupt or not yet durable file, and a burst of
small files costs a few journal commits instead of one each. Memory stays bounded by a
couple of chunks whatever the file size; writes, hashing and fsyncs run in threads so a
1 GiB file never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import stat
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import yarl

from .paths import url_path
from .state import temp_name
from .tree import file_digest

log = logging.getLogger("dlopbox.client")

EMPTY_DIGEST = hashlib.sha256(b"").hexdigest()
#: nginx answers at once and streams without pause: 15 s without a byte is a dead connection (a
#: network cut leaves pooled keep-alive sockets that never answer), not a slow one.
_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=15)
MAX_BACKOFF = 5.0
#: Bytes written between two starts of writeback while a large file streams in.
WRITEBACK_BYTES = 8 * 2**20


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
        self.installer = Installer()

    def url(self, path: str) -> yarl.URL:
        # Already percent-encoded: re-quoting would turn %3F back into '?' (a query string).
        return yarl.URL(self.files_url + url_path(path), encoded=True)

    async def install(self, source: str, final: Path, version: FileVersion) -> None:
        """Download ``source`` (a relative path on the master) and install it at ``final``.

        Returns once the file is durable under its final name. Raises :class:`StaleContent`
        when nginx does not have these bytes; transfer failures are retried until they succeed
        (or the task is cancelled).
        """
        if version.size == 0 and version.digest == EMPTY_DIGEST:
            sink = _TempFile(final)
            await self._seal(sink, [], version)
        else:
            # Nothing there (the common case): no thread hop; a file there is hashed in a thread.
            if _lstat(final) is not None and await asyncio.to_thread(_already_there, final, version):
                return
            async with self.slots:
                # Retried while holding the slot: when nginx is down, only `downloads` requests are
                # in the air at a time, however many files wait.
                delay = 0.2
                while True:
                    try:
                        sink = await self._download(source, final, version)
                        break
                    except TransferError as exc:
                        log.warning("%s; retrying in %.1fs", exc, delay)
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, MAX_BACKOFF)
        if not sink.installed:
            # The slot is free while the file waits for its round: the next downloads go on meanwhile.
            await _settled(self.installer.submit(sink), sink)
        self.counters.files += 1

    async def _download(self, source: str, final: Path, version: FileVersion) -> _TempFile:
        try:
            # A chunk of read buffer: the socket keeps being read while the thread writes the last chunk.
            async with self.session.get(self.url(source), headers={"Accept-Encoding": "identity"},
                                        timeout=_TIMEOUT, read_bufsize=self.chunk_bytes) as response:
                if response.status >= 500 or response.status in (408, 429):
                    raise TransferError(f"{source!r}: nginx answered {response.status}")
                if response.status != 200:
                    # 404 mostly (the master moved on); 403 or 414 would not change on a retry either.
                    raise StaleContent(f"{source!r}: nginx answered {response.status}")
                if response.content_length is not None and response.content_length != version.size:
                    raise StaleContent(f"{source!r}: {response.content_length} bytes served, {version.size} expected")
                return await self._stream_into(response, source, final, version)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransferError(f"{source!r}: {type(exc).__name__}: {exc}") from exc

    async def _stream_into(self, response: aiohttp.ClientResponse, source: str, final: Path,
                           version: FileVersion) -> _TempFile:
        """Stream the body into a temp file; return it complete, verified and sealed (installed if it went solo)."""
        sink = _TempFile(final)
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
            try:
                await self._seal(sink, pending, version)
            except StaleContent as exc:
                raise StaleContent(f"{source!r}: {exc}") from None
            return sink
        except BaseException:
            if any(not future.done() for future in busy):
                # A thread may still be using the descriptor: never close it under its feet.
                await asyncio.wait(busy)
            await asyncio.to_thread(sink.discard)
            raise

    async def _seal(self, sink: _TempFile, pieces: list[bytes], version: FileVersion) -> None:
        """The last hop: hash, write and seal the last pieces, then check the file against ``version``.

        When nothing else is being installed, the same hop also makes the file durable and renames it.
        """
        solo = self.installer.claim_solo()
        try:
            await _settled(asyncio.get_running_loop().run_in_executor(None, sink.write, pieces, version, solo), sink)
        finally:
            if solo:
                self.installer.release_solo(sink.installed)
        if not solo and (problem := sink.mismatch(version)):
            raise StaleContent(problem)


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


class Installer:
    """Makes verified temp files durable and renames them into place, many per round.

    A round takes every file submitted since the last one, fsyncs them back to back, then
    renames each over its final name; files submitted meanwhile wait for the next round.
    A lone file waits for nothing: its writer thread installs it in its last hop (a solo round).
    """

    def __init__(self) -> None:
        self._ready: list[tuple[_TempFile, asyncio.Future[None]]] = []
        self._rounds: asyncio.Task[None] | None = None
        self._solo = False
        self.rounds = 0
        self.files = 0

    def claim_solo(self) -> bool:
        """True when nothing is being installed: the caller installs its one file itself, then releases."""
        if self._rounds is not None or self._ready or self._solo:
            return False
        self._solo = True
        return True

    def release_solo(self, installed: bool) -> None:
        self._solo = False
        self.rounds += installed
        self.files += installed
        self._start()

    def submit(self, sink: _TempFile) -> asyncio.Future[None]:
        """A future done once ``sink`` is durable under its final name (or with the OSError that prevented it)."""
        done = asyncio.get_running_loop().create_future()
        self._ready.append((sink, done))
        self._start()
        return done

    def _start(self) -> None:
        if self._rounds is None and not self._solo and self._ready:
            self._rounds = asyncio.get_running_loop().create_task(self._run(), name="install")

    async def _run(self) -> None:
        try:
            while self._ready:
                batch, self._ready = self._ready, []
                errors = await asyncio.to_thread(_install_round, [sink for sink, _ in batch])
                self.rounds += 1
                self.files += len(batch)
                for (_, done), error in zip(batch, errors):
                    if done.done():
                        continue
                    if error is None:
                        done.set_result(None)
                    else:
                        done.set_exception(error)
        finally:
            self._rounds = None
            for _, done in self._ready:
                done.cancel()
            self._ready = []


def _install_round(sinks: list[_TempFile]) -> list[OSError | None]:
    """fsync every temp file, then rename each durable one into place (blocking)."""
    errors: list[OSError | None] = []
    for sink in sinks:
        try:
            sink.make_durable()
            errors.append(None)
        except OSError as exc:
            errors.append(exc)
    for i, sink in enumerate(sinks):
        if errors[i] is None:
            try:
                _replace(sink.path, sink.final)
                sink.installed = True
            except OSError as exc:
                errors[i] = exc
    return errors


class _TempFile:
    """A hidden temp file next to ``final``, hashed as written (its methods block: call them in a thread)."""

    def __init__(self, final: Path) -> None:
        self.final = final
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

    def write(self, pieces: list[bytes], last: FileVersion | None = None, install: bool = False) -> None:
        """Append ``pieces``; with ``last`` (they end the file), also hash them, give the file its attributes, close it.

        With ``install`` too, a file matching ``last`` is fsynced and renamed into place (StaleContent otherwise).
        """
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
        os.fchmod(self.fd, last.mode)
        os.utime(self.fd, ns=(last.mtime_ns, last.mtime_ns))
        if install:
            if problem := self.mismatch(last):
                raise StaleContent(problem)
            os.fsync(self.fd)
        else:
            self._start_writeback()
        os.close(self.fd)
        self.fd = None
        if install:
            _replace(self.path, self.final)
            self.installed = True

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

    def make_durable(self) -> None:
        # Reopened here so that files waiting for a round hold no descriptor.
        fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

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
    try:
        st = os.lstat(final)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        shutil.rmtree(final)
    os.replace(tmp, final)


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _already_there(final: Path, version: FileVersion) -> bool:
    """True when ``final`` already holds this version (a redelivered event): only the mode is fixed."""
    try:
        st = os.lstat(final)
    except FileNotFoundError:
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
