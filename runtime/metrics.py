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
        self.replicas = Gauge("omni_replicas", "Stage replicas by state (ready, starting, hung: found hung and "
                              "being killed, restarting: failed and loading again)", ["stage", "state"], registry=r)
        self.replica_failures = Counter("omni_replica_failures", "Replica failures by stage and cause (died, hung)",
                                        ["stage", "cause"], registry=r)
        self.requests = Counter("omni_requests", "HTTP requests of the images, edits and video routes by status code "
                                "(a stream: how it ended)", ["status"], registry=r)
        # the denoiser's steps (step-level scheduling reports every step; request-level batches too)
        self.step_active = Histogram("omni_denoiser_step_active", "Items in one denoising step", ["replica"],
                                     buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r)
        self.step_admitted = Histogram("omni_denoiser_step_admitted", "Items that joined the running set at one "
                                       "step boundary", ["replica"], buckets=(0, 1, 2, 4, 8, 16, 32), registry=r)
        self.step_retired = Histogram("omni_denoiser_step_retired", "Items that left the running set (finished, "
                                      "cancelled, expired) at one step", ["replica"], buckets=(0, 1, 2, 4, 8, 16, 32),
                                      registry=r)
        self.step_seconds = Histogram("omni_denoiser_step_seconds", "Compute time of one denoising step",
                                      ["replica"], buckets=_LATENCY_BUCKETS, registry=r)
        self.step_padding = Histogram("omni_denoiser_step_padding_waste", "Fraction of one step's image tokens that "
                                      "were padding", ["replica"], buckets=(0, 0.05, 0.1, 0.2, 0.3, 0.5, 1),
                                      registry=r)

        self.cache_steps = Counter("omni_cache_steps", "Denoiser row-steps (one branch of one image at one step) "
                                   "of requests with cache acceleration, by method and outcome (computed, cached)",
                                   ["method", "outcome"], registry=r)
        self.cache_blocks = Counter("omni_cache_blocks", "Transformer blocks of those row-steps, by method and "
                                    "outcome (computed, cached)", ["method", "outcome"], registry=r)

        self.peak_memory = Histogram("omni_stage_peak_memory_mb", "Peak memory (MB) of a stage's driver rank while "
                                     "computing one item (CPU: the process's RSS high-water mark; CUDA: "
                                     "max_memory_allocated; runtime.peak_memory)", ["stage"],
                                     buckets=(16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768,
                                              65536, 131072), registry=r)

    def observe_cache(self, stats: dict) -> None:
        """One image's cache counters (``stages.cache_config.CacheStats.as_dict``)."""
        m = str(stats["method"])
        self.cache_steps.labels(method=m, outcome="cached").inc(int(stats["cached_steps"]))
        self.cache_steps.labels(method=m, outcome="computed").inc(int(stats["steps"]) - int(stats["cached_steps"]))
        self.cache_blocks.labels(method=m, outcome="cached").inc(int(stats["cached_blocks"]))
        self.cache_blocks.labels(method=m, outcome="computed").inc(int(stats["blocks"]) - int(stats["cached_blocks"]))

    def observe_step(self, replica: int, step_s: float, active: int, admitted: int, retired: int,
                     padding_waste: float) -> None:
        """One denoising step of a denoiser replica."""
        rep = str(replica)
        self.step_seconds.labels(replica=rep).observe(step_s)
        self.step_active.labels(replica=rep).observe(active)
        self.step_admitted.labels(replica=rep).observe(admitted)
        self.step_retired.labels(replica=rep).observe(retired)
        self.step_padding.labels(replica=rep).observe(padding_waste)

    def render(self) -> bytes:
        return generate_latest(self.registry)
