"""Slaves stay mirrors, measured: how fast a local change is undone, and what an audit costs.

    .venv/bin/python tests/bench/local_changes.py [--changes 120] [--files 100000] [--json out.json]

Undo: the real pipeline (watcher, interface, one client, as processes, on real RabbitMQ,
SecantusDB and nginx: tests/bench/mirrors.py), a synced tree of 4 KiB files; then, one at a
time, a local change on the slave (delete, modify, chmod, add a file, add a directory, rename,
remove a directory), timed from the change until the slave is back as the master has it,
polled every millisecond. Audit: a directory of ``--files`` files in 1,000 directories and
its complete record; :func:`dlopbox.client.audit.audit` timed (best and median of 5) and its
peak allocation traced (tracemalloc), clean and with 1% of the files touched (hashed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from dlopbox.client.audit import audit
from dlopbox.client.installed import InstalledRecord
from dlopbox.settings import DEFAULT_IGNORE
from dlopbox.tree import Ignore, file_version
from tests.bench.bench import pct
from tests.bench.mirrors import DlopboxMirror

FILES = 60
SIZE = 4096


def _same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = os.lstat(a), os.lstat(b)
    except FileNotFoundError:
        return False
    return (sa.st_size, sa.st_mode, sa.st_mtime_ns) == (sb.st_size, sb.st_mode, sb.st_mtime_ns) and \
        a.read_bytes() == b.read_bytes()


def _changes(master: Path, slave: Path, i: int) -> tuple[str, Callable[[], None], Callable[[], bool]]:
    """The i-th local change: its name, how to make it, and when it is undone."""
    rel = f"d{i % 6}/f{i % FILES:03d}"
    s, m = slave / rel, master / rel
    kind = ("delete", "modify", "chmod", "add file", "add dir", "rename", "rmdir")[i % 7]
    if kind == "delete":
        return kind, lambda: os.unlink(s), lambda: _same_file(s, m)
    if kind == "modify":
        return kind, lambda: s.write_bytes(os.urandom(SIZE)), lambda: _same_file(s, m)
    if kind == "chmod":
        return kind, lambda: os.chmod(s, 0o600), lambda: _same_file(s, m)
    if kind == "add file":
        extra = slave / f"d{i % 6}/local-{i}"
        return kind, lambda: extra.write_bytes(b"local"), lambda: not extra.exists()
    if kind == "add dir":
        extra = slave / f"local-dir-{i}"
        return kind, lambda: extra.mkdir(), lambda: not extra.exists()
    if kind == "rename":
        dest = slave / f"d{i % 6}/renamed-{i}"
        return kind, lambda: os.rename(s, dest), lambda: not dest.exists() and _same_file(s, m)
    sub = f"d{i % 6}/sub"
    return (kind, lambda: shutil.rmtree(slave / sub),
            lambda: all(_same_file(slave / sub / n, master / sub / n) for n in os.listdir(master / sub)))


async def undo_times(workdir: Path, changes: int) -> dict[str, object]:
    mirror = DlopboxMirror(workdir, 1)
    master, slave = mirror.master, mirror.targets[0]
    for d in range(6):
        (master / f"d{d}/sub").mkdir(parents=True)
        (master / f"d{d}/sub/g").write_bytes(os.urandom(SIZE))
    for i in range(FILES):
        (master / f"d{i % 6}/f{i:03d}").write_bytes(os.urandom(SIZE))
    await asyncio.to_thread(mirror.start)  # it waits for its services with asyncio.run of its own
    try:
        deadline = time.monotonic() + 60
        while not all(_same_file(slave / f"d{i % 6}/f{i:03d}", master / f"d{i % 6}/f{i:03d}") for i in range(FILES)):
            assert time.monotonic() < deadline, "the slave never got the master's tree"
            await asyncio.sleep(0.1)
        await asyncio.sleep(1)
        times: dict[str, list[float]] = {}
        for i in range(changes):
            kind, change, undone = _changes(master, slave, i)
            started = time.perf_counter()
            change()
            while not undone():
                if time.perf_counter() - started > 10:
                    raise AssertionError(f"change {i} ({kind}) was not undone within 10 s")
                await asyncio.sleep(0.001)
            times.setdefault(kind, []).append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.05)
        everything = [t for values in times.values() for t in values]
        return {"changes": len(everything), "p50_ms": round(statistics.median(everything), 1),
                "p99_ms": round(pct(everything, 0.99), 1), "max_ms": round(max(everything), 1),
                "by_kind_p50_ms": {k: round(statistics.median(v), 1) for k, v in times.items()}}
    finally:
        await asyncio.to_thread(mirror.stop)


def audit_cost(workdir: Path, files: int) -> dict[str, object]:
    target = workdir / "audit"
    dirs = 1000
    for d in range(dirs):
        (target / f"dir{d:04d}").mkdir(parents=True)
    for i in range(files):
        (target / f"dir{i % dirs:04d}/file{i:06d}").write_bytes(i.to_bytes(8, "big"))

    async def build() -> InstalledRecord:
        record = await asyncio.to_thread(InstalledRecord, target)
        for d in range(dirs):
            record.directory(f"dir{d:04d}", os.lstat(target / f"dir{d:04d}").st_mode & 0o7777)
        for i in range(files):
            rel = f"dir{i % dirs:04d}/file{i:06d}"
            st = os.lstat(target / rel)
            digest, blocks = file_version(target / rel)
            record.file(rel, st.st_size, st.st_mtime_ns, st.st_mode & 0o7777, digest, blocks)
        record.mark_complete()
        return record

    tracemalloc.start()
    record = asyncio.run(build())
    record.flush()
    record_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    ignore = Ignore(DEFAULT_IGNORE)

    def measure() -> tuple[float, float, int]:
        times = []
        for _ in range(5):
            started = time.perf_counter()
            audit(target, record, ignore)
            times.append(time.perf_counter() - started)
        tracemalloc.start()
        audit(target, record, ignore)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return min(times), statistics.median(times), peak

    clean_best, clean_median, clean_peak = measure()
    for i in range(0, files, 100):  # 1%: a new mtime, so each is hashed
        os.utime(target / f"dir{i % dirs:04d}/file{i:06d}", ns=(1, 1))
    touched_best, touched_median, touched_peak = measure()
    found = len(audit(target, record, ignore))
    start = time.perf_counter()
    InstalledRecord(target)
    load_s = time.perf_counter() - start
    record.close()
    return {"files": files, "dirs": dirs, "clean_best_s": round(clean_best, 3), "clean_median_s": round(clean_median, 3),
            "clean_peak_mib": round(clean_peak / 2**20, 2), "touched_1pct_best_s": round(touched_best, 3),
            "touched_1pct_median_s": round(touched_median, 3), "touched_1pct_peak_mib": round(touched_peak / 2**20, 2),
            "touched_found": found, "record_in_memory_mib": round(record_bytes / 2**20, 1),
            "record_load_s": round(load_s, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=120)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--skip-undo", action="store_true")
    parser.add_argument("--skip-audit", action="store_true")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="dlopbox-local-bench-"))
    try:
        result: dict[str, object] = {"loadavg": os.getloadavg()}
        if not args.skip_audit:
            result["audit"] = audit_cost(workdir, args.files)
            print(json.dumps(result["audit"]), flush=True)
        if not args.skip_undo:
            result["undo"] = asyncio.run(undo_times(workdir / "pipeline", args.changes))
            print(json.dumps(result["undo"]), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
