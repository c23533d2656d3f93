"""Hostile input against the real services on this host: refused with a clear error, nothing written anywhere.

The interface runs in-process on the session's RabbitMQ and SecantusDB, with two client
queues bound as real clients bind them; nginx serves a fresh shared directory. After the
hostile requests, MongoDB holds nothing, the queues are empty and the next good batch
still gets seq 1. Hypothesis then fuzzes the event parser (every answer a Batch with safe
paths or an EventError) and the interface itself (never a 500).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import secrets
import string
from typing import Any

import aio_pika
import aiohttp
import pytest
from aiormq.exceptions import ChannelAccessRefused
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlopbox import broker
from dlopbox.events import Batch, EventError
from dlopbox.paths import RESERVED_PREFIX, check_relpath
from tests.support.interface_harness import (
    READ,
    WRITE,
    bound_queues,
    mongo_reader,
    post_batch,
    running,
    settings_for,
    write_event,
)
from tests.support.pipeline_harness import TOKEN, InterfaceProcess
from tests.support.services import http_request

DIGEST = hashlib.sha256(b"evil").hexdigest()


def event(path: object = "x.txt", **fields: Any) -> dict[str, Any]:
    return {"op": "write", "path": path, "size": 4, "mtime_ns": 0, "mode": 0o644, "digest": DIGEST, "ts": 1.0,
            **fields}


def body(*events: dict[str, Any]) -> bytes:
    return json.dumps({"batch_id": "hostile-" + secrets.token_hex(4), "events": list(events)}).encode()


# name: (headers, body, status, words the error must contain)
HOSTILE_POSTS: dict[str, tuple[dict[str, str], bytes, int, str]] = {
    "no token": ({}, body(event()), 401, "bearer token is required"),
    "wrong token": ({"Authorization": "Bearer not-the-token"}, body(event()), 403, "not allowed"),
    "read token": (READ, body(event()), 403, "not allowed"),
    "malformed JSON": (WRITE, b'{"batch_id": "b", "events": [', 400, "malformed JSON"),
    "not UTF-8": (WRITE, b'{"batch_id": "b\xff", "events": []}', 400, "malformed JSON"),
    "20 MB body": (WRITE, b"[" + b" " * (20 * 1024 * 1024) + b"]", 413, ""),
    "unknown op": (WRITE, body({"op": "chown", "path": "x", "ts": 1.0}), 400, "unknown op"),
    "../../etc/passwd": (WRITE, body(event("../../etc/passwd")), 400, "'..' component"),
    "absolute path": (WRITE, body(event("/etc/passwd")), 400, "absolute"),
    "NUL byte": (WRITE, body(event("a\x00b")), 400, "NUL"),
    "5,000-byte path": (WRITE, body(event("d/" * 2499 + "f.txt")), 400, "4096-byte limit"),
    "256-byte name": (WRITE, body(event("n" * 256)), 400, "over 255 bytes"),
    "reserved name": (WRITE, body(event(".dlopbox/state.json")), 400, "reserved"),
    "move out of the tree": (WRITE, body({"op": "move", "path": "a", "dest": "../a", "ts": 1.0}), 400, "'..'"),
    "size over 64 bits": (WRITE, body(event(size=2**70)), 400, "size: must be <="),
    "mtime over 64 bits": (WRITE, body(event(mtime_ns=-(2**70))), 400, "mtime_ns: must be >="),
    "seq from the watcher": (WRITE, body(event(seq=1)), 400, "assigned by the interface"),
    "unknown field": (WRITE, body(event(owner="root")), 400, "unknown field"),
    "not an object": (WRITE, b'["write", "x"]', 400, "must be a JSON object"),
}


async def test_hostile_posts_are_refused_clearly_and_nothing_is_written(rabbit, mongo, mongo_db, client_queues,
                                                                      clean_journal):
    async with bound_queues(rabbit, client_queues[:2]) as queues, \
            running(settings_for(rabbit, mongo, mongo_db)) as svc, \
            mongo_reader(mongo, mongo_db) as db, aiohttp.ClientSession() as http:
        for name, (headers, data, status, words) in HOSTILE_POSTS.items():
            async with http.post(svc.url + "/events", data=io.BytesIO(data), headers=headers) as r:
                assert r.status == status, (name, r.status, await r.text())
                reply = await r.json()
            assert words in reply["error"], (name, reply)
            if status == 400 and name not in ("malformed JSON", "not UTF-8", "not an object"):
                assert reply["index"] == 0 and reply["field"] and reply["reason"], (name, reply)
        assert await db.counts() == {"events": 0, "state": 0, "batches": 0}
        for queue in queues.names:
            assert await queues.depth(queue) == 0
        async with http.get(svc.url + "/healthz") as r:
            assert (await r.json())["head"] == 0
        # A hostile progress report is refused too, and the interface still numbers from 1.
        for bad in ({"seq": 2**64}, {"seq": -1}, {"seq": "1"}, {"seq": 1, "x": 2}, [1]):
            async with http.post(svc.url + "/clients/c1/progress", json=bad, headers=READ) as r:
                assert r.status == 400, (bad, r.status, await r.text())
        async with http.post(svc.url + "/clients/..%2F..%2Fetc/progress", json={"seq": 1}, headers=READ) as r:
            assert r.status in (400, 404), r.status
        status, reply = await post_batch(http, svc.url, [write_event("fine.txt")])
        assert (status, reply["first_seq"]) == (200, 1)


async def raw_get(port: int, target: str) -> tuple[str, bytes]:
    """One HTTP request with the target sent byte for byte (no client-side normalisation)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, content = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), content


async def test_nginx_refuses_traversal_and_a_symlink_to_etc_passwd(nginx, shared_dir):
    os.symlink("/etc/passwd", shared_dir / "passwd-link")
    (shared_dir / "real.txt").write_bytes(b"served")
    base = f"/{shared_dir.name}"
    status, content = await raw_get(nginx.port, f"{base}/real.txt")
    assert " 200 " in status and content == b"served"
    for target in ("/../etc/passwd", "/../../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/..%2f..%2fetc%2fpasswd",
                   f"{base}/../../../../etc/passwd", f"{base}/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc/passwd",
                   f"{base}/passwd-link", f"{base}/.dlopbox/state.json"):
        status, content = await raw_get(nginx.port, target)
        code = int(status.split()[1])
        assert code in (400, 403, 404), (target, status)
        assert b"root:" not in content, target


async def test_a_clients_broker_user_cannot_publish_anywhere(rabbit, client_queues):
    """A compromised slave can neither inject events for all (the exchange) nor for one (its queue)."""
    async with bound_queues(rabbit, client_queues[:2]) as queues:
        for routing_key in ("", queues.names[1]):
            connection = await aio_pika.connect(rabbit.client_url)
            async with connection:
                channel = await connection.channel()
                if routing_key:
                    exchange = channel.default_exchange
                else:
                    exchange = await channel.get_exchange("dlopbox.events", ensure=False)
                with pytest.raises(ChannelAccessRefused, match="ACCESS_REFUSED"):
                    await exchange.publish(aio_pika.Message(b'{"forged": true}'), routing_key=routing_key)
        for name in queues.names:
            assert await queues.depth(name) == 0


# -- the event parser, fuzzed ------------------------------------------------------------------

_texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["..", ".", "", "/", "a/../b", "../x", "/abs", "a//b", "a/./b", "a\x00b", RESERVED_PREFIX,
                     f"d/{RESERVED_PREFIX}-tmp-1", "é/文件 🙂", "x" * 256, "d/" * 2100]),
    st.lists(st.sampled_from(["a", "..", ".", "", "文件", RESERVED_PREFIX, "%2e%2e", "\\..\\"]),
             max_size=6).map("/".join),
)
_values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), _texts, st.lists(st.integers(), max_size=2))
_fields = st.fixed_dictionaries(
    {"op": st.one_of(st.sampled_from(["write", "attrib", "delete", "mkdir", "rmdir", "move"]), _values),
     "path": st.one_of(_texts, _values)},
    optional={"dest": st.one_of(_texts, _values), "is_dir": _values, "size": _values, "mtime_ns": _values,
              "mode": _values, "digest": st.one_of(st.just(DIGEST), _values), "seq": _values, "ts": _values,
              "junk": _values})
_batches = st.fixed_dictionaries({"batch_id": st.one_of(st.just("b-1"), _texts),
                                  "events": st.lists(_fields, max_size=4)})


def assert_safe(batch: Batch) -> None:
    for e in batch.events:
        for path in e.paths():
            assert check_relpath(path) == path
            assert not any(part.startswith(RESERVED_PREFIX) for part in path.split("/"))


@settings(max_examples=600, deadline=None)
@given(data=_batches, sequenced=st.sampled_from([None, True, False]))
def test_the_event_parser_returns_safe_events_or_an_event_error(data: dict[str, Any], sequenced: bool | None) -> None:
    raw = json.dumps(data).encode()
    try:
        batch = Batch.from_json(raw, sequenced=sequenced)
    except EventError as exc:
        assert exc.field and exc.reason and str(exc)
        return
    assert_safe(batch)
    assert Batch.from_json(batch.to_json(), sequenced=sequenced) == batch


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_a_client_refuses_any_undecodable_message_with_an_event_error(raw: bytes) -> None:
    try:
        assert_safe(broker.parse_message(raw))
    except EventError:
        pass


# -- the interface, fuzzed over HTTP ------------------------------------------------------------

def post(url: str, data: bytes) -> tuple[int, bytes]:
    return http_request(url, data=data, token=TOKEN, timeout=30)


_junk = st.sampled_from([b"", b"{", b"null", b"[]", b'{"batch_id": 1}', b"\xff\xfe", b"{" * 500 + b"}" * 500])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(_batches.map(lambda d: json.dumps(d).encode()), _junk,
                      st.text(alphabet=string.printable, max_size=200).map(str.encode)))
def test_the_interface_answers_any_body_with_200_or_400_never_500(interface_process: InterfaceProcess,
                                                                  data: bytes) -> None:
    status, answer = post(interface_process.url + "/events", data)
    assert status in (200, 400), (status, answer[:300])
    reply = json.loads(answer)
    if status == 200:
        assert_safe(Batch.from_json(data, sequenced=False))
        assert reply["last_seq"] >= reply["first_seq"] >= 1
    else:
        assert reply["error"]
