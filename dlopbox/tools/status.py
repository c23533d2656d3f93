"""`dlopbox status`: every slave's seq, lag and last report, as the interface sees them."""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from typing import Any, TextIO

import aiohttp

from ..api import InterfaceAPI
from ..errors import HTTP_ERRORS
from ..settings import ClientSettings


async def status(settings: ClientSettings, out: TextIO | None = None) -> int:
    """Print every client's seq, lag and last report as a table; 0 when the interface answered."""
    out = out or sys.stdout
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
