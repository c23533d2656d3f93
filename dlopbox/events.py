"""The event model every dlopbox service shares, with strict JSON (de)serialisation.

One :class:`Event` says one thing that happened to the master's tree. The watcher creates
them without a ``seq``; the interface numbers them; the client applies them in that order.
A :class:`Batch` is what travels: a watcher POST body, and one AMQP message.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .paths import UnsafePathError, check_relpath, is_within

DIGEST_ALGORITHM = "sha256"
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_BATCH_ID_RE = re.compile(r"[0-9A-Za-z_.:-]{1,128}")
MAX_MODE = 0o7777
#: Every file longer than one block is described by the SHA-256 of each of its blocks: one size for the
#: whole deployment, so any local file can lend its blocks to any other.
BLOCK_SIZE = 1024 * 1024
#: The only block scheme yet: fixed-size blocks (content-defined chunking would be another name).
BLOCK_SCHEME = "fixed-1MiB"
#: Integers are stored in MongoDB as 64-bit: anything wider is refused here, not at the log write.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class Op(enum.StrEnum):
    """What happened. Every change on the master is exactly one of these."""

    WRITE = "write"  #: a file was created or its content replaced (closed after writing)
    ATTRIB = "attrib"  #: mode or mtime changed, content did not (chmod, touch)
    DELETE = "delete"  #: a file was removed (or moved out of the tree)
    MKDIR = "mkdir"  #: a directory was created (its content arrives as further events)
    RMDIR = "rmdir"  #: a directory and everything below it was removed (or moved out)
    MOVE = "move"  #: a file or a whole directory was renamed from ``path`` to ``dest``


#: The operations that change what lies below their path (or dest).
_TREE_OPS = frozenset({Op.RMDIR, Op.MOVE})


class EventError(ValueError):
    """A malformed event. ``field`` names what is wrong, ``index`` which event of a batch."""

    def __init__(self, field_name: str, message: str, index: int | None = None) -> None:
        self.field = field_name
        self.index = index
        self.reason = message
        where = field_name if index is None else f"events[{index}].{field_name}"
        super().__init__(f"{where}: {message}")

    def at(self, index: int) -> EventError:
        return EventError(self.field, self.reason, index)

    def to_json(self) -> dict[str, Any]:
        return {"error": str(self), "field": self.field, "index": self.index, "reason": self.reason}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: object, *, minimum: int | None = None, maximum: int | None = None) -> None:
    if not _is_int(value):
        raise EventError(name, f"must be an integer, not {type(value).__name__}")
    assert isinstance(value, int)
    if minimum is not None and value < minimum:
        raise EventError(name, f"must be >= {minimum}")
    if maximum is not None and value > maximum:
        raise EventError(name, f"must be <= {maximum:#o}" if name == "mode" else f"must be <= {maximum}")


def _check_path(name: str, value: object) -> None:
    try:
        check_relpath(value)
    except UnsafePathError as exc:
        raise EventError(name, str(exc)) from None


def blocks_digest(hashes: tuple[str, ...]) -> str:
    """A multi-block file's digest: the SHA-256 of its raw block hashes (Dropbox's construction).

    It costs no second pass over the content, and a client that verified every block has
    verified the whole file.
    """
    return hashlib.sha256(b"".join(bytes.fromhex(h) for h in hashes)).hexdigest()


def block_count(size: int) -> int:
    return -(-size // BLOCK_SIZE)


@dataclass(frozen=True, slots=True)
class Blocks:
    """A file's content as its blocks, in order (only for files longer than one block)."""

    scheme: str
    hashes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.scheme != BLOCK_SCHEME:
            raise EventError("blocks.scheme", f"unknown block scheme {self.scheme!r}; expected {BLOCK_SCHEME!r}")
        if not isinstance(self.hashes, tuple):
            if not isinstance(self.hashes, list):
                raise EventError("blocks.hashes", "must be a JSON array")
            object.__setattr__(self, "hashes", tuple(self.hashes))
        if len(self.hashes) < 2:
            raise EventError("blocks.hashes", "a file of one block is described by its digest alone")
        for h in self.hashes:
            if not isinstance(h, str) or not _DIGEST_RE.fullmatch(h):
                raise EventError("blocks.hashes", f"each must be 64 lowercase hex characters ({DIGEST_ALGORITHM})")

    def size_of(self, index: int, file_size: int) -> int:
        return min(BLOCK_SIZE, file_size - index * BLOCK_SIZE)

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "hashes": list(self.hashes)}

    @classmethod
    def from_value(cls, value: object) -> Blocks:
        if isinstance(value, Blocks):
            return value
        if not isinstance(value, Mapping):
            raise EventError("blocks", f"must be a JSON object, not {type(value).__name__}")
        unknown = set(value) - {"scheme", "hashes"}
        if unknown:
            raise EventError(f"blocks.{sorted(unknown)[0]}", "unknown field")
        for name in ("scheme", "hashes"):
            if name not in value:
                raise EventError(f"blocks.{name}", "is missing")
        return cls(value["scheme"], value["hashes"])


def _check_blocks(owner: Any) -> None:
    """``owner.blocks`` (an Event or an Entry) must describe exactly ``owner.size`` bytes hashing to its digest."""
    object.__setattr__(owner, "blocks", Blocks.from_value(owner.blocks))
    if owner.is_dir or owner.size is None or owner.digest is None:
        raise EventError("blocks", "only a file with a size and a digest has blocks")
    if len(owner.blocks.hashes) != block_count(owner.size):
        raise EventError("blocks", f"{len(owner.blocks.hashes)} blocks do not make {owner.size} bytes "
                                   f"({BLOCK_SIZE}-byte blocks)")
    if blocks_digest(owner.blocks.hashes) != owner.digest:
        raise EventError("digest", "must be the SHA-256 of the block hashes")


# Which optional fields each op must carry; the rest may be null.
_REQUIRED: dict[Op, tuple[str, ...]] = {
    Op.WRITE: ("size", "mtime_ns", "mode", "digest"),
    Op.ATTRIB: ("mtime_ns", "mode"),
    Op.DELETE: (),
    Op.MKDIR: ("mode",),
    Op.RMDIR: (),
    Op.MOVE: ("dest",),
}


@dataclass(frozen=True, slots=True)
class Event:
    """One change to the master's tree, validated on construction."""

    op: Op
    path: str
    dest: str | None = None
    is_dir: bool = False
    size: int | None = None
    mtime_ns: int | None = None
    mode: int | None = None
    digest: str | None = None
    seq: int | None = None
    ts: float = field(default_factory=time.time)
    #: Only for a file longer than one block; its digest is then :func:`blocks_digest` of them.
    blocks: Blocks | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.op, Op):
            try:
                object.__setattr__(self, "op", Op(self.op))
            except ValueError:
                raise EventError("op", f"unknown op {self.op!r}; expected one of {', '.join(Op)}") from None
        _check_path("path", self.path)
        if not isinstance(self.is_dir, bool):
            raise EventError("is_dir", f"must be a boolean, not {type(self.is_dir).__name__}")
        for name in _REQUIRED[self.op]:
            if getattr(self, name) is None:
                raise EventError(name, f"is required for a {self.op} event")
        if self.dest is not None:
            if self.op is not Op.MOVE:
                raise EventError("dest", f"is only allowed on a move, not on a {self.op} event")
            _check_path("dest", self.dest)
            if self.dest == self.path or (self.is_dir and is_within(self.dest, self.path)):
                raise EventError("dest", "cannot move a path onto itself or into itself")
        if self.op in (Op.WRITE, Op.DELETE) and self.is_dir:
            raise EventError("is_dir", f"a {self.op} event is for files; directories use mkdir/rmdir")
        if self.op in (Op.MKDIR, Op.RMDIR) and not self.is_dir:
            raise EventError("is_dir", f"a {self.op} event must have is_dir true")
        if self.size is not None:
            _check_int("size", self.size, minimum=0, maximum=INT64_MAX)
        if self.mtime_ns is not None:
            _check_int("mtime_ns", self.mtime_ns, minimum=INT64_MIN, maximum=INT64_MAX)
        if self.mode is not None:
            _check_int("mode", self.mode, minimum=0, maximum=MAX_MODE)
        if self.digest is not None:
            if self.is_dir:
                raise EventError("digest", "directories have no digest")
            if not isinstance(self.digest, str) or not _DIGEST_RE.fullmatch(self.digest):
                raise EventError("digest", f"must be 64 lowercase hex characters ({DIGEST_ALGORITHM})")
        if self.blocks is not None:
            if self.op not in (Op.WRITE, Op.MOVE):
                raise EventError("blocks", f"is only allowed on a write or a move, not on a {self.op} event")
            _check_blocks(self)
        if self.seq is not None:
            _check_int("seq", self.seq, minimum=1, maximum=INT64_MAX)
        if isinstance(self.ts, bool) or not isinstance(self.ts, (int, float)) or not 0 <= self.ts < math.inf:
            raise EventError("ts", "must be a non-negative number (unix seconds)")

    def with_seq(self, seq: int) -> Event:
        return dataclasses.replace(self, seq=seq)

    def paths(self) -> tuple[str, ...]:
        """Every path this event touches (source and destination of a move)."""
        return (self.path,) if self.dest is None else (self.path, self.dest)

    def affects(self, prefix: str) -> bool:
        """Whether this event can change what is at or below ``prefix``.

        It does when it acts on ``prefix`` or below it, and also when it removes or moves a
        directory above it: a client following a file the master moved on must see both.
        """
        if any(is_within(p, prefix) for p in self.paths()):
            return True
        return self.op in _TREE_OPS and any(is_within(prefix, p) for p in self.paths())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; null fields are left out to keep batches small."""
        out: dict[str, Any] = {"op": self.op.value, "path": self.path}
        for name in ("dest", "size", "mtime_ns", "mode", "digest", "seq"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.is_dir:
            out["is_dir"] = True
        out["ts"] = self.ts
        if self.blocks is not None:
            out["blocks"] = self.blocks.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: object) -> Event:
        """Build an event from decoded JSON, refusing unknown or missing fields."""
        if not isinstance(data, Mapping):
            raise EventError("event", f"must be a JSON object, not {type(data).__name__}")
        unknown = set(data) - _FIELD_NAMES
        if unknown:
            raise EventError(sorted(unknown)[0], "unknown field")
        for name in ("op", "path", "ts"):
            if name not in data:
                raise EventError(name, "is missing")
        if not isinstance(data["op"], str):
            raise EventError("op", f"must be a string, not {type(data['op']).__name__}")
        return cls(**{k: v for k, v in data.items() if v is not None or k in ("op", "path", "ts")})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Event:
        return cls.from_dict(_loads(text))


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(Event))


def _loads(text: str | bytes) -> Any:
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EventError("body", f"malformed JSON: {exc}") from None


@dataclass(frozen=True, slots=True)
class Batch:
    """Events that travel together, in order.

    ``batch_id`` is chosen by the watcher and makes a retried POST idempotent. In a
    sequenced batch (what the interface publishes) the seqs are consecutive.
    """

    batch_id: str
    events: tuple[Event, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.batch_id, str) or not _BATCH_ID_RE.fullmatch(self.batch_id):
            raise EventError("batch_id", "must be 1-128 characters of [0-9A-Za-z_.:-]")
        if not isinstance(self.events, tuple):
            object.__setattr__(self, "events", tuple(self.events))
        if not self.events:
            raise EventError("events", "must hold at least one event")
        seqs = [e.seq for e in self.events]
        if any(s is not None for s in seqs):
            first = seqs[0]
            if first is None or seqs != list(range(first, first + len(seqs))):
                raise EventError("seq", "seqs in a batch must be all null or consecutive")

    @property
    def first_seq(self) -> int | None:
        return self.events[0].seq

    @property
    def last_seq(self) -> int | None:
        return self.events[-1].seq

    def numbered(self, first_seq: int) -> Batch:
        return Batch(self.batch_id, tuple(e.with_seq(first_seq + i) for i, e in enumerate(self.events)))

    def to_dict(self) -> dict[str, Any]:
        return {"batch_id": self.batch_id, "events": [e.to_dict() for e in self.events]}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, data: object, *, sequenced: bool | None = None) -> Batch:
        """Parse a batch; ``sequenced`` True/False demands that seqs be present/absent."""
        if not isinstance(data, Mapping):
            raise EventError("body", f"must be a JSON object, not {type(data).__name__}")
        unknown = set(data) - {"batch_id", "events"}
        if unknown:
            raise EventError(sorted(unknown)[0], "unknown field")
        if "batch_id" not in data:
            raise EventError("batch_id", "is missing")
        raw = data.get("events")
        if not isinstance(raw, list):
            raise EventError("events", "must be a JSON array")
        events = []
        for index, item in enumerate(raw):
            try:
                event = Event.from_dict(item)
            except EventError as exc:
                raise exc.at(index) from None
            if sequenced is True and event.seq is None:
                raise EventError("seq", "is missing", index)
            if sequenced is False and event.seq is not None:
                raise EventError("seq", "is assigned by the interface and must be absent", index)
            events.append(event)
        return cls(data["batch_id"], tuple(events))

    @classmethod
    def from_json(cls, text: str | bytes, *, sequenced: bool | None = None) -> Batch:
        return cls.from_dict(_loads(text), sequenced=sequenced)


@dataclass(frozen=True, slots=True)
class Entry:
    """One row of a manifest: the state of one path at the manifest's seq."""

    path: str
    is_dir: bool
    size: int | None = None
    mtime_ns: int | None = None
    mode: int | None = None
    digest: str | None = None
    seq: int | None = None
    blocks: Blocks | None = None

    def __post_init__(self) -> None:
        _check_path("path", self.path)
        if self.blocks is not None:
            _check_blocks(self)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}
        if self.blocks is not None:
            out["blocks"] = self.blocks.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: object) -> Entry:
        if not isinstance(data, Mapping):
            raise EventError("entry", "must be a JSON object")
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise EventError(sorted(unknown)[0], "unknown field")
        if "path" not in data:
            raise EventError("path", "is missing")
        return cls(**{"is_dir": False, **data})
