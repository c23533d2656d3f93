"""Progress of a long catch-up: a bar on a terminal (files, bytes, rate), log lines otherwise."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import TextIO

from .download import Counters

log = logging.getLogger(__name__)

BAR_WIDTH = 30


def _mib(n: float) -> str:
    return f"{n / 1048576:.1f} MiB"


class Progress:
    """Shows ``counters`` against totals until stopped; redraws a bar on a TTY, logs every few seconds otherwise."""

    def __init__(self, what: str, counters: Counters, total_files: int, total_bytes: int,
                 stream: TextIO | None = None, log_every: float = 5.0) -> None:
        self.what = what
        self.counters = counters
        self.base_files, self.base_bytes = counters.files, counters.bytes
        self.total_files, self.total_bytes = total_files, total_bytes
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.interval = 0.2 if self.tty else log_every
        self.started = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def line(self) -> str:
        files = self.counters.files - self.base_files
        done = self.counters.bytes - self.base_bytes
        elapsed = max(time.monotonic() - self.started, 1e-6)
        fraction = done / self.total_bytes if self.total_bytes else (files / self.total_files if self.total_files else 1)
        fraction = min(max(fraction, 0.0), 1.0)
        text = (f"{self.what}: {files}/{self.total_files} files, {_mib(done)}/{_mib(self.total_bytes)}, "
                f"{_mib(done / elapsed)}/s")
        if self.tty:
            filled = int(fraction * BAR_WIDTH)
            return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {fraction:4.0%} {text}"
        return text

    def _show(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K" + self.line())
            self.stream.flush()
        else:
            log.info("%s", self.line())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self._show()

    def __enter__(self) -> Progress:
        self._task = asyncio.get_running_loop().create_task(self._loop())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.total_files or self.counters.files != self.base_files:
            self._show()
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
