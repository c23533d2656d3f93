"""The interface against real RabbitMQ and SecantusDB: numbering, fan-out, validation, read side."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import random
import time

import aiohttp
import pytest
import yaml

from dlopbox.events import Entry, Event, Op
from dlopbox.interface import eventlog, http, journal
from dlopbox.interface.metrics import Metrics
from dlopbox.interface.service import Ingest
from dlopbox.settings import InterfaceSettings
from dlopbox.tree import Tree
from tests.support.interface_harness import (
    READ,
    READ_TOKEN,
    TOKEN,
    WRITE,
    batch_body,
    bound_queues,
    message_seqs,
    mongo_reader,
    ndjson,
    numbered_events,
    post_batch,
    running,
    settings_for,
    without_seq,
    write_event,
)

pytestmark = pytest.mark.usefixtures("clean_journal")


def sample_events() -> list[Event]:
    return [
        Event(Op.MKDIR, "文档", is_dir=True, mode=0o755),
        write_event("文档/报告 #1 ?.txt", b"hello"),
        write_event("文档/old.txt", b"old"),
        Event(Op.ATTRIB, "文档/old.txt", mode=0o600, mtime_ns=5),
        Event(Op.MKDIR, "文档/sub", is_dir=True, mode=0o700),
        write_event("文档/sub/a.bin", b"a"),
        Event(Op.MOVE, "文档/sub", dest="移动后", is_dir=True),
        Event(Op.DELETE, "文档/old.txt"),
        write_event("emoji 🎉.txt", b"party"),
    ]


async def test_a_batch_lands_as_log_rows_state_rows_and_one_message_per_client_queue(rabbit, mongo, mongo_db,
                                                                                      client_queues):
    events = sample_events()
    async with bound_queues(rabbit, client_queues) as queues, running(settings_for(rabbit, mongo, mongo_db)) as svc, \
            mongo_reader(mongo, mongo_db) as db, aiohttp.ClientSession() as http:
        status, reply = await post_batch(http, svc.url, events, "first-batch")
        assert status == 200, reply
        assert reply == {"batch_id": "first-batch", "first_seq": 1, "last_seq": len(events), "logged": True}
        second = [write_event("second.txt", b"2"), Event(Op.RMDIR, "移动后", is_dir=True)]
        status, reply2 = await post_batch(http, svc.url, second, "second-batch")
        assert (status, reply2["first_seq"], reply2["last_seq"]) == (200, len(events) + 1, len(events) + 2)
        everything = events + second

        # The log: consecutive seqs, the events as posted, each with its batch.
        rows = [d async for d in db.db.events.find().sort("seq", 1)]
        assert [r["seq"] for r in rows] == list(range(1, len(everything) + 1))
        assert [r["op"] for r in rows] == [e.op.value for e in everything]
        assert [r["path"] for r in rows] == [e.path for e in everything]
        assert {r["batch_id"] for r in rows[:len(events)]} == {"first-batch"}
        # The state: exactly the tree those events make, each row with the seq that last touched it.
        expected = Tree()
        for seq, e in enumerate(everything, 1):
            expected.apply(e.with_seq(seq))
        state = await db.state()
        assert {p: Entry(p, d["is_dir"], d.get("size"), d.get("mtime_ns"), d.get("mode"), d.get("digest"), d.get("seq"))
                for p, d in state.items()} == expected.entries
        assert state["emoji 🎉.txt"]["seq"] == 9 and "文档/old.txt" not in state and "移动后/a.bin" not in state

        # Every bound client queue: one message per batch, in order, seqs consecutive.
        for name in queues.names:
            messages = await queues.take(name, 2)
            assert [m.message_id for m in messages] == ["first-batch", "second-batch"]
            assert message_seqs(messages) == list(range(1, len(everything) + 1))
            assert without_seq(numbered_events(messages)) == without_seq(everything)
            assert all(m.delivery_mode == 2 for m in messages)

        # A retried batch_id is applied once: same seqs, no new row, no new message.
        status, again = await post_batch(http, svc.url, events, "first-batch")
        assert (status, again) == (200, reply)
        assert len(await db.seqs()) == len(everything)
        for name in queues.names:
            assert await queues.depth(name) == 0


BAD_REQUESTS = {
    "no token": (None, None, 401),
    "not a bearer": ({"Authorization": f"Basic {TOKEN}"}, None, 401),
    "wrong token": ({"Authorization": "Bearer nope"}, None, 403),
    "read token cannot write": ({"Authorization": f"Bearer {READ_TOKEN}"}, None, 403),
    "malformed JSON": (WRITE, b'{"batch_id": "x", "events": [', 400),
    "not UTF-8": (WRITE, b'{"batch_id": "\xff"}', 400),
    "unsafe path": (WRITE, json.dumps({"batch_id": "b", "events": [
        {"op": "mkdir", "path": "ok", "is_dir": True, "mode": 493, "ts": 1},
        {"op": "delete", "path": "ok/../../etc/passwd", "ts": 1}]}).encode(), 400),
    "reserved name": (WRITE, json.dumps({"batch_id": "b", "events": [
        {"op": "delete", "path": "a/.dlopbox-tmp", "ts": 1}]}).encode(), 400),
    "unknown op": (WRITE, json.dumps({"batch_id": "b", "events": [{"op": "chown", "path": "a", "ts": 1}]}).encode(), 400),
    "seq from the watcher": (WRITE, json.dumps({"batch_id": "b", "events": [
        {"op": "delete", "path": "a", "ts": 1, "seq": 7}]}).encode(), 400),
    "empty batch": (WRITE, b'{"batch_id": "b", "events": []}', 400),
    "oversized body": (WRITE, b"x" * 5000, 413),
}


async def test_bad_requests_get_the_right_status_and_change_nothing(rabbit, mongo, mongo_db, client_queues):
    settings = settings_for(rabbit, mongo, mongo_db, max_body=4096)
    async with bound_queues(rabbit, client_queues) as queues, running(settings) as svc, \
            mongo_reader(mongo, mongo_db) as db, aiohttp.ClientSession() as http:
        valid = batch_body([write_event("fine.txt")])
        for name, (headers, body, expected) in BAD_REQUESTS.items():
            async with http.post(svc.url + "/events", data=body if body is not None else valid, headers=headers) as r:
                assert r.status == expected, (name, r.status, await r.text())
                reply = await r.json()
                assert reply["error"], name
            if name == "unsafe path":
                assert (reply["index"], reply["field"]) == (1, "path")
                assert reply["error"].startswith("events[1].path")
            if name == "unknown op":
                assert (reply["index"], reply["field"]) == (0, "op")
        # A body over the limit sent without Content-Length (chunked) is refused as well.
        async def chunks():
            for _ in range(10):
                yield b" " * 1000
        async with http.post(svc.url + "/events", data=chunks(), headers=WRITE) as r:
            assert r.status == 413
        assert await db.counts() == {"events": 0, "state": 0, "batches": 0}
        for name in queues.names:
            assert await queues.depth(name) == 0
        # Nothing was numbered either: the next good batch starts at seq 1.
        status, reply = await post_batch(http, svc.url, [write_event("fine.txt")])
        assert (status, reply["first_seq"]) == (200, 1)


async def test_twenty_concurrent_posters_get_gap_free_seqs(rabbit, mongo, mongo_db, client_queues):
    async with bound_queues(rabbit, client_queues[:1]) as queues, running(settings_for(rabbit, mongo, mongo_db)) as svc, \
            mongo_reader(mongo, mongo_db) as db, aiohttp.ClientSession() as http:
        async def poster(n: int) -> list[tuple[int, int, int]]:
            rng = random.Random(n)
            ranges = []
            for i in range(8):
                events = [write_event(f"p{n}/f{i}-{j}", bytes([n, i, j])) for j in range(rng.randint(1, 6))]
                status, reply = await post_batch(http, svc.url, events)
                assert status == 200, reply
                assert reply["last_seq"] - reply["first_seq"] + 1 == len(events)
                ranges.append((reply["first_seq"], reply["last_seq"], n))
            return ranges

        results = await asyncio.gather(*(poster(n) for n in range(20)))
        ranges = sorted(r for rs in results for r in rs)
        total = ranges[-1][1]
        covered = [seq for first, last, _ in ranges for seq in range(first, last + 1)]
        assert covered == list(range(1, total + 1)), "seqs overlap or have gaps"
        assert await db.seqs() == list(range(1, total + 1))
        messages = await queues.take(queues.names[0], len(ranges))
        assert message_seqs(messages) == list(range(1, total + 1)), "messages out of order"


async def test_seqs_stay_gap_free_across_an_interface_restart(rabbit, mongo, mongo_db, client_queues):
    settings = settings_for(rabbit, mongo, mongo_db)
    async with bound_queues(rabbit, client_queues[:1]) as queues, mongo_reader(mongo, mongo_db) as db, \
            aiohttp.ClientSession() as http:
        async with running(settings) as svc:
            for i in range(3):
                status, reply = await post_batch(http, svc.url, [write_event(f"a{i}"), write_event(f"b{i}")], f"one-{i}")
                assert status == 200
        async with running(settings) as svc:
            # The retry of a batch from before the restart is recognised...
            status, reply = await post_batch(http, svc.url, [write_event("a2"), write_event("b2")], "one-2")
            assert (status, reply["first_seq"], reply["last_seq"]) == (200, 5, 6)
            # ...and numbering resumes right after the last logged seq.
            status, reply = await post_batch(http, svc.url, [write_event("after")], "two-0")
            assert (status, reply["first_seq"]) == (200, 7)
        assert await db.seqs() == list(range(1, 8))
        messages = await queues.take(queues.names[0], 4)
        assert message_seqs(messages) == list(range(1, 8)), "a restart must not republish or skip"


async def test_the_journal_mark_is_written_now_and_then_not_per_batch_and_on_stop(rabbit, mongo, mongo_db,
                                                                                 monkeypatch):
    """The keeper used to write the mark (last seq seen in the journal) once per batch: a MongoDB write each."""
    marks: list[int] = []
    real_mark = eventlog.EventLog.mark_journaled

    async def counted_mark(self, seq: int) -> None:
        marks.append(seq)
        await real_mark(self, seq)

    monkeypatch.setattr(eventlog.EventLog, "mark_journaled", counted_mark)
    settings = settings_for(rabbit, mongo, mongo_db)
    async with mongo_reader(mongo, mongo_db) as db, aiohttp.ClientSession() as http:
        async with running(settings) as svc:
            started = time.monotonic()
            for i in range(40):
                status, _ = await post_batch(http, svc.url, [write_event(f"f{i}")], f"mark-{i}")
                assert status == 200
            await asyncio.sleep(journal.JOURNAL_MARK_EVERY * 1.5)  # the keeper sees the last copies, one mark
            during, elapsed = len(marks), time.monotonic() - started
        assert (await db.db.meta.find_one({"_id": "journal"}))["seq"] == 40, "the stop writes the last mark"
    assert 1 <= during <= min(39, elapsed / journal.JOURNAL_MARK_EVERY + 2), \
        f"{during} journal marks for 40 batches in {elapsed:.1f} s"
    assert marks == sorted(marks)


async def test_get_events_filters_by_since_prefix_and_limit(rabbit, mongo, mongo_db):
    events = [
        Event(Op.MKDIR, "a", is_dir=True, mode=0o755),  # 1
        write_event("a/x"),  # 2
        write_event("a b"),  # 3: not below "a"
        write_event("ab"),  # 4: not below "a"
        Event(Op.MOVE, "ab", dest="a/ab"),  # 5: dest below "a"
        write_event("c/d/e"),  # 6
        Event(Op.MOVE, "a/x", dest="c/x"),  # 7: path below "a"
        Event(Op.DELETE, "a/ab"),  # 8
    ]
    async with running(settings_for(rabbit, mongo, mongo_db)) as svc, aiohttp.ClientSession() as http:
        assert (await post_batch(http, svc.url, events))[0] == 200

        async def get(query: str, headers=READ) -> tuple[int, dict]:
            async with http.get(svc.url + "/events" + query, headers=headers) as r:
                return r.status, await r.json()

        status, body = await get("")
        assert status == 200 and [e["seq"] for e in body["events"]] == list(range(1, 9)) and body["next"] == 8
        assert body["events"][4] == {**events[4].to_dict(), "seq": 5}
        assert [e["seq"] for e in (await get("?since=5"))[1]["events"]] == [6, 7, 8]
        assert [e["seq"] for e in (await get("?prefix=a"))[1]["events"]] == [1, 2, 5, 7, 8]
        assert [e["seq"] for e in (await get("?prefix=a&since=2"))[1]["events"]] == [5, 7, 8]
        assert [e["seq"] for e in (await get("?prefix=c"))[1]["events"]] == [6, 7]
        assert [e["seq"] for e in (await get("?prefix=c/d/e"))[1]["events"]] == [6]
        assert [e["seq"] for e in (await get("?prefix=a%20b"))[1]["events"]] == [3]
        # A move or removal of a directory above the prefix changes what is at it: included.
        assert [e["seq"] for e in (await get("?prefix=a/ab/z"))[1]["events"]] == [5]
        assert [e["seq"] for e in (await get("?prefix=a/x/y"))[1]["events"]] == [7]
        status, page = await get("?limit=3&prefix=a")
        assert [e["seq"] for e in page["events"]] == [1, 2, 5] and page["next"] == 5
        status, page = await get(f"?limit=3&prefix=a&since={page['next']}")
        assert [e["seq"] for e in page["events"]] == [7, 8]
        assert (await get("?since=8"))[1] == {"events": [], "next": 8}
        # The write token reads too; no token, a bad token, bad parameters are refused.
        assert (await get("", WRITE))[0] == 200
        assert (await get("", {}))[0] == 401
        assert (await get("", {"Authorization": "Bearer wrong"}))[0] == 403
        for bad in ("?since=-1", "?since=x", "?since=9223372036854775808", "?limit=0", "?limit=10001", "?prefix=../etc", "?prefix=/abs", "?prefix="):
            assert (await get(bad))[0] == 400, bad


def manifest_events(total: int) -> list[Event]:
    """A realistic mix: directories, files, edits, chmods, renames of files and directories, removals."""
    rng = random.Random(4)
    events: list[Event] = []
    dirs = [f"d{i}" for i in range(20)]
    events += [Event(Op.MKDIR, d, is_dir=True, mode=0o755) for d in dirs]
    events += [Event(Op.MKDIR, f"{d}/sub", is_dir=True, mode=0o750) for d in dirs]
    files: list[str] = []
    n = 0
    while len(events) < total:
        roll = rng.random()
        if roll < 0.80 or len(files) < 50:
            parent = rng.choice(dirs)
            path = f"{parent}/{'sub/' if rng.random() < 0.5 else ''}f{n} 文件.txt"
            n += 1
            events.append(write_event(path, str(n).encode(), mode=rng.choice([0o644, 0o600])))
            files.append(path)
        elif roll < 0.88:
            events.append(Event(Op.ATTRIB, rng.choice(files), mode=0o640, mtime_ns=n))
        elif roll < 0.95:
            src = files.pop(rng.randrange(len(files)))
            dest = f"{rng.choice(dirs)}/moved {n}.txt"
            n += 1
            events.append(Event(Op.MOVE, src, dest=dest))
            files.append(dest)
        elif roll < 0.995:
            events.append(Event(Op.DELETE, files.pop(rng.randrange(len(files)))))
        else:
            # A whole directory renamed (what is inside goes with it), or removed.
            old = dirs.pop(rng.randrange(len(dirs)))
            files = [f for f in files if not f.startswith(old + "/")]
            if rng.random() < 0.5:
                new = f"renamed{n}"
                n += 1
                events.append(Event(Op.MOVE, old, dest=new, is_dir=True))
                dirs.append(new)
            else:
                events.append(Event(Op.RMDIR, old, is_dir=True))
            if not dirs:
                dirs.append(f"fresh{n}")
                events.append(Event(Op.MKDIR, dirs[-1], is_dir=True, mode=0o755))
                events.append(Event(Op.MKDIR, dirs[-1] + "/sub", is_dir=True, mode=0o755))
    return events[:total]


async def test_manifest_holds_every_batch_published_before_it_was_asked_for(rabbit, mongo, mongo_db):
    """A client binds its queue, then reads the manifest: each event must be in one or the other.

    The 200 status line goes out once a batch is published, while its log write may still run;
    a manifest asked for at that moment must wait for the write, or a new client misses the batch.
    """
    first = [write_event(f"a/{i:04d}", str(i).encode()) for i in range(1000)]
    second = [write_event(f"b/{i:04d}", str(i).encode()) for i in range(1000)]
    settings = settings_for(rabbit, mongo, mongo_db, backend_timeout=30.0)
    async with running(settings) as svc, aiohttp.ClientSession() as http:
        # Two batches back to back: the second is published while the first is still being
        # logged, and its own log write waits its turn (headers only: published, not logged).
        async with http.post(svc.url + "/events", data=batch_body(first), headers=WRITE) as one:
            async with http.post(svc.url + "/events", data=batch_body(second), headers=WRITE) as two:
                assert one.status == two.status == 200
                async with http.get(svc.url + "/manifest", headers=READ) as r:
                    assert r.status == 200
                    rows = ndjson(await r.read())
                reply = await two.json()
    assert reply["last_seq"] == 2000
    assert rows[0]["seq"] == 2000
    assert {row["path"] for row in rows[1:]} >= {e.path for e in first + second}


async def test_manifest_matches_the_state_after_10000_events(rabbit, mongo, mongo_db):
    events = manifest_events(10_000)
    expected = Tree()
    for seq, e in enumerate(events, 1):
        expected.apply(e.with_seq(seq))
    # 1,000-event log writes take seconds on a loaded machine: this test is about the snapshot.
    settings = settings_for(rabbit, mongo, mongo_db, backend_timeout=30.0)
    async with running(settings) as svc, mongo_reader(mongo, mongo_db) as db, aiohttp.ClientSession() as http:
        for i in range(0, len(events), 1000):
            status, reply = await post_batch(http, svc.url, events[i:i + 1000])
            assert status == 200 and reply["logged"], reply
        async with http.get(svc.url + "/manifest", headers=READ) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("application/x-ndjson")
            assert r.headers.get("Transfer-Encoding") == "chunked"
            lines = ndjson(await r.read())
        header, rows = lines[0], lines[1:]
        assert header == {"seq": 10_000, "count": len(expected)}
        entries = [Entry.from_dict(row) for row in rows]
        assert Tree(entries) == expected
        assert len(entries) == len(expected)
        seen: set[str] = set()
        for entry in entries:
            parent = entry.path.rpartition("/")[0]
            assert not parent or parent in seen, f"{entry.path} listed before its parent"
            seen.add(entry.path)
        assert len(await db.state()) == len(expected)
        async with http.get(svc.url + "/manifest") as r:
            assert r.status == 401


async def test_client_progress_and_lag(rabbit, mongo, mongo_db):
    async with running(settings_for(rabbit, mongo, mongo_db)) as svc, aiohttp.ClientSession() as http:
        await post_batch(http, svc.url, [write_event(f"f{i}") for i in range(10)])

        async def progress(client_id: str, body, headers=READ) -> int:
            async with http.post(f"{svc.url}/clients/{client_id}/progress", data=body, headers=headers) as r:
                return r.status

        assert await progress("slave-1", b'{"seq": 4}') == 204
        assert await progress("slave_2.local", b'{"seq": 10}', WRITE) == 204
        assert await progress("slave-1", b'{"seq": 7}') == 204
        assert await progress("slave-1", b'{"seq": 7}', {}) == 401
        assert await progress("slave-1", b'{"seq": 7}', {"Authorization": "Bearer no"}) == 403
        for bad in (b"", b"[]", b'{"seq": -1}', b'{"seq": "3"}', b'{"seq": true}', b'{"seq": 1, "x": 2}'):
            assert await progress("slave-1", bad) == 400, bad
        assert await progress("bad%20id", b'{"seq": 1}') == 400
        async with http.get(svc.url + "/clients", headers=READ) as r:
            assert r.status == 200
            body = await r.json()
        assert body["head"] == 10
        assert [(c["id"], c["seq"], c["lag"]) for c in body["clients"]] == [("slave-1", 7, 3), ("slave_2.local", 10, 0)]
        assert all(c["last_seen"] for c in body["clients"])


async def test_healthz_and_metrics(rabbit, mongo, mongo_db):
    async with running(settings_for(rabbit, mongo, mongo_db)) as svc, aiohttp.ClientSession() as http:
        await post_batch(http, svc.url, [write_event("a"), write_event("b")])
        async with http.post(svc.url + "/events", data=b"{", headers=WRITE) as r:
            assert r.status == 400
        async with http.get(svc.url + "/healthz") as r:
            health = await r.json()
            assert r.status == 200 and health["mongodb"] == "ok" and health["rabbitmq"] == "ok"
            assert (health["head"], health["logged"], health["log_degraded"]) == (2, 2, False)
            assert health["version"] == importlib.metadata.version("dlopbox")
        async with http.get(svc.url + "/metrics") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
        samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                   if line and not line.startswith("#")}
        assert samples["dlopbox_events_total"] == 2
        assert samples["dlopbox_batches_total"] == 1
        assert samples["dlopbox_publish_seconds_count"] == 1
        assert samples["dlopbox_log_seconds_count"] >= 1
        assert samples['dlopbox_rejected_requests_total{status="400"}'] == 1
        assert samples["dlopbox_log_degraded"] == 0 and samples["dlopbox_head_seq"] == 2


async def test_without_backends_it_answers_503_and_keeps_trying(rabbit, mongo, mongo_db):
    from tests.support.services import free_port

    settings = settings_for(rabbit, mongo, mongo_db, mongo_url=f"mongodb://127.0.0.1:{free_port()}/?directConnection=true",
                            backend_timeout=0.5)
    async with running(settings, wait_ready=False) as svc, aiohttp.ClientSession() as http:
        async with http.get(svc.url + "/healthz") as r:
            assert r.status == 503 and (await r.json())["ready"] is False
        async with http.post(svc.url + "/events", data=batch_body([write_event("a")]), headers=WRITE) as r:
            assert r.status == 503 and r.headers["Retry-After"]
        async with http.post(svc.url + "/events", data=batch_body([write_event("a")])) as r:
            assert r.status == 401
        async with http.get(svc.url + "/manifest", headers=READ) as r:
            assert r.status == 503
        assert not svc.task.done()


def test_openapi_describes_exactly_the_routes_of_the_app():
    spec = yaml.safe_load(http.openapi_spec())
    assert spec["openapi"].startswith("3.")
    settings, metrics = InterfaceSettings(token="t", read_token="r"), Metrics()
    app = http.create_app(settings, Ingest(settings, metrics), metrics)
    routes = {(route.resource.canonical, route.method.lower()) for route in app.router.routes()}
    described = {(path, method) for path, item in spec["paths"].items() for method in item}
    assert routes == described
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            codes = set(operation["responses"])
            assert codes & {"200", "204"}, (path, method)
            if operation.get("security") != []:
                assert {"401", "403"} <= codes, (path, method)
            # Path parameters are declared.
            for name in (p[1:-1] for p in path.split("/") if p.startswith("{")):
                assert any(p["in"] == "path" and p["name"] == name for p in operation.get("parameters", [])), path
    post = spec["paths"]["/events"]["post"]["responses"]
    assert {"200", "400", "401", "403", "413", "503"} <= set(post)
    get = spec["paths"]["/events"]["get"]
    assert {p["name"] for p in get["parameters"]} == {"since", "prefix", "limit"}
    assert get["parameters"][2]["schema"]["maximum"] == http.EVENTS_LIMIT_MAX
    assert "version" in spec["components"]["schemas"]["Health"]["required"]


async def test_graceful_shutdown_finishes_in_flight_commits(rabbit, mongo, mongo_db):
    settings = settings_for(rabbit, mongo, mongo_db)
    async with mongo_reader(mongo, mongo_db) as db, aiohttp.ClientSession() as http:
        async with running(settings) as svc:
            posts = [asyncio.create_task(post_batch(http, svc.url, [write_event(f"g{i}-{j}") for j in range(200)]))
                     for i in range(5)]
            await asyncio.sleep(0.05)
            svc.stop.set()
            results = await asyncio.gather(*posts, return_exceptions=True)
        # Every post either completed (and is then logged) or was never accepted; none half-done.
        done = [r for r in results if isinstance(r, tuple) and r[0] == 200]
        assert done, results
        assert await db.seqs() == list(range(1, 200 * len(done) + 1))
