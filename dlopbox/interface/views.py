"""The dashboard's routes: the page and its static files, sign-in, and the push channel (GET /live).

The page is static and holds no secret; it signs in by posting the read token to /session
and from then on rides the session cookie (see session.py), for /live and for the read
routes (GET only: the cookie never authorises a write).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import socket
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from aiohttp import web

from ..settings import InterfaceSettings
from .live import FEED_MAX, Hub
from .metrics import Metrics
from .session import Sessions, SignInRefused, clear_cookie, set_cookie

SESSIONS = web.AppKey("sessions", Sessions)
HUB = web.AppKey("hub", Hub)
VIEW_SETTINGS = web.AppKey("view_settings", InterfaceSettings)

STATIC = {"app.js": "text/javascript", "app.css": "text/css"}
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
SIGN_IN_MAX = 4096
LIVE_SOCKET_BUFFER = 32 * 1024


def _asset(name: str) -> bytes:
    return resources.files(__package__).joinpath("dashboard", name).read_bytes()


def signed_in(request: web.Request) -> bool:
    """A live session cookie on a GET: enough for the read routes."""
    return request.method == "GET" and request.app[SESSIONS].valid(request)


def _view_auth(request: web.Request) -> None:
    """A session, or the read token itself (for scripts); never the write token."""
    if request.app[SESSIONS].valid(request):
        return
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    presented = presented.strip()
    if scheme.lower() != "bearer" or not presented:
        raise web.HTTPUnauthorized(text="sign in at / first (or send the read token as a bearer token)",
                                   headers={"WWW-Authenticate": 'Bearer realm="dlopbox"'})
    read_token = request.app[VIEW_SETTINGS].read_token
    if not (read_token and hmac.compare_digest(presented.encode(), read_token.encode())):
        raise web.HTTPForbidden(text="only the read token opens the dashboard's channel")


async def get_index(request: web.Request) -> web.Response:
    return web.Response(body=_asset("index.html"), content_type="text/html", charset="utf-8",
                        headers=SECURITY_HEADERS)


async def get_static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC:
        raise web.HTTPNotFound(text=f"no such dashboard file: {name[:100]}")
    return web.Response(body=_asset(name), content_type=STATIC[name], charset="utf-8", headers=SECURITY_HEADERS)


async def post_session(request: web.Request) -> web.Response:
    """Sign in: JSON ``{"token"}`` from the page's script, or the plain form without script."""
    if request.content_length is not None and request.content_length > SIGN_IN_MAX:
        raise web.HTTPRequestEntityTooLarge(max_size=SIGN_IN_MAX, actual_size=request.content_length)
    form = request.content_type == "application/x-www-form-urlencoded"
    if form:
        token = (await request.post()).get("token")
    else:
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            raise web.HTTPBadRequest(text='body must be JSON: {"token": "..."}') from None
        token = body.get("token") if isinstance(body, dict) else None
    if not isinstance(token, str):
        raise web.HTTPBadRequest(text='body must be {"token": "..."} with the read token')
    try:
        session_id = request.app[SESSIONS].sign_in(token)
    except SignInRefused as exc:
        raise web.HTTPForbidden(text=str(exc)) from None
    response = web.Response(status=303, headers={"Location": "/"}) if form else web.Response(status=204)
    set_cookie(response, session_id)
    return response


async def get_session(request: web.Request) -> web.Response:
    if not request.app[SESSIONS].valid(request):
        raise web.HTTPUnauthorized(text="not signed in")
    return web.json_response({"signed_in": True})


async def delete_session(request: web.Request) -> web.Response:
    request.app[SESSIONS].sign_out(request)
    response = web.Response(status=204)
    clear_cookie(response)
    return response


def _last_seen(request: web.Request, hub: Hub) -> tuple[int, bool]:
    """(the seq a reconnecting tab saw, True) from Last-Event-ID; a new tab starts with the last few batches."""
    raw = request.headers.get("Last-Event-ID", "")
    try:
        seen = int(raw)
    except ValueError:
        return max(0, hub.last_seq - FEED_MAX), False
    if seen < 0 or (hub.last_seq and seen > hub.last_seq):
        return hub.last_seq, True
    return seen, True


def _bound_socket(transport: asyncio.Transport) -> None:
    """Small kernel and transport buffers for a viewer, so a stuck one reaches its hub bound (and is dropped)
    instead of parking megabytes in socket buffers."""
    transport.set_write_buffer_limits(high=LIVE_SOCKET_BUFFER)
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LIVE_SOCKET_BUFFER)


async def get_live(request: web.Request) -> web.StreamResponse:
    """Server-sent events: ``events`` (id = last seq), ``client``, ``status`` and ``gap``."""
    _view_auth(request)
    hub = request.app[HUB]
    transport = request.transport
    if transport is not None:
        _bound_socket(transport)
    viewer = hub.subscribe(transport.abort if transport is not None else None, *_last_seen(request, hub))
    if viewer is None:
        raise web.HTTPServiceUnavailable(text="too many dashboard viewers")
    try:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                               "Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        await response.prepare(request)
        while True:
            await response.write(await viewer.next())
    except ConnectionResetError:  # the tab went away, or was dropped for falling behind
        return response
    finally:
        hub.unsubscribe(viewer)


def setup(app: web.Application, settings: InterfaceSettings, ingest: Any, metrics: Metrics) -> None:
    """Register the dashboard's routes, and run the hub's snapshot loop for the app's lifetime."""
    app[VIEW_SETTINGS] = settings
    app[SESSIONS] = Sessions(settings.read_token, settings.token)
    hub = app[HUB] = Hub(ingest, metrics)

    async def run_hub(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(hub.run(), name="dlopbox-dashboard-hub")
        yield
        hub.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def close_viewers(app: web.Application) -> None:
        hub.close()

    app.cleanup_ctx.append(run_hub)
    app.on_shutdown.append(close_viewers)  # else open streams hold the shutdown for its whole timeout
    app.router.add_get("/", get_index, allow_head=False)
    app.router.add_get("/dashboard/{name}", get_static, allow_head=False)
    app.router.add_post("/session", post_session)
    app.router.add_get("/session", get_session, allow_head=False)
    app.router.add_delete("/session", delete_session)
    app.router.add_get("/live", get_live, allow_head=False)
