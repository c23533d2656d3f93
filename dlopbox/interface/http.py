"""The HTTP side of the interface: routes, auth, the JSON error middleware and the handlers.

The handlers call the narrow :class:`Ingestion` facade, never the database or the broker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import importlib.metadata
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC
from importlib import resources
from types import EllipsisType
from typing import IO, Any, Protocol

from aiohttp import web
from pymongo.errors import PyMongoError

from .. import broker
from ..events import INT64_MAX, Batch, EventError
from ..paths import UnsafePathError, check_relpath
from ..settings import InterfaceSettings
from . import views
from .backends import Unavailable
from .commit import Committed
from .master import MalformedReport, MasterReport
from .metrics import Metrics

log = logging.getLogger(__name__)

EVENTS_LIMIT = 1000
EVENTS_LIMIT_MAX = 10_000
STREAM_CHUNK = 256 * 1024
RETRY_AFTER = "1"
VERSION = importlib.metadata.version("dlopbox")


def openapi_spec() -> str:
    """The OpenAPI description of this API, shipped as package data."""
    return resources.files(__package__).joinpath("openapi.yaml").read_text(encoding="utf-8")


class Ingestion(Protocol):
    """What the handlers need of the interface (:class:`dlopbox.interface.service.Ingest`)."""

    async def accept(self, batch: Batch) -> tuple[Committed, asyncio.Future[bool]]: ...

    async def manifest(self) -> tuple[IO[bytes], int, int]: ...

    async def events_since(self, since: int, prefix: str | None, limit: int) -> list[dict[str, Any]]: ...

    async def set_progress(self, client_id: str, seq: int, local_differences: int | None | EllipsisType = ...
                           ) -> None: ...

    async def set_master(self, body: Any) -> MasterReport: ...

    async def master(self) -> MasterReport | None: ...

    async def client_progress(self) -> tuple[int, list[dict[str, Any]]]: ...

    async def health(self) -> dict[str, Any]: ...

    async def queue_counts(self, names: list[str]) -> dict[str, tuple[int, int] | None]: ...


SETTINGS = web.AppKey("settings", InterfaceSettings)
INGEST = web.AppKey("ingest", Ingestion)
METRICS = web.AppKey("metrics", Metrics)


def _error(status: int, message: str, **extra: Any) -> web.Response:
    headers = {"Retry-After": RETRY_AFTER} if status == 503 else None
    return web.json_response({"error": message, **extra}, status=status, headers=headers)


@web.middleware
async def json_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
    """Every refusal is a JSON body and is counted; 503 carries Retry-After."""
    metrics = request.app[METRICS]
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        metrics.rejected.labels(str(exc.status)).inc()
        response = _error(exc.status, exc.text if exc.content_type == "text/plain" and exc.text else exc.reason)
        for name in ("WWW-Authenticate", "Allow"):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
    except Unavailable as exc:
        response = _error(503, str(exc))
    except PyMongoError as exc:
        log.warning("MongoDB unavailable for %s %s: %s", request.method, request.path, exc)
        response = _error(503, f"MongoDB is unavailable: {type(exc).__name__}")
    if response.status >= 400:
        metrics.rejected.labels(str(response.status)).inc()
    return response


def _authorize(request: web.Request, *tokens: str) -> None:
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    presented = presented.strip()
    if scheme.lower() != "bearer" or not presented:
        raise web.HTTPUnauthorized(text="a bearer token is required", headers={"WWW-Authenticate": 'Bearer realm="dlopbox"'})
    given = presented.encode()
    if not any(token and hmac.compare_digest(given, token.encode()) for token in tokens):
        raise web.HTTPForbidden(text="this token is not allowed here")


def _write_auth(request: web.Request) -> None:
    _authorize(request, request.app[SETTINGS].token)


def _read_auth(request: web.Request) -> None:
    settings = request.app[SETTINGS]
    if "Authorization" not in request.headers and views.signed_in(request):
        return
    _authorize(request, settings.read_token, settings.token)


async def post_events(request: web.Request) -> web.Response:
    _write_auth(request)
    settings = request.app[SETTINGS]
    if request.content_length is not None and request.content_length > settings.max_body:
        raise web.HTTPRequestEntityTooLarge(max_size=settings.max_body, actual_size=request.content_length)
    body = await request.read()
    try:
        batch = Batch.from_json(body, sequenced=False)
    except EventError as exc:
        return web.json_response(exc.to_json(), status=400)
    started = time.perf_counter()
    accepted, logged = await request.app[INGEST].accept(batch)
    request.app[views.HUB].committed(batch, accepted.first_seq, accepted.last_seq)
    # Published, so durable: the status line goes out now, and the body once the log write ended.
    response = web.StreamResponse(headers={"Content-Type": "application/json; charset=utf-8"})
    await response.prepare(request)
    committed = dataclasses.replace(accepted, logged=await asyncio.shield(logged))
    await response.write(json.dumps(committed.to_json()).encode())
    await response.write_eof()
    request.app[METRICS].commit_seconds.observe(time.perf_counter() - started)
    return response


def _int_param(request: web.Request, name: str, default: int, minimum: int, maximum: int | None = None) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be an integer") from None
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise web.HTTPBadRequest(text=f"{name} must be {bounds}")
    return value


async def get_events(request: web.Request) -> web.Response:
    _read_auth(request)
    since = _int_param(request, "since", 0, 0, INT64_MAX)
    limit = _int_param(request, "limit", EVENTS_LIMIT, 1, EVENTS_LIMIT_MAX)
    prefix = request.query.get("prefix")
    if prefix is not None:
        try:
            check_relpath(prefix)
        except UnsafePathError as exc:
            raise web.HTTPBadRequest(text=f"prefix: {exc}") from None
    events = await request.app[INGEST].events_since(since, prefix, limit)
    return web.json_response({"events": events, "next": events[-1]["seq"] if events else since},
                             dumps=lambda obj: json.dumps(obj, ensure_ascii=False))


async def get_manifest(request: web.Request) -> web.StreamResponse:
    _read_auth(request)
    spool, seq, count = await request.app[INGEST].manifest()
    with spool:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson; charset=utf-8",
                                               "X-Dlopbox-Seq": str(seq)})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(json.dumps({"seq": seq, "count": count}).encode() + b"\n")
        while chunk := await asyncio.to_thread(spool.read, STREAM_CHUNK):
            await response.write(chunk)
        await response.write_eof()
    return response


async def post_progress(request: web.Request) -> web.Response:
    _read_auth(request)
    client_id = request.match_info["client_id"]
    try:
        broker.queue_name(client_id)
    except ValueError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    body = await _json_body(request, PROGRESS_SHAPE)
    seq = body.get("seq") if isinstance(body, dict) else None
    if not _count(seq) or not set(body) <= {"seq", "local_differences"}:
        raise web.HTTPBadRequest(text=f"body must be {PROGRESS_SHAPE} with N a non-negative 64-bit integer "
                                      "(local_differences optional)")
    differences = body.get("local_differences", ...)
    if differences is not ... and differences is not None and not _count(differences):
        raise web.HTTPBadRequest(text="local_differences must be a non-negative 64-bit integer (or null: unknown)")
    await request.app[INGEST].set_progress(client_id, seq, differences)
    request.app[views.HUB].progress(client_id, seq, differences)
    return web.Response(status=204)


PROGRESS_SHAPE = '{"seq": N, "local_differences": K}'


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= INT64_MAX


async def _json_body(request: web.Request, shape: str) -> Any:
    try:
        return json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text=f"body must be JSON: {shape}") from None


async def put_master(request: web.Request) -> web.Response:
    """The watcher's report: only its (write) token, and only a well-formed report is kept."""
    _write_auth(request)
    body = await _json_body(request, '{"watched_dirs": N, "rescans": N, "unsendable": [...]}')
    try:
        await request.app[INGEST].set_master(body)
    except MalformedReport as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    return web.Response(status=204)


async def get_master(request: web.Request) -> web.Response:
    _read_auth(request)
    report = await request.app[INGEST].master()
    if report is None:
        raise web.HTTPNotFound(text="the watcher has not reported yet")
    return web.json_response(report.to_json(), dumps=lambda obj: json.dumps(obj, ensure_ascii=False))


async def get_clients(request: web.Request) -> web.Response:
    _read_auth(request)
    head, rows = await request.app[INGEST].client_progress()
    # MongoDB hands datetimes back naive (they are UTC): RFC 3339, as the OpenAPI says, needs the offset.
    clients = [{"id": r["_id"], "seq": r["seq"], "last_seen": r["last_seen"].replace(tzinfo=UTC).isoformat(),
                "lag": max(0, head - r["seq"]), "local_differences": r.get("local_differences")} for r in rows]
    return web.json_response({"head": head, "clients": clients})


async def get_healthz(request: web.Request) -> web.Response:
    health = await request.app[INGEST].health()
    healthy = health["ready"] and health["mongodb"] == "ok" and health["rabbitmq"] == "ok"
    body = {"status": "ok" if healthy else "unavailable", **health, "version": VERSION}
    return web.json_response(body, status=200 if healthy else 503)


async def get_metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    return web.Response(body=metrics.render(), headers={"Content-Type": metrics.content_type})


def create_app(settings: InterfaceSettings, ingest: Ingestion, metrics: Metrics) -> web.Application:
    app = web.Application(client_max_size=settings.max_body, middlewares=[json_errors])
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[INGEST] = ingest
    app.router.add_post("/events", post_events)
    app.router.add_get("/events", get_events, allow_head=False)
    app.router.add_get("/manifest", get_manifest, allow_head=False)
    app.router.add_post("/clients/{client_id}/progress", post_progress)
    app.router.add_get("/clients", get_clients, allow_head=False)
    app.router.add_put("/master", put_master)
    app.router.add_get("/master", get_master, allow_head=False)
    app.router.add_get("/healthz", get_healthz, allow_head=False)
    app.router.add_get("/metrics", get_metrics, allow_head=False)
    views.setup(app, settings, ingest, metrics)
    return app
