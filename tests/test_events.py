"""events.py: every op validates, round-trips through JSON, and names the bad field."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dlopbox.events import Batch, Entry, Event, EventError, Op

DIGEST = "ab" * 32


def valid_events() -> list[Event]:
    return [
        Event(Op.WRITE, "报告/第一季度.xlsx", size=10, mtime_ns=1_700_000_000_000_000_000, mode=0o644, digest=DIGEST),
        Event(Op.ATTRIB, "a.sh", mtime_ns=1, mode=0o755),
        Event(Op.ATTRIB, "dir", is_dir=True, mtime_ns=1, mode=0o700),
        Event(Op.DELETE, "gone.txt"),
        Event(Op.MKDIR, "新目录", is_dir=True, mode=0o755),
        Event(Op.RMDIR, "old tree", is_dir=True),
        Event(Op.MOVE, "a dir", dest="b dir/a dir", is_dir=True),
        Event(Op.MOVE, "file 😀", dest="file 🎉"),
    ]


@pytest.mark.parametrize("event", valid_events(), ids=lambda e: e.op.value)
def test_round_trip(event):
    assert Event.from_json(event.to_json()) == event
    assert Event.from_dict(json.loads(json.dumps(event.to_dict()))) == event


def test_json_keeps_chinese_readable():
    assert "报告" in valid_events()[0].to_json()


def raw(**changes):
    base = {"op": "write", "path": "f", "size": 1, "mtime_ns": 1, "mode": 0o644, "digest": DIGEST, "ts": 1.0}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not ...}


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (raw(op="explode"), "op"),
        (raw(op=3), "op"),
        (raw(op=...), "op"),
        (raw(path=...), "path"),
        (raw(ts=...), "ts"),
        (raw(path="../../etc/passwd"), "path"),
        (raw(path="/etc/passwd"), "path"),
        (raw(path="a\x00b"), "path"),
        (raw(path="x" * 5000), "path"),
        (raw(path=7), "path"),
        (raw(size="10"), "size"),
        (raw(size=True), "size"),
        (raw(size=-1), "size"),
        (raw(size=...), "size"),
        (raw(mode=0o17777), "mode"),
        (raw(mode=1.5), "mode"),
        (raw(digest="xyz"), "digest"),
        (raw(digest=...), "digest"),
        (raw(mtime_ns="now"), "mtime_ns"),
        (raw(seq=0), "seq"),
        (raw(ts=-5), "ts"),
        (raw(ts="yesterday"), "ts"),
        (raw(ts=float("nan")), "ts"),
        (raw(ts=float("inf")), "ts"),
        (raw(is_dir="yes"), "is_dir"),
        (raw(is_dir=True), "is_dir"),
        (raw(dest="elsewhere"), "dest"),
        (raw(extra=1), "extra"),
        ({"op": "move", "path": "a", "ts": 1}, "dest"),
        ({"op": "move", "path": "a", "dest": "../b", "ts": 1}, "dest"),
        ({"op": "move", "path": "a", "dest": "a/b", "is_dir": True, "ts": 1}, "dest"),
        ({"op": "mkdir", "path": "a", "mode": 0o755, "ts": 1}, "is_dir"),
        ({"op": "mkdir", "path": "a", "is_dir": True, "ts": 1}, "mode"),
        ({"op": "attrib", "path": "a", "mode": 0o755, "ts": 1}, "mtime_ns"),
        ([1, 2], "event"),
    ],
)
def test_malformed_events_name_the_field(data, field):
    with pytest.raises(EventError) as info:
        Event.from_dict(data)
    assert info.value.field == field
    assert field in str(info.value)


def test_batch_names_the_bad_event_index():
    body = {"batch_id": "w1-7", "events": [raw(), raw(path="../x")]}
    with pytest.raises(EventError) as info:
        Batch.from_dict(body, sequenced=False)
    assert (info.value.index, info.value.field) == (1, "path")
    assert str(info.value).startswith("events[1].path:")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{not json", "body"),
        (b'"a string"', "body"),
        (b'{"events": []}', "batch_id"),
        (b'{"batch_id": "has space", "events": []}', "batch_id"),
        (b'{"batch_id": "b", "events": []}', "events"),
        (b'{"batch_id": "b", "events": {}}', "events"),
        (b'{"batch_id": "b", "events": [], "more": 1}', "more"),
    ],
)
def test_malformed_batches(body, field):
    with pytest.raises(EventError) as info:
        Batch.from_json(body)
    assert info.value.field == field


def test_sequenced_batches_demand_consecutive_seqs():
    batch = Batch("b1", tuple(valid_events()))
    numbered = batch.numbered(41)
    assert [e.seq for e in numbered.events] == list(range(41, 49))
    assert (numbered.first_seq, numbered.last_seq) == (41, 48)
    assert Batch.from_json(numbered.to_json(), sequenced=True) == numbered
    with pytest.raises(EventError, match="seq"):
        Batch.from_json(batch.to_json(), sequenced=True)
    with pytest.raises(EventError, match="absent"):
        Batch.from_json(numbered.to_json(), sequenced=False)
    gappy = numbered.to_dict()
    gappy["events"][3]["seq"] = 99
    with pytest.raises(EventError, match="consecutive"):
        Batch.from_dict(gappy)


def test_entry_round_trip_and_refuses_unsafe_paths():
    entry = Entry("目录/文件", is_dir=False, size=3, mtime_ns=5, mode=0o600, digest=DIGEST, seq=9)
    assert Entry.from_dict(json.loads(json.dumps(entry.to_dict()))) == entry
    with pytest.raises(EventError, match="path"):
        Entry.from_dict({"path": "../x"})


_name = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"), min_size=1, max_size=30).filter(
    lambda s: s not in (".", "..") and not s.startswith(".dlopbox"))


@given(
    path=st.lists(_name, min_size=1, max_size=4).map("/".join),
    size=st.integers(0, 2**63 - 1),
    mtime=st.integers(-(2**63), 2**63 - 1),
    mode=st.integers(0, 0o7777),
    seq=st.one_of(st.none(), st.integers(1, 2**62)),
)
def test_any_write_event_round_trips(path, size, mtime, mode, seq):
    event = Event(Op.WRITE, path, size=size, mtime_ns=mtime, mode=mode, digest=DIGEST, seq=seq, ts=1.5)
    assert Event.from_json(event.to_json()) == event


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda c: st.lists(c) | st.dictionaries(st.text(), c), max_leaves=20))
def test_arbitrary_json_never_crashes_the_parser(value):
    try:
        Batch.from_dict(value)
    except EventError:
        pass
    try:
        Event.from_dict(value)
    except EventError:
        pass


def test_an_event_affects_its_paths_what_lies_below_them_and_what_a_removed_or_moved_parent_held():
    write = Event(Op.WRITE, "a/b", size=1, mtime_ns=1, mode=0o644, digest="0" * 64)
    assert write.affects("a/b") and write.affects("a") and not write.affects("a/b/c") and not write.affects("a/bc")
    move = Event(Op.MOVE, "a", dest="x/y", is_dir=True)
    assert move.affects("a/b/c") and move.affects("x/y/z") and move.affects("x") and not move.affects("ab")
    rmdir = Event(Op.RMDIR, "a", is_dir=True)
    assert rmdir.affects("a/b") and not rmdir.affects("b/a")
    mkdir = Event(Op.MKDIR, "a", is_dir=True, mode=0o755)
    assert not mkdir.affects("a/b") and mkdir.affects("a")
