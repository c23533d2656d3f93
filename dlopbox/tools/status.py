"""`dlopbox status`: every slave's seq, lag, local differences and last report, and the master's report."""

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

#: Unsendable paths printed below the table; the rest are counted.
MASTER_ROWS = 20
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
            async with asyncio.timeout(watch):
                await stop.wait()
    return 0


async def _once(settings: ClientSettings, out: TextIO) -> int:
    try:
        async with aiohttp.ClientSession() as session:
            api = InterfaceAPI(session, settings.interface_url, settings.read_token)
            body = await api.clients()
            master = await api.master()
    except HTTP_ERRORS as exc:
        print(f"dlopbox status: cannot reach {settings.interface_url}: {exc}", file=sys.stderr)
        return 2
    print(render_status(body, master=master), file=out)
    return 0


def client_state(lag: object, local_differences: object) -> str:
    """The dashboard's words (dlopbox/interface/live.py); "in sync" only for a mirror known to be faithful."""
    if isinstance(local_differences, int) and local_differences > 0:
        return "local differences"
    if lag:
        return "syncing"
    return "in sync" if local_differences == 0 else "caught up"


def render_status(body: dict[str, Any], now: datetime | None = None, master: dict[str, Any] | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    rows = [("CLIENT", "SEQ", "LAG", "LOCAL", "STATE", "LAST SEEN")]
    for c in body["clients"]:
        differences = c.get("local_differences")
        rows.append((str(c.get("id")), str(c.get("seq")), str(c.get("lag")),
                     "-" if differences is None else str(differences), client_state(c.get("lag"), differences),
                     _ago(c.get("last_seen"), now)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}  "
             f"{r[4]:<{widths[4]}}  {r[5]}" for r in rows]
    lines.append(f"head seq: {body.get('head')}, {len(body['clients'])} client(s)")
    lines.extend(render_master(master))
    return "\n".join(lines)


def render_master(master: dict[str, Any] | None) -> list[str]:
    """The watcher's last report: directories, rescans and the paths it cannot send (the first MASTER_ROWS)."""
    if master is None:
        return ["master: not reported"]
    rows = master.get("unsendable") or []
    total = master.get("unsendable_total", len(rows))
    received = _ago(master.get("received_at"), datetime.now(timezone.utc))
    lines = [f"master: {master.get('watched_dirs')} watched dirs, {master.get('rescans')} rescans, "
             + f"{total} unsendable path(s), reported {received}"]
    lines += [f"  {row.get('path')}: {row.get('reason')}" for row in rows[:MASTER_ROWS]]
    if total > min(len(rows), MASTER_ROWS):
        lines.append(f"  ... and {total - min(len(rows), MASTER_ROWS)} more")
    return lines


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
