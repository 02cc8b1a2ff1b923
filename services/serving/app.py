"""Build the Serve application and operate it: start or join a cluster, deploy, scale,
roll out a checkpoint version, report status.

The application ``genfleet`` has one deployment per model (``ModelDeployment`` with the
model's name) and a tiny ingress, ``Directory``, that lists them. Re-applying the app with
one model's options changed updates only that deployment: ``user_config`` changes
(version, batching) reconfigure live replicas; scaling changes add or remove replicas.
The desired state is kept as JSON next to the store so that successive ``scale`` and
``deploy`` commands compose.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import ray
from ray import serve
from ray.serve.config import ProxyLocation

from services.core.errors import InvalidArgument, ModelNotFound, ModelNotReady
from services.core.store import ModelStore
from services.serving.config import ServeConfig
from services.serving.deployment import ModelDeployment

log = logging.getLogger("genfleet.serving")


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
            autoscaling_config=m.autoscaling_config,
            ray_actor_options=m.ray_actor_options,
            user_config=m.user_config(),
        )
        bound[m.name] = deployment.bind(
            m.name, str(store.root), device=m.device, autocast=m.autocast, threads=m.threads,
            limits=dict(m.limits))
    app: serve.Application = cast(Any, Directory).bind(bound)
    return app


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


# ------------------------------------------------------------------ cluster
def start_cluster(address: str | None = None, *, num_cpus: int | None = None,
                  metrics_port: int | None = None, dashboard_port: int | None = None) -> None:
    """Join ``address``, or start an embedded local cluster with explicit logical CPUs.

    ``metrics_port``: Ray's metrics export port on this node (None: any free port).
    ``dashboard_port``: also run the Ray dashboard on 127.0.0.1 there (off by default: its
    processes take CPU from the replicas on a small machine). Either way Ray's Prometheus
    service-discovery file (``/tmp/ray/prom_metrics_service_discovery.json``, read by
    ``deploy/prometheus/prometheus.yml``) is kept current by Ray's writer in this process.
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP", "0")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        return
    dashboard: dict[str, Any] = {"include_dashboard": False}
    if dashboard_port is not None:
        dashboard = {"include_dashboard": True, "dashboard_host": "127.0.0.1",
                     "dashboard_port": dashboard_port}
    ray.init(num_cpus=num_cpus if num_cpus is not None else max(4, os.cpu_count() or 2),  # logical
             logging_level=logging.WARNING, log_to_driver=False,
             _metrics_export_port=metrics_port, **dashboard)
    _write_service_discovery()


_discovery_stop = threading.Event()


def _write_service_discovery() -> None:
    """Ray's Prometheus service-discovery writer (what the dashboard runs) in a daemon
    thread of this process, until ``stop_cluster``: the file lists every live node's
    metrics export address."""
    from ray._private.metrics_agent import PrometheusServiceDiscoveryWriter
    from ray._private.worker import global_worker

    node = global_worker.node
    if node is None:
        return
    writer = PrometheusServiceDiscoveryWriter(node.gcs_address, node.get_temp_dir_path(),
                                              node.get_session_dir_path())
    writer.write()  # the file exists when start_cluster returns
    _discovery_stop.clear()

    def refresh() -> None:
        while not _discovery_stop.wait(writer.default_service_discovery_flush_period):
            try:
                writer.write()
            except Exception as exc:  # a node went away mid-call: next round
                log.debug("service discovery file not written: %s", exc)

    threading.Thread(target=refresh, name="prometheus-discovery", daemon=True).start()


def metrics_endpoints() -> dict[str, str]:
    """Where this cluster's metrics are: every live node's metrics export address, and
    Ray's service-discovery file when this machine has one."""
    from ray._private import ray_constants
    from ray._private.worker import global_worker

    out = {f"ray node {n['NodeManagerAddress']}":
           f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
           for n in ray.nodes() if n.get("Alive")}
    node = global_worker.node
    temp_dir = Path(node.get_temp_dir_path() if node is not None else "/tmp/ray")
    discovery = temp_dir / ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE
    if discovery.exists():
        out["service discovery"] = str(discovery)
    return out


def join_node(gcs_address: str) -> None:
    """Start a raylet on this machine that joins the cluster at ``gcs_address`` with no
    CPUs or GPUs for tasks, so that a driver here (the gateway) can call the cluster.

    Raises:
        ModelNotReady: ``ray start`` failed (cluster unreachable, version mismatch).
    """
    ray_cli = Path(sys.executable).with_name("ray")
    command = [str(ray_cli) if ray_cli.exists() else "ray", "start", f"--address={gcs_address}",
               "--num-cpus=0", "--num-gpus=0", "--disable-usage-stats"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ModelNotReady(f"could not join the Ray cluster at {gcs_address}: "
                            f"{(done.stderr or done.stdout).strip()[-2000:]}")


def connect(address: str | None = None) -> None:
    """Join a running cluster (``auto``: the local one ``genfleet up`` started)."""
    if ray.is_initialized():
        return
    try:
        ray.init(address=address or "auto", logging_level=logging.ERROR, log_to_driver=False)
    except ConnectionError as exc:
        raise ModelNotReady(f"no Ray cluster at {address or 'auto'}: run genfleet up") from exc


def stop_cluster(*, embedded: bool) -> None:
    """Shut Serve down (when this process started the cluster) and leave Ray."""
    _discovery_stop.set()
    if embedded and ray.is_initialized():
        serve.shutdown()
    ray.shutdown()


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
