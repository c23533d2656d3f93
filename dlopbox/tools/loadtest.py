"""`dlopbox loadtest`: fire bulk file creations at a master and time their arrival on each slave.

For every file: the time from its writer's close() on the master to the moment it stands,
complete, under its final name in each target (seen by inotify on the target, then checked
byte for byte). Works against any deployment whose master and slave directories are
reachable from here: the host pipeline, compose volumes, or an lsyncd mirror for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from asyncinotify import Inotify, Mask

SUBDIRS = 10


@dataclass(frozen=True, slots=True)
class Sample:
    """What a process used during the run."""

    name: str
    pid: int
    peak_rss_kib: int
    cpu_seconds: float


@dataclass(slots=True)
class Result:
    files: int
    size: int
    targets: list[str]
    started: float
    created_s: float = 0.0
    converged_s: float | None = None
    missing: dict[str, int] = field(default_factory=dict)
    corrupt: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    throughput_files_s: float = 0.0
    throughput_mib_s: float = 0.0
    processes: list[Sample] = field(default_factory=list)
    timeline: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "max": ordered[-1],
            "mean": statistics.fmean(ordered)}


class ProcessProbe:
    """Peak RSS (VmHWM) and CPU time of named processes, read from /proc."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.cpu_start = {name: self._cpu(pid) for name, pid in pids.items()}

    @staticmethod
    def _cpu(pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _hwm(pid: int) -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        return 0

    def samples(self) -> list[Sample]:
        out = []
        for name, pid in self.pids.items():
            try:
                out.append(Sample(name, pid, self._hwm(pid), round(self._cpu(pid) - self.cpu_start[name], 3)))
            except FileNotFoundError:
                out.append(Sample(name, pid, -1, -1.0))
        return out


def resolve_pids(specs: list[str]) -> dict[str, int]:
    """`NAME=PID` pairs, or `NAME=container:ID` for a container's main process."""
    pids = {}
    for spec in specs:
        name, _, value = spec.partition("=")
        if value.startswith("container:"):
            value = subprocess.run(["docker", "inspect", "-f", "{{.State.Pid}}", value.split(":", 1)[1]],
                                   check=True, capture_output=True, text=True).stdout.strip()
        pids[name] = int(value)
    return pids


async def run(args: argparse.Namespace, *, stop: asyncio.Event | None = None) -> int:
    stop = stop or asyncio.Event()
    sys.setswitchinterval(0.0005)  # the writer thread must not delay arrival timestamps by 5 ms slices
    result = await loadtest(args.root, args.targets, files=args.files, size=args.size, rate=args.rate,
                            pids=resolve_pids(args.pid or []), timeout=args.timeout, stop=stop)
    print(summary(result))
    if args.json:
        args.json.write_text(json.dumps(result.to_json(), indent=2))
    if args.plot:
        plot(result, args.plot)
    return 0 if not any(result.missing.values()) and not any(result.corrupt.values()) else 1


async def loadtest(root: Path, targets: list[Path], *, files: int, size: int, rate: float = 0.0,
                   pids: dict[str, int] | None = None, timeout: float = 300.0,
                   stop: asyncio.Event | None = None) -> Result:
    stop = stop or asyncio.Event()
    run_dir = f"loadtest-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
    subdirs = [f"{run_dir}/d{i:02d}" for i in range(SUBDIRS)]
    # The directories first, so each target's can be watched before any file exists.
    for sub in subdirs:
        (root / sub).mkdir(parents=True)
    await _wait_for(lambda: all((t / s).is_dir() for t in targets for s in subdirs), timeout, stop)

    names = [f"{subdirs[i % SUBDIRS]}/f{i:06d}-报告.bin" for i in range(files)]
    closed: dict[str, float] = {}
    arrived: dict[str, dict[str, float]] = {str(t): {} for t in targets}
    probe = ProcessProbe(pids or {})
    result = Result(files=files, size=size, targets=[str(t) for t in targets], started=time.time())
    watcher = asyncio.create_task(_watch_arrivals(targets, subdirs, arrived, files, stop))
    payloads = _Payloads(size)
    try:
        await asyncio.sleep(0.05)  # let the inotify watches settle
        # Writing runs in a thread so this loop is free to timestamp arrivals the moment they land.
        start = time.monotonic()
        await asyncio.to_thread(_create_files, root, names, payloads, rate, closed, stop)
        result.created_s = round(time.monotonic() - start, 3)
        try:
            await asyncio.wait_for(asyncio.shield(watcher), timeout)
        except TimeoutError:
            pass
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)

    last = 0.0
    all_latencies: list[float] = []
    for target in targets:
        seen = arrived[str(target)]
        lat = [(seen[n] - closed[n]) * 1000 for n in names if n in seen and n in closed]
        result.latency_ms[str(target)] = percentiles(lat)
        all_latencies += lat
        result.missing[str(target)] = sum(1 for n in names if n not in seen)
        result.corrupt[str(target)] = await asyncio.to_thread(_count_corrupt, target, names, seen, payloads)
        result.timeline[str(target)] = [(round(closed[n] - result.started, 4), round(seen[n] - result.started, 4))
                                        for n in names if n in seen and n in closed]
        if seen:
            last = max(last, max(seen.values()))
    result.latency_ms["all"] = percentiles(all_latencies)
    if last and closed:
        span = last - min(closed.values())
        result.converged_s = round(span, 3)
        result.throughput_files_s = round(files / span, 1)
        result.throughput_mib_s = round(files * size / span / 2**20, 2)
    result.processes = probe.samples()
    return result


class _Payloads:
    """Distinct content per file without holding all of it: a random block with the index in front."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.block = os.urandom(size)

    def get(self, i: int) -> bytes:
        head = i.to_bytes(8, "big")
        return (head + self.block[8:])[: self.size] if self.size >= 8 else head[-self.size:] if self.size else b""


def _create_files(root: Path, names: list[str], payloads: _Payloads, rate: float, closed: dict[str, float],
                  stop: asyncio.Event) -> None:
    start = time.monotonic()
    for i, name in enumerate(names):
        if stop.is_set():
            return
        if rate > 0:
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        with open(root / name, "wb") as f:
            f.write(payloads.get(i))
        closed[name] = time.time()


def _count_corrupt(target: Path, names: list[str], seen: dict[str, float], payloads: _Payloads) -> int:
    """Files that arrived but whose bytes differ from what was written (checked after the run)."""
    bad = 0
    for i, name in enumerate(names):
        if name not in seen:
            continue
        try:
            data = (target / name).read_bytes()
        except FileNotFoundError:
            bad += 1
            continue
        if data != payloads.get(i):
            bad += 1
    return bad


async def _watch_arrivals(targets: list[Path], subdirs: list[str], arrived: dict[str, dict[str, float]],
                          files: int, stop: asyncio.Event) -> None:
    """Timestamp each file when it appears under its final name in a target, complete."""
    with Inotify() as inotify:
        owner: dict[Path, tuple[str, str]] = {}
        for target in targets:
            for sub in subdirs:
                path = target / sub
                inotify.add_watch(path, Mask.MOVED_TO | Mask.CLOSE_WRITE)
                owner[path] = (str(target), sub)
        remaining = files * len(targets)
        async for event in inotify:
            now = time.time()
            if stop.is_set() or event.watch is None or event.name is None:
                continue
            target, sub = owner[Path(event.watch.path)]
            base = str(event.name)
            name = f"{sub}/{base}"
            if name in arrived[target] or base.startswith("."):
                continue
            arrived[target][name] = now
            remaining -= 1
            if remaining == 0:
                return


async def _wait_for(check, timeout: float, stop: asyncio.Event) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline or stop.is_set():
            raise TimeoutError("the targets did not receive the load test's directories in time")
        await asyncio.sleep(0.02)


def summary(result: Result) -> str:
    lines = [f"dlopbox loadtest: {result.files} files x {result.size} B into {len(result.targets)} target(s)",
             f"  created in {result.created_s} s; converged in {result.converged_s} s; "
             f"{result.throughput_files_s} files/s, {result.throughput_mib_s} MiB/s"]
    lines.append(f"  {'target':<40} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'max ms':>9} {'missing':>8} {'corrupt':>8}")
    for target in [*result.targets, "all"]:
        p = result.latency_ms.get(target, {})
        row = [f"{p.get(k, float('nan')):9.1f}" for k in ("p50", "p90", "p99", "max")]
        lines.append(f"  {target[-40:]:<40} {' '.join(row)} {result.missing.get(target, ''):>8} {result.corrupt.get(target, ''):>8}")
    for s in result.processes:
        lines.append(f"  process {s.name} (pid {s.pid}): peak RSS {s.peak_rss_kib / 1024:.1f} MiB, CPU {s.cpu_seconds} s")
    return "\n".join(lines)


def plot(result: Result, path: Path) -> None:
    """Latency CDF and arrival timeline as one PNG (needs the `plot` extra: matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("dlopbox loadtest: --plot needs matplotlib (pip install 'dlopbox[plot]')", file=sys.stderr)
        return
    fig, (cdf, timeline) = plt.subplots(1, 2, figsize=(12, 4.5))
    for target, points in result.timeline.items():
        lat = sorted((b - a) * 1000 for a, b in points)
        if not lat:
            continue
        label = Path(target).name or target
        cdf.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], label=label)
        timeline.scatter([a for a, _ in points], [(b - a) * 1000 for a, b in points], s=2, label=label)
    cdf.set(xlabel="latency close → visible (ms)", ylabel="fraction of files", title="Latency CDF", xscale="log")
    timeline.set(xlabel="time since start (s)", ylabel="latency (ms)", title="Latency over the run")
    cdf.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
