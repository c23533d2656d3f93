"""Move pairing on its own: a MOVED_FROM and the MOVED_TO with its cookie, and the expiry of one alone."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from asyncinotify import Inotify

from dlopbox.tree import Ignore
from dlopbox.watch.moves import MOVED_OUT, PAIR_S, MovePairing
from dlopbox.watch.watches import Watches
from tests.support.polling import eventually


@pytest.fixture
def watches(tmp_path: Path) -> Iterator[Watches]:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    with Inotify() as inotify:
        w = Watches(inotify, tmp_path, Ignore(()))
        w.watch_tree("")
        yield w


async def test_a_from_and_its_to_within_the_window_are_one_move(watches: Watches):
    pairing = MovePairing(watches, unread=lambda: False)
    top = watches.top
    assert top is not None
    item = pairing.moved_from(top, "a", "a", False, cookie=7, ts=1.0)
    assert pairing.moved_to(top, "b", "b", False, cookie=7, ignored=False)
    assert await asyncio.wait_for(item.job, 1) == "b"
    assert item.paths() == ("a", "b")
    assert len(pairing) == 0


async def test_a_from_alone_is_a_move_out_once_nothing_is_left_to_read(watches: Watches):
    unread = [True]
    pairing = MovePairing(watches, unread=lambda: unread[0])
    top = watches.top
    assert top is not None
    item = pairing.moved_from(top, "a", "a", False, cookie=8, ts=1.0)
    assert item.paths() is None  # not paired yet: it may touch anything
    await asyncio.sleep(PAIR_S * 5)
    assert not item.ready(), "the kernel still had events to read: its MOVED_TO may be among them"
    unread[0] = False
    await eventually(item.ready, 5, "the move to expire")
    assert item.job.result() is MOVED_OUT
    assert item.paths() == ("a",)
    assert not pairing.moved_to(top, "b", "b", False, cookie=8, ignored=False)  # too late: an arrival


async def test_a_to_alone_is_an_arrival(watches: Watches):
    pairing = MovePairing(watches, unread=lambda: False)
    top = watches.top
    assert top is not None
    assert not pairing.moved_to(top, "from-outside", "from-outside", False, cookie=9, ignored=False)


async def test_a_renamed_directory_keeps_its_watches_at_the_new_path(tmp_path: Path, watches: Watches):
    pairing = MovePairing(watches, unread=lambda: False)
    top = watches.top
    assert top is not None
    sub = watches.find("d/sub")
    assert sub is not None
    (tmp_path / "d").rename(tmp_path / "e")
    item = pairing.moved_from(top, "d", "d", True, cookie=10, ts=1.0)
    assert pairing.moved_to(top, "e", "e", True, cookie=10, ignored=False)
    assert await asyncio.wait_for(item.job, 1) == "e"
    assert watches.find("d") is None
    assert watches.find("e/sub") is sub and sub.rel == "e/sub"


async def test_a_directory_renamed_to_an_ignored_name_is_a_move_out_and_unwatched(tmp_path: Path,
                                                                                  watches: Watches):
    pairing = MovePairing(watches, unread=lambda: False)
    top = watches.top
    assert top is not None
    watched = len(watches)
    (tmp_path / "d").rename(tmp_path / "d~")
    item = pairing.moved_from(top, "d", "d", True, cookie=11, ts=1.0)
    assert pairing.moved_to(top, "d~", "d~", True, cookie=11, ignored=True)
    assert await asyncio.wait_for(item.job, 1) is MOVED_OUT
    assert watches.find("d") is None and len(watches) == watched - 2
