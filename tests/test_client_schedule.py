"""PathScheduler: related paths in seq order, unrelated ones in parallel, bounded pending jobs."""

from __future__ import annotations

import asyncio

from dlopbox.client.schedule import PathScheduler
from dlopbox.events import Event, Op


def write(path: str, seq: int) -> Event:
    return Event(Op.WRITE, path, size=1, mtime_ns=0, mode=0o644, digest="0" * 64, seq=seq)


class Recorder:
    """Jobs that block until released, recording when each starts and ends."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.gates: dict[int, asyncio.Event] = {}

    def job(self, gate: bool = False):
        async def run(job) -> None:
            seq = job.event.seq
            self.log.append(f"start {seq}")
            if gate:
                self.gates[seq] = asyncio.Event()
                await self.gates[seq].wait()
            self.log.append(f"end {seq}")
        return run


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_one_path_in_order_other_paths_in_parallel():
    s, r = PathScheduler(), Recorder()
    await s.submit(write("a", 1), r.job(gate=True))
    await s.submit(write("b", 2), r.job(gate=True))
    await s.submit(write("a", 3), r.job())
    await settle()
    assert r.log == ["start 1", "start 2"]  # b overlaps a; the second write of a waits
    r.gates[2].set()
    await settle()
    assert "start 3" not in r.log
    r.gates[1].set()
    await s.drain()
    assert r.log.index("end 1") < r.log.index("start 3")


async def test_directory_move_waits_for_work_below_and_a_write_waits_for_its_parents_move():
    s, r = PathScheduler(), Recorder()
    await s.submit(write("d/sub/f", 1), r.job(gate=True))
    await s.submit(write("other", 2), r.job())
    await s.submit(Event(Op.MOVE, "d", dest="e", is_dir=True, seq=3), r.job(gate=True))
    await s.submit(write("e/g", 4), r.job())
    await settle()
    assert r.log == ["start 1", "start 2", "end 2"]
    r.gates[1].set()
    await settle()
    assert r.log[-1] == "start 3" and "start 4" not in r.log
    r.gates[3].set()
    await s.drain()
    assert r.log[-2:] == ["start 4", "end 4"]


async def test_pending_jobs_are_bounded():
    s, r = PathScheduler(max_jobs=2), Recorder()
    await s.submit(write("x", 1), r.job(gate=True))
    await s.submit(Event(Op.MOVE, "x", dest="y", seq=2), r.job())
    third = asyncio.create_task(s.submit(write("z", 3), r.job()))
    await settle()
    assert not third.done()  # two jobs pending: the third waits for a slot
    r.gates[1].set()
    await third
    await s.drain()
    assert r.log[:2] == ["start 1", "end 1"] and sorted(r.log[2:]) == ["end 2", "end 3", "start 2", "start 3"]


async def test_news_wakes_a_waiter_when_a_later_event_touches_its_path():
    s, r = PathScheduler(), Recorder()
    waiting = asyncio.create_task(s.wait_for_news("dir/f", 30))
    await settle()
    await s.submit(write("dir/other", 1), r.job())
    await settle()
    assert not waiting.done()
    await s.submit(Event(Op.MOVE, "dir", dest="dir2", is_dir=True, seq=2), r.job())
    await asyncio.wait_for(waiting, 1)
    await s.drain()
