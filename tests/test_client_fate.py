"""FateFinder and UnexplainedWrites driven directly: what became of a write whose bytes are gone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from dlopbox.api import InterfaceAPI
from dlopbox.client import fate
from dlopbox.client.fate import Fate, FateFinder, UnexplainedWrites
from dlopbox.events import Event, Op
from tests.support.fake_interface import FakeInterface
from tests.support.polling import eventually

pytestmark = pytest.mark.timeout(30)


def write(path: str, seq: int) -> Event:
    return Event(Op.WRITE, path, size=4, mtime_ns=1, mode=0o644, digest="a" * 64, seq=seq)


async def until_resync_requested(writes: UnexplainedWrites, requested: list[int]) -> None:
    """Run the watch's loop until it asks for a resync."""
    loop = asyncio.create_task(writes.loop())
    try:
        await eventually(lambda: requested, 5, "a resync request for the write nothing explains")
    finally:
        loop.cancel()


@pytest.fixture
async def interface(tmp_path) -> AsyncIterator[FakeInterface]:
    fake = FakeInterface(tmp_path)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def finder(interface: FakeInterface) -> AsyncIterator[FateFinder]:
    async with aiohttp.ClientSession() as session:
        yield FateFinder(InterfaceAPI(session, interface.url, interface.token))


async def test_a_later_delete_among_the_recent_events_explains_it_without_asking_the_log(
        finder: FateFinder, interface: FakeInterface):
    finder.recent.extend([write("f", 5), Event(Op.DELETE, "f", seq=6)])
    assert await finder.fate(write("f", 5)) == Fate(True, "f")
    assert interface.events_requests == 0


async def test_a_move_of_its_directory_in_the_interfaces_log_says_where_it_is_now(
        finder: FateFinder, interface: FakeInterface):
    finder.recent.append(write("d/f", 5))
    interface.events = [Event(Op.MOVE, "d", dest="d2", is_dir=True, seq=7)]
    assert await finder.fate(write("d/f", 5)) == Fate(False, "d2/f")
    assert interface.events_requests == 1


async def test_a_move_then_a_delete_are_followed_to_the_end(finder: FateFinder, interface: FakeInterface):
    finder.recent.append(Event(Op.MOVE, "a", dest="b", seq=6))
    interface.events = [Event(Op.MOVE, "a", dest="b", seq=6), Event(Op.DELETE, "b", seq=9)]
    assert await finder.fate(write("a", 5)) == Fate(True, "b")


async def test_past_the_log_window_a_write_is_watched_and_only_its_patience_asks_about_its_path(
        finder: FateFinder, interface: FakeInterface, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(fate, "LOG_WINDOW", 10)
    interface.events = [write(f"other{i}", 5 + i) for i in range(1, 20)] + [Event(Op.DELETE, "f", seq=40)]
    # The apply path: one read of the window serves every lookup it covers, no query per path.
    assert await finder.fate(write("f", 5)) == Fate(False, "f")
    assert await finder.fate(write("g", 6)) == Fate(False, "g")
    assert interface.events_requests == 1
    # A write still unexplained past its patience: its own path is asked about (a resync avoided).
    assert await finder.follow("f", 5) == Fate(True, "f")
    assert interface.events_requests == 2


async def test_nothing_known_leaves_it_where_it_was(finder: FateFinder, interface: FakeInterface):
    finder.recent.extend([write("f", 5), write("other", 6), Event(Op.DELETE, "f", seq=4)])
    assert await finder.fate(write("f", 5)) == Fate(False, "f")


async def test_an_unexplained_write_is_cleared_by_a_later_event_and_resyncs_only_past_its_patience(
        finder: FateFinder, interface: FakeInterface, monkeypatch):
    requested: list[int] = []
    writes = UnexplainedWrites(finder, requested.append)
    writes.watch("explained", 5)
    writes.explained_by(Event(Op.MKDIR, "explained", is_dir=True, mode=0o755, seq=6))  # cannot explain bytes
    writes.explained_by(Event(Op.DELETE, "explained", seq=4))  # earlier: cannot either
    assert set(writes.writes) == {"explained"}
    writes.explained_by(Event(Op.DELETE, "explained", seq=7))
    assert writes.writes == {}

    monkeypatch.setattr(fate, "STALE_PATIENCE", 0.0)
    writes.watch("logged", 8)
    writes.watch("lost", 9)
    interface.events = [Event(Op.DELETE, "logged", seq=10)]
    await until_resync_requested(writes, requested)
    assert requested == [9] and writes.writes == {}


async def test_a_write_already_explained_by_a_dispatched_event_is_not_watched(finder: FateFinder):
    finder.recent.extend([write("f", 5), Event(Op.MOVE, "f", dest="g", seq=6)])
    writes = UnexplainedWrites(finder, lambda seq: None)
    writes.watch("f", 5)
    assert writes.writes == {}


def dir_move(path: str, dest: str, seq: int) -> Event:
    return Event(Op.MOVE, path, dest=dest, is_dir=True, mode=0o755, seq=seq)


async def test_a_move_of_its_directory_carries_a_watched_write_and_it_resyncs_if_nothing_else_explains_it(
        finder: FateFinder, interface: FakeInterface, monkeypatch):
    """The client renames its directory, where the file it never got is not: the write stays watched at its
    new path (seen on every slave: files written just before their directory moved, while MongoDB was down)."""
    requested: list[int] = []
    writes = UnexplainedWrites(finder, requested.append)
    writes.watch("d/f", 5)
    writes.explained_by(dir_move("d", "e", 6))
    assert set(writes.writes) == {"e/f"} and writes.writes["e/f"][0] == 6
    writes.explained_by(dir_move("e", "x/e", 7))
    writes.explained_by(Event(Op.DELETE, "e/f", seq=8))  # about what stood at the old path: not this file
    assert set(writes.writes) == {"x/e/f"}
    finder.recent.extend([write("a/f", 10), dir_move("a", "b", 11)])  # dispatched before the watch begins
    writes.watch("a/f", 10)
    assert set(writes.writes) == {"x/e/f", "b/f"}
    writes.explained_by(write("b/f", 12))  # a newer version at the new path explains it
    assert set(writes.writes) == {"x/e/f"}

    monkeypatch.setattr(fate, "STALE_PATIENCE", 0.0)
    writes.watch("x/e/f", 7)  # the deadline is now
    await until_resync_requested(writes, requested)
    assert requested == [7] and writes.writes == {}
