"""The Serve application ``genfleet``: one ``ModelDeployment`` per model (named after it)
and a tiny ingress, ``Directory``, that lists them and collects the load their replicas
report. ``build_app`` turns a ``ServeConfig`` with pinned versions into that application;
``services.serving.operations`` applies it, ``services.serving.ray_cluster`` starts Ray.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, cast

from ray import serve

from services.core.store import ModelStore
from services.serving.config import ServeConfig
from services.serving.deployment import ModelDeployment

Lanes = dict[str, list[dict[str, Any]]]  # model -> its replicas' lanes (LaneAddress dicts)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class Directory:
    """Ingress of the app: the names of the model deployments it holds, and the load their
    replicas report (``ModelDeployment._report_load``, every second)."""

    def __init__(self, models: dict[str, Any], stale_s: float = 5.0) -> None:
        self._names = sorted(models)
        self._stale_s = stale_s
        self._loads: dict[tuple[str, str], tuple[float, dict[str, int]]] = {}
        self._lanes: dict[tuple[str, str], dict[str, Any]] = {}  # (model, replica) -> lane

    async def list(self) -> list[str]:
        return self._names

    async def report_load(self, model: str, replica: str, load: dict[str, int],
                          lane: dict[str, Any] | None = None) -> None:
        self._loads[(model, replica)] = (time.monotonic(), load)
        if lane is not None:
            self._lanes[(model, replica)] = lane

    async def leave(self, model: str, replica: str) -> None:
        """A replica that is stopping: its lane is no longer handed out."""
        self._lanes.pop((model, replica), None)
        self._loads.pop((model, replica), None)

    async def lanes(self) -> Lanes:
        """Per model: the lanes (``services.serving.lane``) of the replicas that reported
        in the last ``stale_s`` seconds."""
        now = time.monotonic()
        out: Lanes = {}
        for key, lane in [*self._lanes.items()]:
            seen = self._loads.get(key)
            if seen is None or now - seen[0] > self._stale_s:
                del self._lanes[key]
                continue
            out.setdefault(key[0], []).append(lane)
        return out

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


def code_version(*parts: Any) -> str:
    """A Serve deployment code version: this package's code and ``parts`` (the replica's
    constructor arguments).

    ``serve.run`` gives a deployment without one a random version (Ray 2.60,
    ``serve/_private/client.py``), so every ``scale``, ``rollout`` or ``deploy`` replaced
    every replica of every model, all at once (a minute of model loading on two cores).
    With a version that changes only with the code or the constructor arguments, a change
    of ``user_config`` (checkpoint version, batching, admission) reconfigures the live
    replicas in place and an autoscaling change adds or removes replicas. Ray 2.60 refuses
    ``.options(version=...)`` but still honours the attribute it kept (``_version``);
    ``tests/integration/test_serving.py`` checks that a rollout keeps its replicas, so a
    Ray that stops honouring it fails there."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]  # services/
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    digest.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def build_app(config: ServeConfig, store: ModelStore) -> serve.Application:
    """The Serve application for ``config`` (versions must be pinned)."""
    bound: dict[str, Any] = {}
    for m in config.models.values():
        kwargs = {"device": m.device, "autocast": m.autocast, "threads": m.threads,
                  "limits": dict(m.limits), "warmup": m.warmup, "lane": m.lane}
        deployment = cast(Any, ModelDeployment).options(
            name=m.name,
            max_ongoing_requests=m.max_ongoing_requests,
            max_queued_requests=m.max_queued_requests,
            autoscaling_config=m.autoscaling(),
            ray_actor_options=m.ray_actor_options,
            user_config=m.user_config(),
        )
        deployment._version = code_version(m.name, str(store.root), kwargs)
        bound[m.name] = deployment.bind(m.name, str(store.root), **kwargs)
    directory = cast(Any, Directory).options()
    directory._version = code_version(sorted(bound))
    app: serve.Application = directory.bind(bound)
    return app
