"""The client against real RabbitMQ and nginx, with the interface's read side as a test double.

Batches are published to the real exchange with the interface's user, exactly as the
interface would; files are served by the real nginx; the manifest comes from
tests/fake_interface.py, built from the files on disk.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import time
from pathlib import Path

import aio_pika
import pytest

from dlopbox import broker
from dlopbox.client import acks
from dlopbox.client.state import STATE_DIR, load_state
from dlopbox.events import Event, Op
from dlopbox.tree import file_digest
from tests.support.client_harness import client_settings, leftovers, running, wait_equal
from tests.support.fake_interface import FakeInterface, FakeMaster
from tests.test_download import DiskLog


@pytest.fixture
def make_settings(rabbit, nginx, shared_dir, upstream):
    def make(client_id: str, target: Path, **overrides):
        return client_settings(rabbit, nginx, shared_dir, upstream.interface.url, upstream.interface.token,
                               client_id, target, **overrides)
    return make


async def wait_synced(slave: Path, timeout: float = 30) -> None:
    """Until the client has a state file: its first sync is done and it consumes its queue."""
    deadline = time.monotonic() + timeout
    while load_state(slave) is None:
        assert time.monotonic() < deadline, f"no state in {slave} after {timeout}s"
        await asyncio.sleep(0.05)


async def wait_progress(fake: FakeInterface, client_id: str, seq: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while fake.progress.get(client_id, -1) < seq:
        assert time.monotonic() < deadline, f"{client_id} reported {fake.progress.get(client_id)}, not {seq}"
        await asyncio.sleep(0.1)


async def test_every_operation_reaches_the_slave(upstream: FakeMaster, make_settings, client_queues, shared_dir,
                                                 tmp_path):
    m = upstream
    slave = tmp_path / "slave"
    outside = tmp_path / "outside"
    outside.mkdir()
    async with running(make_settings(client_queues[0], slave)):
        steps = [
            ("create", lambda: [m.write("a.txt", b"hello\n")]),
            ("rewrite", lambda: [m.write("a.txt", b"goodbye, and more bytes\n")]),
            ("append", lambda: [m.append("a.txt", os.urandom(100_000))]),
            ("truncate", lambda: [m.truncate("a.txt", 10)]),
            ("chmod", lambda: [m.chmod("a.txt", 0o600)]),
            ("touch", lambda: [m.touch("a.txt", 1_500_000_000_123_456_789)]),
            ("empty file", lambda: [m.write("empty", b"")]),
            ("delete", lambda: [m.delete("a.txt")]),
            ("mkdir -p with immediate writes", lambda: [
                m.mkdir("d1"), m.mkdir("d1/d2"), m.mkdir("d1/d2/d3", 0o750), m.mkdir("d1/d2/d3/d4"),
                m.mkdir("d1/d2/d3/d4/d5"),
                *[m.write(f"d1/d2/d3/d4/d5/f{i}", os.urandom(5000)) for i in range(5)],
                m.write("d1/top", b"top")]),
            ("file rename", lambda: [m.move("d1/top", "d1/d2/renamed")]),
            ("directory rename", lambda: [m.move("d1/d2/d3", "d1/d3-renamed")]),
            ("chmod directory", lambda: [m.chmod("d1/d3-renamed", 0o700)]),
            ("move out", lambda: [_move_out(m, "d1/d3-renamed/d4", outside / "d4")]),
            ("move in", lambda: _move_in(m, outside / "d4", "back")),
            ("names", lambda: [
                m.mkdir("报告 2026"), m.write("报告 2026/季度 #1 ?;%.txt", "中文内容".encode()),
                m.write("emoji 😀🎉 file.bin", os.urandom(2000)), m.write("with  spaces  ", b"s"),
                m.write("x" * 255, b"long name"), m.write("é" * 127, b"two-byte chars, 254 bytes"),
                m.write("quote's \"double\" %3F%2F", b"q")]),
            ("recursive removal", lambda: [m.rmtree("d1")]),
        ]
        for name, step in steps:
            events = step()
            await m.publish(*events)
            try:
                await wait_equal(shared_dir, slave, timeout=30)
            except AssertionError as exc:
                raise AssertionError(f"after {name}: {exc}") from None
    assert load_state(slave).seq == m.interface.head


def _move_out(m: FakeMaster, src: str, outside: Path) -> Event:
    os.rename(m.abs(src), outside)
    return Event(Op.RMDIR, src, is_dir=True)


def _move_in(m: FakeMaster, outside: Path, dest: str) -> list[Event]:
    os.rename(outside, m.abs(dest))
    events = [Event(Op.MKDIR, dest, is_dir=True, mode=0o755)]
    for dirpath, dirs, files in os.walk(m.abs(dest)):
        rel = os.path.relpath(dirpath, m.root)
        events += [Event(Op.MKDIR, f"{rel}/{d}", is_dir=True, mode=os.stat(os.path.join(dirpath, d)).st_mode & 0o7777)
                   for d in sorted(dirs)]
        events += [m.write_event(f"{rel}/{f}") for f in sorted(files)]
    return events


async def test_renames_are_local_not_downloaded_again(upstream: FakeMaster, make_settings, client_queues, shared_dir,
                                                      tmp_path):
    m = upstream
    slave = tmp_path / "slave"
    await m.publish(m.mkdir("big"), m.write("big/blob", os.urandom(3_000_000)))
    async with running(make_settings(client_queues[0], slave)):
        await wait_equal(shared_dir, slave)
        inode = os.stat(slave / "big/blob").st_ino
        await m.publish(m.move("big/blob", "big/blob-renamed"))
        await wait_equal(shared_dir, slave)
        assert os.stat(slave / "big/blob-renamed").st_ino == inode
        await m.publish(m.move("big", "moved/deeper/big"))
        await wait_equal(shared_dir, slave)
        assert os.stat(slave / "moved/deeper/big/blob-renamed").st_ino == inode


async def test_late_client_bootstraps_1000_existing_files(upstream: FakeMaster, make_settings, client_queues,
                                                          shared_dir, tmp_path):
    m = upstream
    events = [m.mkdir(f"dir{d}") for d in range(10)]
    events += [m.write(f"dir{i % 10}/file{i}.txt", os.urandom(100 + i)) for i in range(1000)]
    await m.publish(*events)  # before the client's queue exists: only the manifest has them
    slave = tmp_path / "late"
    async with running(make_settings(client_queues[0], slave)):
        await wait_equal(shared_dir, slave, timeout=120)
        await wait_progress(m.interface, client_queues[0], m.interface.head)
        # and it keeps following
        await m.publish(m.write("dir0/after.txt", b"after the bootstrap"))
        await wait_equal(shared_dir, slave)
    assert m.interface.manifest_requests == 1


async def test_client_stopped_while_1000_changes_happen_catches_up_from_its_queue(
        upstream: FakeMaster, make_settings, client_queues, shared_dir, tmp_path):
    m = upstream
    slave = tmp_path / "slave"
    settings = make_settings(client_queues[0], slave)
    await m.publish(m.mkdir("docs"), *[m.write(f"docs/{i}", os.urandom(200)) for i in range(100)])
    async with running(settings):
        await wait_equal(shared_dir, slave)
    requests = m.interface.manifest_requests
    # While it is away: 1,000 changes of every kind, in many messages.
    changes = [m.mkdir("new")]
    changes += [m.write(f"new/{i}.dat", os.urandom(300)) for i in range(600)]
    changes += [m.write(f"docs/{i}", os.urandom(150)) for i in range(0, 100, 2)]
    changes += [m.delete(f"docs/{i}") for i in range(1, 100, 4)]
    changes += [m.move(f"new/{i}.dat", f"docs/moved-{i}") for i in range(200)]
    changes += [m.chmod(f"new/{i}.dat", 0o640) for i in range(200, 300)]
    changes += [m.touch(f"new/{i}.dat", 1_600_000_000_000_000_000 + i) for i in range(300, 324)]
    assert len(changes) == 1000
    await m.publish_each(changes, per_message=7)
    async with running(settings):
        await wait_equal(shared_dir, slave, timeout=120)
        await wait_progress(m.interface, client_queues[0], m.interface.head)
    assert m.interface.manifest_requests == requests, "caught up from the queue, not the manifest"


async def _lose_queue(rabbit, client_id: str) -> None:
    conn = await aio_pika.connect(rabbit.admin_url)
    async with conn:
        channel = await conn.channel()
        await channel.queue_delete(broker.queue_name(client_id))


async def test_gap_in_the_queue_is_repaired_from_the_manifest(upstream: FakeMaster, make_settings, client_queues,
                                                              shared_dir, tmp_path, rabbit):
    m = upstream
    slave = tmp_path / "slave"
    settings = make_settings(client_queues[0], slave)
    async with running(settings):
        await m.publish(m.write("one", b"1"))
        await wait_equal(shared_dir, slave)
    await _lose_queue(rabbit, client_queues[0])  # an operator deleted it while the client was away
    await m.publish(m.write("two", b"2"), m.write("three", b"3"), m.delete("one"))  # lost with it
    requests = m.interface.manifest_requests
    m.interface.progress.clear()
    async with running(settings):
        await wait_progress(m.interface, client_queues[0], 1)  # consuming its new, empty queue
        await m.publish(m.write("four", b"4"))  # the next message shows the gap
        await wait_equal(shared_dir, slave, timeout=60)
        await wait_progress(m.interface, client_queues[0], m.interface.head)
    assert load_state(slave).seq == m.interface.head
    assert m.interface.manifest_requests == requests + 1


async def test_lost_queue_is_noticed_on_start_without_any_new_event(upstream: FakeMaster, make_settings,
                                                                    client_queues, shared_dir, tmp_path, rabbit):
    m = upstream
    slave = tmp_path / "slave"
    settings = make_settings(client_queues[0], slave)
    async with running(settings):
        await m.publish(m.write("one", b"1"))
        await wait_equal(shared_dir, slave)
    await _lose_queue(rabbit, client_queues[0])
    await m.publish(m.write("two", b"2"), m.delete("one"))
    async with running(settings):
        await wait_equal(shared_dir, slave, timeout=60)
        await wait_progress(m.interface, client_queues[0], m.interface.head)


async def test_out_of_order_delivery_is_reordered_without_a_resync(upstream: FakeMaster, make_settings,
                                                                   client_queues, shared_dir, tmp_path):
    m = upstream
    slave = tmp_path / "slave"
    async with running(make_settings(client_queues[0], slave)):
        await wait_synced(slave)
        requests = m.interface.manifest_requests
        first = m.write("f1", b"first")
        second = m.write("f2", b"second")
        head = m.interface.head
        await m.publish(second, seq=head + 2)
        await asyncio.sleep(0.3)
        await m.publish(first, seq=head + 1)
        await wait_equal(shared_dir, slave)
        await wait_progress(m.interface, client_queues[0], head + 2)
        assert m.interface.manifest_requests == requests


async def test_master_moved_on_the_outdated_write_is_skipped(upstream: FakeMaster, make_settings, client_queues,
                                                             shared_dir, tmp_path):
    m = upstream
    slave = tmp_path / "slave"
    async with running(make_settings(client_queues[0], slave)):
        old = m.write("doc.txt", b"version 1")
        new = m.write("doc.txt", b"version 2, longer")  # nginx now serves only version 2
        old_dir_file = m.write("dir/f", b"in dir")
        moved = m.move("dir", "dir2")  # nginx no longer has dir/f at all
        gone = m.write("gone", b"soon deleted")
        deleted = m.delete("gone")
        await m.publish(Event(Op.MKDIR, "dir", is_dir=True, mode=0o755), old, new, old_dir_file, moved, gone, deleted)
        await wait_equal(shared_dir, slave)
        requests = m.interface.manifest_requests
        await wait_progress(m.interface, client_queues[0], m.interface.head)
        assert m.interface.manifest_requests == requests


async def test_a_write_whose_directory_the_master_moved_since_is_fetched_from_the_new_place(
        upstream: FakeMaster, make_settings, client_queues, shared_dir, tmp_path):
    """Only the interface's log knows of the move yet: GET /events must include a move of a parent."""
    m = upstream
    slave = tmp_path / "slave"
    async with running(make_settings(client_queues[0], slave)):
        await wait_synced(slave)
        requests = m.interface.manifest_requests
        mkdir, write = m.mkdir("dir"), m.write("dir/f", b"in dir")
        moved = m.move("dir", "dir2")  # nginx now has dir2/f only
        batch = await m.publish(mkdir, write)
        assert batch.last_seq is not None
        m.interface.events.append(dataclasses.replace(moved, seq=batch.last_seq + 1))  # logged, not delivered
        m.interface.head = batch.last_seq + 1
        deadline = time.monotonic() + 10  # far below fate.STALE_PATIENCE, after which it resyncs
        while not (slave / "dir" / "f").is_file():
            assert time.monotonic() < deadline, "the client did not follow the move of dir/f's directory"
            await asyncio.sleep(0.05)
        assert (slave / "dir" / "f").read_bytes() == b"in dir"
        await m.publish(moved, seq=batch.last_seq + 1)
        await wait_equal(shared_dir, slave)
        await wait_progress(m.interface, client_queues[0], m.interface.head)
        assert m.interface.manifest_requests == requests


async def test_a_write_whose_explanation_is_far_behind_in_the_queue_does_not_stall_it(
        upstream: FakeMaster, make_settings, client_queues, shared_dir, tmp_path, monkeypatch):
    """Its bytes are gone (deleted on the master) and the delete comes many messages later, more than
    the prefetch, and is not in the interface's log yet: the client must go on (acknowledging) until
    it arrives, not hold every acknowledgement (so the broker stops delivering) and resync."""
    from dlopbox.client import fate
    monkeypatch.setattr(fate, "STALE_PATIENCE", 120.0)
    m = upstream
    slave = tmp_path / "slave"
    async with running(make_settings(client_queues[0], slave, prefetch=4)):
        await wait_synced(slave)
        requests = m.interface.manifest_requests
        gone = m.write("gone.txt", b"deleted before any slave could fetch it")
        deleted = m.delete("gone.txt")
        others = [m.mkdir("other"), *(m.write(f"other/f{i}", b"x" * i) for i in range(12))]
        started = time.monotonic()
        await m.publish(gone)
        await m.publish_each(others)  # one message each: three times the prefetch
        await m.publish(deleted, logged=False)
        await wait_equal(shared_dir, slave, timeout=20)
        assert time.monotonic() - started < 20, "the client waited for the explanation instead of going on"
        await wait_progress(m.interface, client_queues[0], m.interface.head)
        assert m.interface.manifest_requests == requests, "it resynced instead of following the queue"


async def test_a_write_explained_by_an_event_dispatched_but_not_logged_yet_is_skipped_at_once(
        upstream: FakeMaster, make_settings, client_queues, shared_dir, tmp_path, monkeypatch):
    """The delete that explains the missing bytes is in the same message, and the interface's log lags:
    only the events the client dispatched lately can tell, or it would wait and then resync."""
    from dlopbox.client import fate
    monkeypatch.setattr(fate, "STALE_PATIENCE", 3.0)
    m = upstream
    slave = tmp_path / "slave"
    async with running(make_settings(client_queues[0], slave)):
        await wait_synced(slave)
        requests = m.interface.manifest_requests
        gone = m.write("gone.txt", b"deleted before any slave could fetch it")
        await m.publish(gone, m.delete("gone.txt"), m.write("kept.txt", b"kept"), logged=False)
        await wait_equal(shared_dir, slave, timeout=20)
        await wait_progress(m.interface, client_queues[0], m.interface.head)
        await asyncio.sleep(fate.STALE_PATIENCE + 1.5)  # past the point where it would have resynced
        assert m.interface.manifest_requests == requests, "it resynced instead of using the events it had"


async def test_a_backlog_of_writes_explained_only_by_the_log_asks_it_once_not_once_each(
        upstream: FakeMaster, make_settings, client_queues, shared_dir, tmp_path):
    """A client back from a network cut replays writes whose files the master has deleted since; the
    deletes are logged but still far behind in its queue. It used to ask the log about each write
    (a query each: ~15 writes a second in the fault suite); one read of the log answers them all."""
    m = upstream
    slave = tmp_path / "slave"
    async with running(make_settings(client_queues[0], slave)):
        await wait_synced(slave)
        asked = m.interface.events_requests
        made = m.mkdir("gone")
        writes = [m.write(f"gone/f{i:02d}", b"x" * (i + 1)) for i in range(40)]
        deletes = [m.delete(f"gone/f{i:02d}") for i in range(40)]
        batch = await m.publish(made, *writes)
        assert batch.last_seq is not None
        m.interface.events += [dataclasses.replace(d, seq=batch.last_seq + 1 + k) for k, d in enumerate(deletes)]
        m.interface.head = batch.last_seq + len(deletes)
        await wait_progress(m.interface, client_queues[0], batch.last_seq)  # every write skipped, none waited for
        assert m.interface.events_requests - asked <= 3, f"{m.interface.events_requests - asked} log queries"
        await m.publish(*deletes, seq=batch.last_seq + 1, logged=False)  # already in the log
        await wait_equal(shared_dir, slave)


async def test_write_whose_bytes_never_match_forces_a_resync(upstream: FakeMaster, make_settings, client_queues,
                                                             shared_dir, tmp_path, monkeypatch):
    from dlopbox.client import fate
    monkeypatch.setattr(fate, "STALE_PATIENCE", 0.5)
    m = upstream
    slave = tmp_path / "slave"
    async with running(make_settings(client_queues[0], slave)):
        await wait_synced(slave)
        requests = m.interface.manifest_requests
        event = m.write("f", b"real content")
        lie = Event(Op.WRITE, "f", size=event.size, mtime_ns=event.mtime_ns, mode=event.mode, digest="0" * 64)
        await m.publish(lie)
        await wait_equal(shared_dir, slave)
        await wait_progress(m.interface, client_queues[0], m.interface.head)
        assert m.interface.manifest_requests == requests + 1


async def test_hostile_events_are_refused_and_write_nothing_outside(upstream: FakeMaster, make_settings,
                                                                    client_queues, shared_dir, tmp_path, rabbit):
    m = upstream
    root = tmp_path / "deep" / "er"
    slave = root / "slave"
    outside = tmp_path / "outside"
    outside.mkdir()
    async with running(make_settings(client_queues[0], slave)):
        await m.publish(m.write("ok", b"fine"))
        await wait_equal(shared_dir, slave)
        queue = broker.queue_name(client_queues[0])
        conn = await aio_pika.connect(rabbit.admin_url)
        async with conn:
            channel = await conn.channel()
            head = m.interface.head
            digest = "a" * 64
            for i, path in enumerate(["../../etc/x", "/tmp/x-absolute", "ok/../../x", ".dlopbox/state.json"]):
                body = {"batch_id": f"evil{i}", "events": [
                    {"op": "write", "path": path, "size": 4, "mtime_ns": 0, "mode": 0o644, "digest": digest,
                     "seq": head + 1, "ts": 1.0}]}
                await channel.default_exchange.publish(
                    aio_pika.Message(json.dumps(body).encode(), headers={"first_seq": head + 1, "last_seq": head + 1}),
                    routing_key=queue)
        # A symlink planted in the slave, pointing outside, where the master has a directory.
        await m.publish(m.mkdir("sub"), m.write("sub/first", b"1"))
        await wait_equal(shared_dir, slave)
        os.rename(slave / "sub", tmp_path / "moved-away")
        os.symlink(outside, slave / "sub")
        await m.publish(m.write("sub/payload", b"must not escape"), m.write("sub/first", b"rewritten"))
        await m.publish(m.write("after", b"still syncing"))
        await wait_equal(shared_dir, slave, timeout=60)
        await wait_progress(m.interface, client_queues[0], m.interface.head)
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "etc").exists() and not (root / "etc").exists() and not Path("/tmp/x-absolute").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "moved-away", "outside"]
    assert sorted(p.name for p in root.iterdir()) == ["slave"]
    assert sorted(p.name for p in (tmp_path / "moved-away").iterdir()) == ["first"]
    assert (slave / "sub").is_dir() and not (slave / "sub").is_symlink()
    assert json.loads((slave / STATE_DIR / "state.json").read_text())["seq"] == m.interface.head


async def test_leftover_temp_files_are_removed_on_start(upstream: FakeMaster, make_settings, client_queues,
                                                        shared_dir, tmp_path):
    m = upstream
    slave = tmp_path / "slave"
    (slave / "sub").mkdir(parents=True)
    (slave / ".dlopbox-tmp-0123456789abcdef").write_bytes(b"partial")
    (slave / "sub" / ".dlopbox-tmp-fedcba9876543210").write_bytes(b"partial")
    await m.publish(m.mkdir("sub"), m.write("sub/f", b"x"))
    async with running(make_settings(client_queues[0], slave)):
        await wait_equal(shared_dir, slave)
    assert leftovers(slave) == []


async def test_client_rides_out_a_rabbitmq_restart(upstream: FakeMaster, make_settings, client_queues, shared_dir,
                                                   tmp_path, rabbit):
    m = upstream
    slave = tmp_path / "slave"
    async with running(make_settings(client_queues[0], slave)) as task:
        await m.publish(m.write("before", b"before the restart"))
        await wait_equal(shared_dir, slave)
        await asyncio.to_thread(rabbit.restart)  # same port and data: the durable queue and the exchange survive
        conn = await aio_pika.connect(rabbit.interface_url)
        async with conn:
            channel = await conn.channel(publisher_confirms=True)
            m.exchange = await channel.get_exchange("dlopbox.events", ensure=False)
            await m.publish(m.write("after", b"after the restart"))
            await wait_equal(shared_dir, slave, timeout=90)
            assert not task.done()
    assert load_state(slave).seq == m.interface.head


async def test_progress_bar_on_a_terminal_and_log_lines_otherwise(caplog):
    from dlopbox.client.download import Counters
    from dlopbox.client.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    counters = Counters()
    terminal = Terminal()
    with Progress("catching up", counters, 10, 4 * 1048576, stream=terminal):
        counters.files, counters.bytes = 5, 2 * 1048576
        await asyncio.sleep(0.5)
    shown = terminal.getvalue()
    assert "\r" in shown and "[###############...............]  50%" in shown
    assert "catching up: 5/10 files, 2.0 MiB/4.0 MiB" in shown and "MiB/s" in shown

    with caplog.at_level("INFO", logger="dlopbox.client"):
        with Progress("catching up", counters, 10, 4 * 1048576, stream=io.StringIO(), log_every=0.1):
            counters.files += 5
            await asyncio.sleep(0.35)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("catching up")]
    assert len(lines) >= 3 and "5/10 files" in lines[-1]


async def test_downloads_wait_for_nginx_to_come_back(upstream: FakeMaster, make_settings, client_queues, shared_dir,
                                                     tmp_path, nginx):
    m = upstream
    slave = tmp_path / "slave"
    async with running(make_settings(client_queues[0], slave)):
        await wait_synced(slave)
        await asyncio.to_thread(nginx.stop)
        try:
            await m.publish(*[m.write(f"f{i}", os.urandom(1000)) for i in range(20)])
            await asyncio.sleep(2)
            assert not (slave / "f0").exists()
            assert load_state(slave).seq == 0, "nothing acknowledged while it cannot be applied"
        finally:
            await asyncio.to_thread(nginx.start)
        await wait_equal(shared_dir, slave, timeout=60)
        await wait_progress(m.interface, client_queues[0], m.interface.head)


async def test_the_longest_paths_sync(upstream: FakeMaster, make_settings, client_queues, shared_dir, tmp_path):
    m = upstream
    slave = tmp_path / "slave"
    parts = ["é" * 125] * 16  # 16 components of 250 bytes: a 4015-byte path, ~12 KB once percent-encoded
    events = [m.mkdir("/".join(parts[:i])) for i in range(1, 16)]
    deep = "/".join(parts)
    assert len(deep.encode()) == 4015
    events.append(m.write(deep, b"at the bottom"))
    async with running(make_settings(client_queues[0], slave)):
        await wait_synced(slave)
        await m.publish(*events)
        await wait_equal(shared_dir, slave)


async def test_state_never_claims_a_seq_before_its_files_are_durable_and_acks_wait_for_that_state(
        upstream: FakeMaster, make_settings, client_queues, shared_dir, tmp_path, monkeypatch):
    """Crash safety of the coalesced state: at any instant, what the state file claims is durable on disk."""
    m = upstream
    slave = tmp_path / "slave"
    violations: list[str] = []
    saves: list[float] = []
    acked: list[int] = []
    async with running(make_settings(client_queues[0], slave)):
        await wait_synced(slave)
        disk = DiskLog(monkeypatch)
        writes: dict[int, Event] = {}
        real_save = acks.save_state

        def checked_save(target: Path, state) -> None:
            saves.append(time.monotonic())
            with disk.lock:
                fsynced = {arg for op, arg in disk.ops if op == "fsync"}
            for seq, event in list(writes.items()):
                if seq > state.seq:
                    continue
                path = target / event.path
                try:
                    ok = os.stat(path).st_ino in fsynced and file_digest(path) == event.digest
                except FileNotFoundError:
                    ok = False
                if not ok:
                    violations.append(f"state seq {state.seq} saved before seq {seq} {event.path} was durable")
            real_save(target, state)

        real_ack = aio_pika.IncomingMessage.ack

        async def checked_ack(message, multiple: bool = False) -> None:
            last_seq = message.headers["last_seq"]
            on_disk = load_state(slave).seq
            if on_disk < last_seq:
                violations.append(f"message up to seq {last_seq} acked with seq {on_disk} on disk")
            acked.append(last_seq)
            await real_ack(message, multiple)

        monkeypatch.setattr(acks, "save_state", checked_save)
        monkeypatch.setattr(aio_pika.IncomingMessage, "ack", checked_ack)
        for start in range(0, 600, 30):
            events = [m.write(f"d{i % 7}/f{i:04d}", os.urandom(3000 + i)) for i in range(start, start + 30)]
            first = m.interface.head + 1
            writes.update({first + k: e for k, e in enumerate(events)})  # known before the client can see them
            await m.publish(*events)
        await wait_equal(shared_dir, slave, timeout=60)
        await wait_progress(m.interface, client_queues[0], m.interface.head)
    assert not violations, violations[:5]
    assert max(acked) == m.interface.head and len(acked) >= 20
    gaps = [b - a for a, b in zip(saves, saves[1:])]
    assert gaps and min(gaps) >= acks.PERSIST_EVERY * 0.9, f"state written {min(gaps) * 1000:.1f} ms after the last"
