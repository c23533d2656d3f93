"""`dlopbox log` against the real interface (RabbitMQ, SecantusDB), and `dlopbox status --watch`."""

from __future__ import annotations

import asyncio
import io
from datetime import datetime, timezone

import aiohttp
import pytest

from dlopbox.events import Event, Op
from dlopbox.settings import ClientSettings
from dlopbox.tools.log import log
from dlopbox.tools.status import CLEAR, status
from tests.support.fake_interface import FakeInterface
from tests.support.interface_harness import (
    READ_TOKEN,
    post_batch,
    running,
    settings_for,
    write_event,
)
from tests.support.polling import eventually
from tests.test_tools import run_cli

pytestmark = pytest.mark.timeout(120)


def lines(out: io.StringIO) -> list[list[str]]:
    """Each printed event as [seq, date, time, op, path...]."""
    return [line.split() for line in out.getvalue().splitlines()]


async def test_log_prints_the_history_of_a_path_in_order_and_follows(rabbit, mongo, mongo_db, client_queues):
    async with running(settings_for(rabbit, mongo, mongo_db)) as svc, aiohttp.ClientSession() as http:
        history = [Event(Op.MKDIR, "docs", mode=0o755, is_dir=True), write_event("docs/a.txt", b"first"),
                   write_event("other.txt"), Event(Op.MOVE, "docs/a.txt", dest="docs/b.txt"),
                   Event(Op.DELETE, "docs/b.txt")]
        for event in history:
            status_code, _ = await post_batch(http, svc.url, [event])
            assert status_code == 200
        settings = ClientSettings(interface_url=svc.url, read_token=READ_TOKEN)

        out = io.StringIO()
        assert await log(settings, out=out) == 0
        assert [(r[0], r[3], r[4]) for r in lines(out)] == [
            ("1", "mkdir", "docs"), ("2", "write", "docs/a.txt"), ("3", "write", "other.txt"),
            ("4", "move", "docs/a.txt"), ("5", "delete", "docs/b.txt")]
        assert lines(out)[3][4:7] == ["docs/a.txt", "->", "docs/b.txt"] and lines(out)[1][-2:] == ["5", "B"]
        datetime.strptime(" ".join(lines(out)[0][1:3]), "%Y-%m-%d %H:%M:%S.%f")

        out = io.StringIO()
        assert await log(settings, prefix="docs", since=1, out=out) == 0
        assert [r[0] for r in lines(out)] == ["2", "4", "5"]

        # --follow keeps printing what is logged next, until stopped.
        out, stop = io.StringIO(), asyncio.Event()
        follower = asyncio.create_task(log(settings, prefix="docs", since=5, follow=True, out=out, stop=stop))
        await asyncio.sleep(0.3)
        assert out.getvalue() == ""
        await post_batch(http, svc.url, [write_event("docs/c.txt")])
        await eventually(lambda: [r[0] for r in lines(out)] == ["6"], 10, "the new event followed")
        stop.set()
        assert await asyncio.wait_for(follower, 5) == 0

        code, stdout = await run_cli("log", "--interface-url", svc.url, "--read-token", READ_TOKEN,
                                     "--path", "docs", "--since", "4")
        assert code == 0 and [line.split()[0] for line in stdout.splitlines()] == ["5", "6"], stdout
        code, stdout = await run_cli("log", "--interface-url", svc.url, "--read-token", READ_TOKEN, "--path", "../x")
        assert code == 2 and "prefix: path has a '..' component" in stdout, stdout
        code, stdout = await run_cli("log", "--interface-url", svc.url, "--read-token", "wrong")
        assert code == 2 and "403" in stdout, stdout


def last_frame(out: io.StringIO) -> str:
    """The last complete redraw (one ends with its footer line)."""
    frames = [frame for frame in out.getvalue().split(CLEAR) if "Ctrl-C to stop" in frame]
    return frames[-1] if frames else ""


async def test_status_watch_redraws_in_place_until_stopped(shared_dir):
    fake = FakeInterface(shared_dir)
    url = await fake.start()
    try:
        fake.head = 7
        fake.progress.update({"laptop": 5})
        fake.last_seen.update({"laptop": datetime.now(timezone.utc).timestamp()})
        out, stop = io.StringIO(), asyncio.Event()
        watcher = asyncio.create_task(status(ClientSettings(interface_url=url, read_token=fake.token), out,
                                             watch=0.05, stop=stop))
        await eventually(lambda: out.getvalue().count(CLEAR) >= 3, 10, "three redraws")
        fake.progress["laptop"] = 7
        await eventually(lambda: [line.split()[:3] for line in last_frame(out).splitlines()[1:2]] == [["laptop", "7", "0"]],
                         10, "the redraw showing the new seq")
        stop.set()
        assert await asyncio.wait_for(watcher, 5) == 0
        assert last_frame(out).splitlines()[0].split() == ["CLIENT", "SEQ", "LAG", "LOCAL", "STATE", "LAST", "SEEN"]
    finally:
        await fake.stop()
