"""Serve autoscaling on requests, not handle calls.

The gateway coalesces up to ``max_batch_size`` Generate calls into one handle call, so
Serve's built-in signal (ongoing handle calls per replica) counts a group of 32 requests
as one: ``target_ongoing_requests: 8`` would mean ~256 requests. Each replica reports the
requests it holds (``ModelDeployment.record_autoscaling_stats``: a group counts its
size; Score, Encode and Decode count one each), and this policy asks for
``sum(requests) / target_ongoing_requests`` replicas. Serve applies the rest as for its
own policy: ``min_replicas``/``max_replicas``, ``upscale_delay_s``/``downscale_delay_s``,
the scaling factors, and the averaging over ``look_back_period_s``.

``services.serving.config.ModelServeConfig.autoscaling`` names this policy for every
deployment whose replica count may change, unless the config names another.
"""

from __future__ import annotations

from typing import Any

METRIC = "requests"


def desired_replicas(per_replica: dict[Any, float], target: float, fallback: float,
                     current: int) -> float:
    """Replicas wanted for ``per_replica`` requests held (``fallback``: Serve's own count
    of ongoing handle calls, used until the replicas have reported)."""
    if current == 0:
        return 1.0 if fallback > 0 else 0.0
    total = sum(per_replica.values()) if per_replica else fallback
    return total / max(target, 1e-9)


def requests_policy(ctx: Any) -> tuple[float, dict[str, Any]]:
    """Serve custom autoscaling policy (``AutoscalingContext`` -> replicas, state)."""
    metrics = ctx.aggregated_metrics or {}
    per_replica = {r: float(v) for r, v in metrics.get(METRIC, {}).items()
                   if r in set(ctx.running_replicas)}
    target = float(ctx.config.get_target_ongoing_requests())
    return desired_replicas(per_replica, target, float(ctx.total_num_requests),
                            ctx.current_num_replicas), {}
