"""The record of what was installed, the audit and the decider, driven directly on a real disk (no services)."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from dlopbox.client.audit import Kind, audit
from dlopbox.client.installed import InstalledRecord
from dlopbox.client.local import Decider, Ledger
from dlopbox.client.schedule import Job, PathScheduler
from dlopbox.events import Event, Op
from dlopbox.settings import DEFAULT_IGNORE
from dlopbox.tree import Ignore, file_version

pytestmark = pytest.mark.timeout(30)
IGNORE = Ignore(DEFAULT_IGNORE)


def record_as_is(target: Path) -> InstalledRecord:
    """A record of everything below ``target`` as it stands, as if the client had installed it."""
    record = InstalledRecord(target)
    for dirpath, dirs, files in os.walk(target):
        dirs[:] = [d for d in dirs if not d.startswith(".dlopbox")]
        for name in sorted(dirs) + sorted(files):
            path = Path(dirpath) / name
            rel = path.relative_to(target).as_posix()
            st = path.lstat()
            if path.is_dir():
                record.directory(rel, st.st_mode & 0o7777)
            else:
                digest, blocks = file_version(path)
                record.file(rel, st.st_size, st.st_mtime_ns, st.st_mode & 0o7777, digest, blocks)
    record.mark_complete()
    return record


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    target = tmp_path / "slave"
    (target / "d/sub").mkdir(parents=True)
    (target / "a.txt").write_bytes(b"alpha")
    (target / "d/b.txt").write_bytes(b"bravo")
    (target / "d/sub/c.bin").write_bytes(os.urandom(2 * 1024 * 1024 + 3))
    return target


async def test_the_record_survives_a_restart(tree: Path):
    record = record_as_is(tree)
    record.move("d", "moved")
    record.remove("a.txt")
    record.attributes("moved/b.txt", 0o600, 5)
    record.close()
    again = InstalledRecord(tree)
    assert again.complete
    assert sorted(again.rows) == ["moved", "moved/b.txt", "moved/sub", "moved/sub/c.bin"]
    assert (again.get("moved/b.txt").mode, again.get("moved/b.txt").mtime_ns) == (0o600, 5)
    assert again.get("moved/sub/c.bin").block_list() is not None  # a multi-block file keeps its block hashes
    assert sorted(again.below("moved")) == ["moved/b.txt", "moved/sub", "moved/sub/c.bin"]
    again.retain({"moved", "moved/sub"})
    again.close()
    assert sorted(InstalledRecord(tree).rows) == ["moved", "moved/sub"]


async def test_a_new_record_is_not_complete_and_judges_nothing(tree: Path):
    record = InstalledRecord(tree)
    assert not record.complete  # a state without it: the client resyncs instead of removing everything
    ledger = Ledger("keep")
    decider = Decider(tree, record, PathScheduler(), IGNORE, ledger, None)
    decider.touched("a.txt")
    await decider.decide()
    assert ledger.current == {}


async def test_the_audit_names_each_kind_of_change(tree: Path):
    record = record_as_is(tree)
    assert audit(tree, record, IGNORE) == []
    os.unlink(tree / "a.txt")
    (tree / "d/b.txt").write_bytes(b"BRAVO")  # same size, new mtime: hashed, differs
    os.utime(tree / "d/sub/c.bin", ns=(1, 1))  # only the mtime: hashed, same content
    (tree / "new.txt").write_bytes(b"n")
    (tree / "newdir/x").mkdir(parents=True)
    (tree / "d/.edit.swp").write_bytes(b"ignored, as the watcher ignores it")
    os.chmod(tree / "d", 0o700)
    found = {c.path: c.kind for c in audit(tree, record, IGNORE)}
    assert found == {"a.txt": Kind.DELETED, "d/b.txt": Kind.MODIFIED, "d/sub/c.bin": Kind.ATTRIBUTES,
                     "new.txt": Kind.ADDED, "newdir": Kind.ADDED_DIR, "d": Kind.DIR_MODE}
    shutil.rmtree(tree / "d/sub")
    os.symlink("/etc", tree / "d/sub")
    found = {c.path: c.kind for c in audit(tree, record, IGNORE)}
    assert found["d/sub"] is Kind.REPLACED and "d/sub/c.bin" not in found


async def test_a_path_with_an_event_pending_waits_for_it(tree: Path):
    record = record_as_is(tree)
    scheduler = PathScheduler()
    ledger = Ledger("keep")
    ledger.known = True
    decider = Decider(tree, record, scheduler, IGNORE, ledger, None)
    release = asyncio.Event()

    async def slow_delete(job: Job) -> None:
        await release.wait()
        record.remove("d/b.txt")  # as the applier records it

    await scheduler.submit(Event(Op.DELETE, "d/b.txt", seq=1), slow_delete)
    os.unlink(tree / "d/b.txt")  # the event's own removal, before it is recorded
    decider.touched("d/b.txt")
    decider.touched("d")
    await decider.decide()
    assert ledger.current == {}  # not judged while the event is pending
    release.set()
    await scheduler.drain()
    await decider.decide()
    assert ledger.current == {} and ledger.count == 0  # the event's own removal: no local change
    os.unlink(tree / "a.txt")
    decider.touched("a.txt")
    await decider.decide()
    assert list(ledger.current) == ["a.txt"] and ledger.counts["kept"] == 1
