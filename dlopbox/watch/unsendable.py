"""The paths the watcher cannot send, so that none is skipped in silence.

A name that is not valid UTF-8, a path over the limits of :mod:`dlopbox.paths`, a name
reserved for dlopbox, a file or directory the watcher may not read: each is logged at WARNING
once (its name escaped, as its bytes are not text), counted and listed in the master's report
(PUT /master) until it is renamed, removed or becomes readable.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping

from asyncinotify import Mask

from ..paths import RESERVED_REASON, is_reserved, is_within
from ..tree import Ignore
from .disk import unsafe_reason

log = logging.getLogger(__name__)

_LEAVE = int(Mask.DELETE | Mask.MOVED_FROM)
_ARRIVE = int(Mask.CREATE | Mask.CLOSE_WRITE | Mask.MOVED_TO | Mask.ATTRIB)
#: The events on a sendable name that matter to the list: a removal, or a mode change.
LEAVE_OR_ATTRIB = _LEAVE | int(Mask.ATTRIB)
#: Entries sent in one report: the count is always exact, the list is a sample past this.
REPORT_MAX = 1000


def escaped(rel: str) -> str:
    """``rel`` as printable text: bytes that are not UTF-8 (surrogates from fsdecode) become ``\\xNN``."""
    return os.fsencode(rel).decode("utf-8", "backslashreplace")


class UnsendablePaths:
    """path -> why it cannot be sent; changed on the event loop only (scans hand theirs back)."""

    def __init__(self) -> None:
        #: path -> why; read it (the reader tests it per event), change it only through the methods.
        self.paths: dict[str, str] = {}
        #: Bumped on every change: the reporter sends when it moved.
        self.version = 0

    def __len__(self) -> int:
        return len(self.paths)

    def __contains__(self, rel: str) -> bool:
        return rel in self.paths

    def add(self, rel: str, reason: str) -> None:
        if self.paths.get(rel) == reason:
            return
        self.paths[rel] = reason
        self.version += 1
        log.warning("cannot send %s: %s (listed in the master's report until renamed, removed or readable)",
                    escaped(rel), reason)

    def discard(self, rel: str) -> None:
        if self.paths.pop(rel, None) is not None:
            self.version += 1
            log.info("%s is no longer unsendable", escaped(rel))

    def discard_below(self, rel: str, is_dir: bool = True) -> None:
        """``rel`` (and, for a directory, everything below it) is gone: removed, or moved away."""
        if not is_dir:
            self.discard(rel)
            return
        for path in [p for p in self.paths if is_within(p, rel)]:
            self.discard(path)

    def replace_below(self, rel: str, found: Mapping[str, str]) -> None:
        """A scan of ``rel`` ("" for everything) found exactly ``found`` there."""
        if not self.paths and not found:
            return  # the usual case, once per arrival
        for path in [p for p in self.paths if (not rel or is_within(p, rel)) and p not in found]:
            self.discard(path)
        for path, reason in found.items():
            self.add(path, reason)

    def report(self) -> tuple[list[dict[str, str]], int]:
        """The first REPORT_MAX entries, escaped and sorted, and how many there are."""
        rows = sorted((escaped(p), reason) for p, reason in self.paths.items())
        return [{"path": p, "reason": r} for p, r in rows[:REPORT_MAX]], len(rows)


class UnsendableEvents:
    """The reader's rule: a name it does not send is listed while it is there; a listed path that is
    removed leaves the list, one whose mode changed is read again (``rescan`` a directory, ``reread`` a file)."""

    def __init__(self, paths: UnsendablePaths, ignore: Ignore, rescan: Callable[[str, bool, float], None],
                 reread: Callable[[str, float], None]) -> None:
        self._paths = paths
        self._ignore = ignore
        self._rescan = rescan
        self._reread = reread

    def ignored(self, rel: str, name: str, mask: int, is_dir: bool) -> None:
        """An event on a name not sent: a reserved or unsafe one is listed, DLOPBOX_IGNORE left out on purpose."""
        if is_reserved(name):
            reason = RESERVED_REASON
        elif self._ignore(name):
            return
        else:
            reason = unsafe_reason(rel)
        if mask & _LEAVE:
            self._paths.discard_below(rel, is_dir)
        elif mask & _ARRIVE:
            self._paths.add(rel, reason)

    def sendable(self, rel: str, mask: int, is_dir: bool, ts: float) -> None:
        """A removal or mode change of a sendable name, while something is listed."""
        if mask & _LEAVE:
            self._paths.discard_below(rel, is_dir)
        elif rel in self._paths.paths:
            if is_dir:
                self._rescan(rel, True, ts)
            else:
                self._reread(rel, ts)
