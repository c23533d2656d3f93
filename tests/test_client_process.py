"""The client as a real process (`python -m dlopbox client`): big files, memory, kills, SIGTERM.

Real RabbitMQ and nginx; the interface's read side is the test double of tests/fake_interface.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from dlopbox.client.state import load_state
from tests.support.client_harness import (
    BIG,
    RSS_LIMIT_KIB,
    ClientProcess,
    FinalNameSampler,
    client_settings,
    leftovers,
    temp_files,
    wait_equal,
    write_big,
)
from tests.support.fake_interface import FakeMaster
from tests.support.polling import eventually


@pytest.fixture
def process(rabbit, nginx, shared_dir, upstream, client_queues, tmp_path):
    started: list[ClientProcess] = []

    def make(target: Path, index: int = 0) -> ClientProcess:
        settings = client_settings(rabbit, nginx, shared_dir, upstream.interface.url, upstream.interface.token,
                                   client_queues[index], target)
        proc = ClientProcess(settings, tmp_path / f"client{index}.log")
        started.append(proc)
        return proc

    yield make
    for proc in started:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait()


def _mtime_ns(path: Path) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return None


async def _timed(*argv: str) -> float:
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(*argv)
    assert await proc.wait() == 0
    return time.monotonic() - started


async def test_200_mib_file_streams_in_bounded_memory_and_never_shows_partially(
        upstream: FakeMaster, process, shared_dir, tmp_path, nginx):
    m = upstream
    slave = tmp_path / "slave"
    client = process(slave)
    client.start()
    await eventually(lambda: load_state(slave) is not None, 60, "the first sync")

    first = await asyncio.to_thread(write_big, shared_dir / "big.bin", BIG, b"v1")
    sampler = FinalNameSampler(slave / "big.bin", {first.digest: BIG})
    sampler.start()
    started = time.monotonic()
    await m.publish(first)
    await eventually(lambda: _mtime_ns(slave / "big.bin") == first.mtime_ns, 120, "the download", interval=0.005)
    client_seconds = time.monotonic() - started  # publish -> consumed, streamed, hashed, fsync'd, renamed
    await wait_equal(shared_dir, slave, timeout=120)

    # A rewrite: the old version stays whole under the final name until the new one replaces it.
    second = await asyncio.to_thread(write_big, shared_dir / "big.bin", BIG, b"v2")
    sampler.versions[second.digest] = BIG
    await m.publish(second)
    await wait_equal(shared_dir, slave, timeout=120)
    sampler.stop.set()
    sampler.join()
    rss_kib = client.peak_rss_kib()

    url = nginx.url + f"{shared_dir.name}/big.bin"
    curl_null = await _timed("curl", "-sS", "-o", "/dev/null", url)
    curl_file = await _timed("sh", "-c", f"curl -sS -o '{tmp_path}/curl.bin' '{url}' && sync '{tmp_path}/curl.bin'")
    print(f"\n200 MiB: client {client_seconds:.2f}s from publish to verified, fsync'd and renamed "
          f"({BIG / client_seconds / 1048576:.0f} MiB/s); curl to a file + sync {curl_file:.2f}s "
          f"({BIG / curl_file / 1048576:.0f} MiB/s); curl to /dev/null {curl_null:.2f}s "
          f"({BIG / curl_null / 1048576:.0f} MiB/s); client peak RSS (VmHWM) {rss_kib / 1024:.1f} MiB; "
          f"{sampler.samples} samples of the final name, {sampler.hashed} hashed whole")

    started = time.monotonic()
    assert await client.stopped() == 0
    assert time.monotonic() - started < 10
    assert sampler.bad == [], sampler.bad
    assert sampler.samples > 0
    assert rss_kib < RSS_LIMIT_KIB, f"peak RSS {rss_kib} KiB"


async def test_sigkill_mid_download_then_restart_leaves_no_partial_or_temp_file(
        upstream: FakeMaster, process, shared_dir, tmp_path):
    m = upstream
    slave = tmp_path / "slave"
    client = process(slave)
    client.start()
    await eventually(lambda: load_state(slave) is not None, 60, "the first sync")
    event = await asyncio.to_thread(write_big, shared_dir / "big.bin", BIG, b"kill")
    await m.publish(event, m.write("small-after", b"queued behind it"))
    await eventually(lambda: temp_files(slave), 60, "the download to start", interval=0.005)
    client.signal(signal.SIGKILL)
    await client.exited(10)
    assert not (slave / "big.bin").exists(), "a partial file under its final name"
    seq_before = load_state(slave).seq

    client.start()
    await wait_equal(shared_dir, slave, timeout=120)
    assert await client.stopped() == 0
    assert leftovers(slave) == []
    assert load_state(slave).seq == m.interface.head > seq_before


async def test_sigterm_mid_download_stops_within_seconds_and_resumes(upstream: FakeMaster, process, shared_dir,
                                                                     tmp_path):
    m = upstream
    slave = tmp_path / "slave"
    client = process(slave)
    client.start()
    await eventually(lambda: load_state(slave) is not None, 60, "the first sync")
    event = await asyncio.to_thread(write_big, shared_dir / "big.bin", BIG, b"term")
    await m.publish(event)
    await eventually(lambda: temp_files(slave), 60, "the download to start", interval=0.005)
    started = time.monotonic()
    client.signal(signal.SIGTERM)
    assert await client.exited(10) == 0
    assert time.monotonic() - started < 5
    assert leftovers(slave) == [], "an abandoned download's temp file was left behind"
    assert "stopped at seq" in client.log()

    client.start()
    # The first process may have finished the file within its shutdown grace: then the slave is
    # already equal, so wait for the second one to be up before stopping it.
    await eventually(lambda: client.log().count(": queue ") == 2, 60, "the restarted client to consume its queue")
    await wait_equal(shared_dir, slave, timeout=120)
    assert await client.stopped() == 0
    assert load_state(slave).seq == m.interface.head


async def test_a_backlog_of_10000_events_is_consumed_in_bounded_memory(upstream: FakeMaster, process, shared_dir,
                                                                        tmp_path):
    m = upstream
    slave = tmp_path / "slave"
    client = process(slave)
    client.start()
    await eventually(lambda: load_state(slave) is not None, 60, "the first sync")
    assert await client.stopped() == 0

    def make_files() -> list:
        events = [m.mkdir(f"d{d}") for d in range(20)]
        return events + [m.write(f"d{i % 20}/{i}.txt", os.urandom(512)) for i in range(10_000 - 20)]
    events = await asyncio.to_thread(make_files)
    await m.publish_each(events, per_message=1000)  # the watcher's largest batches

    started = time.monotonic()
    client.start()
    head = m.interface.head
    await eventually(lambda: (load_state(slave).seq or 0) >= head, 240, "the backlog", interval=0.1)
    seconds = time.monotonic() - started
    await wait_equal(shared_dir, slave, timeout=60)
    rss_kib = client.peak_rss_kib()
    print(f"\nbacklog of 10,000 events: consumed in {seconds:.1f}s ({10_000 / seconds:.0f} files/s); "
          f"peak RSS {rss_kib / 1024:.1f} MiB")
    assert await client.stopped() == 0
    assert rss_kib < RSS_LIMIT_KIB, f"peak RSS {rss_kib} KiB"
