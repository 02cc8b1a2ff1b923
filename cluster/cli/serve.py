"""``genfleet up`` (Ray, every model served, the gRPC gateway, metrics) and the commands
that operate what it started: ``down``, ``status``, ``scale``, ``deploy``."""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from cluster.cli.common import (
    client,
    client_args,
    gateway_args,
    gateway_config,
    gateway_loop,
    join_cluster,
    open_store,
    run_dir,
    security_note,
    serve_until_signal,
)
from services.core.errors import InvalidArgument


def _missing(store: Any, names: list[str]) -> list[str]:
    """The models of the config that have no checkpoint (each must be a family's name)."""
    from services.models import FAMILIES

    missing = [n for n in names if not store.versions(n)]
    for name in missing:
        if name not in FAMILIES:
            raise InvalidArgument("models", f"{name!r} has no checkpoint and is not a family name; "
                                            f"train it: genfleet train FAMILY --local --name {name}")
    return missing


async def _serve_gateway(args: argparse.Namespace, store: Any, config: Any, started: float,
                         gateway_settings: Any, training: Any, loop: str) -> str | None:
    """Serve until a signal (None) or until the embedded Ray head dies (its reason);
    ``training`` (a ``BackgroundTraining`` or None) starts once the gateway answers."""
    from cluster.batch.manager import BatchManager
    from services.gateway.grpc_server import Gateway
    from services.serving import ray_cluster
    from services.serving.serve_backend import ServeBackend

    batch_root = Path(args.batch_root) if args.batch_root else store.root.parent / "batches"
    batches = BatchManager(store, batch_root)
    gateway = Gateway(ServeBackend(config.app_name), batches=batches, config=gateway_settings)
    background: list[asyncio.Task[None]] = []

    async def announce(port: int) -> None:
        target = f"{args.host}:{port}"
        metrics = ({"gateway": f"http://{args.host}:{gateway.metrics_port}/metrics"}
                   if gateway.metrics_port is not None else {})
        metrics.update(await asyncio.to_thread(ray_cluster.metrics_endpoints))
        state = {"pid": os.getpid(), "target": target, "app": config.app_name,
                 "ray_address": ray_cluster.address(),
                 "ray_auth_mode": os.environ.get("RAY_AUTH_MODE", ""),  # as ray.init set it
                 "http_port": gateway.http_port, "event_loop": loop,
                 "models": list(config.models), "started": time.time(), "metrics": metrics}
        (run_dir(store) / "up.json").write_text(json.dumps(state))
        served = [m for m in config.models if training is None or m in training.served]
        print(f"genfleet is up in {time.perf_counter() - started:.1f} s", flush=True)
        print(f"  gRPC gateway     {target}  (genfleet.v1.GenerationService, grpc.health.v1, "
              f"reflection{security_note(gateway)}; event loop {loop})")
        print(f"  OIP v2 gRPC      {target}  (inference.GRPCInferenceService: tritonclient, "
              f"KServe)")
        if gateway.http_port is not None:
            scheme = "https" if gateway.config.tls else "http"
            print(f"  OIP v2 REST      {scheme}://{args.host}:{gateway.http_port}/v2")
        print(f"  models           "
              f"{', '.join(f'{m}@{config.models[m].version}' for m in served) or 'none yet'}")
        if training is not None:
            print(f"  training         {', '.join(training.missing)} (in the background, one "
                  f"at a time; each serves when trained; progress: genfleet status)")
        print(f"  model store      {store.root}")
        print(f"  batch jobs       genfleet.v1.BatchService, outputs under {batch_root}")
        for what, where in metrics.items():
            print(f"  metrics          {where}  ({what})")
        if args.dashboard_port >= 0 and args.address is None:
            print(f"  Ray dashboard    http://127.0.0.1:{args.dashboard_port}")
        print("  stop with        genfleet down  (or Ctrl-C)", flush=True)
        if training is not None:
            if args.demo:
                training.on_served = lambda name: _demo(target, [name], Path(args.demo), args)
            background.append(asyncio.get_running_loop().create_task(training.run()))
        if args.demo and served:
            await asyncio.to_thread(_demo, target, served, Path(args.demo), args)

    watch = ray_cluster.watch_head if args.address is None else None
    try:
        return await serve_until_signal(gateway, args.grace, announce, watch,
                                        lambda reason: _leave(store, reason))
    finally:
        for task in background:
            task.cancel()
        if training is not None:
            training.cancel()


def _demo(target: str, models: list[str], out: Path, args: argparse.Namespace) -> None:
    """Generate a labelled grid from every served model through gRPC."""
    from services.evaluation.grid import save_grid
    from services.gateway.client import GenfleetClient

    out.mkdir(parents=True, exist_ok=True)
    with GenfleetClient(target, token=args.token, timeout=120) as client:
        infos = {m.name: m for m in client.list_models()}
        for name in models:
            info = infos[name]
            conditional = "conditional" in info.capabilities and len(info.classes) > 0
            labels = [i // 10 % len(info.classes) for i in range(100)] if conditional else None
            started = time.perf_counter()
            result = client.generate(name, 100, seed=0, labels=labels)
            ms = 1000 * (time.perf_counter() - started)
            if result.samples is not None and info.data_kind == "image":
                path = save_grid(result.samples, out / f"{name}.png", ncols=10, scale=6,
                                 title=f"{name}@{result.version} via gRPC",
                                 row_labels=[str(r) for r in range(10)] if conditional else None)
                print(f"  demo: {path}  (100 samples in {ms:.0f} ms)", flush=True)


def cmd_up(args: argparse.Namespace) -> int:
    from services.gateway import event_loop
    from services.serving import operations, ray_cluster
    from services.serving.config import load_config

    started = time.perf_counter()
    settings = gateway_config(args)  # a misconfiguration refuses before any work
    loop = gateway_loop(args)
    store = open_store(args)
    config = load_config(args.config, models=args.models or None)
    missing = _missing(store, list(config.models))
    print("starting Ray and the Serve application ...", flush=True)
    ray_cluster.start_cluster(args.address, num_cpus=args.num_cpus,
                          metrics_port=None if args.ray_metrics_port < 0 else args.ray_metrics_port,
                          dashboard_port=None if args.dashboard_port < 0 else args.dashboard_port)
    embedded = args.address is None
    lost: str | None = None
    try:
        training = None
        served = [m for m in config.models if m not in missing]
        if missing:
            from cluster.train.background import BackgroundTraining

            training = BackgroundTraining(
                store, config, served, missing, minutes=args.train_minutes,
                threads=args.train_threads or max(1, (os.cpu_count() or 2) - 1))
            training.start_board()  # before the gateway answers: calls see "training"
            serving = copy.deepcopy(config)
            serving.models = {m: c for m, c in config.models.items() if m in served}
            operations.deploy(serving, store)
            for name in served:
                config.models[name].version = serving.models[name].version
        else:
            operations.deploy(config, store)
        lost = event_loop.run(
            _serve_gateway(args, store, config, started, settings, training, loop), loop)
    finally:
        (run_dir(store) / "up.json").unlink(missing_ok=True)
        if lost is None:
            ray_cluster.stop_cluster(embedded=embedded)
    if lost is not None:
        _leave(store, lost)
    return 0


def _leave(store: Any, reason: str) -> NoReturn:
    """The embedded Ray head died (``reason``): nothing of the cluster answers, so kill what
    is left of it without asking it anything, say so in one line, and exit 1 at once (Ray's
    threads would wait on the dead GCS at interpreter exit; the gateway, still answering
    UNAVAILABLE, closes its connections with the process)."""
    from services.serving import ray_cluster

    (run_dir(store) / "up.json").unlink(missing_ok=True)
    ray_cluster.abandon_cluster()
    sys.stdout.flush()
    print(f"genfleet up: {reason}; the cluster and everything it served are gone and "
          f"the gateway has stopped; run genfleet up again", file=sys.stderr, flush=True)
    os._exit(1)


def cmd_down(args: argparse.Namespace) -> int:

    path = run_dir(open_store(args)) / "up.json"
    if not path.exists():
        print("genfleet is not up (no run state)")
        return 0
    pid = json.loads(path.read_text())["pid"]
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        path.unlink(missing_ok=True)
        print(f"genfleet (pid {pid}) was not running; cleared its run state")
        return 0
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print(f"genfleet (pid {pid}) stopped")
            return 0
        time.sleep(0.2)
    print(f"genfleet (pid {pid}) did not stop within {args.wait} s", file=sys.stderr)
    return 1


def _connect(args: argparse.Namespace) -> None:
    """Join ``--address``, else the cluster ``genfleet up`` runs for this store, else Ray's
    ``auto``."""
    join_cluster(args.address, open_store(args))


def cmd_status(args: argparse.Namespace) -> int:
    from services.serving import operations

    store = open_store(args)
    config = operations.load_state(store)
    _connect(args)
    print(f"{'model':<16}{'version':>8}{'status':>12}{'replicas':>10}{'min':>5}{'max':>5}"
          f"{'queued':>8}{'running':>9}  states")
    for row in operations.status(config):
        running = row.replicas.get("RUNNING", 0)
        queued = "-" if row.queued is None else row.queued
        busy = "-" if row.running is None else row.running
        print(f"{row.name:<16}{row.version or '-':>8}{row.status:>12}{running:>10}"
              f"{row.min_replicas:>5}{row.max_replicas:>5}{queued:>8}{busy:>9}  {row.replicas}")
    from services.serving.pending import read_board

    waiting = read_board(config.app_name)
    if waiting:
        print("not served yet (genfleet up trains them in the background, one at a time):")
        for pending in waiting.values():
            print(f"  {pending.line()}")
    up = run_dir(store) / "up.json"
    if up.exists():
        target = json.loads(up.read_text())["target"]
        args.target = target
        with client(args) as gateway:
            print(f"gateway {target}: {gateway.health()}")
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    from services.serving import operations

    _connect(args)
    config = operations.scale(open_store(args), args.model, min_replicas=args.min,
                           max_replicas=args.max, gpus=args.gpus)
    m = config.models[args.model]
    print(f"{args.model}: replicas {m.autoscaling_config['min_replicas']}.."
          f"{m.autoscaling_config['max_replicas']}, GPUs per replica "
          f"{m.ray_actor_options.get('num_gpus', 0)}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from services.serving import operations

    _connect(args)
    store = open_store(args)
    batching = {k: v for k, v in (("max_batch_size", args.max_batch_size),
                                  ("batch_wait_timeout_s", args.batch_wait_s)) if v is not None}
    config = operations.rollout(store, args.model, args.version, batching=batching)
    m = config.models[args.model]
    print(f"{args.model} serves version {m.version} (batching {m.batching})")
    return 0


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("up", help="start Ray, serve every model, run the gRPC gateway")
    p.add_argument("--config", default=None, help="serve YAML (default cluster/configs/serve.yaml)")
    p.add_argument("--models", nargs="*", default=None, help="serve only these")
    p.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the embedded cluster")
    gateway_args(p)
    p.add_argument("--ray-metrics-port", type=int, default=8081,
                   help="Ray's metrics export port on the embedded cluster (-1: any free port)")
    p.add_argument("--dashboard-port", type=int, default=-1,
                   help="also run the Ray dashboard on 127.0.0.1 at this port (e.g. 8265); "
                        "off by default: it takes CPU from the replicas on small machines")
    p.add_argument("--batch-root", default=None,
                   help="BatchService outputs go below this directory (default: beside the store)")
    p.add_argument("--train-minutes", type=float, default=5.0,
                   help="training cap for a family that has no checkpoint (trained in the "
                        "background while the others serve)")
    p.add_argument("--train-threads", type=int, default=None,
                   help="torch threads of that training (default: all cores but one)")
    p.add_argument("--demo", default=None, metavar="DIR",
                   help="write a grid from every model (via gRPC) to DIR as it comes up")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="stop what genfleet up started")
    p.add_argument("--wait", type=float, default=60.0)
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("status", help="replicas, versions and gateway health")
    p.add_argument("--address", default=None)
    client_args(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("scale", help="change one model's replica bounds / GPUs per replica")
    p.add_argument("model")
    p.add_argument("--min", type=int, default=None)
    p.add_argument("--max", type=int, default=None)
    p.add_argument("--gpus", type=float, default=None, help="GPUs per replica (fractional ok)")
    p.add_argument("--address", default=None)
    p.set_defaults(func=cmd_scale)

    p = sub.add_parser("deploy", help="roll a model to a checkpoint version (no failed requests)")
    p.add_argument("model")
    p.add_argument("--version", type=int, default=None, help="default: the latest in the store")
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument("--batch-wait-s", type=float, default=None)
    p.add_argument("--address", default=None)
    p.set_defaults(func=cmd_deploy)
