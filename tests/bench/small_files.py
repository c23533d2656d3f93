"""Small files in bulk, dlopbox beside lsyncd and rsync in one run: W1, W2 with each process's CPU, and W10.

W1: one 4 KiB file's latency (p50 of 20); W2: a burst of 1,000 x 4 KiB files in 10 directories,
with the CPU-seconds each process spent on it (client, interface, MongoDB stand-in, watcher,
nginx, RabbitMQ) divided per file; W10: a late slave's first sync of 20,000 x 2 KiB files in 200
directories (started once the first slave has them all), in files per second, with rsync's copy
of the same tree to an empty directory beside it. Each configuration runs ``--rounds`` times,
dlopbox and lsyncd alternating, so that the ratios compare runs taken side by side.

    .venv/bin/python tests/bench/small_files.py [--scaling 1 4 16] [--rounds 3] [--json F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from dlopbox.tools.loadtest import loadtest
from tests.bench.bench import digest
from tests.bench.mirrors import DlopboxMirror, LsyncdMirror, Mirror

W2_FILES = 1000
W10_FILES, W10_DIRS, W10_SIZE = 20_000, 200, 2048


def cpu_of_group(pgid: int) -> float:
    """CPU-seconds of every live process in the process group ``pgid`` (a service and its children)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def groups(mirror: Mirror) -> dict[str, int]:
    """The process groups of a mirror: its own processes, and for dlopbox the services under it."""
    found = dict(mirror.pids())
    for name in ("rabbit", "mongo", "nginx"):
        service = getattr(mirror, name, None)
        if service is not None and service.proc is not None:
            found[name] = service.proc.pid
    return found


async def w1(mirror: Mirror, trials: int = 20) -> float:
    latencies = []
    for _ in range(trials):
        result = await loadtest(mirror.master, mirror.targets, files=1, size=4096, timeout=60)
        assert not any(result.missing.values()), result.missing
        latencies.append(max(result.latency_ms[str(t)]["max"] for t in mirror.targets))
    return statistics.median(latencies)


async def w2(mirror: Mirror) -> tuple[float, dict[str, float]]:
    """Seconds to converge, and each process group's CPU-seconds per file."""
    pids = groups(mirror)
    before = {name: cpu_of_group(pid) for name, pid in pids.items()}
    result = await loadtest(mirror.master, mirror.targets, files=W2_FILES, size=4096, timeout=300)
    assert not any(result.missing.values()) and not any(result.corrupt.values()), (result.missing, result.corrupt)
    await asyncio.sleep(0.5)  # the acknowledgements and state writes that follow the last install
    cpu = {name: (cpu_of_group(pid) - before[name]) / W2_FILES for name, pid in pids.items()}
    return result.converged_s or float("nan"), cpu


def write_tree(root: Path) -> dict[str, str]:
    expected = {}
    for d in range(W10_DIRS):
        directory = root / "w10" / f"d{d:03}"
        directory.mkdir(parents=True)
        for f in range(W10_FILES // W10_DIRS):
            path = directory / f"f{f:03}.bin"
            path.write_bytes(os.urandom(W10_SIZE))
            expected[str(path.relative_to(root))] = digest(path)
    return expected


async def wait_tree(target: Path, expected: dict[str, str], timeout: float = 600) -> float:
    """Poll ``target`` until it holds every file of ``expected``; return when the last one was seen.

    Directory by directory, a complete one dropped: bench.wait_identical stats all 20,000 paths every
    2 ms, which took a core of its own (18 CPU-s over a 22 s sync) on a machine with two.
    """
    by_dir: dict[str, dict[str, str]] = {}
    for rel, want in expected.items():
        parent, _, name = rel.rpartition("/")
        by_dir.setdefault(parent, {})[name] = want
    seen: dict[tuple[str, str], tuple[int, int, int]] = {}
    deadline, last = time.monotonic() + timeout, 0.0
    while by_dir:
        for parent, files in list(by_dir.items()):
            now = time.time()
            try:
                entries = list(os.scandir(target / parent))
            except FileNotFoundError:
                continue
            for entry in entries:
                want = files.get(entry.name)
                if want is None:
                    continue
                st = entry.stat(follow_symlinks=False)
                version = (st.st_ino, st.st_size, st.st_mtime_ns)
                if seen.get((parent, entry.name)) == version:
                    continue
                seen[(parent, entry.name)] = version
                if digest(Path(entry.path)) == want:
                    del files[entry.name]
                    last = max(last, now)
            if not files:
                del by_dir[parent]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{sum(map(len, by_dir.values()))} files never arrived in {target}")
        if by_dir:
            await asyncio.sleep(0.02)
    return last or time.time()


async def w10(mirror: DlopboxMirror, workdir: Path) -> dict[str, float]:
    """A late slave's first sync of the tree the first slave already has; rsync's copy beside it."""
    started = time.time()
    expected = await asyncio.to_thread(write_tree, mirror.master)
    written = time.time()
    await wait_tree(mirror.targets[0], expected)
    burst = time.time() - started
    late = workdir / "late"
    began = time.time()
    mirror.add_client(late)
    converged = await wait_tree(late, expected)
    rsync_dest = workdir / "rsync-copy"
    t0 = time.perf_counter()
    await asyncio.to_thread(subprocess.run, ["rsync", "-a", f"{mirror.master / 'w10'}/", str(rsync_dest)], check=True)
    rsync_s = time.perf_counter() - t0
    return {"burst write s": written - started, "burst converged s": burst,
            "first sync s": converged - began, "first sync files/s": W10_FILES / (converged - began),
            "rsync s": rsync_s, "rsync files/s": W10_FILES / rsync_s}


async def run(kinds: list[str], scaling: list[int], rounds: int, workdir: Path, with_w10: bool) -> list[dict]:
    results: list[dict] = []
    for clients in scaling:
        for r in range(rounds):
            for kind in kinds:
                where = workdir / f"{kind}-{clients}-{r}"
                mirror: Mirror = DlopboxMirror(where, clients) if kind == "dlopbox" else LsyncdMirror(where, clients)
                await asyncio.to_thread(mirror.start)
                try:
                    await w2(mirror)  # warm-up
                    p50 = await w1(mirror)
                    seconds, cpu = await w2(mirror)
                    row = {"kind": kind, "clients": clients, "round": r, "W1 p50 ms": p50, "W2 s": seconds,
                           "W2 CPU ms per file": {k: round(v * 1000, 4) for k, v in cpu.items()}}
                    print(json.dumps(row), flush=True)
                    results.append(row)
                finally:
                    await asyncio.to_thread(mirror.stop)
    if with_w10 and "dlopbox" in kinds:
        for r in range(rounds):
            where = workdir / f"w10-{r}"
            mirror = DlopboxMirror(where, 1)
            await asyncio.to_thread(mirror.start)
            try:
                row = {"kind": "dlopbox", "round": r, "W10": await w10(mirror, where)}
                print(json.dumps(row), flush=True)
                results.append(row)
            finally:
                await asyncio.to_thread(mirror.stop)
    return results


def summary(results: list[dict]) -> str:
    lines = ["| slaves | metric | dlopbox (median) | lsyncd (median) | ratio |", "| ---: | --- | ---: | ---: | ---: |"]
    for clients in sorted({r["clients"] for r in results if "clients" in r}):
        for metric in ("W1 p50 ms", "W2 s"):
            d = [r[metric] for r in results if r.get("clients") == clients and r["kind"] == "dlopbox"]
            lsy = [r[metric] for r in results if r.get("clients") == clients and r["kind"] == "lsyncd"]
            dm = statistics.median(d) if d else float("nan")
            lm = statistics.median(lsy) if lsy else float("nan")
            lines.append(f"| {clients} | {metric} | {dm:.3f} | {lm:.3f} | {dm / lm:.2f} |")
    cpu_rows = [r["W2 CPU ms per file"] for r in results if r.get("kind") == "dlopbox" and r.get("clients") == 1]
    if cpu_rows:
        names = sorted({k for row in cpu_rows for k in row})
        lines += ["", "W2, 1 slave, CPU ms per file (median): " + ", ".join(
            f"{n} {statistics.median(row.get(n, 0) for row in cpu_rows):.3f}" for n in names)]
    w10s = [r["W10"] for r in results if "W10" in r]
    if w10s:
        def med(key: str) -> float:
            return statistics.median(w[key] for w in w10s)

        lines += ["", (f"W10 (median of {len(w10s)}): first sync {med('first sync files/s'):.0f} files/s "
                      f"({med('first sync s'):.2f} s), rsync {med('rsync files/s'):.0f} files/s ({med('rsync s'):.2f} s), "
                      f"burst of 20,000 converged on the first slave in {med('burst converged s'):.2f} s")]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["dlopbox", "lsyncd"], help="Run one system only.")
    parser.add_argument("--scaling", type=int, nargs="+", default=[1, 4, 16], help="Slave counts for W1/W2.")
    parser.add_argument("--rounds", type=int, default=3, help="Runs of each configuration (alternating).")
    parser.add_argument("--no-w10", action="store_true", help="Skip W10.")
    parser.add_argument("--w10-only", action="store_true", help="Run W10 only.")
    parser.add_argument("--json", type=Path, help="Write the raw results as JSON here.")
    args = parser.parse_args()
    kinds = [args.only] if args.only else ["dlopbox", "lsyncd"]
    with tempfile.TemporaryDirectory(prefix="dlopbox-small-") as tmp:
        results = asyncio.run(run(kinds, [] if args.w10_only else args.scaling, args.rounds, Path(tmp),
                                  not args.no_w10))
    print(summary(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
