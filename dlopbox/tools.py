"""`dlopbox verify` and `dlopbox status`: operators' views of how well the slaves follow."""

from __future__ import annotations

import asyncio
import sys
from datetime import datetime, timezone
from typing import Any, TextIO

import aiohttp

from .api import APIError, InterfaceAPI
from .events import Entry
from .settings import ClientSettings
from .state import load_state
from .tree import Tree, scan

_ERRORS = (aiohttp.ClientError, APIError, TimeoutError, OSError)


async def verify(settings: ClientSettings, out: TextIO | None = None) -> int:
    """Compare the target with the manifest (paths, types, sizes, digests, modes, file mtimes); 0 when equal."""
    out = out or sys.stdout
    if not settings.target.is_dir():
        print(f"dlopbox verify: {settings.target} is not a directory", file=sys.stderr)
        return 2
    try:
        async with aiohttp.ClientSession() as session:
            manifest = await InterfaceAPI(session, settings.interface_url, settings.read_token).manifest()
    except _ERRORS as exc:
        print(f"dlopbox verify: cannot fetch the manifest from {settings.interface_url}: {exc}", file=sys.stderr)
        return 2
    local = await asyncio.to_thread(scan, settings.target)
    state = await asyncio.to_thread(load_state, settings.target)
    differences = compare(manifest.tree, local)
    files = sum(1 for e in manifest.tree.entries.values() if not e.is_dir)
    where = f"{settings.target} (client state: {'seq ' + str(state.seq) if state else 'none'})"
    for line in differences:
        print(line, file=out)
    if differences:
        print(f"{len(differences)} difference(s) between {where} and the manifest at seq {manifest.seq}", file=out)
        return 1
    print(f"OK: {where} equals the manifest at seq {manifest.seq}: {files} files, "
          f"{len(manifest.tree) - files} directories", file=out)
    return 0


def compare(master: Tree, local: Tree) -> list[str]:
    """Readable differences, one line per path, parents first."""
    lines = []
    for path in sorted(set(master.entries) | set(local.entries), key=lambda p: p.split("/")):
        want, have = master.get(path), local.get(path)
        if have is None:
            assert want is not None
            lines.append(f"missing   {path}  ({_kind(want)})")
        elif want is None:
            lines.append(f"extra     {path}  ({_kind(have)})")
        else:
            details = _details(want, have)
            if details:
                lines.append(f"differs   {path}  ({'; '.join(details)})")
    return lines


def _kind(entry: Entry) -> str:
    return "directory" if entry.is_dir else f"file, {entry.size} bytes"


def _details(want: Entry, have: Entry) -> list[str]:
    if want.is_dir != have.is_dir:
        return [f"master has a {'directory' if want.is_dir else 'file'}, here a {'directory' if have.is_dir else 'file'}"]
    details = []
    if not want.is_dir:
        if want.size != have.size:
            details.append(f"size {have.size} here, {want.size} on the master")
        elif want.digest is not None and want.digest != have.digest:
            details.append(f"content differs (sha256 {str(have.digest)[:12]}... here, {want.digest[:12]}... on the master)")
        if want.mtime_ns is not None and want.mtime_ns != have.mtime_ns:
            details.append(f"mtime {_when_ns(have.mtime_ns)} here, {_when_ns(want.mtime_ns)} on the master")
    if want.mode is not None and want.mode != have.mode:
        details.append(f"mode {have.mode:04o} here, {want.mode:04o} on the master")
    return details


def _when_ns(ns: int | None) -> str:
    if ns is None:
        return "?"
    return datetime.fromtimestamp(ns / 1e9, timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f UTC")


async def status(settings: ClientSettings, out: TextIO | None = None) -> int:
    """Print every client's seq, lag and last report as a table; 0 when the interface answered."""
    out = out or sys.stdout
    try:
        async with aiohttp.ClientSession() as session:
            body = await InterfaceAPI(session, settings.interface_url, settings.read_token).clients()
    except _ERRORS as exc:
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
