"""Ordering with parallelism: events run concurrently unless their paths are related.

Two events are related when a path of one is the same as, or lies below, a path of the
other. A job starts only after every earlier related job has finished, so events for one
path apply in seq order, a write waits for the move or mkdir of its parent, and a
directory's move, rmdir or chmod waits for all work below it; unrelated paths (downloads,
mostly) overlap freely. Jobs are submitted in seq order, and at most ``max_jobs`` wait at
once, which bounds memory however large the backlog.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable

from ..events import Event, Op
from ..paths import ancestors, is_within


class Job:
    __slots__ = ("event", "order", "task")

    def __init__(self, event: Event, order: int) -> None:
        self.event = event
        self.order = order
        self.task: asyncio.Task[None] | None = None


class PathScheduler:
    def __init__(self, max_jobs: int = 1024) -> None:
        self._by_path: dict[str, dict[int, Job]] = {}
        self._below: Counter[str] = Counter()  # pending jobs strictly below each directory
        self._slots = asyncio.Semaphore(max_jobs)
        self._jobs: set[Job] = set()
        self._order = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._listeners: dict[str, set[asyncio.Future[None]]] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    async def submit(self, event: Event, run: Callable[[Job], Awaitable[None]]) -> None:
        """Start ``run(job)`` once every earlier related job is done; waits while too many are pending."""
        await self._slots.acquire()
        self._order += 1
        job = Job(event, self._order)
        deps = self._related(event.paths())
        self._register(job)
        job.task = asyncio.get_running_loop().create_task(self._run(job, deps, run), name=f"apply-{event.seq}")
        if self._listeners:
            self._notify(event)

    def busy(self, path: str) -> bool:
        """Whether a job pending here touches ``path``, an ancestor of it, or something below it."""
        if not self._jobs:
            return False
        return self._below.get(path, 0) > 0 or any(p in self._by_path for p in (path, *ancestors(path)))

    async def wait_for_news(self, path: str, timeout: float) -> None:
        """Sleep up to ``timeout``, less if an event touching ``path`` or an ancestor is submitted meanwhile."""
        news = asyncio.get_running_loop().create_future()
        self._listeners.setdefault(path, set()).add(news)
        try:
            await asyncio.wait([news], timeout=timeout)
        finally:
            listeners = self._listeners.get(path)
            if listeners is not None:
                listeners.discard(news)
                if not listeners:
                    del self._listeners[path]

    def _notify(self, event: Event) -> None:
        for path in event.paths():
            woken = [p for p in self._listeners if is_within(p, path)] if event.is_dir or event.op in (
                Op.MOVE, Op.RMDIR) else [path]
            for p in woken:
                for news in self._listeners.get(p, ()):
                    if not news.done():
                        news.set_result(None)

    async def _run(self, job: Job, deps: set[Job], run: Callable[[Job], Awaitable[None]]) -> None:
        try:
            waits = [d.task for d in deps if d.task is not None and not d.task.done()]
            if waits:
                await asyncio.wait(waits)
            await run(job)
        finally:
            self._unregister(job)
            self._slots.release()

    async def drain(self) -> None:
        """Wait until every submitted job has finished."""
        await self._idle.wait()

    async def cancel(self) -> None:
        """Cancel every pending job and wait for their clean-up (temp files removed)."""
        tasks = [j.task for j in self._jobs if j.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def _related(self, paths: tuple[str, ...]) -> set[Job]:
        deps: set[Job] = set()
        for path in paths:
            for p in (path, *ancestors(path)):
                deps.update(self._by_path.get(p, {}).values())
            if self._below[path] > 0:
                prefix = path + "/"
                for p, jobs in self._by_path.items():
                    if p.startswith(prefix):
                        deps.update(jobs.values())
        return deps

    def _register(self, job: Job) -> None:
        self._jobs.add(job)
        self._idle.clear()
        for path in set(job.event.paths()):
            self._by_path.setdefault(path, {})[job.order] = job
            for a in ancestors(path):
                self._below[a] += 1

    def _unregister(self, job: Job) -> None:
        self._jobs.discard(job)
        for path in set(job.event.paths()):
            jobs = self._by_path.get(path)
            if jobs is not None:
                jobs.pop(job.order, None)
                if not jobs:
                    del self._by_path[path]
            for a in ancestors(path):
                self._below[a] -= 1
                if self._below[a] <= 0:
                    del self._below[a]
        if not self._jobs:
            self._idle.set()
