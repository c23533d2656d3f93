"""The interface's HTTP API as its callers see it: POST /events, manifest, history, progress, the client table,
the master's report.

One :class:`InterfaceAPI` per process, over one kept-alive aiohttp session, authenticated
with the token of its role (the watcher's write token, the others' read token). The manifest
is streamed line by line, so a tree of 100,000 files never sits in memory as one JSON document.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import aiohttp
import yarl

from .errors import APIError
from .events import Entry, Event, EventError
from .tree import Tree

SPOOL_CHUNK = 1024 * 1024
#: The interface holds a manifest request while its log catches up (up to 30 s by default).
MANIFEST_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
EVENTS_TIMEOUT = aiohttp.ClientTimeout(total=60, sock_connect=5)


@dataclass(frozen=True, slots=True)
class Manifest:
    seq: int
    tree: Tree


class InterfaceAPI:
    def __init__(self, session: aiohttp.ClientSession, base_url: str, token: str) -> None:
        self.session = session
        self.base = yarl.URL(base_url)
        self.headers = {"Authorization": f"Bearer {token}"}

    def _url(self, *segments: str) -> yarl.URL:
        url = self.base
        for segment in segments:
            url = url / segment
        return url

    async def post_events(self, body: str) -> aiohttp.ClientResponse:
        """POST /events with one batch's JSON: the open response, its body still to be read.

        The status line comes once the batch is published; the body once it is logged, which
        the caller may read in the background.
        """
        return await self.session.post(self._url("events"), data=body, timeout=EVENTS_TIMEOUT,
                                       headers={**self.headers, "Content-Type": "application/json"})

    async def manifest(self) -> Manifest:
        """GET /manifest: the master's whole tree and the seq it reflects."""
        seq, entries = 0, []
        async for header, entry in self.stream_manifest():
            seq = header
            if entry is not None:
                entries.append(entry)
        return Manifest(seq, Tree(entries))

    @contextlib.asynccontextmanager
    async def _manifest_response(self) -> AsyncIterator[tuple[aiohttp.ClientResponse, int, int]]:
        """GET /manifest, its header line read: (the response, positioned on the entries, seq, count)."""
        async with self.session.get(self._url("manifest"), headers=self.headers, timeout=MANIFEST_TIMEOUT) as response:
            await _check(response)
            header = _decode_line(await response.content.readline())
            try:
                seq, count = int(header["seq"]), int(header["count"])
            except (KeyError, TypeError, ValueError):
                raise APIError(f"malformed manifest header: {header!r}") from None
            yield response, seq, count

    async def stream_manifest(self) -> AsyncIterator[tuple[int, Entry | None]]:
        """Yield (seq, None) for the header, then (seq, entry) for each entry, as they arrive."""
        async with self._manifest_response() as (response, seq, count):
            yield seq, None
            received = 0
            while True:
                line = await response.content.readline()
                if not line:
                    break
                if not line.strip():
                    continue
                try:
                    entry = Entry.from_dict(_decode_line(line))
                except EventError as exc:
                    raise APIError(f"malformed manifest entry: {exc}") from None
                received += 1
                yield seq, entry
            if received != count:
                raise APIError(f"manifest announced {count} entries but sent {received}")

    async def spool_manifest(self, out: BinaryIO) -> tuple[int, int]:
        """GET /manifest, its entry lines copied raw into ``out``; returns the header's (seq, count).

        Spooling to disk keeps memory flat for 100,000 entries and frees the interface at once,
        however long the downloads the manifest asks for will take.
        """
        async with self._manifest_response() as (response, seq, count):
            buffered: list[bytes] = []
            size = 0
            async for chunk in response.content.iter_chunked(SPOOL_CHUNK):
                buffered.append(chunk)
                size += len(chunk)
                if size >= SPOOL_CHUNK:
                    await asyncio.to_thread(out.write, b"".join(buffered))
                    buffered, size = [], 0
            if buffered:
                await asyncio.to_thread(out.write, b"".join(buffered))
        return seq, count

    async def events_since(self, since: int, prefix: str | None = None, limit: int = 100) -> list[Event]:
        """GET /events: events with seq > ``since`` touching ``prefix``, ascending."""
        query: dict[str, str | int] = {"since": since, "limit": limit}
        if prefix is not None:
            query["prefix"] = prefix
        async with self.session.get(self._url("events").with_query(query), headers=self.headers,
                                    timeout=aiohttp.ClientTimeout(total=30)) as response:
            await _check(response)
            body = await response.json()
        try:
            return [Event.from_dict(e) for e in body["events"]]
        except (KeyError, TypeError, EventError) as exc:
            raise APIError(f"malformed /events answer: {exc}") from None

    async def report_progress(self, client_id: str, seq: int, local_differences: int | None = None) -> None:
        """POST /clients/{id}/progress: the seq on disk and, once the client knows it, how many paths of its
        directory differ from what it installed (``{"seq": N, "local_differences": K}``)."""
        body: dict[str, int] = {"seq": seq}
        if local_differences is not None:
            body["local_differences"] = local_differences
        async with self.session.post(self._url("clients", client_id, "progress"), json=body,
                                     headers=self.headers, timeout=aiohttp.ClientTimeout(total=10)) as response:
            await _check(response)

    async def put_master(self, report: dict[str, Any]) -> None:
        """PUT /master: the watcher's report (watched dirs, rescans, the paths it cannot send)."""
        async with self.session.put(self._url("master"), json=report, headers=self.headers,
                                    timeout=aiohttp.ClientTimeout(total=10)) as response:
            await _check(response)

    async def master(self) -> dict[str, Any] | None:
        """GET /master: the watcher's last report and when it came; None when it has not reported."""
        async with self.session.get(self._url("master"), headers=self.headers,
                                    timeout=aiohttp.ClientTimeout(total=30)) as response:
            if response.status == 404:
                return None
            await _check(response)
            body = await response.json()
        if not isinstance(body, dict) or not isinstance(body.get("unsendable"), list):
            raise APIError(f"malformed /master answer: {str(body)[:200]}")
        return body

    async def clients(self) -> dict[str, Any]:
        """GET /clients: {"head", "clients": [{"id", "seq", "last_seen", "lag"}]}."""
        async with self.session.get(self._url("clients"), headers=self.headers,
                                    timeout=aiohttp.ClientTimeout(total=30)) as response:
            await _check(response)
            body = await response.json()
        if not isinstance(body, dict) or not isinstance(body.get("clients"), list):
            raise APIError(f"malformed /clients answer: {str(body)[:200]}")
        return body


async def _check(response: aiohttp.ClientResponse) -> None:
    if response.status >= 400:
        text = (await response.text(errors="replace"))[:300]
        raise APIError(f"{response.method} {response.url.path} -> {response.status}: {text}")


def _decode_line(line: bytes) -> Any:
    try:
        return json.loads(line)
    except ValueError as exc:
        raise APIError(f"malformed manifest line: {exc}") from None


def read_spooled_entries(spool: BinaryIO, batch: int = 2000) -> Iterator[list[Entry]]:
    """Entries of a spooled manifest, a batch at a time (blocking: iterate it in a thread)."""
    entries: list[Entry] = []
    for line in spool:
        if not line.strip():
            continue
        try:
            entries.append(Entry.from_dict(_decode_line(line)))
        except EventError as exc:
            raise APIError(f"malformed manifest entry: {exc}") from None
        if len(entries) >= batch:
            yield entries
            entries = []
    if entries:
        yield entries
