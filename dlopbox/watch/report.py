"""The master's report to the interface (PUT /master): what an operator needs to know about the watcher.

Directories watched, rescans after inotify overflows, and the paths it cannot send. Sent by a
task of its own whenever one of them changed, at most every REPORT_EVERY_S, and again once the
interface answers after an outage (it may have restarted); a failure is logged and retried
with backoff, and never holds back an event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from ..api import InterfaceAPI
from ..errors import HTTP_ERRORS
from ..retry import Backoff
from .unsendable import UnsendablePaths

log = logging.getLogger(__name__)

REPORT_EVERY_S = 0.5
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0
FAILURE_LOG_EVERY_S = 60.0


class MasterReporter:
    """PUTs the report whenever ``watched_dirs()``, ``rescans()`` or the unsendable paths changed."""

    def __init__(self, api: InterfaceAPI, watched_dirs: Callable[[], int], rescans: Callable[[], int],
                 unsendable: UnsendablePaths) -> None:
        self._api = api
        self._watched_dirs = watched_dirs
        self._rescans = rescans
        self._unsendable = unsendable
        self._sent: tuple[int, int, int] | None = None
        self._failing_since: float | None = None
        self._failure_logged = float("-inf")
        #: Reports the interface took, for tests and logs.
        self.reports = 0

    def resend(self) -> None:
        """The interface answers again after an outage: send the report even if nothing changed."""
        self._sent = None

    def body(self) -> dict[str, Any]:
        rows, total = self._unsendable.report()
        return {"watched_dirs": self._watched_dirs(), "rescans": self._rescans(), "unsendable": rows,
                "unsendable_total": total}

    async def run(self) -> None:
        backoff = Backoff(BACKOFF_FIRST_S, BACKOFF_MAX_S)
        while True:
            key = (self._watched_dirs(), self._rescans(), self._unsendable.version)
            if key != self._sent:
                try:
                    await self._api.put_master(self.body())
                except HTTP_ERRORS as exc:
                    self._failed(f"{type(exc).__name__}: {exc}")
                    await backoff.wait()
                    continue
                self._sent = key
                self.reports += 1
                backoff.reset()
                if self._failing_since is not None:
                    log.info("the master's report reached the interface again after %.0f s",
                             time.monotonic() - self._failing_since)
                    self._failing_since = None
            await asyncio.sleep(REPORT_EVERY_S)

    def _failed(self, message: str) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        if now - self._failure_logged >= FAILURE_LOG_EVERY_S:
            self._failure_logged = now
            log.warning("PUT /master failed (%s); retrying with backoff", message[:300])
