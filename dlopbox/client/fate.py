"""What became of a write whose bytes are gone from the master.

nginx no longer serves a write's bytes when a later event deleted, replaced or moved its
file. That event is looked for among the events dispatched lately, then in the interface's
log; a write that nothing explains yet is watched for a while, then the client resyncs.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..api import InterfaceAPI
from ..errors import HTTP_ERRORS
from ..events import Event, Op
from ..paths import is_within

log = logging.getLogger(__name__)

#: Events remembered after dispatch, to explain a write whose bytes are gone.
RECENT_EVENTS = 10_000
#: Events read at once from the interface's log when a write's fate is not among the recent ones: a
#: client replaying a backlog asked once per write (a query on the log each: ~15 writes a second).
LOG_WINDOW = 500
#: Seconds a window that held the whole log answers "nothing logged yet" before it is read again.
LOG_WINDOW_FRESH = 0.5
#: Seconds a write's bytes may stay gone with nothing to explain it before the client resyncs.
STALE_PATIENCE = 20.0

#: Asks for a resync because the event of this seq could not be applied.
ResyncRequest = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class Fate:
    """Where the content of a write went after its seq: gone (superseded) or now at ``path``."""

    superseded: bool
    path: str


class FateFinder:
    """Follows a path through the events after a seq: those dispatched lately, then the interface's log."""

    def __init__(self, api: InterfaceAPI) -> None:
        self.api = api
        #: The events dispatched last: one may already explain a write that finds its bytes gone.
        self.recent: deque[Event] = deque(maxlen=RECENT_EVENTS)
        #: The interface's log after some seq, read once for many lookups (see _logged_effect).
        self._log_window: _LogWindow | None = None
        self._log_window_lock = asyncio.Lock()

    async def fate(self, event: Event) -> Fate:
        """Follow ``event.path`` through the later events held here, then the window of the log.

        Not the log path by path: in a burst whose files are deleted as fast as they are written,
        every slave would ask once per file, and those queries saturated MongoDB (seconds each, the
        interface's own writes timing out). An unexplained write is watched instead; the queue
        brings its explanation, and :class:`UnexplainedWrites` asks about its path if it does not.
        """
        assert event.seq is not None
        return await self.follow(event.path, event.seq, ask_path=False)

    async def follow(self, path: str, after: int, ask_path: bool = True) -> Fate:
        """Where ``path`` went after seq ``after``; ``ask_path``: past the log's window, ask about it alone."""
        while True:
            # Every event dispatched lately, applied or still pending, then the interface's log.
            effect, cause = _first_effect(path, self.recent, after)
            if effect is None:
                try:
                    effect, cause = await self._logged_effect(path, after, ask_path)
                except HTTP_ERRORS as exc:
                    log.debug("cannot ask the interface about %r: %s", path, exc)
            if effect is None:
                return Fate(False, path)
            if effect is _GONE:
                return Fate(True, path)
            assert isinstance(effect, str) and cause is not None and cause.seq is not None
            path, after = effect, cause.seq

    async def _logged_effect(self, path: str, after: int, ask_path: bool) -> tuple[object, Event | None]:
        """What the interface's log says happened to ``path`` after ``after`` (see :func:`_first_effect`).

        One window of the log serves every lookup it covers: a client replaying a backlog asks about
        many writes at once. It is read again once it is older than LOG_WINDOW_FRESH (when it held the
        whole log) or when a lookup starts past its end (when it did not); a lookup it cannot answer
        asks about its path alone (``ask_path``), or is answered "nothing known yet".
        """
        async with self._log_window_lock:  # concurrent lookups share one read
            now = asyncio.get_running_loop().time()
            window = self._log_window
            if (window is None or window.after > after or (window.full and after >= window.last_seq)
                    or (not window.full and now - window.read_at >= LOG_WINDOW_FRESH)):
                window = self._log_window = _LogWindow(after, now, await self.api.events_since(after, limit=LOG_WINDOW))
            effect, cause = _first_effect(path, window.events, after)
            if effect is not None or not window.full or not ask_path:
                return effect, cause  # found, or the whole log holds nothing about it yet
        logged = await self.api.events_since(after, prefix=path, limit=100)
        return _first_effect(path, logged, after)


class UnexplainedWrites:
    """Writes whose bytes were gone with nothing to explain it yet, each watched until a later event does.

    Past STALE_PATIENCE with no explanation, among the events dispatched since or in the
    interface's log, the client resyncs.
    """

    def __init__(self, finder: FateFinder, request_resync: ResyncRequest) -> None:
        self.finder = finder
        self.request_resync = request_resync
        #: path -> (seq, deadline): a later event affecting the path explains it.
        self.writes: dict[str, tuple[int, float]] = {}

    def watch(self, path: str, seq: int) -> None:
        """Go on without the write; a newer event about ``path`` should follow, or the client resyncs."""
        for later in self.finder.recent:  # dispatched meanwhile (applied already, or waiting in the scheduler)
            if later.seq is None or later.seq <= seq:
                continue
            if (moved := _carried(later, path)) is not None:
                path, seq = moved, later.seq
            elif _explains(later, path):
                return
        self._watch(path, seq, asyncio.get_running_loop().time() + STALE_PATIENCE)

    def _watch(self, path: str, seq: int, deadline: float) -> None:
        previous = self.writes.get(path)
        self.writes[path] = (seq, deadline if previous is None else min(previous[1], deadline))

    def explained_by(self, event: Event) -> None:
        assert event.seq is not None
        for path, (seq, deadline) in list(self.writes.items()):
            if event.seq > seq and _explains(event, path):
                del self.writes[path]
                if (moved := _carried(event, path)) is not None:
                    self._watch(moved, event.seq, deadline)

    def clear(self) -> None:
        """A resync brought whatever those writes were missing."""
        self.writes.clear()

    async def loop(self) -> None:
        """Resync once a write's bytes have stayed gone, unexplained, for STALE_PATIENCE."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            now = loop.time()
            overdue = [(path, seq) for path, (seq, deadline) in self.writes.items() if deadline <= now]
            if not overdue:
                continue
            for path, seq in overdue:
                # The interface's log may know what the queue has not delivered yet.
                fate = await self.finder.follow(path, seq)
                if fate.superseded:
                    self.writes.pop(path, None)
                # Moved on the master (perhaps with its directory, which carries no missing file): the
                # resync below brings it wherever it is now.
            overdue = [(path, seq) for path, seq in overdue if path in self.writes]
            if overdue:
                path, seq = min(overdue, key=lambda item: item[1])
                log.error("seq %d: the master's bytes of %r are gone and no newer event explains it after %.0fs; "
                          "resyncing from the manifest", seq, path, STALE_PATIENCE)
                for path, _ in overdue:
                    del self.writes[path]
                self.request_resync(seq)


#: The effect of an event that removes or replaces the file (see :func:`_effect_on`).
_GONE = object()


class _LogWindow:
    """Events the interface logged after ``after``, as read at ``read_at`` (loop time)."""

    __slots__ = ("after", "read_at", "events", "full", "last_seq")

    def __init__(self, after: int, read_at: float, events: list[Event]) -> None:
        self.after, self.read_at, self.events = after, read_at, events
        self.full = len(events) >= LOG_WINDOW  # more may follow that it does not hold
        self.last_seq = max((e.seq for e in events if e.seq is not None), default=after)


def _carried(event: Event, path: str) -> str | None:
    """Where a directory's move takes ``path``, a file below it; None for any other event.

    Such a move explains nothing: the client renames its directory, and a file it never got is not
    in it. Its bytes are now expected at the new path, and watched there (seen: files written into a
    directory just before the master moved it, while MongoDB was down, missing on every slave).
    """
    if event.op is Op.MOVE and event.is_dir and path != event.path and is_within(path, event.path):
        assert event.dest is not None
        return event.dest + path[len(event.path):]
    return None


def _explains(event: Event, path: str) -> bool:
    """Whether ``event`` can account for the master's bytes at ``path`` being gone or different."""
    return event.op is not Op.ATTRIB and event.op is not Op.MKDIR and event.affects(path)


def _first_effect(path: str, events: Iterable[Event], after: int) -> tuple[object, Event | None]:
    """The first of ``events`` past seq ``after`` that affects ``path``, and what it does to it."""
    for event in events:
        if event.seq is None or event.seq <= after:
            continue
        effect = _effect_on(path, event)
        if effect is not None:
            return effect, event
    return None, None


def _effect_on(path: str, event: Event) -> object:
    """What a later ``event`` does to the file at ``path``: None, _GONE, or its new path."""
    match event.op:
        case Op.WRITE | Op.DELETE if event.path == path:
            return _GONE
        case Op.RMDIR if is_within(path, event.path):
            return _GONE
        case Op.MOVE:
            assert event.dest is not None
            if is_within(path, event.path):
                return event.dest + path[len(event.path):]
            if is_within(path, event.dest):
                return _GONE  # something else now stands there
    return None
