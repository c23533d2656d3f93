"""Typed settings for each service, read from ``DLOPBOX_*`` environment variables.

Each field names its variable and documents its default; the CLI adds a flag per field
that overrides the environment. ``dlopbox settings`` prints this table for the README.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self


class SettingsError(ValueError):
    """A setting is missing or malformed."""


def setting(default: Any, env: str, help: str, *, flag: str | None = None, secret: bool = False) -> Any:
    meta = {"env": env, "help": help, "flag": flag, "secret": secret}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def parse_value(kind: Any, raw: str, env: str) -> Any:
    """``raw`` (the value of variable ``env``) as ``kind``; SettingsError naming the variable if it is not one."""
    try:
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is Path:
            return Path(raw)
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if typing.get_origin(kind) is tuple:
            return tuple(p.strip() for p in raw.split(",") if p.strip())
        return raw
    except ValueError:
        raise SettingsError(f"{env}={raw!r} is not a valid {getattr(kind, '__name__', kind)}") from None


class _FromEnv:
    """Mixin: build a frozen settings dataclass from the environment plus overrides."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        environ = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if overrides.get(f.name) is not None:
                values[f.name] = overrides[f.name]
            elif f.metadata["env"] in environ:
                values[f.name] = parse_value(hints[f.name], environ[f.metadata["env"]], f.metadata["env"])
        return cls(**values)

    def require(self, *names: str) -> Self:
        """Fail clearly, before any connection is tried, when a secret is not set."""
        for name in names:
            if not getattr(self, name):
                env = next(f.metadata["env"] for f in dataclasses.fields(self) if f.name == name)  # type: ignore[arg-type]
                raise SettingsError(f"{env} is required (set it in the environment or .env)")
        return self

    def __repr__(self) -> str:
        shown = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            shown.append(f"{f.name}={'***' if f.metadata['secret'] and value else repr(value)}")
        return f"{type(self).__name__}({', '.join(shown)})"


def _interface_url() -> Any:
    return setting("http://interface:5000", "DLOPBOX_INTERFACE_URL", "Base URL of the ingestion API.")
DEFAULT_IGNORE = ("*.swp", "*.swx", "*.swo", "*~", ".#*", "#*#", "4913", ".goutputstream-*")


@dataclass(frozen=True, repr=False)
class WatcherSettings(_FromEnv):
    """`dlopbox watch`: the inotify daemon on the master."""

    root: Path = setting(Path("/shared"), "DLOPBOX_ROOT", "The directory to watch (the master's target dir).")
    interface_url: str = _interface_url()
    token: str = setting("", "DLOPBOX_TOKEN", "Bearer token for POST /events (required).", secret=True)
    batch_ms: float = setting(1.0, "DLOPBOX_BATCH_MS", "Flush a batch this many ms after its first event (the window grows to 100 ms while events keep coming).")
    batch_max: int = setting(1000, "DLOPBOX_BATCH_MAX", "Flush a batch as soon as it holds this many events.")
    buffer_max: int = setting(100_000, "DLOPBOX_BUFFER_MAX", "Events held while the interface is unreachable; past it, a full reconcile replaces them.")
    ignore: tuple[str, ...] = setting(DEFAULT_IGNORE, "DLOPBOX_IGNORE", "Comma-separated glob patterns of names never synced (editor swap files...).")
    hash_workers: int = setting(2, "DLOPBOX_HASH_WORKERS", "Threads hashing new file versions off the event loop.")


@dataclass(frozen=True, repr=False)
class InterfaceSettings(_FromEnv):
    """`dlopbox interface`: the ingestion API."""

    host: str = setting("0.0.0.0", "DLOPBOX_HOST", "Address the API listens on.")
    port: int = setting(5000, "DLOPBOX_PORT", "Port the API listens on.")
    token: str = setting("", "DLOPBOX_TOKEN", "Bearer token the watcher must present to POST /events (required).", secret=True)
    read_token: str = setting("", "DLOPBOX_READ_TOKEN", "Bearer token for the read side and client progress (required).", secret=True)
    mongo_url: str = setting("mongodb://mongo:27017/", "DLOPBOX_MONGO_URL", "MongoDB connection string (may carry credentials).", secret=True)
    mongo_db: str = setting("dlopbox", "DLOPBOX_MONGO_DB", "MongoDB database holding the log and the tree state.")
    amqp_url: str = setting("amqp://dlopbox-interface@rabbit:5672/dlopbox", "DLOPBOX_AMQP_URL", "RabbitMQ URL of the interface's (publishing) user.", secret=True)
    exchange: str = setting("dlopbox.events", "DLOPBOX_EXCHANGE", "Durable fanout exchange every client queue is bound to.")
    max_body: int = setting(16 * 1024 * 1024, "DLOPBOX_MAX_BODY", "Largest accepted POST body in bytes (413 above).")
    backend_timeout: float = setting(5.0, "DLOPBOX_BACKEND_TIMEOUT", "Seconds to wait for a MongoDB write or a RabbitMQ confirm before treating that backend as down.")


@dataclass(frozen=True, repr=False)
class ClientSettings(_FromEnv):
    """`dlopbox client`: the mirror on each slave."""

    client_id: str = setting(socket.gethostname, "DLOPBOX_CLIENT_ID", "This slave's name; its queue is dlopbox.client.<id>.", flag="--id")
    target: Path = setting(Path("."), "DLOPBOX_TARGET", "The directory kept equal to the master's.")
    amqp_url: str = setting("amqp://dlopbox-client@rabbit:5672/dlopbox", "DLOPBOX_AMQP_URL", "RabbitMQ URL of the clients' (consume-only) user.", secret=True)
    exchange: str = setting("dlopbox.events", "DLOPBOX_EXCHANGE", "Exchange the client's queue is bound to.")
    files_url: str = setting("http://nginx/", "DLOPBOX_FILES_URL", "Base URL of the nginx serving the master's files.")
    interface_url: str = _interface_url()
    read_token: str = setting("", "DLOPBOX_READ_TOKEN", "Bearer token for GET /manifest and progress reports (required).", secret=True)
    prefetch: int = setting(32, "DLOPBOX_PREFETCH", "Unacknowledged AMQP messages held at once (backpressure).")
    downloads: int = setting(4, "DLOPBOX_DOWNLOADS", "Files downloaded concurrently.")
    chunk_bytes: int = setting(1024 * 1024, "DLOPBOX_CHUNK_BYTES", "Read and write size while streaming a download.")
    local_changes: str = setting("revert", "DLOPBOX_LOCAL_CHANGES", "What becomes of a change made in the slave's directory by anything but dlopbox: `revert` undoes it within a second, `keep` leaves it and reports it.")
    audit_interval: float = setting(600.0, "DLOPBOX_AUDIT_INTERVAL", "Seconds between two audits of the slave's directory against what the client installed (also done at start; 0: only at start).")


SERVICES: dict[str, type[_FromEnv]] = {
    "watch": WatcherSettings,
    "interface": InterfaceSettings,
    "client": ClientSettings,
}


def markdown_table() -> str:
    """The README's table of every variable, generated so it cannot drift."""
    rows = ["| variable | service | default | meaning |", "| --- | --- | --- | --- |"]
    for service, cls in SERVICES.items():
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.default is not dataclasses.MISSING:
                default = f.default
            else:
                default = "hostname" if f.name == "client_id" else f.default_factory()  # type: ignore[misc]
            if isinstance(default, tuple):
                default = ",".join(default)
            shown = f"`{default}`" if default != "" else "(none)"
            rows.append(f"| `{f.metadata['env']}` | {service} | {shown} | {f.metadata['help']} |")
    return "\n".join(rows)
