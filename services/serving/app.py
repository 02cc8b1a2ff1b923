"""The Serve application ``genfleet``: one ``ModelDeployment`` per model (named after it)
and a tiny ingress, ``Directory``, that lists them and collects the load their replicas
report. ``build_app`` turns a ``ServeConfig`` with pinned versions into that application;
``services.serving.operations`` applies it, ``services.serving.ray_cluster`` starts Ray.
"""

from __future__ import annotations

import time
from typing import Any, cast

from ray import serve

from services.core.store import ModelStore
from services.serving.config import ServeConfig
from services.serving.deployment import ModelDeployment


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class Directory:
    """Ingress of the app: the names of the model deployments it holds, and the load their
    replicas report (``ModelDeployment._report_load``, every second)."""

    def __init__(self, models: dict[str, Any], stale_s: float = 5.0) -> None:
        self._names = sorted(models)
        self._stale_s = stale_s
        self._loads: dict[tuple[str, str], tuple[float, dict[str, int]]] = {}

    async def list(self) -> list[str]:
        return self._names

    async def report_load(self, model: str, replica: str, load: dict[str, int]) -> None:
        self._loads[(model, replica)] = (time.monotonic(), load)

    async def load(self) -> dict[str, dict[str, int]]:
        """Per model: requests queued and running summed over the replicas that reported
        in the last ``stale_s`` seconds, and how many replicas those are."""
        now = time.monotonic()
        self._loads = {k: v for k, v in self._loads.items() if now - v[0] <= self._stale_s}
        out: dict[str, dict[str, int]] = {}
        for (model, _), (_, load) in self._loads.items():
            row = out.setdefault(model, {"queued": 0, "running": 0, "replicas": 0})
            row["queued"] += int(load.get("queued", 0))
            row["running"] += int(load.get("running", 0))
            row["replicas"] += 1
        return out


def pin_versions(config: ServeConfig, store: ModelStore) -> ServeConfig:
    """Resolve every unpinned version to the store's latest intact one, so that replicas
    started later (scale-up, restarts) serve the same version as the others.

    Raises:
        ModelNotFound: a model or pinned version is not in the store.
        CheckpointError: a pinned version is broken (it is never served).
    """
    for model in config.models.values():
        ref = model.name if model.version is None else f"{model.name}@{model.version}"
        model.version = store.verify(ref).version
    return config


def build_app(config: ServeConfig, store: ModelStore) -> serve.Application:
    """The Serve application for ``config`` (versions must be pinned)."""
    bound: dict[str, Any] = {}
    for m in config.models.values():
        deployment = cast(Any, ModelDeployment).options(
            name=m.name,
            max_ongoing_requests=m.max_ongoing_requests,
            max_queued_requests=m.max_queued_requests,
            autoscaling_config=m.autoscaling(),
            ray_actor_options=m.ray_actor_options,
            user_config=m.user_config(),
        )
        bound[m.name] = deployment.bind(
            m.name, str(store.root), device=m.device, autocast=m.autocast, threads=m.threads,
            limits=dict(m.limits), warmup=m.warmup)
    app: serve.Application = cast(Any, Directory).bind(bound)
    return app
