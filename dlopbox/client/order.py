"""Ordering: each batch's events go to the PathScheduler in seq order, and each one's outcome is accounted for.

A message that does not follow the last seq dispatched is held briefly (redeliveries may
arrive out of order); past the gap's deadline, the client repairs it from the manifest.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections import deque

from aio_pika.abc import AbstractIncomingMessage

from ..events import Batch, Event
from ..paths import UnsafePathError
from .acks import Acks
from .apply import Applier, Outcome, Unexplained
from .fate import ResyncRequest, UnexplainedWrites
from .schedule import Job, PathScheduler

log = logging.getLogger(__name__)

#: Seconds a message following a gap is held, waiting for the missing one, before resyncing.
GAP_WAIT = 2.0
MAX_GAP_WAIT = 60.0


class JobRunner:
    """Applies one scheduled event and accounts for how it ended: applied, skipped, or a resync to ask for."""

    def __init__(self, applier: Applier, acks: Acks, unexplained: UnexplainedWrites,
                 request_resync: ResyncRequest) -> None:
        self.applier = applier
        self.acks = acks
        self.unexplained = unexplained
        self.request_resync = request_resync

    async def run(self, job: Job) -> None:
        event = job.event
        assert event.seq is not None
        try:
            outcome = await self.applier.apply(event)
        except Unexplained as exc:
            self.unexplained.watch(exc.path, event.seq)
            outcome = Outcome.SKIPPED
        except UnsafePathError as exc:
            log.error("REFUSED seq %d %s %r%s: %s", event.seq, event.op, event.path,
                      f" -> {event.dest!r}" if event.dest else "", exc)
            outcome = Outcome.RESYNC
        except OSError as exc:
            log.error("seq %d: cannot %s %r: %s", event.seq, event.op, event.path, exc)
            outcome = Outcome.RESYNC
        except Exception:
            log.exception("seq %d: failed to %s %r", event.seq, event.op, event.path)
            outcome = Outcome.RESYNC
        if outcome is Outcome.RESYNC:
            self.request_resync(event.seq)
        self.acks.complete(event.seq)


class Sequencer:
    """Dispatches batches in seq order; holds those past a gap until it is filled or its deadline passes."""

    def __init__(self, scheduler: PathScheduler, runner: JobRunner, acks: Acks, recent: deque[Event],
                 unexplained: UnexplainedWrites, prefetch: int) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.acks = acks
        self.recent = recent  # the FateFinder's: every event dispatched joins it
        self.unexplained = unexplained
        self.prefetch = prefetch
        self.dispatched = acks.applied  # every seq <= dispatched is in the scheduler, applied, or in a manifest
        self._held: list[tuple[int, int, Batch, AbstractIncomingMessage]] = []  # heap by first_seq
        self._counter = itertools.count()
        self.gap_deadline: float | None = None  # loop time past which a gap is repaired from the manifest
        self._gap_wait = GAP_WAIT

    @property
    def first_held(self) -> int:
        return self._held[0][0]

    async def offer(self, batch: Batch, message: AbstractIncomingMessage) -> None:
        """Dispatch a message's batch, hold it past a gap, or ack it when it brings nothing new."""
        assert batch.first_seq is not None and batch.last_seq is not None
        if batch.last_seq <= self.dispatched:
            self.acks.ack_later(batch.last_seq, message)  # a redelivery, or already in a manifest
        elif batch.first_seq > self.dispatched + 1:
            heapq.heappush(self._held, (batch.first_seq, next(self._counter), batch, message))
            if self.gap_deadline is None:
                self.gap_deadline = asyncio.get_running_loop().time() + self._gap_wait
            if len(self._held) >= self.prefetch:
                self.gap_deadline = asyncio.get_running_loop().time()  # nothing more can arrive
        else:
            await self._dispatch(batch, message)
            self._gap_wait = GAP_WAIT
            await self.release_held()

    async def gap_repaired(self) -> None:
        """A resync covered the gap: dispatch what it held, and wait longer before the next repair."""
        self._gap_wait = min(self._gap_wait * 2, MAX_GAP_WAIT)
        await self.release_held()

    def resynced(self, seq: int) -> None:
        self.dispatched = seq

    async def release_held(self) -> None:
        while self._held and self._held[0][0] <= self.dispatched + 1:
            _, _, batch, message = heapq.heappop(self._held)
            assert batch.last_seq is not None
            if batch.last_seq <= self.dispatched:
                self.acks.ack_later(batch.last_seq, message)
            else:
                await self._dispatch(batch, message)
        self.gap_deadline = asyncio.get_running_loop().time() + self._gap_wait if self._held else None

    async def _dispatch(self, batch: Batch, message: AbstractIncomingMessage) -> None:
        for event in batch.events:
            assert event.seq is not None
            if event.seq <= self.dispatched:
                continue
            if self.unexplained.writes:
                self.unexplained.explained_by(event)
            self.recent.append(event)
            await self.scheduler.submit(event, self.runner.run)
            self.dispatched = event.seq
        assert batch.last_seq is not None
        self.acks.ack_later(batch.last_seq, message)
