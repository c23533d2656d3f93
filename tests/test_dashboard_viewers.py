"""Dashboard viewers never slow ingestion: 20 connected, one never reading, during a 1,000-event burst.

The interface runs as a real process on the session's RabbitMQ and SecantusDB. The same burst
(1,000 events, one per batch, posted in order as a watcher does) is timed with no viewer and
then with 20 viewers; the times are printed for the record, not compared (two shared cores make
wall-clock ratios flaky). What is asserted: both bursts complete and are logged gap-free, every
reading viewer received every seq in order, the stuck viewer was dropped (its buffer is bounded),
and a tab reconnecting with Last-Event-ID resumes right after it.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from pathlib import Path

import aiohttp
import pytest

from dlopbox.interface.service import SHUTDOWN_TIMEOUT
from tests.support.interface_harness import READ_TOKEN as HARNESS_READ
from tests.support.interface_harness import (
    Running,
    batch_body,
    mongo_reader,
    settings_for,
    write_event,
)
from tests.support.pipeline_harness import READ_TOKEN, TOKEN, InterfaceProcess
from tests.support.polling import eventually

pytestmark = pytest.mark.timeout(240)

BURST = 1000
VIEWERS = 20
WRITE = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
READ = {"Authorization": f"Bearer {READ_TOKEN}"}
#: Long paths make each event's message about 500 bytes, so a burst outgrows the stuck viewer's bound.
DEEP = "/".join(["a-rather-long-folder-name-for-the-feed"] * 5)


@pytest.fixture
def interface(rabbit, mongo, unique, clean_journal, tmp_path: Path):
    process = InterfaceProcess(tmp_path / "interface", rabbit, mongo, unique)
    process.start()
    yield process
    process.stop()


async def burst(session: aiohttp.ClientSession, url: str, tag: str) -> tuple[float, int, int]:
    """Post BURST single-event batches in order; (seconds, first seq, last seq)."""
    bodies = [batch_body([write_event(f"{DEEP}/{tag}-{i:04d}.txt", b"x" * i)]) for i in range(BURST)]
    started = time.perf_counter()
    seqs = []
    for body in bodies:
        async with session.post(url + "/events", data=body, headers=WRITE) as r:
            assert r.status == 200, await r.text()
            seqs.append((await r.json())["last_seq"])
    elapsed = time.perf_counter() - started
    assert seqs == list(range(seqs[0], seqs[0] + BURST))
    return elapsed, seqs[0], seqs[-1]


class Reader:
    """A tab that reads everything: the seqs of every events message, in arrival order."""

    def __init__(self, session: aiohttp.ClientSession, url: str, last_event_id: int | None = None) -> None:
        self.session, self.url, self.last_event_id = session, url, last_event_id
        self.seqs: list[int] = []
        self.connected = asyncio.Event()
        self.task = asyncio.create_task(self.read())

    async def read(self) -> None:
        headers = dict(READ)
        if self.last_event_id is not None:
            headers["Last-Event-ID"] = str(self.last_event_id)
        async with self.session.get(self.url + "/live", headers=headers,
                                    timeout=aiohttp.ClientTimeout(total=None, sock_read=60)) as r:
            assert r.status == 200
            self.connected.set()
            event = None
            async for line in r.content:
                if line.startswith(b"event: "):
                    event = line[7:].strip()
                elif line.startswith(b"data: ") and event == b"events":
                    data = json.loads(line[6:])
                    self.seqs.extend(e["seq"] for e in data["events"])

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def stuck_viewer(port: int) -> socket.socket:
    """A tab that connects to /live and never reads a byte (a tiny receive window)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET /live HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {READ_TOKEN}\r\n\r\n".encode())
    return sock


async def metric(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    assert found, name
    return float(found.group(1))


async def test_twenty_viewers_one_stuck_do_not_slow_a_burst(interface: InterfaceProcess, mongo, unique):
    url = interface.url
    async with aiohttp.ClientSession() as session:
        alone, first_alone, last_alone = await burst(session, url, "alone")

        readers = [Reader(session, url) for _ in range(VIEWERS - 1)]
        stuck = stuck_viewer(interface.port)
        try:
            await asyncio.gather(*(asyncio.wait_for(r.connected.wait(), 30) for r in readers))
            await eventually(lambda: _equals(metric(session, url, "dlopbox_live_viewers"), VIEWERS), 30,
                             "20 viewers connected")
            watched, first, last = await burst(session, url, "watched")
            print(f"1,000-event burst: {alone:.2f} s with no viewer, {watched:.2f} s with {VIEWERS} viewers "
                  f"(one never reading)")

            # Every reading tab got every seq of the burst, in order, once.
            async def all_read() -> bool:
                return all(r.seqs and r.seqs[-1] == last for r in readers)
            await eventually(all_read, 60, "every reading viewer at the burst's last seq")
            for r in readers:
                burst_seqs = [s for s in r.seqs if s >= first]
                assert burst_seqs == list(range(first, last + 1))

            # The stuck tab was dropped, not waited for: its buffer is bounded.
            assert await metric(session, url, "dlopbox_live_dropped_viewers_total") >= 1
            assert await metric(session, url, "dlopbox_live_viewers") == VIEWERS - 1

            # Reconnecting with the last seq it saw, a tab resumes right after it, gap-free.
            resumed = Reader(session, url, last_event_id=first + 499)
            await eventually(lambda: resumed.seqs and resumed.seqs[-1] == last, 30, "the resumed tab caught up")
            assert resumed.seqs == list(range(first + 500, last + 1))
            await resumed.close()
        finally:
            stuck.close()
            for r in readers:
                await r.close()

    async with mongo_reader(mongo, unique) as db:
        await eventually(lambda: _logged(db, last), 60, "both bursts in the log")
        assert await db.seqs() == list(range(first_alone, last + 1))
    assert last_alone + 1 == first


async def _equals(value: object, expected: float) -> bool:
    return await value == expected  # type: ignore[misc]


async def _logged(db, last: int) -> bool:
    return (await db.counts())["events"] >= last


async def test_an_open_tab_does_not_hold_up_the_interface_stopping(rabbit, mongo, mongo_db):
    service = Running(settings_for(rabbit, mongo, mongo_db))
    await service.start()
    async with aiohttp.ClientSession() as session:
        async with session.get(service.url + "/live", headers={"Authorization": f"Bearer {HARNESS_READ}"}) as live:
            assert live.status == 200
            started = time.monotonic()
            await service.shutdown()
            # aiohttp would wait its whole shutdown timeout (15 s) for an open stream.
            assert time.monotonic() - started < SHUTDOWN_TIMEOUT / 3
            assert await asyncio.wait_for(live.content.read(), 5) is not None
