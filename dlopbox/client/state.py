"""A client's local state in ``<target>/.dlopbox/``: the last applied seq, and temp-file hygiene.

The directory name is reserved (see :mod:`dlopbox.paths`): it is never synced, nginx refuses
it and the watcher ignores it. Downloads are written to ``.dlopbox-tmp-*`` files next to
their final name and renamed over it; any left by a crash are removed on start.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from ..paths import RESERVED_PREFIX

log = logging.getLogger(__name__)

STATE_DIR = RESERVED_PREFIX
STATE_FILE = "state.json"
TEMP_PREFIX = RESERVED_PREFIX + "-tmp-"


_TEMP_NAMES = itertools.count()
_TEMP_PROCESS = secrets.token_hex(6)  # drawn once: a getrandom(2) per file was 3% of the loop in a burst


def temp_name() -> str:
    """A fresh temp file name, hidden and reserved, unique enough for O_EXCL (random per process, then counted)."""
    return f"{TEMP_PREFIX}{_TEMP_PROCESS}-{next(_TEMP_NAMES):x}"


@dataclass(frozen=True, slots=True)
class ClientState:
    """What a client must remember across restarts: the seq its tree reflects (0: nothing yet)."""

    client_id: str
    seq: int


def load_state(target: Path) -> ClientState | None:
    """The persisted state, or None for a client that never completed a sync here."""
    try:
        raw = (target / STATE_DIR / STATE_FILE).read_bytes()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
        state = ClientState(str(data["client_id"]), int(data["seq"]))
    except (ValueError, KeyError, TypeError):
        log.warning("unreadable state file in %s; starting with a full resync", target / STATE_DIR)
        return None
    return state if state.seq >= 0 else None


def save_state(target: Path, state: ClientState) -> None:
    """Write the state atomically and durably (blocking: run it in a thread)."""
    directory = target / STATE_DIR
    directory.mkdir(mode=0o700, exist_ok=True)
    tmp = directory / temp_name()
    body = json.dumps({"client_id": state.client_id, "seq": state.seq}).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, directory / STATE_FILE)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_temp_files(target: Path) -> int:
    """Delete every leftover ``.dlopbox-tmp-*`` file below ``target`` (blocking; never follows links)."""
    removed = 0
    for dirpath, dirnames, filenames in os.walk(target, followlinks=False):
        for name in filenames:
            if name.startswith(TEMP_PREFIX):
                try:
                    os.unlink(os.path.join(dirpath, name))
                    removed += 1
                except FileNotFoundError:
                    pass
        # os.walk lists links to directories among dirnames but never descends into them.
    if removed:
        log.info("removed %d leftover temp file(s) below %s", removed, target)
    return removed
