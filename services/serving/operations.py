"""Operate the Serve application: apply a config (``deploy``), change one model's replicas
(``scale``), roll it to a checkpoint version (``rollout``), report ``status``.

Re-applying the app with one model's options changed updates only that deployment:
``user_config`` changes (version, batching) reconfigure live replicas; scaling changes
add or remove replicas. The desired state is kept as JSON next to the store so that
successive ``scale`` and ``deploy`` commands compose.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.config import ProxyLocation

from services.core.errors import InvalidArgument, ModelNotFound
from services.core.store import ModelStore
from services.serving.app import build_app, pin_versions
from services.serving.config import ServeConfig

log = logging.getLogger("genfleet.serving")


# ------------------------------------------------------------- desired state
def state_path(store: ModelStore, app_name: str = "genfleet") -> Path:
    return store.root.parent / "run" / f"serve-state-{app_name}.json"


def save_state(config: ServeConfig, store: ModelStore) -> None:
    path = state_path(store, config.app_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(config.to_json())
    tmp.replace(path)


def load_state(store: ModelStore, app_name: str = "genfleet") -> ServeConfig:
    path = state_path(store, app_name)
    if not path.exists():
        raise ModelNotFound(f"nothing is deployed from {store.root} (no {path}); run genfleet up")
    return ServeConfig.from_json(path.read_text())


# ---------------------------------------------------------------- operations
def deploy(config: ServeConfig, store: ModelStore) -> None:
    """Apply ``config`` (pinning versions) and wait until every deployment is running."""
    pin_versions(config, store)
    serve.start(proxy_location=ProxyLocation.Disabled)
    serve.run(build_app(config, store), name=config.app_name, route_prefix=None, blocking=False)
    save_state(config, store)


def scale(store: ModelStore, name: str, *, min_replicas: int | None = None,
          max_replicas: int | None = None, gpus: float | None = None,
          app_name: str = "genfleet") -> ServeConfig:
    """Change one model's replica bounds (and GPUs per replica); others are untouched.

    Giving only one bound moves the other when needed (``--max 1`` lowers a min of 2).
    """
    config = load_state(store, app_name)
    model = config.model(name)
    scaling = dict(model.autoscaling_config)
    lo, hi = int(scaling.get("min_replicas", 1)), int(scaling.get("max_replicas", 1))
    if min_replicas is not None:
        lo = min_replicas
        hi = max(hi, lo) if max_replicas is None else hi
    if max_replicas is not None:
        hi = max_replicas
        lo = min(lo, hi) if min_replicas is None else lo
    model.autoscaling_config = {**scaling, "min_replicas": lo, "max_replicas": hi}
    if "initial_replicas" in scaling:  # Serve requires min <= initial <= max
        model.autoscaling_config["initial_replicas"] = min(max(scaling["initial_replicas"], lo), hi)
    if gpus is not None:
        if gpus < 0:
            raise InvalidArgument("gpus", "must be >= 0")
        model.ray_actor_options = {**model.ray_actor_options, "num_gpus": gpus}
    model.validate()
    deploy(config, store)
    return config


def rollout(store: ModelStore, name: str, version: int | None,
            batching: dict[str, Any] | None = None, app_name: str = "genfleet") -> ServeConfig:
    """Serve ``version`` (latest when None) of ``name`` by reconfiguring its replicas;
    ``batching`` changes the dynamic-batching settings the same way (no restart)."""
    config = load_state(store, app_name)
    model = config.model(name)
    # a broken version is refused here, while the replicas keep serving the old one
    model.version = store.verify(name if version is None else f"{name}@{version}").version
    model.batching = {**model.batching, **(batching or {})}
    model.validate()
    deploy(config, store)
    return config


@dataclass
class DeploymentStatus:
    name: str
    status: str
    version: int | None
    replicas: dict[str, int]
    min_replicas: int
    max_replicas: int
    queued: int | None  # Generate requests waiting for a batch in the replicas (None: no report)
    running: int | None  # in the batches computing now


def replica_load(app_name: str = "genfleet", timeout_s: float = 5.0) -> dict[str, dict[str, int]]:
    """The load the replicas last reported to the app's Directory, per model."""
    try:
        loads: dict[str, dict[str, int]] = serve.get_app_handle(app_name).load.remote().result(
            timeout_s=timeout_s)
    except Exception as exc:  # app down or directory restarting: status still shows replicas
        log.warning("no replica load from %s: %s", app_name, exc)
        return {}
    return loads


def status(config: ServeConfig) -> list[DeploymentStatus]:
    """Replica states per model, with the configured bounds, version and queue depth."""
    app = serve.status().applications.get(config.app_name)
    loads = replica_load(config.app_name) if app else {}
    rows = []
    for name, m in config.models.items():
        dep = app.deployments.get(name) if app else None
        rows.append(DeploymentStatus(
            name=name, status=str(dep.status.value if dep else "NOT_DEPLOYED"),
            version=m.version,
            replicas={str(k.value if hasattr(k, "value") else k): int(v)
                      for k, v in (dep.replica_states.items() if dep else [])},
            min_replicas=int(m.autoscaling_config.get("min_replicas", 1)),
            max_replicas=int(m.autoscaling_config.get("max_replicas", 1)),
            queued=loads[name]["queued"] if name in loads else None,
            running=loads[name]["running"] if name in loads else None,
        ))
    return rows
