"""The quiet-file rules on their own: which version of a file still being written is read, and when."""

from __future__ import annotations

import asyncio
import hashlib
import signal
from pathlib import Path

from dlopbox.tree import Ignore
from dlopbox.watch.disk import DiskWork
from dlopbox.watch.pipeline import Pending
from dlopbox.watch.settle import OPEN_QUIET_S, SETTLE_S, QuietFiles
from tests.support.polling import eventually


async def test_a_file_still_being_written_is_read_only_once_quiet_and_complete(tmp_path: Path):
    previous = signal.signal(signal.SIGIO, signal.SIG_IGN)
    disk = DiskWork(tmp_path, Ignore(()), 1)
    pending = Pending()
    quiet = QuietFiles(disk, pending, leases=True)
    try:
        path = tmp_path / "copy.bin"
        with path.open("wb") as f:
            for _ in range(12):  # 1.2 s of writing: more than twice SETTLE_S
                f.write(b"x" * 1000)
                f.flush()
                quiet.modified("copy.bin")  # IN_MODIFY
                await asyncio.sleep(0.1)
            assert not pending.items, "read while still being written"
            await asyncio.sleep(SETTLE_S * 2)  # quiet, but its writer still holds it open
            assert not pending.items, "read while a writer still had it open"
            assert quiet.busy("copy.bin")  # a version closed now would be skipped for the next one
        # Closed (its IN_CLOSE_WRITE not handed over): quiet and no writer, so the next check reads it.
        await eventually(lambda: pending.items, OPEN_QUIET_S, "the file to be read")
        [item] = pending.items
        entry = await item.job
        assert entry is not None
        assert entry.size == 12_000 and entry.digest == hashlib.sha256(path.read_bytes()).hexdigest()
        assert not quiet.busy("copy.bin")
    finally:
        quiet.stop()
        disk.close()
        signal.signal(signal.SIGIO, previous)


async def test_a_modified_file_without_a_writer_is_read_after_settle_s(tmp_path: Path):
    disk = DiskWork(tmp_path, Ignore(()), 1)
    pending = Pending()
    quiet = QuietFiles(disk, pending, leases=False)
    try:
        (tmp_path / "f").write_bytes(b"truncated by path")
        quiet.modified("f")  # truncate(2): IN_MODIFY and no close
        await asyncio.sleep(SETTLE_S / 2)
        assert not pending.items
        await eventually(lambda: pending.items, SETTLE_S * 6, "the file to be read")
        [item] = pending.items
        assert (await item.job).digest == hashlib.sha256(b"truncated by path").hexdigest()
    finally:
        quiet.stop()
        disk.close()


async def test_fifty_closes_in_a_row_are_read_once(tmp_path: Path):
    disk = DiskWork(tmp_path, Ignore(()), 1)
    pending = Pending()
    quiet = QuietFiles(disk, pending, leases=False)
    try:
        for i in range(50):
            (tmp_path / "f").write_bytes(str(i).encode())
            quiet.closed("f", float(i))
        items = list(pending.items)
        assert len(items) == 50
        assert all(item.superseded for item in items[:-1])  # released as nothing
        last = items[-1]
        assert not last.superseded and (await last.job).digest == hashlib.sha256(b"49").hexdigest()
    finally:
        quiet.stop()
        disk.close()
