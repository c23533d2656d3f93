"""`dlopbox verify`: is a slave's directory equal to the master's, and if not, where not."""

from __future__ import annotations

import asyncio
import sys
from datetime import datetime, timezone
from typing import TextIO

import aiohttp

from ..api import InterfaceAPI
from ..client.state import load_state
from ..errors import HTTP_ERRORS
from ..events import Entry
from ..settings import ClientSettings
from ..tree import Tree, scan


async def verify(settings: ClientSettings, out: TextIO | None = None) -> int:
    """Compare the target with the manifest (paths, types, sizes, digests, modes, file mtimes); 0 when equal."""
    out = out or sys.stdout
    if not settings.target.is_dir():
        print(f"dlopbox verify: {settings.target} is not a directory", file=sys.stderr)
        return 2
    try:
        async with aiohttp.ClientSession() as session:
            manifest = await InterfaceAPI(session, settings.interface_url, settings.read_token).manifest()
    except HTTP_ERRORS as exc:
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
