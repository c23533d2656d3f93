"""RabbitMQ topology: one durable fanout exchange, a durable queue per client, least privilege.

The interface publishes each batch as one persistent message with publisher confirms;
each client declares and binds its own quorum queue, so it keeps receiving while offline.
The definitions (users and permissions) are generated here so tests and containers load
the very same least-privilege rules: only the interface may publish to the exchange.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import aio_pika
import yarl
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from .events import Batch

VHOST = "dlopbox"
INTERFACE_USER = "dlopbox-interface"
CLIENT_USER = "dlopbox-client"
ADMIN_USER = "dlopbox-admin"
QUEUE_PREFIX = "dlopbox.client."
#: The interface's own queue: every published batch, kept until it is in the MongoDB log.
JOURNAL_QUEUE = "dlopbox.journal"
_CLIENT_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,200}")
QUORUM = {"x-queue-type": "quorum"}
#: A client queue nobody has consumed for this long is deleted by RabbitMQ (a policy), so slaves
#: that are gone for good (a container recreated under a new id) do not fill the broker forever.
#: A client that comes back later finds its queue gone and resyncs from the manifest.
CLIENT_QUEUE_EXPIRES_DAYS = 7.0
_DAY_MS = 24 * 3600 * 1000


#: Seconds between AMQP heartbeats unless the URL sets ``heartbeat``: a connection whose peer
#: vanished without a reset (a container cut from its network) is noticed within two or three
#: of them, instead of the minutes RabbitMQ's default of 60 s takes.
HEARTBEAT_S = 10


def amqp_url(url: str) -> str:
    """``url`` with ``heartbeat=HEARTBEAT_S`` added when it does not choose one itself."""
    parsed = yarl.URL(url)
    return url if "heartbeat" in parsed.query else str(parsed.update_query(heartbeat=HEARTBEAT_S))


def queue_name(client_id: str) -> str:
    if not _CLIENT_ID_RE.fullmatch(client_id):
        raise ValueError(f"client id {client_id!r} must be 1-200 characters of [A-Za-z0-9_.-]")
    return QUEUE_PREFIX + client_id


async def declare_exchange(channel: AbstractChannel, name: str) -> AbstractExchange:
    return await channel.declare_exchange(name, aio_pika.ExchangeType.FANOUT, durable=True)


async def declare_bound_queue(channel: AbstractChannel, exchange: str, queue: str) -> AbstractQueue:
    """Declare a durable quorum queue bound to the (pre-existing) exchange."""
    q = await channel.declare_queue(queue, durable=True, arguments=QUORUM)
    await q.bind(exchange, routing_key="")
    return q


def batch_message(batch: Batch) -> aio_pika.Message:
    """One persistent message per sequenced batch; headers let consumers skip without parsing."""
    assert batch.first_seq is not None and batch.last_seq is not None
    return aio_pika.Message(
        batch.to_json(),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=batch.batch_id,
        headers={"first_seq": batch.first_seq, "last_seq": batch.last_seq},
    )


def parse_message(body: bytes) -> Batch:
    """Decode a queued batch; raises :class:`dlopbox.events.EventError` on anything malformed."""
    return Batch.from_json(body, sequenced=True)


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256 format: base64(salt + sha256(salt + password))."""
    salt = os.urandom(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def definitions(passwords: Mapping[str, str], exchange: str = "dlopbox.events",
                client_queue_expires_ms: int = int(CLIENT_QUEUE_EXPIRES_DAYS * _DAY_MS)) -> dict[str, Any]:
    """The broker's whole configuration: vhost, exchange, three users, least-privilege permissions.

    ``passwords`` maps each of ADMIN_USER, INTERFACE_USER and CLIENT_USER to its password.
    Clients may declare, bind and consume ``dlopbox.client.*`` queues, and read the exchange,
    but have no write permission on any exchange: a compromised slave cannot publish. A policy
    deletes a client queue left unused for ``client_queue_expires_ms``.
    """
    ex = re.escape(exchange)
    journal = re.escape(JOURNAL_QUEUE)
    clients = re.escape(QUEUE_PREFIX) + r"[A-Za-z0-9_.-]+"
    users = []
    for name, tags in ((ADMIN_USER, ["administrator"]), (INTERFACE_USER, []), (CLIENT_USER, [])):
        users.append({
            "name": name,
            "password_hash": password_hash(passwords[name]),
            "hashing_algorithm": "rabbit_password_hashing_sha256",
            "tags": tags,
        })
    return {
        "users": users,
        "vhosts": [{"name": VHOST}],
        "permissions": [
            {"user": ADMIN_USER, "vhost": VHOST, "configure": ".*", "write": ".*", "read": ".*"},
            {"user": INTERFACE_USER, "vhost": VHOST,
             "configure": f"^({ex}|{journal})$", "write": f"^({ex}|{journal})$", "read": f"^({ex}|{journal})$"},
            {"user": CLIENT_USER, "vhost": VHOST,
             "configure": f"^{clients}$", "write": f"^{clients}$", "read": f"^({ex}|{clients})$"},
        ],
        "exchanges": [{"name": exchange, "vhost": VHOST, "type": "fanout", "durable": True,
                       "auto_delete": False, "internal": False, "arguments": {}}],
        "queues": [{"name": JOURNAL_QUEUE, "vhost": VHOST, "durable": True, "auto_delete": False,
                    "arguments": QUORUM}],
        "bindings": [{"source": exchange, "vhost": VHOST, "destination": JOURNAL_QUEUE,
                      "destination_type": "queue", "routing_key": "", "arguments": {}}],
        "policies": [{"vhost": VHOST, "name": "dlopbox-client-queues-expire", "pattern": f"^{clients}$",
                      "apply-to": "queues", "priority": 0, "definition": {"expires": client_queue_expires_ms}}],
    }


def definitions_from_env(environ: Mapping[str, str], exchange: str = "dlopbox.events") -> str:
    """Definitions JSON from RABBITMQ_ADMIN_PASSWORD, RABBITMQ_INTERFACE_PASSWORD, RABBITMQ_CLIENT_PASSWORD
    and DLOPBOX_CLIENT_QUEUE_EXPIRES_DAYS (default 7)."""
    from .settings import SettingsError, parse_value

    names = {ADMIN_USER: "RABBITMQ_ADMIN_PASSWORD", INTERFACE_USER: "RABBITMQ_INTERFACE_PASSWORD", CLIENT_USER: "RABBITMQ_CLIENT_PASSWORD"}
    missing = [env for env in names.values() if not environ.get(env)]
    if missing:
        raise SettingsError(f"{', '.join(missing)} must be set")
    raw = environ.get("DLOPBOX_CLIENT_QUEUE_EXPIRES_DAYS") or str(CLIENT_QUEUE_EXPIRES_DAYS)
    days = parse_value(float, raw, "DLOPBOX_CLIENT_QUEUE_EXPIRES_DAYS")
    if not 0 < days <= 3650:  # also refuses nan
        raise SettingsError(f"DLOPBOX_CLIENT_QUEUE_EXPIRES_DAYS={raw!r}: must be a number of days, above 0 and "
                            "at most 3650")
    passwords = {user: environ[env] for user, env in names.items()}
    return json.dumps(definitions(passwords, exchange, int(days * _DAY_MS)), indent=2)
