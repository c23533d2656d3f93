"""Hostile input against the compose deployment: each refused with a clear error, nothing changed anywhere.

"Nothing changed" is checked, not assumed: the MongoDB log (its head and row count), the
master's and every client's tree, and each client's /etc/passwd are the same before and
after. Each input records its row of the README's results table.
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from tests.docker.helpers import PUBLISH_AS_CLIENT, run
from tests.faults.harness import Case, Deployment, recorded

pytestmark = [pytest.mark.faults, pytest.mark.docker, pytest.mark.timeout(300)]

ETC_PASSWD = "python3 -c 'import hashlib;print(hashlib.sha256(open(\"/etc/passwd\",\"rb\").read()).hexdigest())'"


_LAST: dict[str, dict[str, object]] = {}


def before(system: Deployment) -> dict[str, object]:
    """The snapshot the previous input left (each one must change nothing), or a fresh one."""
    return _LAST.get("snapshot") or snapshot(system)


def snapshot(system: Deployment) -> dict[str, object]:
    """Everything a hostile input must leave alone."""
    master, clients = system.trees(system.containers("client"))
    audit = system.audit_log()
    passwd = {c: run("docker", "exec", c, "sh", "-c", ETC_PASSWD).stdout for c in system.containers("client")}
    _LAST["snapshot"] = {"log": (audit["count"], audit["last"]), "head": system.health()["head"],
                         "master": master, "clients": clients, "passwd": passwd}
    return _LAST["snapshot"]


@pytest.fixture(scope="module")
def quiet(system: Deployment) -> Iterator[None]:
    """A converged deployment with some content."""
    run("docker", "exec", system.master, "sh", "-c", "mkdir -p /shared/input && echo hello > /shared/input/a.txt")
    system.wait_equal(system.containers("client"))
    yield


def post(system: Deployment, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    request = urllib.request.Request(system.url() + "/events", data=body, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode(errors="replace")
    except (ConnectionResetError, BrokenPipeError) as exc:
        # The interface may close the connection once it has answered 413 to a body it will not read.
        return 0, f"{type(exc).__name__}"


def write_event(path: str) -> dict[str, object]:
    return {"op": "write", "path": path, "size": 4, "mtime_ns": 0, "mode": 0o644,
            "digest": hashlib.sha256(b"evil").hexdigest(), "ts": 1.0}


def batch(*events: dict[str, object], batch_id: str = "hostile") -> bytes:
    return json.dumps({"batch_id": batch_id, "events": list(events)}).encode()


# (key, title, body, auth, expected status, what the error must name)
POSTS = [
    ("post-no-token", "POST /events without a token", batch(write_event("x.txt")), None, 401, "bearer token"),
    ("post-wrong-token", "POST /events with a wrong token", batch(write_event("x.txt")), "wrong", 403, "not allowed"),
    ("post-malformed-json", "POST /events with malformed JSON", b'{"batch_id": "b", "events": [', "write", 400,
     "malformed JSON"),
    ("post-20mb", "POST /events with a 20 MB body", b"[" + b" " * (20 * 1024 * 1024) + b"]", "write", 413, ""),
    ("post-unknown-op", "POST /events with an unknown op",
     batch({"op": "chown", "path": "x.txt", "ts": 1.0}), "write", 400, "unknown op"),
    ("post-dotdot", "POST /events with path `../../etc/passwd`", batch(write_event("../../etc/passwd")), "write",
     400, "'..' component"),
    ("post-absolute", "POST /events with an absolute path `/etc/passwd`", batch(write_event("/etc/passwd")),
     "write", 400, "absolute"),
    ("post-nul", "POST /events with a NUL byte in the path", batch(write_event("a\x00b.txt")), "write", 400,
     "NUL"),
    ("post-5000-bytes", "POST /events with a 5,000-byte path", batch(write_event("d/" * 2499 + "f.txt")), "write",
     400, "4096-byte limit"),
]


@pytest.mark.parametrize("key,title,body,auth,status,reason", POSTS, ids=[p[0] for p in POSTS])
def test_hostile_posts_are_refused_and_change_nothing(system: Deployment, quiet: None, key: str,
                                                      title: str, body: bytes, auth: str | None, status: int,
                                                      reason: str) -> None:
    case = Case(key, title, order=POSTS.index(next(p for p in POSTS if p[0] == key)), group="input")
    with recorded(case):
        unchanged = before(system)
        token = {"write": system.env["DLOPBOX_TOKEN"], "wrong": "not-the-token"}.get(auth or "")
        got, text = post(system, body, {"Authorization": f"Bearer {token}"} if token else {})
        shown = text if len(text) < 200 else text[:200] + "..."
        case.happened = f"refused: {got} {shown}".strip()
        assert got in (status, 0) if status == 413 else got == status, f"{got} {text}"
        if got:
            error = json.loads(text)["error"]
            assert reason in error, error
            case.happened = f"refused: {got} `{error[:160]}`; log, queues and trees unchanged"
        else:
            case.happened = f"refused: connection closed before the {len(body) / 2**20:.0f} MB body was read"
        assert snapshot(system) == unchanged, "a refused POST changed something"
        case.events_lost = 0


RAW_GET = r"""
import socket, sys
request = "GET %s HTTP/1.1\r\nHost: nginx\r\nConnection: close\r\n\r\n" % sys.argv[1]
with socket.create_connection(("nginx", 80), timeout=10) as s:
    s.sendall(request.encode())
    data = b""
    while chunk := s.recv(65536):
        data += chunk
head, _, body = data.partition(b"\r\n\r\n")
print(head.split(b"\r\n")[0].decode(), "passwd-content" if b"root:" in body else "no-passwd-content")
"""

NGINX = [
    ("nginx-dotdot", "nginx asked for `/../etc/passwd`", "/../etc/passwd"),
    ("nginx-encoded", "nginx asked for `/%2e%2e/%2e%2e/etc/passwd` (encoded traversal)", "/%2e%2e/%2e%2e/etc/passwd"),
    ("nginx-encoded-slash", "nginx asked for `/..%2f..%2fetc%2fpasswd`", "/..%2f..%2fetc%2fpasswd"),
    ("nginx-symlink", "nginx asked for a symlink in the shared dir pointing to /etc/passwd", "/input/passwd-link"),
]


@pytest.mark.parametrize("key,title,target", NGINX, ids=[n[0] for n in NGINX])
def test_nginx_refuses_traversal_and_symlinks(system: Deployment, quiet: None, key: str, title: str,
                                              target: str) -> None:
    case = Case(key, title, order=20 + [n[0] for n in NGINX].index(key), group="input")
    with recorded(case):
        client = system.containers("client")[0]
        if key == "nginx-symlink":
            run("docker", "exec", system.master, "ln", "-s", "/etc/passwd", "/shared/input/passwd-link")
        try:
            status, content = run("docker", "exec", client, "python3", "-c", RAW_GET, target).stdout.rsplit(" ", 1)
            code = int(status.split()[1])
            case.happened = f"refused: `{status}`"
            assert code in (400, 403, 404), status
            assert content.strip() == "no-passwd-content"
            if key == "nginx-symlink":
                # The watcher never syncs a link: after a later change, no client has it.
                run("docker", "exec", system.master, "sh", "-c", "echo later > /shared/input/after-link.txt")
                _, clients = system.trees(system.containers("client"))
                deadline = time.monotonic() + 60
                while not all("input/after-link.txt" in t for t in clients.values()):
                    assert time.monotonic() < deadline, "the change after the link never arrived"
                    time.sleep(0.5)
                    _, clients = system.trees(system.containers("client"))
                assert not any("input/passwd-link" in t for t in clients.values())
                case.happened += "; the link itself is never synced to any client"
        finally:
            if key == "nginx-symlink":
                run("docker", "exec", system.master, "rm", "-f", "/shared/input/passwd-link",
                    "/shared/input/after-link.txt")
        system.wait_equal(system.containers("client"))
        case.events_lost = 0


PUBLISH_TO_ANOTHER_QUEUE = r"""
import asyncio, os, sys
import aio_pika
from aiormq.exceptions import ChannelAccessRefused

async def main():
    connection = await aio_pika.connect(os.environ["DLOPBOX_AMQP_URL"])
    async with connection:
        channel = await connection.channel()
        try:
            await channel.default_exchange.publish(aio_pika.Message(b'{"forged": true}'), routing_key=sys.argv[1])
        except ChannelAccessRefused as exc:
            print("refused:", exc)
            return
        sys.exit("the client's user could publish into another client's queue")

asyncio.run(main())
"""


def test_a_clients_broker_user_cannot_publish(system: Deployment, quiet: None) -> None:
    case = Case("broker-client-publish", "A client's broker user publishing to the exchange, or into another "
                "client's queue", order=30, group="input")
    with recorded(case):
        unchanged = snapshot(system)
        attacker, victim = system.containers("client")[:2]
        victim_id = json.loads(run("docker", "exec", victim, "cat", "/sync/.dlopbox/state.json").stdout)["client_id"]
        to_exchange = run("docker", "exec", attacker, "python3", "-c", PUBLISH_AS_CLIENT).stdout
        to_queue = run("docker", "exec", attacker, "python3", "-c", PUBLISH_TO_ANOTHER_QUEUE,
                       f"dlopbox.client.{victim_id}").stdout
        assert "ACCESS_REFUSED" in to_exchange and "ACCESS_REFUSED" in to_queue, (to_exchange, to_queue)
        reason = to_exchange.split("ACCESS_REFUSED", 1)[1].split("'")[0].strip(" -")
        case.happened = f"refused by RabbitMQ: `ACCESS_REFUSED - {reason[:120]}` (both routes)"
        assert snapshot(system) == unchanged
        case.events_lost = 0


INJECT = r"""
import asyncio, json, os, sys
import aio_pika

async def main():
    queue, seq = sys.argv[1], int(sys.argv[2])
    bodies = [b"not json at all"]
    for i, path in enumerate(["../../etc/dlopbox-pwned", "/etc/dlopbox-pwned-abs", "a/../../../dlopbox-pwned",
                              ".dlopbox/state.json", "ok/\u0000nul"]):
        bodies.append(json.dumps({"batch_id": "evil%d" % i, "events": [
            {"op": "write", "path": path, "size": 4, "mtime_ns": 0, "mode": 420, "digest": "a" * 64,
             "seq": seq, "ts": 1.0}]}).encode())
    bodies.append(json.dumps({"batch_id": "evil-move", "events": [
        {"op": "move", "path": "input/a.txt", "dest": "../../../tmp/dlopbox-pwned-move", "seq": seq,
         "ts": 1.0}]}).encode())
    connection = await aio_pika.connect(os.environ["ADMIN_URL"])
    async with connection:
        channel = await connection.channel()
        for body in bodies:
            await channel.default_exchange.publish(
                aio_pika.Message(body, headers={"first_seq": seq, "last_seq": seq}), routing_key=queue)
    print(len(bodies))

asyncio.run(main())
"""

OUTSIDE = ["/etc/dlopbox-pwned", "/etc/dlopbox-pwned-abs", "/dlopbox-pwned", "/tmp/dlopbox-pwned-move",
           "/sync/../dlopbox-pwned"]


def test_unsafe_events_injected_into_a_clients_queue_are_refused(system: Deployment,
                                                                quiet: None) -> None:
    case = Case("queue-injection", "Events with unsafe paths (and a non-JSON body) injected straight into a "
                "client's queue", order=31, group="input")
    with recorded(case):
        client = system.containers("client")[0]
        state = json.loads(run("docker", "exec", client, "cat", "/sync/.dlopbox/state.json").stdout)
        mark = str(int(time.time()) - 1)
        admin = f"amqp://dlopbox-admin:{system.env['RABBITMQ_ADMIN_PASSWORD']}@rabbit:5672/dlopbox"
        sent = int(run("docker", "exec", "-e", f"ADMIN_URL={admin}", client, "python3", "-c", INJECT,
                       f"dlopbox.client.{state['client_id']}", str(state["seq"] + 1)).stdout)
        deadline = time.monotonic() + 60
        while (refused := system.logs_since(client, mark).count("REFUSED")) < sent:
            assert time.monotonic() < deadline, f"{refused} of {sent} injected messages refused"
            time.sleep(0.5)
        found = run("docker", "exec", client, "sh", "-c",
                    " ".join(f"test -e '{p}' && echo '{p}';" for p in OUTSIDE) + " true").stdout.split()
        assert found == [], f"written outside /sync: {found}"
        # Still in sync: a new file on the master arrives, and nothing else changed.
        run("docker", "exec", system.master, "sh", "-c", "echo after > /shared/input/after-injection.txt")
        system.wait_equal(system.containers("client"))
        run("docker", "exec", system.master, "rm", "/shared/input/after-injection.txt")
        system.wait_equal(system.containers("client"))
        case.happened = (f"all {sent} refused by the client (logged REFUSED, dropped); nothing written outside its "
                         "directory; it kept syncing")
        case.events_lost = 0
