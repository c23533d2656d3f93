"""dlopbox vs lsyncd, side by side on the same machine and workloads (run by tests/bench/run).

W1 latency of one 4 KiB file (20 trials); W2 a burst of 1,000 4 KiB files in 10 dirs;
W3 one 256 MiB file (with the curl floor from the same nginx, one curl per slave at once; a second
floor where each curl's output is also hashed, SHA-256 by the openssl CLI, as each slave must verify
what it installs; and each client's peak RSS);
W4 50 rapid appends to one file; W5 a directory of 100 files renamed plus 100 files deleted;
W1 and W2 again with 1, 4 and 16 slaves; W6 1 MiB overwritten in the middle of a 256 MiB file;
W7 1 MiB appended to it; W8 a cp of it to a new name; W9 a 256 MiB sparse file holding 1 MiB of data.
W6-W9 report the bytes each slave received (dlopbox: from nginx's access log; lsyncd: rsync's own
count of what it transferred) and are also run with rsync's delta algorithm forced (--no-whole-file).
During every workload a sampler reads the slaves and counts files seen under their final name with
content the master never had complete.
With --link RATE the whole bench runs in a network namespace whose loopback is shaped to RATE, so
the bytes each system sends cost the time they would between machines; lsyncd then sends through
an rsync daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from dlopbox.tools.loadtest import ProcessProbe, loadtest  # noqa: E402
from tests.bench.mirrors import DlopboxMirror, LsyncdMirror, Mirror  # noqa: E402

CHUNK = 4096


@dataclass
class Measure:
    workload: str
    metric: str
    unit: str
    values: dict[str, float] = field(default_factory=dict)
    target: str = ""
    note: str = ""


class PartialSampler:
    """Reads the slaves in a loop; counts final-name files whose content is no complete version."""

    def __init__(self, targets: list[Path], scope: str, valid: Callable[[str, Path], bool]) -> None:
        self.targets, self.scope, self.valid = targets, scope, valid
        self.bad: set[tuple[str, str, int]] = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PartialSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            for target in self.targets:
                for dirpath, _, files in os.walk(target / self.scope):
                    for name in files:
                        if name.startswith("."):
                            continue  # rsync's and dlopbox's temp files are hidden by design
                        path = Path(dirpath) / name
                        rel = str(path.relative_to(target))
                        try:
                            size = path.stat().st_size
                            ok = self.valid(rel, path)
                        except FileNotFoundError:
                            continue
                        self.samples += 1
                        if not ok:
                            self.bad.add((str(target), rel, size))
            self._stop.wait(0.001)


def digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


async def wait_identical(targets: list[Path], expected: dict[str, str | None], timeout: float = 600) -> float:
    """Poll until every target has these files (digest), or not (None); return when the last one got there.

    A version is timed when its stat was first seen, not after the check of its digest: hashing
    256 MiB here takes a quarter of a second that neither system under test spends.
    """
    deadline = time.monotonic() + timeout
    pending = {(t, rel) for t in targets for rel in expected}
    versions: dict[tuple[Path, str], tuple[int, int, int]] = {}
    last = 0.0
    while pending:
        for target, rel in list(pending):
            path = target / rel
            want = expected[rel]
            seen = time.time()
            if want is None:  # must be gone
                if not path.exists():
                    pending.discard((target, rel))
                    last = max(last, seen)
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            version = (st.st_ino, st.st_size, st.st_mtime_ns)
            if version == versions.get((target, rel)):
                continue
            versions[(target, rel)] = version
            # Small files inline: a thread hop per file would make the polling itself the slow part.
            got = digest(path) if st.st_size <= 2**20 else await asyncio.to_thread(digest, path)
            if got == want:
                pending.discard((target, rel))
                last = max(last, seen)
        if not pending:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} files never converged, e.g. {sorted(pending)[:3]}")
        await asyncio.sleep(0.002)
    return last or time.time()


async def w1(mirror: Mirror, trials: int = 20) -> list[float]:
    latencies = []
    for _ in range(trials):
        result = await loadtest(mirror.master, mirror.targets, files=1, size=CHUNK, timeout=60)
        assert not any(result.missing.values()), result.missing
        latencies.append(max(result.latency_ms[str(t)]["max"] for t in mirror.targets))
    return latencies


async def w2(mirror: Mirror) -> tuple[float, int]:
    result = await loadtest(mirror.master, mirror.targets, files=1000, size=CHUNK, timeout=300)
    assert not any(result.missing.values()) and not any(result.corrupt.values()), (result.missing, result.corrupt)
    return result.converged_s or float("nan"), sum(result.corrupt.values())


async def w3(mirror: Mirror, size: int = 256 * 2**20) -> dict[str, float]:
    scope = f"w3-{time.time_ns()}"
    (mirror.master / scope).mkdir()
    await wait_identical(mirror.targets, {}, 60)
    block = os.urandom(2**20)
    h = hashlib.sha256()
    tmp_master = mirror.master / scope / "big.bin"
    valid = lambda rel, path: path.stat().st_size == size  # noqa: E731  (digest checked at convergence)
    with PartialSampler(mirror.targets, scope, valid) as sampler:
        with open(tmp_master, "wb") as f:
            for i in range(size // len(block)):
                chunk = i.to_bytes(8, "big") + block[8:]
                h.update(chunk)
                f.write(chunk)
        closed = time.time()
        done = await wait_identical(mirror.targets, {f"{scope}/big.bin": h.hexdigest()})
    out: dict[str, float | str] = {"seconds": done - closed, "partial": len(sampler.bad), "samples": sampler.samples,
                                   "partial_seen": ", ".join(f"{size} B" for _, _, size in sorted(sampler.bad)[:4])}
    if isinstance(mirror, DlopboxMirror):
        # One curl per slave at once (the slaves share this machine's cores and disk), best of three:
        # the floor is what the machine can do, not its worst moment. The second floor also hashes
        # what it receives (OpenSSL's SHA-256, as fast as Python's hashlib), as a slave must.
        url = mirror.nginx.url + f"{scope}/big.bin"
        out["curl_floor"] = _floor(mirror, "curl -sf -o {out} {url}", url)
        out["verified_floor"] = _floor(mirror, "set -o pipefail; curl -sf {url} | tee {out} | openssl dgst -sha256", url)
    probe = ProcessProbe({n: p for n, p in mirror.pids().items() if n.startswith("client")})
    rss = [s.peak_rss_kib / 1024 for s in probe.samples()]
    out["client_rss_mib"] = max(rss) if rss else float("nan")
    return out


def _floor(mirror: DlopboxMirror, command: str, url: str) -> float:
    """Best of three runs of ``command``, once per slave at once, each into its own file."""
    dests = [mirror.workdir / f"floor-{i}.bin" for i in range(len(mirror.targets))]
    times = []
    for _ in range(3):
        start = time.monotonic()
        runs = [subprocess.Popen(["bash", "-c", command.format(out=d, url=url)], stdout=subprocess.DEVNULL)
                for d in dests]
        if any(r.wait() != 0 for r in runs):
            raise RuntimeError(f"the W3 floor command failed: {command}")
        times.append(time.monotonic() - start)
        for d in dests:
            d.unlink()
    return min(times)


async def w4(mirror: Mirror) -> tuple[float, int]:
    scope = f"w4-{time.time_ns()}"
    (mirror.master / scope).mkdir()
    await asyncio.sleep(0.2)
    chunks = [os.urandom(CHUNK) for _ in range(50)]
    prefixes = set()
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
        prefixes.add(h.copy().hexdigest())
    valid = lambda rel, path: path.stat().st_size % CHUNK == 0 and digest(path) in prefixes  # noqa: E731
    with PartialSampler(mirror.targets, scope, valid) as sampler:
        for c in chunks:
            with open(mirror.master / scope / "log.txt", "ab") as f:
                f.write(c)
        closed = time.time()
        done = await wait_identical(mirror.targets, {f"{scope}/log.txt": h.hexdigest()})
    return done - closed, len(sampler.bad)


async def w5(mirror: Mirror) -> tuple[float, int]:
    scope = f"w5-{time.time_ns()}"
    expected: dict[str, str | None] = {}
    for sub in ("moveme", "deleteme"):
        (mirror.master / scope / sub).mkdir(parents=True)
        for i in range(100):
            data = os.urandom(CHUNK)
            (mirror.master / scope / sub / f"f{i:03d}").write_bytes(data)
            expected[f"{scope}/{sub}/f{i:03d}"] = hashlib.sha256(data).hexdigest()
    await wait_identical(mirror.targets, expected)
    final: dict[str, str | None] = {}
    for rel, d in expected.items():
        if "/moveme/" in rel:
            final[rel] = None
            final[rel.replace("/moveme/", "/moved/")] = d
        else:
            final[rel] = None
    good = {d for d in expected.values()}
    valid = lambda rel, path: digest(path) in good  # noqa: E731
    with PartialSampler(mirror.targets, scope, valid) as sampler:
        os.rename(mirror.master / scope / "moveme", mirror.master / scope / "moved")
        for i in range(100):
            (mirror.master / scope / "deleteme" / f"f{i:03d}").unlink()
        closed = time.time()
        done = await wait_identical(mirror.targets, final)
    return done - closed, len(sampler.bad)


BIG = 256 * 2**20
MiB = 2**20


async def timed_change(mirror: Mirror, change: Callable[[], None], rel: str) -> tuple[float, list[int]]:
    """Run ``change``; the time from its end until every slave has the file, and the bytes each slave received."""
    before = mirror.received()
    await asyncio.to_thread(os.sync)  # the previous workload's writeback (1 GiB for 4 slaves) does not land on this one
    await asyncio.to_thread(change)
    closed = time.time()
    done = await wait_stat_then_digest(mirror.targets, mirror.master / rel, rel)
    await asyncio.sleep(1.0)  # nginx logs a request once answered, rsync a file once transferred
    return done - closed, [a - b for a, b in zip(mirror.received(), before)]


async def wait_stat_then_digest(targets: list[Path], master: Path, rel: str, timeout: float = 600) -> float:
    """When the last slave showed the master's size and mtime under ``rel`` (both systems copy the
    mtime), checked by digest once all have: hashing 256 MiB per slave while polling would delay
    the moment the next slave is seen by as much."""
    st = master.stat()
    want = asyncio.ensure_future(asyncio.to_thread(digest, master))
    seen: dict[Path, float] = {}
    deadline = time.monotonic() + timeout
    while True:
        for target in targets:
            if target in seen:
                continue
            try:
                got = (target / rel).stat()
            except FileNotFoundError:
                continue
            if (got.st_size, got.st_mtime_ns) == (st.st_size, st.st_mtime_ns):
                seen[target] = time.time()
        if len(seen) == len(targets):
            wrong = [t for t in targets if await asyncio.to_thread(digest, t / rel) != await want]
            if not wrong:
                return max(seen.values())
            for target in wrong:
                del seen[target]  # the right stat, other bytes: wait for its next version
        if time.monotonic() > deadline:
            raise TimeoutError(f"{rel} never converged on {sorted(set(targets) - set(seen))}")
        await asyncio.sleep(0.002)


def _write_big(path: Path) -> str:
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for i in range(BIG // MiB):
            f.write(i.to_bytes(8, "big") + block[8:])
    return digest(path)


def _overwrite_middle(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(BIG // 2)
        f.write(os.urandom(MiB))


def _append(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(os.urandom(MiB))


def _copy(src: Path, dst: Path) -> None:
    subprocess.run(["cp", str(src), str(dst)], check=True)


def _sparse(path: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(BIG)
        f.seek(100 * MiB)
        f.write(os.urandom(MiB))


async def w6_to_w9(mirror: Mirror) -> dict[str, tuple[float, list[int]]]:
    """W6-W9 on one 256 MiB file (written and synced first, untimed); W9's extra is the bytes on disk per slave."""
    scope = f"delta-{time.time_ns()}"
    (mirror.master / scope).mkdir()
    big, rel = mirror.master / scope / "big.bin", f"{scope}/big.bin"
    await wait_identical(mirror.targets, {rel: await asyncio.to_thread(_write_big, big)})
    await asyncio.sleep(1.5)  # rsync's quick check sees mtimes to the second
    out = {"W6": await timed_change(mirror, lambda: _overwrite_middle(big), rel)}
    await asyncio.sleep(1.5)
    out["W7"] = await timed_change(mirror, lambda: _append(big), rel)
    out["W8"] = await timed_change(mirror, lambda: _copy(big, big.with_name("copy.bin")), f"{scope}/copy.bin")
    out["W9"] = await timed_change(mirror, lambda: _sparse(big.with_name("sparse.img")), f"{scope}/sparse.img")
    out["W9 disk"] = (0.0, [(t / scope / "sparse.img").stat().st_blocks * 512 for t in mirror.targets])
    return out


#: The machine's load average as each configuration started (other work on it skews every number).
LOAD: list[str] = []


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def create_cost(directory: Path, files: int = 200) -> str:
    """Median and p99 time of an O_CREAT in a new directory beside the master and slaves.

    This VM's ext4 has no journal, and without one a new inode skips every inode of its block
    group deleted in the last 1-6 minutes, each skip a lookup (the kernel's recently_deleted):
    after a large rm -rf a create took 0.4-1.2 ms instead of 15-25 us, and every workload here
    creates each file in the master and in each slave. The probe's files stay: deleting them
    would slow the very creates it measures.
    """
    directory.mkdir()
    times = []
    for i in range(files):
        start = time.perf_counter()
        os.close(os.open(directory / str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        times.append(time.perf_counter() - start)
    times.sort()
    return f"O_CREAT median {times[files // 2] * 1e6:.0f} us, p99 {times[int(files * 0.99)] * 1e6:.0f} us"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


DELTA_TITLES = {"W6": "W6 1 MiB overwritten mid 256 MiB, {clients} slaves", "W7": "W7 1 MiB appended to 256 MiB",
                "W8": "W8 cp of a 256 MiB file", "W9": "W9 256 MiB sparse, 1 MiB data"}
DELTA_TARGETS = {"W6": ("≤ 0.2 × lsyncd", "≤ 2 MiB"), "W7": ("≤ 0.2 × lsyncd", "≤ 2 MiB"),
                 "W8": ("≤ 0.3 × lsyncd", "0 from nginx"), "W9": ("", "")}


async def bench(kinds: list[str], scaling: list[int], main_clients: int, workdir: Path,
                delta_workloads: bool = True, classic: bool = True, network: bool = False) -> list[Measure]:
    measures: dict[tuple[str, str], Measure] = {}

    def put(workload: str, metric: str, unit: str, kind: str, value: float, target: str = "") -> None:
        m = measures.setdefault((workload, metric), Measure(workload, metric, unit, target=target))
        m.values[kind] = round(value, 4)

    for clients in sorted(set(scaling if classic else []) | {main_clients}):
        for kind in kinds:
            if kind == "lsyncd-delta" and clients != main_clients:
                continue  # rsync's delta algorithm only matters for W6-W9
            path = workdir / f"{kind}-{clients}"
            mirror = (DlopboxMirror(path, clients) if kind == "dlopbox"
                      else LsyncdMirror(path, clients, kind == "lsyncd-delta", network))
            os.sync()  # what the previous configuration wrote does not land on this one
            conditions = f"load average {loadavg()}; {create_cost(workdir / f'create-probe-{kind}-{clients}')}"
            print(f"== {kind} with {clients} slave(s); {conditions}", flush=True)
            LOAD.append(f"{kind}, {clients} slave(s): {conditions}")
            try:
                await asyncio.to_thread(mirror.start)  # blocking probes, some of which run their own loop
                if clients == main_clients and delta_workloads:
                    for name, (seconds, received) in (await w6_to_w9(mirror)).items():
                        title = DELTA_TITLES[name.split()[0]].format(clients=clients)
                        if name == "W9 disk":
                            put(title, "on disk per slave (max)", "MiB", kind, max(received) / MiB, "≤ 2 MiB")
                            continue
                        put(title, "time to converge", "s", kind, seconds, DELTA_TARGETS[name][0])
                        put(title, "received per slave (max)", "MiB", kind, max(received) / MiB, DELTA_TARGETS[name][1])
                if kind == "lsyncd-delta" or not classic:
                    continue
                lat = await w1(mirror)
                put(f"W1 latency, {clients} slave(s)", "p50", "ms", kind, statistics.median(lat),
                    "≤ 10 ms" if clients == 1 else "")
                put(f"W1 latency, {clients} slave(s)", "p99", "ms", kind, pct(lat, 0.99), "≤ 50 ms" if clients == 1 else "")
                seconds, corrupt = await w2(mirror)
                put(f"W2 burst 1,000 x 4 KiB, {clients} slave(s)", "time", "s", kind, seconds, "≤ 0.5 × lsyncd")
                if clients == main_clients:
                    r3 = await w3(mirror)
                    put("W3 256 MiB file", "time", "s", kind, r3["seconds"], "≤ 1.2 × curl floor")
                    put("W3 256 MiB file", "partial files seen", "files", kind, r3["partial"], "0")
                    if r3["partial_seen"]:
                        measures[("W3 256 MiB file", "partial files seen")].note += f"{kind}: {r3['partial_seen']}. "
                    put("W3 256 MiB file", "client peak RSS", "MiB", kind, r3["client_rss_mib"], "≤ 64 MiB")
                    if "curl_floor" in r3:
                        put("W3 256 MiB file", "curl floor", "s", kind, r3["curl_floor"])
                        put("W3 256 MiB file", "curl + SHA-256 floor", "s", kind, r3["verified_floor"])
                    seconds, bad = await w4(mirror)
                    put("W4 50 appends", "time to converge", "s", kind, seconds, "≤ lsyncd")
                    put("W4 50 appends", "partial files seen", "files", kind, bad, "0")
                    seconds, bad = await w5(mirror)
                    put("W5 rename dir of 100 + delete 100", "time to converge", "s", kind, seconds, "≤ lsyncd")
                    put("W5 rename dir of 100 + delete 100", "partial files seen", "files", kind, bad, "0")
            finally:
                await asyncio.to_thread(mirror.stop)
    large, floor = measures.get(("W3 256 MiB file", "time")), measures.get(("W3 256 MiB file", "curl floor"))
    if large and floor and "dlopbox" in floor.values:
        for kind, seconds in large.values.items():  # the same file from the same disk: one floor for both
            put("W3 256 MiB file", "time ÷ curl floor", "×", kind, seconds / floor.values["dlopbox"], "≤ 1.2")
    verified = measures.get(("W3 256 MiB file", "curl + SHA-256 floor"))
    if large and verified and "dlopbox" in verified.values:
        for kind, seconds in large.values.items():
            put("W3 256 MiB file", "time ÷ curl + SHA-256 floor", "×", kind, seconds / verified.values["dlopbox"])
    return list(measures.values())


#: Set in the bench re-run inside its namespace: the link it runs over.
LINK_ENV = "DLOPBOX_BENCH_LINK"


def on_link(rate: str, argv: list[str]) -> int:
    """Re-run this bench in a network namespace whose loopback is shaped to ``rate``: between machines,
    the bytes each system sends cost time, which a local copy at memory speed hides."""
    namespace = f"dlopbox-bench-{os.getpid()}"
    inside = ["ip", "netns", "exec", namespace]
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        subprocess.run([*inside, "ip", "link", "set", "lo", "up"], check=True)
        # burst: at least rate / HZ (tbf refuses less); latency bounds the queue, as a switch's buffer would.
        subprocess.run([*inside, "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", rate,
                        "burst", "1mb", "latency", "50ms"], check=True)
        return subprocess.run([*inside, sys.executable, *argv], env={**os.environ, LINK_ENV: rate}).returncode
    finally:
        subprocess.run(["ip", "netns", "del", namespace], check=False)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))) // 1024 // 1024
    lsyncd = subprocess.run(["lsyncd", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    rsync = subprocess.run(["rsync", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return (f"{os.cpu_count()} cores ({cpu}), {mem} GiB RAM, Linux {platform.release()}, "
            f"Python {platform.python_version()}, lsyncd {lsyncd.split()[-1]}, rsync {rsync.split()[2]}")


def _fmt(value: float | None, unit: str) -> str:
    if value is None or value != value:  # absent, or NaN (lsyncd has no client process)
        return "—"
    digits = {"ms": ".1f", "MiB": ".1f", "s": ".3f", "×": ".2f"}.get(unit, "g")
    return f"{value:{digits}} {unit}"


def table(measures: list[Measure]) -> str:
    rows = ["| workload | metric | dlopbox | lsyncd | lsyncd --no-whole-file | dlopbox / lsyncd | target |",
            "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for m in measures:
        d, lsy, delta = m.values.get("dlopbox"), m.values.get("lsyncd"), m.values.get("lsyncd-delta")
        ratio = f"{d / lsy:.2f}" if d is not None and lsy and lsy == lsy else "—"
        rows.append(f"| {m.workload} | {m.metric} | {_fmt(d, m.unit)} | {_fmt(lsy, m.unit)} | {_fmt(delta, m.unit)} "
                    f"| {ratio} | {m.target} |")
    notes = [f"- {m.workload}, {m.metric}: {m.note.strip()}" for m in measures if m.note]
    return "\n".join(rows + ([""] + notes if notes else []))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["dlopbox", "lsyncd", "lsyncd-delta"], help="Run one system only.")
    parser.add_argument("--no-delta", action="store_true", help="Skip W6-W9.")
    parser.add_argument("--delta-only", action="store_true", help="Run W6-W9 only.")
    parser.add_argument("--scaling", type=int, nargs="+", default=[1, 4, 16], help="Slave counts for W1/W2.")
    parser.add_argument("--clients", type=int, default=4, help="Slaves for W3-W5 (default 4).")
    parser.add_argument("--link", metavar="RATE",
                        help="Run over a link of this rate shared by every slave (tc's units: 1gbit, 100mbit), "
                             "lsyncd through an rsync daemon; needs root and iproute2.")
    parser.add_argument("--report", type=Path, help="Write the Markdown report here.")
    parser.add_argument("--json", type=Path, help="Write raw measures as JSON here.")
    args = parser.parse_args()
    if args.link and os.environ.get(LINK_ENV) != args.link:
        return on_link(args.link, sys.argv)
    kinds = [args.only] if args.only else ["dlopbox", "lsyncd", "lsyncd-delta"]
    with tempfile.TemporaryDirectory(prefix="dlopbox-bench-") as tmp:
        measures = asyncio.run(bench(kinds, args.scaling, args.clients, Path(tmp), not args.no_delta,
                                     not args.delta_only, network=bool(args.link)))
    text = table(measures)
    print(text)
    for path in (args.json, args.report):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
    if args.json:
        args.json.write_text(json.dumps([m.__dict__ for m in measures], indent=2))
    if args.report:
        load = "\n".join(f"- {line}" for line in LOAD)
        link = (f"Link: every byte between the processes crosses one {args.link} link (tbf on the loopback of a "
                f"network namespace of the bench's own), shared by the slaves as a master's uplink is; lsyncd's "
                f"rsync sends to an rsync daemon over it.\n\n" if args.link else "")
        args.report.write_text(f"# dlopbox vs lsyncd, {time.strftime('%Y-%m-%d')}\n\nMachine: {machine()}\n\n"
                               f"Command: `tests/bench/run {' '.join(sys.argv[1:])}`\n\n{link}{text}\n\n"
                               f"W1 runs 20 trials, so its p99 is the slowest trial. Load average (1, 5, 15 min) "
                               f"and the cost of creating a file beside its directories as each configuration started:\n\n{load}\n")
    return 0


if __name__ == "__main__":
    if shutil.which("lsyncd") is None:
        sys.exit("lsyncd is not installed: run tests/bench/run, which installs it")
    sys.exit(main())
