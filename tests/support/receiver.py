"""A stand-in for the interface's write side, for the watcher's tests.

It answers POST /events, GET /manifest and PUT /master as the README's protocol says: it numbers the
events of each batch with its own gap-free seqs, is idempotent on ``batch_id``, keeps the
tree that applying every received event gives, and serves that tree as the NDJSON manifest.
It can be told to answer 503, or be taken down (no listener, connections closed) and
brought back on the same port.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from aiohttp import web

from dlopbox.events import Batch, Event, EventError
from dlopbox.tree import Tree


@dataclass(frozen=True)
class Received:
    batch: Batch  # numbered
    at: float  # time.time() on arrival


class Receiver:
    def __init__(self, token: str = "write-token") -> None:
        self.token = token
        self.tree = Tree()
        self.received: list[Received] = []
        self.answers: dict[str, dict[str, object]] = {}
        self.posts = 0  # every POST /events, retries and refusals included
        self.duplicates = 0  # POSTs of a batch_id already logged
        self.manifests = 0
        self.status: int | None = None  # answer this to everything instead (e.g. 503)
        self.max_events: int | None = None  # answer 413 to larger batches
        self.refuse: set[str] = set()  # answer 400 naming the first event with one of these paths
        self.master_reports: list[dict[str, object]] = []  # every PUT /master body, in order
        self.master_status: int | None = None  # answer this to PUT /master only (e.g. 500)
        self.seq = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def up(self) -> bool:
        return self._runner is not None

    def events(self, since: int = 0) -> list[Event]:
        """Every received event with seq > ``since``, in seq order."""
        return [e for r in self.received for e in r.batch.events if e.seq is not None and e.seq > since]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/events", self._post_events)
        app.router.add_get("/manifest", self._get_manifest)
        app.router.add_put("/master", self._put_master)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        if not self.port:
            self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Go down: stop listening and close every connection (the next start reuses the port)."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.token}"

    async def _post_events(self, request: web.Request) -> web.Response:
        self.posts += 1
        if self.status is not None:
            return web.json_response({"error": "unavailable"}, status=self.status)
        if not self._authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        try:
            batch = Batch.from_json(await request.read(), sequenced=False)
        except EventError as exc:
            return web.json_response(exc.to_json(), status=400)
        if self.max_events is not None and len(batch.events) > self.max_events:
            return web.json_response({"error": "too many events"}, status=413)
        for index, event in enumerate(batch.events):
            if event.path in self.refuse:
                return web.json_response({"error": "refused", "field": "path", "index": index, "reason": "test"},
                                         status=400)
        if batch.batch_id in self.answers:
            self.duplicates += 1
            return web.json_response(self.answers[batch.batch_id])
        numbered = batch.numbered(self.seq + 1)
        self.seq += len(batch.events)
        for event in numbered.events:
            self.tree.apply(event)
        self.received.append(Received(numbered, time.time()))
        answer = {"batch_id": batch.batch_id, "first_seq": numbered.first_seq, "last_seq": numbered.last_seq,
                  "logged": len(batch.events)}
        self.answers[batch.batch_id] = answer
        return web.json_response(answer)

    async def _put_master(self, request: web.Request) -> web.Response:
        status = self.status or self.master_status
        if status is not None:
            return web.json_response({"error": "unavailable"}, status=status)
        if not self._authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        self.master_reports.append(await request.json())
        return web.Response(status=204)

    @property
    def master(self) -> dict[str, object] | None:
        """The last report the watcher PUT, if any."""
        return self.master_reports[-1] if self.master_reports else None

    async def _get_manifest(self, request: web.Request) -> web.StreamResponse:
        self.manifests += 1
        if self.status is not None:
            return web.json_response({"error": "unavailable"}, status=self.status)
        if not self._authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        entries = self.tree.sorted_entries()
        lines = [json.dumps({"seq": self.seq, "count": len(entries)})]
        lines += [json.dumps(e.to_dict(), ensure_ascii=False) for e in entries]
        return web.Response(body=("\n".join(lines) + "\n").encode(), content_type="application/x-ndjson")
