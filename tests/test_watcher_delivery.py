"""delivery.py: coalescing never changes the outcome; batches go out in order, retried until durable."""

from __future__ import annotations

import asyncio
import dataclasses

import aiohttp
from hypothesis import given, settings
from hypothesis import strategies as st

from dlopbox.events import Entry, Event, Op
from dlopbox.paths import is_within
from dlopbox.tree import Tree
from dlopbox.watch.coalesce import OpenBatch
from dlopbox.watch.delivery import Delivery
from tests.support.polling import eventually
from tests.support.receiver import Receiver

DIGESTS = ["aa" * 32, "bb" * 32, "cc" * 32]


def strip(tree: Tree) -> dict[str, Entry]:
    return {p: dataclasses.replace(e, seq=None) for p, e in tree.entries.items()}


@st.composite
def histories(draw) -> tuple[Tree, list[tuple[Event, bool]]]:
    """A starting tree and a valid sequence of changes to it, each with its ``created`` flag."""
    names = ["a", "b", "c"]
    state = Tree()
    for top in draw(st.lists(st.sampled_from(["a", "b"]), max_size=2, unique=True)):
        state.entries[top] = Entry(top, True, mode=0o755)
        for child in draw(st.lists(st.sampled_from(["b", "c"]), max_size=2, unique=True)):
            path = f"{top}/{child}"
            state.entries[path] = (Entry(path, True, mode=0o755) if draw(st.booleans())
                                   else Entry(path, False, 1, 1, 0o644, DIGESTS[0]))
    base = Tree(state.entries.values())
    history: list[tuple[Event, bool]] = []
    for _ in range(draw(st.integers(1, 14))):
        dirs = [""] + [p for p, e in state.entries.items() if e.is_dir]
        files = [p for p, e in state.entries.items() if not e.is_dir]
        existing = list(state.entries)
        kind = draw(st.sampled_from(["write", "write", "attrib", "delete", "mkdir", "rmdir", "move"]))
        parent = draw(st.sampled_from(dirs))
        path = f"{parent}/{draw(st.sampled_from(names))}" if parent else draw(st.sampled_from(names))
        event: Event | None = None
        if kind == "write" and not (state.get(path) and state.get(path).is_dir) and path.count("/") < 4:
            event = Event(Op.WRITE, path, size=draw(st.integers(0, 2)), mtime_ns=draw(st.integers(0, 3)), mode=0o644,
                          digest=draw(st.sampled_from(DIGESTS)))
        elif kind == "attrib" and existing:
            target = draw(st.sampled_from(existing))
            event = Event(Op.ATTRIB, target, is_dir=state.get(target).is_dir, mode=draw(st.sampled_from([0o600, 0o755])),
                          mtime_ns=draw(st.integers(0, 3)))
        elif kind == "delete" and files:
            event = Event(Op.DELETE, draw(st.sampled_from(files)))
        elif kind == "mkdir" and path not in state and path.count("/") < 4:
            event = Event(Op.MKDIR, path, is_dir=True, mode=0o755)
        elif kind == "rmdir" and len(dirs) > 1:
            event = Event(Op.RMDIR, draw(st.sampled_from(dirs[1:])), is_dir=True)
        elif kind == "move" and existing:
            src = draw(st.sampled_from(existing))
            entry = state.get(src)
            target = state.get(path)
            if path != src and not is_within(path, src) and path.count("/") < 4 and (
                    target is None or (not entry.is_dir and not target.is_dir)
                    or (entry.is_dir and target.is_dir and not list(state.below(path)))):
                fields = {} if entry.is_dir else {"size": entry.size, "mtime_ns": entry.mtime_ns, "mode": entry.mode,
                                                  "digest": entry.digest}
                event = Event(Op.MOVE, src, dest=path, is_dir=entry.is_dir, **fields)
        if event is None:
            continue
        created = (event.dest if event.op is Op.MOVE else event.path) not in state
        state.apply(event)
        history.append((event, created))
    return base, history


@settings(max_examples=1500, deadline=None)
@given(histories())
def test_coalescing_gives_the_same_tree_as_every_event(history):
    base, changes = history
    expected = Tree(base.entries.values())
    batch = OpenBatch()
    for event, created in changes:
        expected.apply(event)
        batch.add(event, created)
    result = Tree(base.entries.values())
    for event in batch.events_out():
        result.apply(event)
    assert strip(result) == strip(expected)
    assert len(batch) == len(batch.events_out()) <= len(changes)


def write(path: str, size: int = 1, mtime: int = 1, digest: str = DIGESTS[0]) -> Event:
    return Event(Op.WRITE, path, size=size, mtime_ns=mtime, mode=0o644, digest=digest)


def test_fifty_writes_of_one_file_are_one_event_and_create_then_delete_is_nothing():
    batch = OpenBatch()
    for i in range(50):
        batch.add(write("f", size=i), created=i == 0)
    assert [e.size for e in batch.events_out()] == [49]
    batch.add(Event(Op.DELETE, "f"))
    assert batch.events_out() == ()


def test_an_overwritten_file_deleted_in_the_window_is_one_delete():
    batch = OpenBatch()
    batch.add(write("f"), created=False)
    batch.add(Event(Op.ATTRIB, "f", mode=0o600, mtime_ns=5))
    batch.add(Event(Op.DELETE, "f"))
    assert [(e.op, e.path) for e in batch.events_out()] == [(Op.DELETE, "f")]


def test_a_removed_tree_is_one_rmdir_and_a_temporary_tree_is_nothing():
    batch = OpenBatch()
    batch.add(write("keep"), created=True)
    for name in ("d/x", "d/s/y", "d/s/z"):
        batch.add(Event(Op.DELETE, name))
    batch.add(Event(Op.RMDIR, "d/s", is_dir=True))
    batch.add(Event(Op.RMDIR, "d", is_dir=True))
    assert [(e.op, e.path) for e in batch.events_out()] == [(Op.WRITE, "keep"), (Op.RMDIR, "d")]
    batch.add(Event(Op.MKDIR, "t", is_dir=True, mode=0o755), created=True)
    batch.add(write("t/f"), created=True)
    batch.add(Event(Op.DELETE, "t/f"))
    batch.add(Event(Op.RMDIR, "t", is_dir=True))
    assert [(e.op, e.path) for e in batch.events_out()] == [(Op.WRITE, "keep"), (Op.RMDIR, "d")]


def test_a_new_file_renamed_into_place_is_one_write_at_its_destination():
    batch = OpenBatch()
    batch.add(write(".doc.tmp", digest=DIGESTS[2]), created=True)
    batch.add(Event(Op.MOVE, ".doc.tmp", dest="doc", size=1, mtime_ns=1, mode=0o644, digest=DIGESTS[2]), created=False)
    assert [(e.op, e.path, e.digest) for e in batch.events_out()] == [(Op.WRITE, "doc", DIGESTS[2])]


def test_nothing_is_merged_across_a_directory_move():
    batch = OpenBatch()
    batch.add(write("d/f"), created=True)
    batch.add(Event(Op.MOVE, "d", dest="e", is_dir=True))
    batch.add(Event(Op.MKDIR, "d", is_dir=True, mode=0o755), created=True)
    batch.add(write("d/f", digest=DIGESTS[1]), created=True)
    assert [(e.op, e.path) for e in batch.events_out()] == [(Op.WRITE, "d/f"), (Op.MOVE, "d"), (Op.MKDIR, "d"),
                                                           (Op.WRITE, "d/f")]


# -- sending --------------------------------------------------------------------------------------


async def test_batches_are_sent_in_order_retried_with_the_same_id_and_split_when_too_large(receiver: Receiver):
    async with aiohttp.ClientSession() as session:
        delivery = Delivery(session, receiver.url, receiver.token, batch_ms=5, batch_max=100, buffer_max=10_000)
        sender = asyncio.create_task(delivery.run())
        try:
            receiver.status = 503
            for i in range(250):
                delivery.add(write(f"f{i}"), created=True)
            await eventually(lambda: receiver.posts >= 3, what="retries")
            assert receiver.received == []
            receiver.status = None
            await asyncio.wait_for(delivery.wait_idle(), 30)
            assert [e.path for e in receiver.events()] == [f"f{i}" for i in range(250)]
            ids = [r.batch.batch_id for r in receiver.received]
            assert [int(i.rsplit("-", 1)[1]) for i in ids] == sorted(int(i.rsplit("-", 1)[1]) for i in ids)

            receiver.max_events = 1
            delivery.add(write("g1"), created=True)
            delivery.add(write("g2"), created=True)
            await asyncio.wait_for(delivery.wait_idle(), 30)
            assert [e.path for e in receiver.events()][-2:] == ["g1", "g2"]
            assert len(receiver.received[-1].batch.events) == 1
        finally:
            sender.cancel()


async def test_a_400_drops_only_the_event_it_names(receiver: Receiver):
    async with aiohttp.ClientSession() as session:
        delivery = Delivery(session, receiver.url, receiver.token, batch_ms=5, batch_max=100, buffer_max=10_000)
        sender = asyncio.create_task(delivery.run())
        try:
            receiver.refuse = {"bad"}
            for name in ("one", "bad", "three"):
                delivery.add(write(name), created=True)
            await asyncio.wait_for(delivery.wait_idle(), 30)
            assert [e.path for e in receiver.events()] == ["one", "three"]
        finally:
            sender.cancel()


async def test_a_small_buffer_holds_the_watcher_back_while_the_interface_answers(receiver: Receiver):
    async with aiohttp.ClientSession() as session:
        delivery = Delivery(session, receiver.url, receiver.token, batch_ms=5, batch_max=10, buffer_max=20)
        sender = asyncio.create_task(delivery.run())
        try:
            for i in range(0, 400, 2):
                await delivery.room()
                delivery.add(write(f"f{i}"), created=True)  # an item may emit two events after one room()
                delivery.add(write(f"f{i + 1}"), created=True)
                assert not delivery.lost
            await asyncio.wait_for(delivery.wait_idle(), 30)
            assert [e.path for e in receiver.events()] == [f"f{i}" for i in range(400)]
        finally:
            sender.cancel()
