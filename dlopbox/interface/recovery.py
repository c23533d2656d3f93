"""Start-up recovery: drain the journal into the log, republish what it never saw, resume numbering."""

from __future__ import annotations

import logging

from aio_pika.abc import AbstractIncomingMessage

from ..events import Batch
from .backends import Amqp
from .eventlog import EventLog
from .journal import parse_journal_message
from .sequence import Sequence, seqs

log = logging.getLogger(__name__)


async def recover(eventlog: EventLog, amqp: Amqp, sequence: Sequence, timeout: float) -> int:
    """Bring the log up to the journal and number on from its head; return the journal mark.

    Every logged batch past the mark (the last seq seen in the journal) may never have been
    published: it is published again (clients skip seqs they have applied).
    """
    assert amqp.journal is not None
    head = await eventlog.head()
    journaled = await eventlog.journaled_through()
    # Taken whole, then written in seq order: a batch requeued by an interrupted earlier attempt
    # may come back after the ones behind it.
    messages: list[AbstractIncomingMessage] = []
    batches: list[Batch] = []
    while (message := await amqp.journal.get(no_ack=False, fail=False, timeout=timeout)):
        messages.append(message)
        batch = parse_journal_message(message)
        if batch is not None:
            batches.append(batch)
    batches.sort(key=lambda b: seqs(b)[0])
    for batch in batches:
        first, last = seqs(batch)
        if first > head + 1:
            log.error("journal batch %s (seqs %d-%d) does not follow the log head %d: seqs %d-%d are lost",
                      batch.batch_id, first, last, head, head + 1, first - 1)
        await eventlog.write(batch)
        await eventlog.mark_journaled(last)
        head, journaled = max(head, last), max(journaled, last)
    for message in messages:
        await message.ack()
    drained = len(batches)
    sequence.resume(head, await eventlog.recent_batches(sequence.recent_limit))
    republished = 0
    async for batch in eventlog.batches_after(journaled):
        await amqp.publish(batch)
        republished += 1
    log.info("interface ready: log head %d, %d batches drained from the journal, %d republished",
             head, drained, republished)
    return journaled
