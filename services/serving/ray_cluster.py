"""The Ray cluster's lifecycle as genfleet uses it: start an embedded local cluster or
join one, start a raylet that joins a remote cluster (a gateway pod), leave, and tell
where the metrics are (Ray's Prometheus service-discovery file, kept current here while
the cluster runs: the dashboard's writer would cost a process). No Serve application
logic lives here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray import serve

from services.core.errors import ModelNotReady

log = logging.getLogger("genfleet.cluster")


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
    # everything of an embedded cluster is on this machine: replicas' lanes on loopback
    os.environ.setdefault("GENFLEET_LANE_HOST", "127.0.0.1")
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


def connect(address: str | None = None, *, auth_mode: str | None = None) -> None:
    """Join a running cluster (``auto``: the local one ``genfleet up`` started).
    ``auth_mode``: the cluster's ``RAY_AUTH_MODE`` (``token`` for a local cluster Ray 2.60
    started), applied unless the environment sets one: Ray finds it by itself only for
    ``auto``."""
    if ray.is_initialized():
        return
    if auth_mode and "RAY_AUTH_MODE" not in os.environ:
        from ray._raylet import Config  # type: ignore[attr-defined]

        os.environ["RAY_AUTH_MODE"] = auth_mode
        Config.initialize("")  # Ray reads the mode once, at import: read it again
    try:
        ray.init(address=address or "auto", logging_level=logging.ERROR, log_to_driver=False)
    except ConnectionError as exc:
        raise ModelNotReady(f"no Ray cluster at {address or 'auto'}: run genfleet up") from exc


def address() -> str:
    """The GCS address of the cluster this process is connected to (host:port)."""
    return str(ray.get_runtime_context().gcs_address)


def watch_head(on_lost: Callable[[str], None], period_s: float = 0.5
               ) -> Callable[[], None] | None:
    """Call ``on_lost(reason)`` once, from a daemon thread, when a process of the embedded
    head (its GCS or raylet) exits. Returns the function that stops watching (call it
    before an orderly shutdown stops the head), or None when this process did not start
    the cluster (nothing to watch)."""
    from ray._private import ray_constants
    from ray._private.worker import global_worker

    node = global_worker.node
    kinds = {ray_constants.PROCESS_TYPE_GCS_SERVER: "GCS (gcs_server)",
             ray_constants.PROCESS_TYPE_RAYLET: "raylet"}
    watched = [(name, info.process) for kind, name in kinds.items()
               for info in (node.all_processes.get(kind, []) if node is not None else [])
               if info.process is not None]
    if not watched:
        return None
    done = threading.Event()

    def poll() -> None:
        while not done.wait(period_s):
            for name, process in watched:
                code = process.poll()
                if code is not None:
                    how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                    done.set()
                    on_lost(f"the Ray head's {name} exited ({how})")
                    return

    threading.Thread(target=poll, name="ray-head-watch", daemon=True).start()
    return done.set


def abandon_cluster() -> None:
    """After the head died: kill what is left of the embedded cluster's processes without
    asking the GCS anything (``ray.shutdown`` and ``serve.shutdown`` would wait on it)."""
    from ray._private.worker import global_worker

    _discovery_stop.set()
    orphans = descendants(os.getpid())  # the raylet's agents and workers too
    node = global_worker.node
    if node is not None:
        node.kill_all_processes(check_alive=False, allow_graceful=False, wait=False)
    for pid in orphans:
        with contextlib.suppress(OSError):  # gone already
            os.kill(pid, signal.SIGKILL)


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(proc.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_cluster(*, embedded: bool) -> None:
    """Shut Serve down (when this process started the cluster) and leave Ray."""
    _discovery_stop.set()
    if embedded and ray.is_initialized():
        serve.shutdown()
    ray.shutdown()
