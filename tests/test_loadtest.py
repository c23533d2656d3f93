"""The load test measures what it claims: arrivals, latencies, missing and corrupt files."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

from dlopbox.tools.loadtest import loadtest, plot, summary


def mirror(root: Path, target: Path, stop: threading.Event, corrupt: str | None = None) -> None:
    """A crude polling mirror (atomic rename), standing in for a sync tool under test."""
    copied: dict[str, int] = {}
    while not stop.is_set():
        for dirpath, _, files in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            (target / rel).mkdir(parents=True, exist_ok=True)
            for name in files:
                src = Path(dirpath) / name
                key = f"{rel}/{name}"
                size = src.stat().st_size
                if copied.get(key) == size:
                    continue
                data = src.read_bytes()
                if corrupt and name.startswith(corrupt):
                    data = data[::-1]
                tmp = target / rel / f".tmp-{name}"
                tmp.write_bytes(data)
                os.replace(tmp, target / rel / name)
                copied[key] = size
        stop.wait(0.005)


async def run_against_mirrors(tmp_path: Path, corrupt: str | None = None):
    root, targets = tmp_path / "master", [tmp_path / "slave1", tmp_path / "slave2"]
    for d in (root, *targets):
        d.mkdir()
    stop = threading.Event()
    threads = [threading.Thread(target=mirror, args=(root, t, stop, corrupt), daemon=True) for t in targets]
    for t in threads:
        t.start()
    try:
        return await loadtest(root, targets, files=300, size=1000, pids={"test": os.getpid()}, timeout=60)
    finally:
        stop.set()
        for t in threads:
            await asyncio.to_thread(t.join)


async def test_every_file_is_timed_on_every_target(tmp_path):
    result = await run_against_mirrors(tmp_path)
    for target in result.targets:
        assert result.missing[target] == 0
        assert result.corrupt[target] == 0
        lat = result.latency_ms[target]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert len(result.timeline[target]) == 300
    assert result.throughput_files_s > 0
    assert result.processes[0].peak_rss_kib > 0
    text = summary(result)
    assert "missing" in text and "peak RSS" in text
    png = tmp_path / "plot.png"
    plot(result, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_corrupt_copies_are_counted(tmp_path):
    result = await run_against_mirrors(tmp_path, corrupt="f000007")
    assert all(result.corrupt[t] == 1 for t in result.targets)
