"""Slaves stay mirrors: every kind of local change on a slave, undone (revert) or kept and reported (keep).

The client runs in this process against the real RabbitMQ and nginx, with the interface's read
side as tests/support/fake_interface.py (which records the local_differences each progress
report carries). Each test changes the slave's directory the way a user would and asserts the
bytes on disk, the client's log rows and the count it reported.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from dlopbox.client.state import load_state
from dlopbox.tree import scan
from tests.support.client_harness import client_settings, running, wait_equal
from tests.support.fake_interface import FakeMaster
from tests.support.polling import eventually

pytestmark = pytest.mark.timeout(120)
MiB = 1024 * 1024


@pytest.fixture
def make_settings(rabbit, nginx, shared_dir, upstream):
    def make(client_id: str, target: Path, **overrides):
        return client_settings(rabbit, nginx, shared_dir, upstream.interface.url, upstream.interface.token,
                               client_id, target, **overrides)
    return make


async def populate(m: FakeMaster) -> None:
    """The master's tree every test starts from: files at the top and two levels down, one of 3 MiB."""
    await m.publish(m.write("a.txt", b"alpha\n"), m.mkdir("d"), m.write("d/b.txt", b"bravo " * 100),
                    m.mkdir("d/sub", 0o750), m.write("d/sub/c.bin", os.urandom(3 * MiB + 17)),
                    m.write("d/sub/e.txt", b"echo"), m.write("run.sh", b"#!/bin/sh\n", 0o755))


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def _rename_dir(slave: Path) -> None:
    os.rename(slave / "d/sub", slave / "d/moved")


#: Each local change: what it does to the slave, and the log row's words for it.
CHANGES: dict[str, tuple[Callable[[Path], object], str]] = {
    "delete": (lambda s: os.unlink(s / "a.txt"), "'a.txt' deleted"),
    "modify": (lambda s: (s / "d/b.txt").write_bytes(b"scribbled over"), "'d/b.txt' modified"),
    "modify a block of a big file": (lambda s: _write_at(s / "d/sub/c.bin", MiB + 5, b"XYZ"), "'d/sub/c.bin' modified"),
    "append": (lambda s: _append(s / "d/sub/e.txt", b" more"), "'d/sub/e.txt' modified"),
    "touch": (lambda s: os.utime(s / "a.txt", ns=(1_000_000_000_000_000_000,) * 2), "'a.txt' attributes changed"),
    "add file": (lambda s: (s / "d/stray.txt").write_bytes(b"not on the master"), "'d/stray.txt' added"),
    "add dir": (lambda s: [os.makedirs(s / "newdir/deeper"), (s / "newdir/deeper/f").write_bytes(b"x")],
                "'newdir' directory added"),
    "chmod file": (lambda s: os.chmod(s / "run.sh", 0o600), "'run.sh' attributes changed"),
    "chmod dir": (lambda s: os.chmod(s / "d/sub", 0o700), "'d/sub' directory mode changed"),
    "rmdir": (lambda s: shutil.rmtree(s / "d/sub"), "'d/sub' directory removed"),
    "rename file": (lambda s: os.rename(s / "d/b.txt", s / "d/renamed.txt"), "'d/b.txt' "),
    "rename dir": (_rename_dir, "'d/sub' "),
    "file replaced by a dir": (lambda s: [os.unlink(s / "a.txt"), os.mkdir(s / "a.txt")], "'a.txt' "),
}


def _write_at(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", list(CHANGES))
async def test_a_local_change_is_undone(name, upstream: FakeMaster, make_settings, client_queues, shared_dir,
                                        tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dlopbox")
    slave = tmp_path / "slave"
    await populate(upstream)
    settings = make_settings(client_queues[0], slave)
    async with running(settings):
        await wait_equal(shared_dir, slave)
        await eventually(lambda: upstream.interface.local_differences.get(settings.client_id) == 0, 10,
                         "a first count of 0 local differences")
        change, words = CHANGES[name]
        change(slave)
        await wait_equal(shared_dir, slave, timeout=10)
        rows = [r.getMessage() for r in caplog.records]
        assert any("local change:" in r and words in r and "undoing it" in r for r in rows), rows[-20:]
        await eventually(lambda: any("local change undone" in r.getMessage() for r in caplog.records), 10,
                         "the undoing logged")
        await eventually(lambda: upstream.interface.local_differences.get(settings.client_id) == 0, 10,
                         "the count back to 0")


@pytest.mark.parametrize("name", list(CHANGES))
async def test_a_local_change_is_kept_and_reported(name, upstream: FakeMaster, make_settings, client_queues,
                                                   shared_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dlopbox")
    slave = tmp_path / "slave"
    await populate(upstream)
    settings = make_settings(client_queues[0], slave, local_changes="keep")
    async with running(settings):
        await wait_equal(shared_dir, slave)
        change, words = CHANGES[name]
        change(slave)
        changed = await eventually(lambda: scan(slave) != scan(shared_dir), 5, "the change on disk")
        count = await eventually(lambda: upstream.interface.local_differences.get(settings.client_id), 10,
                                 "a count of local differences reported")
        assert count >= 1
        rows = [r.getMessage() for r in caplog.records]
        assert any("local change kept" in r and words in r for r in rows), rows[-20:]
        await asyncio.sleep(1.0)
        assert changed and scan(slave) != scan(shared_dir), "the change was undone"
        # The master's next version of a path overrides a local change there, as in a receive-only folder.
        await upstream.publish(upstream.write("a.txt", b"the master's new version\n"))
        await eventually(lambda: (slave / "a.txt").is_file() and (slave / "a.txt").read_bytes()
                         == b"the master's new version\n", 10, "the master's new version installed")


async def test_changes_made_while_stopped_are_repaired_at_start(upstream: FakeMaster, make_settings, client_queues,
                                                                shared_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dlopbox")
    slave = tmp_path / "slave"
    await populate(upstream)
    settings = make_settings(client_queues[0], slave)
    async with running(settings):
        await wait_equal(shared_dir, slave)
    seq = load_state(slave).seq
    _tamper(slave)
    async with running(settings):
        await wait_equal(shared_dir, slave, timeout=15)
        assert load_state(slave).seq == seq
    rows = [r.getMessage() for r in caplog.records]
    assert any("startup check" in r and "5 local differences" in r for r in rows), [r for r in rows if "startup" in r]


async def test_changes_made_while_stopped_are_reported_at_start(upstream: FakeMaster, make_settings, client_queues,
                                                                shared_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dlopbox")
    slave = tmp_path / "slave"
    await populate(upstream)
    settings = make_settings(client_queues[0], slave, local_changes="keep")
    async with running(settings):
        await wait_equal(shared_dir, slave)
    _tamper(slave)
    tampered = scan(slave)
    upstream.interface.local_differences.clear()
    async with running(settings):
        await eventually(lambda: upstream.interface.local_differences.get(settings.client_id) == 5, 10,
                         "5 local differences reported")
        assert scan(slave) == tampered
    kept = [r.getMessage() for r in caplog.records if "local change kept" in r.getMessage()]
    assert len(kept) == 5, kept


def _tamper(slave: Path) -> None:
    """Five changes made while the client is stopped."""
    os.unlink(slave / "a.txt")
    (slave / "d/b.txt").write_bytes(b"edited while the client was stopped")
    (slave / "added.txt").write_bytes(b"new")
    os.chmod(slave / "run.sh", 0o644)
    shutil.rmtree(slave / "d/sub")


async def test_tampering_during_a_burst_of_master_changes(upstream: FakeMaster, make_settings, client_queues,
                                                          shared_dir, tmp_path):
    m = upstream
    slave = tmp_path / "slave"
    await populate(m)
    async with running(make_settings(client_queues[0], slave)):
        await m.publish(m.mkdir("burst"))
        await wait_equal(shared_dir, slave)
        for round_ in range(20):
            events = [m.write(f"burst/{round_}-{i}.txt", os.urandom(2000 + i)) for i in range(10)]
            if round_ % 3 == 0:
                events.append(m.write("a.txt", f"version {round_}\n".encode()))
            await m.publish(m.touch("run.sh", 1_600_000_000_000_000_000 + round_), *events)
            # Meanwhile, on the slave: whatever is there now is changed locally.
            for victim in sorted((slave / "burst").glob("*.txt"))[:2] if (slave / "burst").is_dir() else []:
                victim.write_bytes(b"local scribble")
            if (slave / "a.txt").exists():
                os.unlink(slave / "a.txt")
            (slave / f"local-{round_}.tmp").write_bytes(b"stray")
        await wait_equal(shared_dir, slave, timeout=30)


async def test_an_install_whose_row_was_lost_is_adopted_not_undone(upstream: FakeMaster, make_settings,
                                                                   client_queues, shared_dir, tmp_path, caplog):
    """Killed between installing a file and recording it: at start, the log explains the file (its digest
    checked), so it is the client's own, not a local change."""
    caplog.set_level(logging.INFO, logger="dlopbox")
    m = upstream
    slave = tmp_path / "slave"
    await populate(m)
    settings = make_settings(client_queues[0], slave)
    async with running(settings):
        await wait_equal(shared_dir, slave)
    # The next version, installed on the slave exactly as the client would have, its event still queued.
    await m.publish(m.write("a.txt", b"installed, then killed before the record\n"), m.write("late.txt", b"late"))
    for rel in ("a.txt", "late.txt"):
        shutil.copy2(shared_dir / rel, slave / rel)
    async with running(settings):
        await eventually(lambda: load_state(slave).seq == m.interface.head, 15, "the queued events applied")
        await wait_equal(shared_dir, slave, timeout=15)
    rows = [r.getMessage() for r in caplog.records]
    assert not any("local change" in r for r in rows), [r for r in rows if "local change" in r]
    assert any("startup check" in r and "0 local differences (2 install(s) of our own adopted)" in r for r in rows), \
        [r for r in rows if "startup" in r]


async def test_a_lost_record_costs_a_resync_not_the_files(upstream: FakeMaster, make_settings, client_queues,
                                                          shared_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dlopbox")
    slave = tmp_path / "slave"
    await populate(upstream)
    settings = make_settings(client_queues[0], slave)
    async with running(settings):
        await wait_equal(shared_dir, slave)
    for name in os.listdir(slave / ".dlopbox"):
        if name.startswith("installed.sqlite"):
            os.unlink(slave / ".dlopbox" / name)
    inode = os.stat(slave / "d/sub/c.bin").st_ino
    upstream.interface.local_differences.clear()
    async with running(settings):
        await eventually(lambda: upstream.interface.local_differences.get(settings.client_id) == 0, 15,
                         "a count of 0 once the record is rebuilt")
        await wait_equal(shared_dir, slave)
    assert os.stat(slave / "d/sub/c.bin").st_ino == inode  # kept, not fetched again
    rows = [r.getMessage() for r in caplog.records]
    assert any("resyncing from the manifest" in r for r in rows)
    assert not any("local change" in r for r in rows), [r for r in rows if "local change" in r]


def _tamper_in_sub(slave: Path) -> None:
    """Three changes inside d/sub: an edit, a deletion and an addition."""
    (slave / "d/sub/e.txt").write_bytes(b"edited on the slave")
    _write_at(slave / "d/sub/c.bin", 2 * MiB, b"scribble")
    (slave / "d/sub/stray.txt").write_bytes(b"not on the master")


async def test_changes_inside_a_directory_the_master_moves_are_undone_where_it_went(
        upstream: FakeMaster, make_settings, client_queues, shared_dir, tmp_path):
    """The master's move lands before the changes are judged: they travel with the directory, and
    inotify names them no more; the directory that arrived is audited below."""
    m = upstream
    slave = tmp_path / "slave"
    await populate(m)
    async with running(make_settings(client_queues[0], slave)):
        await wait_equal(shared_dir, slave)
        _tamper_in_sub(slave)
        await m.publish(m.move("d/sub", "moved/deeper/sub"))
        await wait_equal(shared_dir, slave, timeout=15)


async def test_a_kept_change_is_reported_where_the_masters_move_took_it(
        upstream: FakeMaster, make_settings, client_queues, shared_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dlopbox")
    m = upstream
    slave = tmp_path / "slave"
    await populate(m)
    settings = make_settings(client_queues[0], slave, local_changes="keep")
    async with running(settings):
        await wait_equal(shared_dir, slave)
        (slave / "d/sub/e.txt").write_bytes(b"edited on the slave")
        os.unlink(slave / "d/b.txt")
        await eventually(lambda: upstream.interface.local_differences.get(settings.client_id) == 2, 10,
                         "2 local differences reported")
        caplog.clear()
        await m.publish(m.move("d", "moved/d"))
        await eventually(lambda: (slave / "moved/d/sub").is_dir() and not (slave / "d").exists(), 10,
                         "the master's move applied")
        rows = await eventually(lambda: [r.getMessage() for r in caplog.records
                                         if "'moved/d/sub/e.txt' modified" in r.getMessage()], 10,
                                "the edit found again where it went")
        assert all("local change kept" in r for r in rows), rows
        upstream.interface.local_differences.clear()
        await m.publish(m.write("a.txt", b"a change, so that progress is reported again\n"))
        # The old paths no longer count; the edit (moved) and the deletion (moved with d) still do.
        await eventually(lambda: upstream.interface.local_differences.get(settings.client_id) == 2, 10,
                         "2 local differences reported after the move")
        assert (slave / "moved/d/sub/e.txt").read_bytes() == b"edited on the slave"
        assert not (slave / "moved/d/b.txt").exists()
