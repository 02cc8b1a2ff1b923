"""Metrics of Ray workers (replicas, training and batch jobs) through ``ray.util.metrics``.

Built from the specs in ``services.core.metrics``; Ray exports them on every node's
metrics port with a ``ray_`` prefix and a ``WorkerId`` label that queries aggregate away.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ray.util import metrics as ray_metrics

from services.core import metrics as specs


def make(spec: specs.MetricSpec) -> Any:
    """The ``ray.util.metrics`` object for ``spec`` (create it inside the worker)."""
    if spec.exporter != "ray":
        raise ValueError(f"{spec.name} is exported by the {spec.exporter}, not by Ray")
    if spec.kind == "counter":
        return ray_metrics.Counter(spec.name, spec.help, tag_keys=spec.labels)
    if spec.kind == "gauge":
        return ray_metrics.Gauge(spec.name, spec.help, tag_keys=spec.labels)
    return ray_metrics.Histogram(spec.name, spec.help, boundaries=list(spec.buckets),
                                 tag_keys=spec.labels)


class ReplicaMetrics:
    """One replica's metrics: every computed batch (``ReplicaEngine``'s observer) and the
    load it reports every second."""

    def __init__(self, model: str, family: str) -> None:
        self._tags = {"model": model, "family": family}
        self._queue = make(specs.SERVE_QUEUE)
        self._compute = make(specs.SERVE_COMPUTE)
        self._batch_requests = make(specs.SERVE_BATCH_REQUESTS)
        self._batch_samples = make(specs.SERVE_BATCH_SAMPLES)
        self._samples = make(specs.SERVE_SAMPLES)
        self._steps = make(specs.SERVE_STEPS)
        self._queued = make(specs.SERVE_QUEUED)
        self._running = make(specs.SERVE_RUNNING)
        self._limit = make(specs.SERVE_BATCH_LIMIT)

    def batch(self, *, requests: int, samples: int, queue_s: Sequence[float],
              compute_s: float, steps: int) -> None:
        tags = self._tags
        for seconds in queue_s:
            self._queue.observe(seconds, tags=tags)
        self._compute.observe(compute_s, tags=tags)
        self._batch_requests.observe(requests, tags=tags)
        self._batch_samples.observe(samples, tags=tags)
        self._samples.inc(samples, tags=tags)
        if steps:
            self._steps.inc(steps, tags=tags)

    def load(self, queued: int, running: int, batch_limit: int) -> None:
        self._queued.set(queued, tags=self._tags)
        self._running.set(running, tags=self._tags)
        self._limit.set(batch_limit, tags=self._tags)
