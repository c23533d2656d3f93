"""CPU-seconds of each dlopbox process per W2 burst (1,000 x 4 KiB), one slave: the A/B probe for small files.

Run it from the checkout to measure (``python -m dlopbox`` is started from the working directory):

    .venv/bin/python tests/bench/w2_cpu.py [--py-spy OUT.txt]

With ``--py-spy`` the client is sampled at 200 Hz into a collapsed-stack file (py-spy must be installed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())
from tests.bench.bench import w2
from tests.bench.mirrors import DlopboxMirror


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def main(workdir: Path, bursts: int, spy: str | None) -> None:
    mirror = DlopboxMirror(workdir / f"w2-cpu-{time.time_ns()}", 1)
    await asyncio.to_thread(mirror.start)
    try:
        await w2(mirror)  # warm-up
        pids = mirror.pids()
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        sampler = None
        if spy:
            sampler = await asyncio.to_thread(subprocess.Popen, ["py-spy", "record", "-p", str(pids["client0"]), "-o", spy, "-f", "raw",
                                              "-r", "200", "--nonblocking"],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times = [(await w2(mirror))[0] for _ in range(bursts)]
        if sampler is not None:
            sampler.send_signal(2)
            await asyncio.to_thread(sampler.wait)
        after = {name: cpu_seconds(pid) for name, pid in pids.items()}
        print("burst times (s):", [round(t, 3) for t in times])
        print("CPU-s per burst:", {name: round((after[name] - before[name]) / bursts, 3) for name in pids})
    finally:
        await asyncio.to_thread(mirror.stop)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp"))
    parser.add_argument("--py-spy", dest="spy", help="Sample the client into this collapsed-stack file.")
    args = parser.parse_args()
    asyncio.run(main(args.workdir, args.bursts, args.spy))
