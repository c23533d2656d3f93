"""Acknowledging: a message is acked once all its events are applied and a seq covering them is on disk.

A seq on disk covers only durable files: each state write first fsyncs the files installed
since the last one (see :class:`~dlopbox.client.download.Unsynced`). State writes are
coalesced, one per PERSIST_EVERY at most, and the seq reached is reported to the interface.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Callable
from pathlib import Path

from aio_pika.abc import AbstractIncomingMessage

from ..api import InterfaceAPI
from ..errors import AMQP_ERRORS, HTTP_ERRORS
from .download import Unsynced
from .state import ClientState, save_state

log = logging.getLogger(__name__)

REPORT_EVERY = 0.25
#: Seconds between a change and the state write that covers it and everything applied meanwhile (it first
#: fsyncs the files installed since the last one, then writes the seq: two more fsyncs).
PERSIST_EVERY = 0.02


class Acks:
    """The seqs applied, the seq on disk, and the messages waiting for it to cover them."""

    def __init__(self, target: Path, client_id: str, unsynced: Unsynced, state: ClientState | None,
                 before_save: Callable[[], None] | None = None) -> None:
        self.target = target
        self.client_id = client_id
        self.unsynced = unsynced
        #: Blocking, run before each state write: the record of what was installed, written first.
        self.before_save = before_save
        seq = 0 if state is None else state.seq
        self.applied = seq  # every seq <= applied is reflected in the target
        self.persisted = seq  # the seq on disk; messages up to it are acknowledged
        self._done: set[int] = set()  # seqs applied out of order, above ``applied``
        self._hold: int | None = None  # after a failure, nothing past this is persisted until a resync
        self._acks: list[tuple[int, int, AbstractIncomingMessage]] = []  # heap by last_seq
        self._counter = itertools.count()
        self._changed = asyncio.Event()
        self._saved = state is not None  # a state file exists: a restart resumes instead of resyncing
        self._synced = state is not None  # the target reflects some seq (a state was loaded or a resync done)

    def complete(self, seq: int) -> None:
        """The event of ``seq`` is applied (or skipped, or failed with a resync asked for)."""
        self._done.add(seq)
        while self.applied + 1 in self._done:
            self.applied += 1
            self._done.remove(self.applied)
        self._changed.set()

    def ack_later(self, last_seq: int, message: AbstractIncomingMessage) -> None:
        """Ack ``message`` once the seq on disk reaches ``last_seq``."""
        heapq.heappush(self._acks, (last_seq, next(self._counter), message))
        self._changed.set()

    def hold_before(self, failed_seq: int) -> None:
        """Persist nothing from ``failed_seq`` on until a resync has repaired it."""
        self._hold = failed_seq - 1 if self._hold is None else min(self._hold, failed_seq - 1)

    def resynced(self, seq: int) -> int:
        """The target equals a manifest at ``seq``: return the seq it now reflects."""
        self.applied = max(self.applied, seq)
        self._done.clear()
        self._hold = None
        self._synced = True
        self._changed.set()
        return self.applied

    async def persist_loop(self) -> None:
        while True:
            await self._changed.wait()
            # A window, like a batch's: what completes meanwhile shares this write, and the files that
            # other slaves on this disk are fsyncing right now do not wait for our journal commits.
            await asyncio.sleep(PERSIST_EVERY)
            self._changed.clear()
            await self.persist()

    async def persist(self) -> None:
        seq = self.applied if self._hold is None else min(self.applied, self._hold)
        if seq != self.persisted or (not self._saved and self._hold is None and self._synced):
            await asyncio.to_thread(self._save, seq)
            self.persisted = seq
            self._saved = True
        while self._acks and self._acks[0][0] <= self.persisted:
            _, _, message = heapq.heappop(self._acks)
            await ack_or_reject(message.ack())

    def _save(self, seq: int) -> None:
        """The files installed so far made durable, then the seq that claims them (blocking)."""
        self.unsynced.sync()
        if self.before_save is not None:
            self.before_save()
        save_state(self.target, ClientState(self.client_id, seq))


#: The count of local differences standing now, None until it is known (see :mod:`.local`).
DifferenceCount = Callable[[], int | None]


class ProgressReports:
    """Tells the interface the seq on disk and the local differences: every 0.25 s while either moves (the
    dashboard shows them live), and on stop."""

    def __init__(self, api: InterfaceAPI, client_id: str, acks: Acks,
                 differences: DifferenceCount | None = None) -> None:
        self.api = api
        self.client_id = client_id
        self.acks = acks
        self.differences = differences

    async def loop(self) -> None:
        reported: tuple[int, int | None] | None = None
        failing = False
        while True:
            await asyncio.sleep(REPORT_EVERY)
            # Read once: they may move on while the POST is in flight.
            now = (self.acks.persisted, self.differences() if self.differences is not None else None)
            if now == reported:
                continue
            try:
                await self._send(*now)
                reported = now
                failing = False
            except HTTP_ERRORS as exc:
                if not failing:
                    log.warning("cannot report progress to the interface: %s", exc)
                failing = True

    async def final(self) -> None:
        try:
            async with asyncio.timeout(2):
                await self._send(self.acks.persisted, self.differences() if self.differences is not None else None)
        except HTTP_ERRORS as exc:
            log.debug("final progress report failed: %s", exc)

    async def _send(self, seq: int, differences: int | None) -> None:
        if differences is None:
            await self.api.report_progress(self.client_id, seq)
        else:
            await self.api.report_progress(self.client_id, seq, local_differences=differences)


async def ack_or_reject(action: object) -> None:
    """Await an ack or a reject; on a channel lost since delivery the broker redelivers, which is handled."""
    try:
        await action  # type: ignore[misc]
    except AMQP_ERRORS as exc:
        log.debug("could not settle a message (it will be redelivered): %s", exc)
