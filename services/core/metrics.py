"""Every genfleet metric, defined once (DESIGN.md §6), as data.

Names follow Prometheus conventions: ``genfleet_<subsystem>_<name>_<unit>``, base units
(seconds, not milliseconds), ``_total`` for counters, and a closed label set. The
processes that export them build real metric objects from these specs:
``prometheus_client`` in the gateway, ``ray.util.metrics`` in Ray workers (which Ray
exports on its metrics port with a ``ray_`` prefix). This module imports neither.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]
LABELS = frozenset({"model", "family", "method", "code", "phase"})  # never seeds or ids
UNITS = ("seconds", "samples", "requests", "epochs", "nats", "bytes", "ratio", "steps",
         "per_second")


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Kind
    help: str
    unit: str  # a base unit the name ends in; "" for a dimensionless quantity
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()  # histograms only


def _check(spec: MetricSpec) -> MetricSpec:
    if not re.fullmatch(r"genfleet_[a-z]+_[a-z0-9_]+", spec.name):
        raise ValueError(f"{spec.name}: must be genfleet_<subsystem>_<name>_<unit>")
    if spec.unit and (spec.unit not in UNITS
                      or not spec.name.removesuffix("_total").endswith("_" + spec.unit)):
        raise ValueError(f"{spec.name}: must end in its base unit, one of {UNITS}")
    if (spec.kind == "counter") != spec.name.endswith("_total"):
        raise ValueError(f"{spec.name}: counters, and only counters, end in _total")
    if set(spec.labels) - LABELS:
        raise ValueError(f"{spec.name}: labels {sorted(set(spec.labels) - LABELS)} are not "
                         f"in the closed set {sorted(LABELS)}")
    if (spec.kind == "histogram") != bool(spec.buckets):
        raise ValueError(f"{spec.name}: histograms, and only histograms, have buckets")
    return spec


# ---------------------------------------------------------------------- training
TRAIN_LOSS = _check(MetricSpec(
    "genfleet_train_loss", "gauge",
    "Mean training loss of the last epoch, per phase (the family's objective: nats for "
    "likelihood models, the hinge/WGAN value for GAN phases)", "", ("model", "family", "phase")))
TRAIN_EPOCH = _check(MetricSpec(
    "genfleet_train_epoch_epochs", "gauge", "Last finished epoch of the training job",
    "epochs", ("model", "family")))
TRAIN_THROUGHPUT = _check(MetricSpec(
    "genfleet_train_throughput_samples_per_second", "gauge",
    "Training samples per second over the last epoch, all workers together",
    "per_second", ("model", "family")))
TRAIN_SAMPLES = _check(MetricSpec(
    "genfleet_train_samples_total", "counter", "Training samples processed (this worker)",
    "samples", ("model", "family")))

ALL: tuple[MetricSpec, ...] = (TRAIN_LOSS, TRAIN_EPOCH, TRAIN_THROUGHPUT, TRAIN_SAMPLES)
