"""`dlopbox log`: what happened to a path, a folder or everything, from the interface's MongoDB log."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from datetime import datetime, timezone
from typing import TextIO

import aiohttp

from ..api import InterfaceAPI
from ..errors import HTTP_ERRORS
from ..events import Event
from ..settings import ClientSettings

PAGE = 1000
FOLLOW_EVERY = 0.5


def render_event(event: Event) -> str:
    when = datetime.fromtimestamp(event.ts, timezone.utc) if event.ts else None
    stamp = f"{when:%Y-%m-%d %H:%M:%S}.{when.microsecond // 1000:03d}" if when else "-"
    path = f"{event.path} -> {event.dest}" if event.dest else event.path
    size = f"  {event.size} B" if event.op.value == "write" and event.size is not None else ""
    return f"{event.seq:>8}  {stamp}  {event.op.value:<6}  {path}{size}"


async def log(settings: ClientSettings, prefix: str | None = None, since: int = 0, follow: bool = False,
              out: TextIO | None = None, stop: asyncio.Event | None = None) -> int:
    """Print every logged event after ``since`` touching ``prefix``, in seq order; with ``follow``, keep going."""
    out = out or sys.stdout
    stop = stop or asyncio.Event()
    try:
        async with aiohttp.ClientSession() as session:
            api = InterfaceAPI(session, settings.interface_url, settings.read_token)
            while not stop.is_set():
                events = await api.events_since(since, prefix=prefix, limit=PAGE)
                for event in events:
                    print(render_event(event), file=out)
                if events:
                    since = events[-1].seq or since
                    continue  # the next page at once
                out.flush()
                if not follow:
                    return 0
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(FOLLOW_EVERY):
                        await stop.wait()
    except HTTP_ERRORS as exc:
        print(f"dlopbox log: {settings.interface_url}: {exc}", file=sys.stderr)
        return 2
    return 0
