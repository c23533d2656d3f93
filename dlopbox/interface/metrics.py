"""The interface's Prometheus metrics, in a registry of its own (one per app, so tests can run several)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events = Counter("dlopbox_events", "Events accepted and numbered.", registry=r)
        self.batches = Counter("dlopbox_batches", "Batches accepted and numbered.", registry=r)
        self.replays = Counter("dlopbox_batch_replays", "Retried batches answered from memory.", registry=r)
        self.rejected = Counter("dlopbox_rejected_requests", "Requests refused, by HTTP status.", ["status"], registry=r)
        self.errors = Counter("dlopbox_backend_errors", "Failed backend operations.", ["backend", "operation"],
                              registry=r)
        self.publish_seconds = Histogram("dlopbox_publish_seconds", "Publishing one batch, until its confirm.",
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.log_seconds = Histogram("dlopbox_log_seconds", "Writing one batch to the MongoDB log and state.",
                                     buckets=_LATENCY_BUCKETS, registry=r)
        self.commit_seconds = Histogram("dlopbox_commit_seconds", "POST /events, from parsed body to reply.",
                                        buckets=_LATENCY_BUCKETS, registry=r)
        self.head = Gauge("dlopbox_head_seq", "Last seq acknowledged to the watcher.", registry=r)
        self.logged = Gauge("dlopbox_logged_seq", "Last seq in the MongoDB log (contiguous).", registry=r)
        self.backlog = Gauge("dlopbox_log_backlog_events", "Acknowledged events not yet in the MongoDB log.",
                             registry=r)
        self.pending = Gauge("dlopbox_pending_batches", "Numbered batches not yet published (retried first).",
                             registry=r)
        self.degraded = Gauge("dlopbox_log_degraded", "1 while the log is written from the journal only.",
                              registry=r)
        self.ready = Gauge("dlopbox_ready", "1 once both backends answered and the journal was recovered.",
                           registry=r)

        self.unsendable = Gauge("dlopbox_unsendable_paths",
                                "Paths on the master the watcher cannot send (its last report).", registry=r)
        self.live_viewers = Gauge("dlopbox_live_viewers", "Dashboard tabs connected to the push channel.", registry=r)
        self.live_dropped = Counter("dlopbox_live_dropped_viewers",
                                    "Dashboard tabs dropped for falling too far behind (they reconnect).", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
