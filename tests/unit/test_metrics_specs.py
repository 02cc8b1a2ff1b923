"""Metric definitions follow the naming conventions (DESIGN.md §6)."""

from __future__ import annotations

import pytest

from services.core import metrics


def test_every_metric_follows_the_conventions() -> None:
    assert metrics.ALL
    names = [m.name for m in metrics.ALL]
    assert len(names) == len(set(names))
    for spec in metrics.ALL:
        assert metrics._check(spec) is spec
        assert set(spec.labels) <= metrics.LABELS


@pytest.mark.parametrize(("spec", "problem"), [
    (metrics.MetricSpec("genfleet_x_latency_ms", "gauge", "", "ms"), "base unit"),
    (metrics.MetricSpec("genfleet_x_requests", "counter", "", "requests"), "_total"),
    (metrics.MetricSpec("genfleet_x_requests_total", "gauge", "", "requests"), "_total"),
    (metrics.MetricSpec("genfleet_x_latency_seconds", "gauge", "", "seconds", ("seed",)),
     "closed set"),
    (metrics.MetricSpec("genfleet_x_latency_seconds", "histogram", "", "seconds"), "buckets"),
    (metrics.MetricSpec("x_latency_seconds", "gauge", "", "seconds"), "genfleet_"),
])
def test_a_metric_that_breaks_a_convention_is_rejected(spec: metrics.MetricSpec,
                                                       problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        metrics._check(spec)
