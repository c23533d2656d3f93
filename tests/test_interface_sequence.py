"""The interface's seq state alone: gap-free numbering, resuming, the pending batch, log-degraded."""

from __future__ import annotations

import logging

from dlopbox.events import Batch
from dlopbox.interface.metrics import Metrics
from dlopbox.interface.sequence import Sequence, seqs
from tests.support.interface_harness import write_event


def batch(batch_id: str, count: int) -> Batch:
    return Batch(batch_id, tuple(write_event(f"{batch_id}/{i}") for i in range(count)))


def gauge(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name)


def test_numbers_are_gap_free_across_batches_and_each_event_carries_its_own():
    sequence = Sequence(Metrics())
    given = []
    for i, count in enumerate((3, 1, 5)):
        pending = sequence.number(batch(f"b{i}", count))
        given.append(seqs(pending.batch))
        assert [e.seq for e in pending.batch.events] == list(range(given[-1][0], given[-1][1] + 1))
        sequence.published()
    assert given == [(1, 3), (4, 4), (5, 9)]
    assert sequence.next_seq == 10 and sequence.head == 9
    assert [sequence.recall(f"b{i}") for i in range(3)] == given
    assert sequence.recall("never-seen") is None


def test_numbering_resumes_after_the_last_logged_seq_and_remembers_the_logged_batch_ids():
    metrics = Metrics()
    sequence = Sequence(metrics)
    sequence.resume(41, [("old", 30, 35), ("older-retry", 36, 41)])
    assert (sequence.head, sequence.logged_through) == (41, 41)
    assert sequence.recall("older-retry") == (36, 41)
    assert seqs(sequence.number(batch("new", 2)).batch) == (42, 43)
    assert gauge(metrics, "dlopbox_logged_seq") == 41


def test_a_pending_batch_holds_the_head_back_until_it_is_published():
    metrics = Metrics()
    sequence = Sequence(metrics)
    sequence.number(batch("a", 2))
    sequence.published()
    pending = sequence.number(batch("b", 3))
    assert sequence.pending is pending
    assert sequence.head == 2, "numbered but not confirmed: not acknowledgeable yet"
    sequence.update_gauges()
    assert gauge(metrics, "dlopbox_pending_batches") == 1
    sequence.published()
    assert sequence.pending is None and sequence.head == 5
    assert gauge(metrics, "dlopbox_pending_batches") == 0 and gauge(metrics, "dlopbox_head_seq") == 5


def test_log_degraded_is_entered_on_a_failed_write_and_left_only_once_the_log_has_caught_up(caplog):
    caplog.set_level(logging.INFO, logger="dlopbox.interface")
    metrics = Metrics()
    sequence = Sequence(metrics)
    for name, count in (("a", 2), ("b", 2), ("c", 2)):
        sequence.number(batch(name, count))
        sequence.published()
    sequence.logged(1, 2)
    sequence.degrade(3)
    sequence.degrade(5)  # already degraded: one warning
    assert sequence.degraded and gauge(metrics, "dlopbox_log_degraded") == 1
    sequence.logged(3, 4)
    assert sequence.degraded, "seqs 5-6 are not in the log yet"
    assert gauge(metrics, "dlopbox_log_backlog_events") == 2
    sequence.logged(5, 6)
    assert not sequence.degraded and sequence.logged_through == 6
    assert gauge(metrics, "dlopbox_log_degraded") == 0 and gauge(metrics, "dlopbox_log_backlog_events") == 0
    messages = [r.getMessage() for r in caplog.records]
    assert sum("log-degraded from seq 3" in m for m in messages) == 1
    assert "log caught up at seq 6: direct MongoDB writes resume" in messages


def test_a_batch_logged_past_a_gap_is_reported_and_logged_through_moves_to_its_end(caplog):
    sequence = Sequence(Metrics())
    sequence.resume(2, [])
    sequence.logged(6, 8)
    assert sequence.logged_through == 8
    assert "the log has a gap: seqs 3-5 are missing" in [r.getMessage() for r in caplog.records]


def test_a_batch_numbered_by_an_earlier_run_moves_numbering_past_it():
    sequence = Sequence(Metrics())
    sequence.resume(10, [])
    sequence.skip_past("from-the-journal", 11, 14)
    assert sequence.next_seq == 15 and sequence.recall("from-the-journal") == (11, 14)
    assert seqs(sequence.number(batch("next", 1)).batch) == (15, 15)


def test_only_the_most_recent_batch_ids_are_remembered():
    sequence = Sequence(Metrics(), recent_limit=2)
    for name in ("a", "b", "c"):
        sequence.number(batch(name, 1))
        sequence.published()
    assert [sequence.recall(name) for name in ("a", "b", "c")] == [None, (2, 2), (3, 3)]
