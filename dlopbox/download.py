"""Streaming downloads from nginx, verified and installed atomically.

A file is streamed in chunks into a hidden temp file next to its final name, hashed as it
arrives, checked against the event's size and SHA-256, given its mode and mtime, flushed,
and only then renamed over the final name: a slave never shows a partial or corrupt file.
Memory stays bounded by a couple of chunks whatever the file size; writes and hashing run
in a thread so a 1 GiB file never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import yarl

from .paths import url_path
from .state import temp_name
from .tree import file_digest

log = logging.getLogger("dlopbox.client")

EMPTY_DIGEST = hashlib.sha256(b"").hexdigest()
_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
MAX_BACKOFF = 5.0


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

    def url(self, path: str) -> yarl.URL:
        # Already percent-encoded: re-quoting would turn %3F back into '?' (a query string).
        return yarl.URL(self.files_url + url_path(path), encoded=True)

    async def install(self, source: str, final: Path, version: FileVersion) -> None:
        """Download ``source`` (a relative path on the master) and install it at ``final``.

        Raises :class:`StaleContent` when nginx does not have these bytes; transfer failures
        are retried until they succeed (or the task is cancelled).
        """
        if version.size == 0 and version.digest == EMPTY_DIGEST:
            await asyncio.to_thread(_install_bytes, final, version)
            self.counters.files += 1
            return
        # Nothing there (the common case): no thread hop; a file there is hashed in a thread.
        if _lstat(final) is not None and await asyncio.to_thread(_already_there, final, version):
            return
        async with self.slots:
            # Retried while holding the slot: when nginx is down, only `downloads` requests are
            # in the air at a time, however many files wait.
            delay = 0.2
            while True:
                try:
                    await self._download(source, final, version)
                    break
                except TransferError as exc:
                    log.warning("%s; retrying in %.1fs", exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, MAX_BACKOFF)
        self.counters.files += 1

    async def _download(self, source: str, final: Path, version: FileVersion) -> None:
        try:
            async with self.session.get(self.url(source), headers={"Accept-Encoding": "identity"},
                                        timeout=_TIMEOUT) as response:
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
        sink = _TempFile(final)
        writing: asyncio.Future[None] | None = None
        loop = asyncio.get_running_loop()
        try:
            pending: list[bytes] = []
            pending_size = received = 0
            async for piece in response.content.iter_chunked(self.chunk_bytes):
                pending.append(piece)
                pending_size += len(piece)
                received += len(piece)
                self.counters.bytes += len(piece)
                if received > version.size:
                    raise StaleContent(f"{source!r}: more than the {version.size} bytes expected")
                if pending_size >= self.chunk_bytes:
                    # Two-stage pipeline: the thread writes chunk N while chunk N+1 is received.
                    if writing is not None:
                        await writing
                    writing = loop.run_in_executor(None, sink.write, pending)
                    pending, pending_size = [], 0
            if writing is not None:
                await writing
                writing = None
            if pending:
                writing = loop.run_in_executor(None, sink.write, pending)
                await writing
            if sink.size != version.size:
                raise StaleContent(f"{source!r}: {sink.size} bytes received, {version.size} expected")
            if sink.hexdigest() != version.digest:
                raise StaleContent(f"{source!r}: digest {sink.hexdigest()[:12]}... differs from the event's "
                                   f"{version.digest[:12]}...")
            writing = loop.run_in_executor(None, sink.install, version)
            await writing
        finally:
            if writing is not None and not writing.done():
                # The thread may still be using the descriptor: never close it under its feet.
                await asyncio.wait([writing])
            if not sink.installed:
                await asyncio.to_thread(sink.discard)


class _TempFile:
    """A hidden temp file next to ``final``, hashed as written (its methods block: call them in a thread)."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.path = final.parent / temp_name()
        self.fd: int | None = None  # opened by the first write, in the writer thread
        self.hash = hashlib.sha256()
        self.size = 0
        self.installed = False

    def open(self) -> int:
        if self.fd is None:
            # Creating a file can wait for the journal that other threads' fsyncs are committing.
            _prepare_parent(self.final)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        return self.fd

    def write(self, pieces: list[bytes]) -> None:
        self.open()
        assert self.fd is not None
        for piece in pieces:
            self.hash.update(piece)
        views = [memoryview(p) for p in pieces]
        while views:
            written = os.writev(self.fd, views)
            self.size += written
            while views and written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            if views and written:
                views[0] = views[0][written:]

    def hexdigest(self) -> str:
        return self.hash.hexdigest()

    def install(self, version: FileVersion) -> None:
        self.open()
        assert self.fd is not None
        os.fchmod(self.fd, version.mode)
        os.utime(self.fd, ns=(version.mtime_ns, version.mtime_ns))
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        _replace(self.path, self.final)
        self.installed = True

    def discard(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
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


def _install_bytes(final: Path, version: FileVersion) -> None:
    """Install a version whose bytes are known (the empty file) without any transfer."""
    sink = _TempFile(final)
    try:
        sink.install(version)
    finally:
        if not sink.installed:
            sink.discard()


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
