"""Prometheus metrics of one runtime (its own registry, so several runtimes can live in one process)."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("omni_queue_depth", "Items waiting for or running in a stage", ["stage"],
                                 registry=r)
        self.batch_size = Histogram("omni_batch_size", "Items per batch a stage driver ran", ["stage"],
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r)
        self.stage_latency = Histogram("omni_stage_latency_seconds", "Hop time per stage as the orchestrator "
                                       "sees it (queue + IPC + compute)", ["stage"], buckets=_LATENCY_BUCKETS,
                                       registry=r)
        self.compute = Histogram("omni_stage_compute_seconds", "Batch compute time in a stage", ["stage"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("omni_stage_queue_wait_seconds", "Time from send to batch start",
                                    ["stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.request_latency = Histogram("omni_request_latency_seconds", "End-to-end request latency",
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.errors = Counter("omni_errors", "Errors by stage (or 'http') and kind", ["stage", "kind"],
                              registry=r)
        self.requests = Counter("omni_requests", "HTTP image requests by status code", ["status"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
