"""Service start-up and graceful shutdown, shared by every entry point.

SIGTERM and SIGINT set a stop event rather than killing the loop, so each service can
stop taking work, flush what it holds and close its connections: `docker compose stop`
then returns in well under its 10 s grace period.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import TypeVar

import uvloop

T = TypeVar("T")
log = logging.getLogger(__name__)


def stop_on_signals(stop: asyncio.Event) -> None:
    """Make SIGTERM/SIGINT set ``stop`` on the running loop."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, stop, sig)


def _on_signal(stop: asyncio.Event, sig: signal.Signals) -> None:
    if stop.is_set():
        raise KeyboardInterrupt  # a second signal: stop waiting for the graceful path
    log.info("received %s, shutting down", sig.name)
    stop.set()


def version() -> str:
    """dlopbox's version, from the installed package's metadata."""
    return metadata.version("dlopbox")


def serve(main: Callable[[asyncio.Event], Awaitable[T]], command: str | None = None) -> T:
    """Run ``main(stop)`` on uvloop until it returns; signals set ``stop``.

    A service passes its ``command``, logged with the version as it starts.
    """
    if command is not None:
        log.info("dlopbox %s %s starting", version(), command)

    async def runner() -> T:
        stop = asyncio.Event()
        stop_on_signals(stop)
        return await main(stop)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        return r.run(runner())


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
