"""Test doubles for the client's upstream, until (and besides) the real watcher and interface.

:class:`FakeInterface` is the interface's READ side only — ``GET /manifest`` built from the
files on disk (``tree.scan``) with a seq the test chooses, ``GET /events`` from what the test
published, progress reports — served by a small in-test aiohttp app. :class:`FakeMaster`
changes files in the nginx root and publishes the matching sequenced batches to the REAL
RabbitMQ exchange with the interface's user, as the interface would. nginx is the real one.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aio_pika
from aiohttp import web

from dlopbox import broker
from dlopbox.events import Batch, Event, Op
from dlopbox.tree import file_version, scan

READ_TOKEN = "read-" + secrets.token_hex(8)


class FakeInterface:
    def __init__(self, root: Path, token: str = READ_TOKEN) -> None:
        self.root = root
        self.token = token
        self.head = 0  # the last seq published
        self.manifest_seq: int | None = None  # None: the head
        self.events: list[Event] = []
        self.progress: dict[str, int] = {}
        self.local_differences: dict[str, int] = {}  # the last count each client reported
        self.last_seen: dict[str, float] = {}
        self.manifest_requests = 0
        self.events_requests = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/manifest", self._manifest)
        app.router.add_get("/events", self._events)
        app.router.add_post("/clients/{id}/progress", self._progress)
        app.router.add_get("/clients", self._clients)
        return app

    async def start(self) -> str:
        self._runner = web.AppRunner(self.app())
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"error": "unauthorized"}, status=401)
        return await handler(request)

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        self.manifest_requests += 1
        seq = self.head if self.manifest_seq is None else self.manifest_seq
        tree = await asyncio.to_thread(scan, self.root)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        await response.write(json.dumps({"seq": seq, "count": len(tree)}).encode() + b"\n")
        lines = []
        for entry in tree.sorted_entries():
            lines.append(json.dumps(entry.to_dict(), ensure_ascii=False).encode() + b"\n")
            if len(lines) >= 500:
                await response.write(b"".join(lines))
                lines = []
        await response.write(b"".join(lines))
        await response.write_eof()
        return response

    async def _events(self, request: web.Request) -> web.Response:
        self.events_requests += 1
        since = int(request.query.get("since", 0))
        prefix = request.query.get("prefix")
        limit = int(request.query.get("limit", 100))
        found = [e for e in self.events if e.seq is not None and e.seq > since
                 and (prefix is None or e.affects(prefix))][:limit]
        return web.json_response({"events": [e.to_dict() for e in found],
                                  "next": found[-1].seq if found else since})

    async def _progress(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.progress[request.match_info["id"]] = int(body["seq"])
        if "local_differences" in body:
            self.local_differences[request.match_info["id"]] = int(body["local_differences"])
        self.last_seen[request.match_info["id"]] = time.time()
        return web.Response(status=204)

    async def _clients(self, request: web.Request) -> web.Response:
        return web.json_response({"head": self.head, "clients": [
            {"id": cid, "seq": seq, "lag": max(0, self.head - seq),
             "last_seen": datetime.fromtimestamp(self.last_seen[cid], timezone.utc).isoformat()}
            for cid, seq in sorted(self.progress.items())]})


class FakeMaster:
    """Changes the master's files (the nginx root) and publishes what the watcher+interface would."""

    def __init__(self, root: Path, interface: FakeInterface, exchange: aio_pika.abc.AbstractExchange) -> None:
        self.root = root
        self.interface = interface
        self.exchange = exchange
        self._batches = 0

    def abs(self, path: str) -> Path:
        return self.root / path

    async def publish(self, *events: Event, seq: int | None = None, logged: bool = True) -> Batch:
        """Number ``events`` from ``seq`` (default: the next) and publish them as one message
        (not in the log yet with ``logged=False``, as when the interface's log lags)."""
        first = self.interface.head + 1 if seq is None else seq
        self._batches += 1
        batch = Batch(f"b{self._batches}-{secrets.token_hex(4)}", tuple(events)).numbered(first)
        if logged:
            self.interface.events.extend(batch.events)
        self.interface.head = max(self.interface.head, batch.last_seq or 0)
        await self.exchange.publish(broker.batch_message(batch), routing_key="")
        return batch

    async def publish_each(self, events: list[Event], per_message: int = 1) -> None:
        for i in range(0, len(events), per_message):
            await self.publish(*events[i:i + per_message])

    # Each helper changes the disk like a user would, and returns the event the watcher would send.

    def write(self, path: str, data: bytes, mode: int = 0o644) -> Event:
        target = self.abs(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        os.chmod(target, mode)
        return self.write_event(path)

    def write_event(self, path: str) -> Event:
        st = os.stat(self.abs(path))
        digest, blocks = file_version(self.abs(path))
        return Event(Op.WRITE, path, size=st.st_size, mtime_ns=st.st_mtime_ns, mode=st.st_mode & 0o7777,
                     digest=digest, blocks=blocks)

    def append(self, path: str, data: bytes) -> Event:
        with open(self.abs(path), "ab") as f:
            f.write(data)
        return self.write_event(path)

    def truncate(self, path: str, size: int) -> Event:
        os.truncate(self.abs(path), size)
        return self.write_event(path)

    def mkdir(self, path: str, mode: int = 0o755) -> Event:
        self.abs(path).mkdir()
        os.chmod(self.abs(path), mode)
        return Event(Op.MKDIR, path, is_dir=True, mode=mode)

    def chmod(self, path: str, mode: int) -> Event:
        os.chmod(self.abs(path), mode)
        st = os.stat(self.abs(path))
        is_dir = self.abs(path).is_dir()
        return Event(Op.ATTRIB, path, is_dir=is_dir, mode=mode, mtime_ns=st.st_mtime_ns)

    def touch(self, path: str, mtime_ns: int) -> Event:
        os.utime(self.abs(path), ns=(mtime_ns, mtime_ns))
        st = os.stat(self.abs(path))
        return Event(Op.ATTRIB, path, mode=st.st_mode & 0o7777, mtime_ns=st.st_mtime_ns)

    def delete(self, path: str) -> Event:
        os.unlink(self.abs(path))
        return Event(Op.DELETE, path)

    def rmtree(self, path: str) -> Event:
        shutil.rmtree(self.abs(path))
        return Event(Op.RMDIR, path, is_dir=True)

    def move(self, src: str, dest: str) -> Event:
        is_dir = self.abs(src).is_dir()
        self.abs(dest).parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.abs(src), self.abs(dest))
        if is_dir:
            return Event(Op.MOVE, src, dest=dest, is_dir=True)
        st = os.stat(self.abs(dest))
        digest, blocks = file_version(self.abs(dest))
        return Event(Op.MOVE, src, dest=dest, size=st.st_size, mtime_ns=st.st_mtime_ns, mode=st.st_mode & 0o7777,
                     digest=digest, blocks=blocks)
