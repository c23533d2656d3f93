"""The manifest: a consistent snapshot of the state, taken once the log holds every batch numbered."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from typing import IO

from .backends import Unavailable
from .eventlog import EventLog, entry_from_doc
from .sequence import Sequence

#: How many backend timeouts a manifest request waits for the log to hold what was published.
MANIFEST_CATCH_UP_FACTOR = 6
MANIFEST_YIELD_EVERY = 1000
SPOOL_MEMORY = 1024 * 1024


async def log_reaches(sequence: Sequence, seq: int, timeout: float) -> None:
    """Wait until every batch numbered so far is in the log.

    A client binds its queue, then asks for the manifest: each event must be in one or the
    other. A batch published before the bind but logged after the snapshot would be in
    neither, since publication runs ahead of the log. While log-degraded the journal keeper
    is catching up: the request waits for it too (answering 503 at once only made every
    client back off, and converge that much later once the log had caught up).
    """
    deadline = time.monotonic() + timeout
    while sequence.logged_through < seq:
        if time.monotonic() > deadline:
            raise Unavailable(f"the log is catching up (at seq {sequence.logged_through} of {seq})")
        await asyncio.sleep(0.01 if not sequence.degraded else 0.1)


async def snapshot(sequence: Sequence, eventlog: EventLog, log_lock: asyncio.Lock, backend_timeout: float
                   ) -> tuple[IO[bytes], int, int]:
    """A consistent snapshot, spooled under the log lock: (NDJSON entries, seq, count)."""
    await log_reaches(sequence, sequence.next_seq - 1, MANIFEST_CATCH_UP_FACTOR * backend_timeout)
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)
    try:
        async with log_lock:
            seq, count = sequence.logged_through, 0
            async for doc in eventlog.state_cursor():
                line = json.dumps(entry_from_doc(doc).to_dict(), ensure_ascii=False, separators=(",", ":"))
                spool.write(line.encode() + b"\n")
                count += 1
                if count % MANIFEST_YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # a cursor batch is decoded at once: let other requests run
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool, seq, count
