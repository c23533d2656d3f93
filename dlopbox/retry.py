"""One retry pacing for every loop that waits for a service to come back."""

from __future__ import annotations

import asyncio


class Backoff:
    """Delays that double from ``first`` up to ``cap``; ``reset()`` once the peer answers again.

    ``wait()`` returns early, and False, when ``stop`` is set, so a service in the middle of a
    retry still stops at once on SIGTERM.
    """

    def __init__(self, first: float, cap: float, stop: asyncio.Event | None = None) -> None:
        if not 0 < first <= cap:
            raise ValueError(f"a backoff needs 0 < first <= cap, not {first} and {cap}")
        self.first = first
        self.cap = cap
        self.stop = stop
        self.delay = first  # the next wait
        self.attempts = 0  # waits since the last reset

    async def wait(self) -> bool:
        """Sleep the current delay, then double it; False if ``stop`` was set meanwhile."""
        delay, self.delay = self.delay, min(self.delay * 2, self.cap)
        self.attempts += 1
        if self.stop is None:
            await asyncio.sleep(delay)
            return True
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that lands as it ends.
            async with asyncio.timeout(delay):
                await self.stop.wait()
        except TimeoutError:
            return True
        return False

    def reset(self) -> None:
        self.delay = self.first
        self.attempts = 0
