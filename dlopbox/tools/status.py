"""`dlopbox status`: every slave's seq, lag and last report, as the interface sees them."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from datetime import datetime, timezone
from typing import Any, TextIO

import aiohttp

from ..api import InterfaceAPI
from ..errors import HTTP_ERRORS
from ..settings import ClientSettings

#: Clears the terminal and homes the cursor, so each refresh of --watch replaces the last one.
CLEAR = "\x1b[H\x1b[2J"


async def status(settings: ClientSettings, out: TextIO | None = None, watch: float | None = None,
                 stop: asyncio.Event | None = None) -> int:
    """Print every client's seq, lag and last report as a table; 0 when the interface answered.

    With ``watch`` (seconds), redraw it in place that often until ``stop`` is set.
    """
    out = out or sys.stdout
    if watch is None:
        return await _once(settings, out)
    stop = stop or asyncio.Event()
    while not stop.is_set():
        print(CLEAR, end="", file=out)
        await _once(settings, out)
        print(f"every {watch:g} s, {datetime.now(timezone.utc):%H:%M:%S} UTC; Ctrl-C to stop", file=out, flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), watch)
    return 0


async def _once(settings: ClientSettings, out: TextIO) -> int:
    try:
        async with aiohttp.ClientSession() as session:
            body = await InterfaceAPI(session, settings.interface_url, settings.read_token).clients()
    except HTTP_ERRORS as exc:
        print(f"dlopbox status: cannot reach {settings.interface_url}: {exc}", file=sys.stderr)
        return 2
    print(render_status(body), file=out)
    return 0


def render_status(body: dict[str, Any], now: datetime | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    rows = [("CLIENT", "SEQ", "LAG", "LAST SEEN")]
    for c in body["clients"]:
        rows.append((str(c.get("id")), str(c.get("seq")), str(c.get("lag")), _ago(c.get("last_seen"), now)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows]
    lines.append(f"head seq: {body.get('head')}, {len(body['clients'])} client(s)")
    return "\n".join(lines)


def _ago(value: object, now: datetime) -> str:
    """An ISO timestamp (or unix seconds) as 'YYYY-MM-DD HH:MM:SS UTC (12s ago)'."""
    when: datetime | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        when = datetime.fromtimestamp(value, timezone.utc)
    elif isinstance(value, str):
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            return value
    if when is None:
        return "never"
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    seconds = max(0, int((now - when).total_seconds()))
    ago = f"{seconds}s" if seconds < 120 else f"{seconds // 60}m" if seconds < 7200 else f"{seconds // 3600}h"
    return f"{when.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S} UTC ({ago} ago)"
