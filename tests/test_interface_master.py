"""PUT/GET /master (the watcher's report) and clients' local differences, on the real interface."""

from __future__ import annotations

import json
import re

import aiohttp
import pytest

from tests.support.interface_harness import (
    READ,
    READ_TOKEN,
    WRITE,
    mongo_reader,
    running,
    settings_for,
)

pytestmark = pytest.mark.usefixtures("clean_journal")

REPORT = {"watched_dirs": 7, "rescans": 2, "unsendable_total": 2,
          "unsendable": [{"path": "bad\\xff\\xfe.txt", "reason": "path is not valid UTF-8"},
                         {"path": "secret.txt", "reason": "cannot read it: Permission denied"}]}


async def gauge(http: aiohttp.ClientSession, url: str, name: str) -> float:
    async with http.get(url + "/metrics") as r:
        found = re.search(rf"^{name} (\S+)$", await r.text(), re.MULTILINE)
    assert found, name
    return float(found.group(1))


async def test_the_masters_report_is_kept_refused_when_malformed_and_survives_a_restart(rabbit, mongo, mongo_db):
    settings = settings_for(rabbit, mongo, mongo_db)
    async with aiohttp.ClientSession() as http:
        async with running(settings) as svc:
            async with http.get(svc.url + "/master", headers=READ) as r:
                assert r.status == 404 and "not reported" in (await r.json())["error"]
            async with http.put(svc.url + "/master", json=REPORT, headers=READ) as r:
                assert r.status == 403
            async with http.put(svc.url + "/master", json=REPORT) as r:
                assert r.status == 401
            malformed = [b"{", b"[]", json.dumps({**REPORT, "rescans": -1}).encode(),
                         json.dumps({**REPORT, "watched_dirs": "7"}).encode(),
                         json.dumps({**REPORT, "watched_dirs": True}).encode(),
                         json.dumps({**REPORT, "unsendable": [{"path": "a"}]}).encode(),
                         json.dumps({**REPORT, "unsendable": [{"path": "", "reason": "x"}]}).encode(),
                         json.dumps({**REPORT, "unsendable": "a"}).encode(),
                         json.dumps({**REPORT, "unsendable_total": 1}).encode(),
                         json.dumps({**REPORT, "extra": 1}).encode(),
                         json.dumps({"rescans": 1, "unsendable": []}).encode()]
            for body in malformed:
                async with http.put(svc.url + "/master", data=body, headers=WRITE) as r:
                    assert r.status == 400, body
                    assert (await r.json())["error"], body
            async with http.get(svc.url + "/master", headers=READ) as r:
                assert r.status == 404  # nothing of the malformed bodies was kept

            async with http.put(svc.url + "/master", json=REPORT, headers=WRITE) as r:
                assert r.status == 204
            async with http.get(svc.url + "/master", headers=READ) as r:
                assert r.status == 200
                got = await r.json()
            assert {k: got[k] for k in REPORT} == REPORT and got["received_at"].endswith("+00:00")
            assert await gauge(http, svc.url, "dlopbox_unsendable_paths") == 2

            # The dashboard reads it with its session cookie, as GET /events.
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
                async with browser.post(svc.url + "/session", json={"token": READ_TOKEN}) as r:
                    assert r.status == 204
                async with browser.get(svc.url + "/master") as r:
                    assert r.status == 200 and (await r.json())["watched_dirs"] == 7
                async with browser.put(svc.url + "/master", json=REPORT) as r:
                    assert r.status == 401  # the cookie never authorises a write

        async with mongo_reader(mongo, mongo_db) as db:
            doc = await db.db.meta.find_one({"_id": "master"})
        assert doc is not None and doc["report"]["unsendable"] == REPORT["unsendable"]

        async with running(settings) as svc:  # a restarted interface answers before the watcher reports again
            async with http.get(svc.url + "/master", headers=READ) as r:
                assert r.status == 200
                again = await r.json()
            assert again == got
            assert await gauge(http, svc.url, "dlopbox_unsendable_paths") == 2
            async with http.put(svc.url + "/master", json={**REPORT, "unsendable": [], "unsendable_total": 0},
                                headers=WRITE) as r:
                assert r.status == 204
            assert await gauge(http, svc.url, "dlopbox_unsendable_paths") == 0


async def read_client_event(live: aiohttp.ClientResponse, client_id: str) -> dict:
    """The next `client` message about ``client_id`` on GET /live."""
    event = None
    async for raw in live.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: ") and event == "client":
            row = json.loads(line[len("data: "):])
            if row["id"] == client_id:
                return row
    raise AssertionError("the live stream ended")


async def test_local_differences_are_validated_stored_listed_and_pushed_live(rabbit, mongo, mongo_db, unique):
    async with running(settings_for(rabbit, mongo, mongo_db)) as svc, aiohttp.ClientSession() as http:
        url = f"{svc.url}/clients/{unique}/progress"
        for body in ({"seq": 0, "local_differences": -1}, {"seq": 0, "local_differences": "3"},
                     {"seq": 0, "local_differences": True}, {"seq": 0, "local_differences": 1.5},
                     {"seq": 0, "local_differences": 2 ** 63}, {"seq": 0, "local_differences": [1]},
                     {"seq": 0, "differences": 3}, {"local_differences": 3}):
            async with http.post(url, json=body, headers=READ) as r:
                assert r.status == 400, body
                assert "local_differences" in (await r.json())["error"] or "seq" in (await r.json())["error"]
        async with http.get(svc.url + "/clients", headers=READ) as r:
            assert all(c["id"] != unique for c in (await r.json())["clients"])  # nothing stored

        async with http.post(url, json={"seq": 0}, headers=READ) as r:
            assert r.status == 204

        async def row() -> dict:
            async with http.get(svc.url + "/clients", headers=READ) as r:
                return next(c for c in (await r.json())["clients"] if c["id"] == unique)

        assert (await row())["local_differences"] is None  # never reported

        async with http.get(svc.url + "/live", headers=READ, timeout=aiohttp.ClientTimeout(total=30)) as live:
            assert live.status == 200
            async with http.post(url, json={"seq": 0, "local_differences": 3}, headers=READ) as r:
                assert r.status == 204
            pushed = await read_client_event(live, unique)
        assert (pushed["local_differences"], pushed["state"], pushed["lag"]) == (3, "local differences", 0)
        assert (await row())["local_differences"] == 3

        async with http.post(url, json={"seq": 0}, headers=READ) as r:  # left out: kept
            assert r.status == 204
        assert (await row())["local_differences"] == 3
        async with http.post(url, json={"seq": 0, "local_differences": 0}, headers=READ) as r:
            assert r.status == 204
        assert (await row())["local_differences"] == 0
        async with http.post(url, json={"seq": 0, "local_differences": None}, headers=READ) as r:
            assert r.status == 204
        assert (await row())["local_differences"] is None
