"""The master's report (PUT /master, GET /master): what the watcher says of itself, kept across restarts.

The watcher sends its directories watched, its rescans after inotify overflows and the paths it
cannot send whenever they change. The last report is held in memory and in one MongoDB
document, so a restarted interface answers GET /master before the watcher reports again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pymongo

from ..events import INT64_MAX
from .eventlog import EventLog
from .metrics import Metrics

#: Bounds of one report: the watcher sends at most 1,000 rows and the exact count beside them.
MAX_ROWS = 10_000
MAX_PATH_CHARS = 16_384
MAX_REASON_CHARS = 1_000


class MalformedReport(ValueError):
    """A PUT /master body that is not a report: refused with 400, nothing stored."""


def _count(body: dict[str, Any], name: str) -> int:
    value = body.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= INT64_MAX:
        raise MalformedReport(f"{name} must be a non-negative integer")
    return value


def _text(row: dict[str, Any], name: str, index: int, limit: int) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise MalformedReport(f"unsendable[{index}].{name} must be a non-empty string of at most {limit} characters")
    return value


@dataclass(frozen=True, slots=True)
class MasterReport:
    watched_dirs: int
    rescans: int
    unsendable: tuple[tuple[str, str], ...]  # (escaped path, reason)
    unsendable_total: int
    received_at: datetime

    @classmethod
    def from_json(cls, body: Any, received_at: datetime) -> MasterReport:
        if not isinstance(body, dict):
            raise MalformedReport('body must be {"watched_dirs": N, "rescans": N, "unsendable": [{"path", "reason"}]}')
        unknown = set(body) - {"watched_dirs", "rescans", "unsendable", "unsendable_total"}
        if unknown:
            raise MalformedReport(f"unknown field {min(unknown)!r}")
        rows = body.get("unsendable")
        if not isinstance(rows, list) or len(rows) > MAX_ROWS:
            raise MalformedReport(f"unsendable must be a list of at most {MAX_ROWS} {{path, reason}} objects")
        parsed = []
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or set(row) != {"path", "reason"}:
                raise MalformedReport(f"unsendable[{i}] must be an object with exactly path and reason")
            parsed.append((_text(row, "path", i, MAX_PATH_CHARS), _text(row, "reason", i, MAX_REASON_CHARS)))
        total = _count(body, "unsendable_total") if "unsendable_total" in body else len(parsed)
        if total < len(parsed):
            raise MalformedReport("unsendable_total is less than the rows sent")
        return cls(_count(body, "watched_dirs"), _count(body, "rescans"), tuple(parsed), total, received_at)

    def to_json(self) -> dict[str, Any]:
        return {"watched_dirs": self.watched_dirs, "rescans": self.rescans,
                "unsendable": [{"path": p, "reason": r} for p, r in self.unsendable],
                "unsendable_total": self.unsendable_total, "received_at": self.received_at.isoformat()}

    def to_doc(self) -> dict[str, Any]:
        return {"report": {k: v for k, v in self.to_json().items() if k != "received_at"},
                "received_at": self.received_at}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> MasterReport:
        # MongoDB hands datetimes back naive (they are UTC).
        return cls.from_json(doc["report"], doc["received_at"].replace(tzinfo=UTC))


class MasterReports:
    """The last report: in memory, and in the ``meta`` document ``master`` for the next start."""

    def __init__(self, eventlog: EventLog, metrics: Metrics, timeout: float) -> None:
        self._eventlog = eventlog
        self._metrics = metrics
        self._timeout = timeout
        self._last: MasterReport | None = None
        self._loaded = False

    async def store(self, body: Any) -> MasterReport:
        """Validate and keep ``body`` (MalformedReport: nothing kept); PyMongoError when it could not be saved."""
        now = datetime.now(UTC)
        # Milliseconds, as MongoDB keeps them: the answer is the same before and after a restart.
        report = MasterReport.from_json(body, now.replace(microsecond=now.microsecond // 1000 * 1000))
        self._last = report
        self._loaded = True
        self._metrics.unsendable.set(report.unsendable_total)
        with pymongo.timeout(self._timeout):
            await self._eventlog.set_master(report.to_doc())
        return report

    async def last(self) -> MasterReport | None:
        """The last report, read from MongoDB once after a start."""
        if not self._loaded:
            with pymongo.timeout(self._timeout):
                doc = await self._eventlog.master()
            if self._last is None and doc is not None:
                try:
                    self._last = MasterReport.from_doc(doc)
                except (MalformedReport, KeyError, AttributeError):
                    self._last = None
                if self._last is not None:
                    self._metrics.unsendable.set(self._last.unsendable_total)
            self._loaded = True
        return self._last
