"""Blocks in the protocol: how the watcher hashes a file, how an event carries its blocks, the client's index."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import aiohttp
import pytest

from dlopbox.client.blocks import BlockIndex, missing_runs
from dlopbox.events import (
    BLOCK_SCHEME,
    BLOCK_SIZE,
    Batch,
    Blocks,
    Entry,
    Event,
    EventError,
    Op,
    blocks_digest,
)
from dlopbox.interface.eventlog import (
    entry_from_doc,
    event_doc,
    event_from_doc,
    state_doc,
)
from dlopbox.tree import (
    PARALLEL_BLOCKS,
    ZERO_BLOCK,
    content_digest,
    file_version,
    hash_blocks,
)
from dlopbox.watch.disk import hash_file
from tests.support.interface_harness import (
    READ,
    bound_queues,
    ndjson,
    numbered_events,
    post_batch,
    running,
    settings_for,
)

pytestmark = pytest.mark.timeout(60)
MiB = BLOCK_SIZE


def block_hashes(data: bytes) -> list[str]:
    return [hashlib.sha256(data[i:i + MiB]).hexdigest() for i in range(0, len(data), MiB)]


def test_a_small_file_keeps_its_plain_digest_and_its_event_is_unchanged(tmp_path: Path):
    (tmp_path / "small").write_bytes(b"x" * 4096)
    entry = hash_file(tmp_path / "small", "small", threading.Event())
    assert entry is not None and entry.blocks is None
    assert entry.digest == hashlib.sha256(b"x" * 4096).hexdigest()
    event = Event(Op.WRITE, "small", size=4096, mtime_ns=1, mode=0o644, digest=entry.digest, ts=1.0)
    assert event.to_json() == ('{"op":"write","path":"small","size":4096,"mtime_ns":1,"mode":420,'
                               f'"digest":"{entry.digest}","ts":1.0}}')
    # Exactly one block is still one digest of the content.
    (tmp_path / "one").write_bytes(os.urandom(MiB))
    assert file_version(tmp_path / "one") == (hashlib.sha256((tmp_path / "one").read_bytes()).hexdigest(), None)


@pytest.mark.parametrize("blocks", [3, PARALLEL_BLOCKS + 5])
def test_a_longer_file_is_hashed_by_blocks_and_named_by_their_hashes(tmp_path: Path, blocks: int):
    data = os.urandom(blocks * MiB - 123)
    (tmp_path / "f").write_bytes(data)
    entry = hash_file(tmp_path / "f", "f", threading.Event())
    assert entry is not None and entry.blocks is not None
    assert list(entry.blocks.hashes) == block_hashes(data)
    assert entry.digest == hashlib.sha256(b"".join(bytes.fromhex(h) for h in block_hashes(data))).hexdigest()


def test_holes_are_hashed_without_being_read(tmp_path: Path):
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate(64 * 1024 * MiB)  # 64 GiB of holes: reading them would take many seconds
        f.seek(10 * MiB + 5)
        f.write(b"data")
    fd = os.open(path, os.O_RDONLY)
    try:
        digest, blocks = content_digest(fd, path.stat().st_size)
    finally:
        os.close(fd)
    assert blocks is not None and len(blocks.hashes) == 64 * 1024
    assert blocks.hashes[10] == hashlib.sha256(bytes(5) + b"data" + bytes(MiB - 9)).hexdigest()
    assert all(h == ZERO_BLOCK for i, h in enumerate(blocks.hashes) if i != 10)


def test_a_file_shrinking_while_hashed_gives_no_digest(tmp_path: Path):
    (tmp_path / "f").write_bytes(os.urandom(3 * MiB))
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        os.truncate(tmp_path / "f", MiB)
        with pytest.raises(Exception, match="expected"):
            hash_blocks(fd, 3 * MiB, 0, 3)
    finally:
        os.close(fd)


def _blocks_event(**overrides) -> dict:
    hashes = [hashlib.sha256(bytes([i])).hexdigest() for i in range(3)]
    out = {"op": "write", "path": "big", "size": 2 * MiB + 1, "mtime_ns": 1, "mode": 0o644,
           "digest": blocks_digest(tuple(hashes)), "ts": 1.0, "blocks": {"scheme": BLOCK_SCHEME, "hashes": hashes}}
    return {**out, **overrides}


def test_an_event_carries_its_blocks_through_json_and_the_log():
    raw = _blocks_event()
    event = Event.from_dict(raw)
    assert isinstance(event.blocks, Blocks) and event.blocks.hashes == tuple(raw["blocks"]["hashes"])
    assert Event.from_json(event.to_json()) == event
    batch = Batch("b1", (event,))
    assert Batch.from_json(batch.to_json()) == batch
    assert Event.from_dict(event_from_doc(json.loads(json.dumps(event_doc(event, "b1", None))))) == event
    entry = Entry("big", False, event.size, 1, 0o644, event.digest, 5, event.blocks)
    assert entry_from_doc(json.loads(json.dumps(state_doc(entry)))) == entry
    assert Entry.from_dict(entry.to_dict()) == entry


@pytest.mark.parametrize(("change", "field"), [
    ({"size": 5 * MiB}, "blocks"),  # three blocks do not make five MiB
    ({"size": MiB}, "blocks"),
    ({"digest": "0" * 64}, "digest"),  # not the SHA-256 of the hashes
    ({"blocks": {"scheme": "cdc", "hashes": []}}, "blocks.scheme"),
    ({"blocks": {"scheme": BLOCK_SCHEME, "hashes": ["x" * 64, "y" * 64]}}, "blocks.hashes"),
    ({"blocks": {"scheme": BLOCK_SCHEME, "hashes": "ab" * 64}}, "blocks.hashes"),
    ({"blocks": {"scheme": BLOCK_SCHEME, "hashes": [ZERO_BLOCK]}}, "blocks.hashes"),
    ({"blocks": {"scheme": BLOCK_SCHEME}}, "blocks.hashes"),
    ({"blocks": {"scheme": BLOCK_SCHEME, "hashes": [], "extra": 1}}, "blocks.extra"),
    ({"blocks": [ZERO_BLOCK, ZERO_BLOCK]}, "blocks"),
    ({"op": "delete"}, "blocks"),
])
def test_blocks_that_do_not_describe_the_file_are_refused(change: dict, field: str):
    with pytest.raises(EventError) as caught:
        Event.from_dict(_blocks_event(**change))
    assert caught.value.field == field


def test_the_index_follows_installs_moves_and_removals_and_survives_a_restart(tmp_path: Path):
    a, b, c = (hashlib.sha256(x).hexdigest() for x in (b"a", b"b", b"c"))
    index = BlockIndex(tmp_path)
    index.put("d/one", [a, b, None, ZERO_BLOCK])
    index.put("two", [c, a])
    assert sorted(index.find(a)) == [("d/one", 0), ("two", 1)]
    assert index.find(ZERO_BLOCK) == [], "holes need no source"
    index.move("d", "e", is_dir=True)
    index.move("two", "e/one", is_dir=False)  # replaces the moved file at e/one
    assert index.find(a) == [("e/one", 1)] and index.find(b) == []
    index.close()
    index = BlockIndex(tmp_path)
    assert index.paths == {"e/one"} and index.find(c) == [("e/one", 0)]
    index.remove("e", is_dir=True)
    assert index.find(c) == [] and not index.paths
    index.close()


def test_missing_blocks_are_coalesced_into_runs():
    assert missing_runs(["h", None, None, "h", None, "h", None]) == [(1, 3), (4, 5), (6, 7)]
    assert missing_runs([None] * 4) == [(0, 4)]
    assert missing_runs(["h"]) == []


@pytest.mark.usefixtures("clean_journal")
async def test_block_lists_reach_the_log_the_queues_the_events_api_and_the_manifest(rabbit, mongo, mongo_db,
                                                                                     client_queues):
    hashes = tuple(hashlib.sha256(str(i).encode()).hexdigest() for i in range(300))  # a 300 MiB file
    big = Event(Op.WRITE, "big.bin", size=300 * MiB - 7, mtime_ns=1, mode=0o644, digest=blocks_digest(hashes),
                blocks=Blocks(BLOCK_SCHEME, hashes))
    moved = Event(Op.MOVE, "big.bin", dest="moved.bin", size=big.size, mtime_ns=1, mode=0o644, digest=big.digest,
                  blocks=big.blocks)
    small = Event(Op.WRITE, "small.txt", size=1, mtime_ns=1, mode=0o644, digest=hashlib.sha256(b"x").hexdigest())
    async with bound_queues(rabbit, client_queues) as queues, running(settings_for(rabbit, mongo, mongo_db)) as svc, \
            aiohttp.ClientSession() as http:
        status, reply = await post_batch(http, svc.url, [big, small, moved])
        assert status == 200 and reply["logged"], reply
        messages = await queues.take(queues.names[0], 1)
        assert [e.blocks for e in numbered_events(messages)] == [big.blocks, None, big.blocks]
        async with http.get(svc.url + "/events?since=0", headers=READ) as r:
            assert [Event.from_dict(e).blocks for e in (await r.json())["events"]] == [big.blocks, None, big.blocks]
        async with http.get(svc.url + "/manifest", headers=READ) as r:
            entries = {e.path: e for e in (Entry.from_dict(row) for row in ndjson(await r.read())[1:])}
        assert entries["moved.bin"].blocks == big.blocks and entries["moved.bin"].digest == big.digest
        assert entries["small.txt"].blocks is None and "big.bin" not in entries
