"""Safe relative paths: the one place that decides what a path may be.

Every path that crosses a process boundary (an event, a URL, a manifest row) is a
relative POSIX path checked here, and every path that touches a disk is resolved
here, so a hostile event can never name a file outside the synced tree.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

MAX_COMPONENT_BYTES = 255
MAX_PATH_BYTES = 4096

#: Names beginning with this are dlopbox's own (temp files, client state) and are never synced.
RESERVED_PREFIX = ".dlopbox"


#: Why a reserved name is never synced, as the watcher lists it.
RESERVED_REASON = f"names starting with {RESERVED_PREFIX} are reserved for dlopbox"


class UnsafePathError(ValueError):
    """A path that dlopbox refuses to read, write or transmit."""


def check_relpath(path: object) -> str:
    """Return ``path`` unchanged if it is a safe relative POSIX path, else raise.

    A safe path is a non-empty ``str`` of ``/``-separated components, none empty, ``.``
    or ``..``, none over 255 bytes, the whole at most 4096 bytes of UTF-8, with no NUL and
    no component reserved for dlopbox itself. Every other character is allowed: users
    name files in Chinese, with emoji, spaces, quotes, ``%``, ``#``, ``?`` and ``;``.
    """
    if not isinstance(path, str):
        raise UnsafePathError(f"path must be a string, not {type(path).__name__}")
    if not path:
        raise UnsafePathError("path is empty")
    if "\x00" in path:
        raise UnsafePathError("path contains a NUL byte")
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePathError("path is not valid UTF-8") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise UnsafePathError(f"path is {len(encoded)} bytes, over the {MAX_PATH_BYTES}-byte limit")
    if path.startswith("/"):
        raise UnsafePathError("path is absolute")
    for part in path.split("/"):
        if part == "":
            raise UnsafePathError("path has an empty component")
        if part in (".", ".."):
            raise UnsafePathError(f"path has a {part!r} component")
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise UnsafePathError(f"path component is over {MAX_COMPONENT_BYTES} bytes")
        if part.startswith(RESERVED_PREFIX):
            raise UnsafePathError(f"path component {part[:40]!r} is reserved for dlopbox")
    return path


def is_reserved(name: str) -> bool:
    """True for names dlopbox keeps for itself, which are never synced."""
    return name.startswith(RESERVED_PREFIX)


def is_within(path: str, directory: str) -> bool:
    """True when ``path`` is ``directory`` itself or lies below it."""
    return path == directory or path.startswith(directory + "/")


def ancestors(path: str) -> Iterator[str]:
    """Every directory above a relative path, nearest first ("a/b/c" -> "a/b", "a")."""
    while "/" in path:
        path = path.rpartition("/")[0]
        yield path


def parent_of(path: str) -> str:
    """The relative parent of ``path`` ("" for a top-level name)."""
    head, _, _ = path.rpartition("/")
    return head


def to_relpath(root: str | os.PathLike[str], absolute: str | os.PathLike[str]) -> str:
    """The checked relative path of ``absolute`` below ``root`` (for walkers and watchers)."""
    rel = os.path.relpath(os.fspath(absolute), os.fspath(root))
    if rel.startswith("..") or os.path.isabs(rel):
        raise UnsafePathError(f"{os.fspath(absolute)!r} is outside {os.fspath(root)!r}")
    return check_relpath(rel.replace(os.sep, "/"))


def resolve(root: str | os.PathLike[str], path: str, *, parents_must_exist: bool = False) -> Path:
    """Join a checked relative ``path`` onto ``root`` without following any symlink out of it.

    Each existing ancestor of the result is inspected with ``lstat``: if one is a symlink
    (or not a directory) the path is refused, so a link planted inside the tree can never
    redirect a write elsewhere. The final component itself may be a symlink; callers that
    open it must pass ``O_NOFOLLOW`` (or replace it by rename, which never follows).
    """
    check_relpath(path)
    base = Path(root)
    current = base
    parts = path.split("/")
    for part in parts[:-1]:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            if parents_must_exist:
                raise UnsafePathError(f"parent directory {to_display(base, current)!r} does not exist") from None
            # Nothing below a missing directory can be a link either.
            return base.joinpath(*parts)
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePathError(f"{to_display(base, current)!r} is a symlink; dlopbox never follows links")
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafePathError(f"{to_display(base, current)!r} is not a directory")
    return base.joinpath(*parts)


def to_display(root: Path, absolute: Path) -> str:
    return os.path.relpath(absolute, root)


def url_path(path: str) -> str:
    """The percent-encoded URL path of a checked relative path (every byte but ``/`` and unreserved).

    Pass the result to yarl with ``encoded=True``: re-quoting would turn ``%3F`` back into
    ``?`` and nginx would see a query string instead of a file name.
    """
    return quote(check_relpath(path), safe="/")
