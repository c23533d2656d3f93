"""The one way a test waits for something: poll until it holds, fail with what was awaited."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any


async def eventually(check: Callable[[], Any], timeout: float = 60.0, what: str = "condition",
                     interval: float | None = None) -> Any:
    """Call ``check()`` (plain or async) until it returns something truthy, and return that.

    Without an ``interval`` the polls start 5 ms apart and slow to 0.25 s, so a fast outcome is
    seen at once and a slow one costs little CPU.
    """
    deadline = time.monotonic() + timeout
    delay = interval if interval is not None else 0.005
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {result!r})")
        await asyncio.sleep(delay)
        if interval is None:
            delay = min(delay * 1.5, 0.25)


def eventually_blocking(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """``eventually`` for code outside the event loop (a service starting); an error counts as not yet."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as exc:  # the service is still starting: keep probing
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout}s (last error: {last!r})")
