"""``genfleet`` commands that run or talk to the serving cluster: up, down, status, scale,
deploy, generate, score, bench."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from services.core.errors import InvalidArgument

DEFAULT_TARGET = "127.0.0.1:50051"


def _run_dir(store: Any) -> Path:
    path: Path = store.root.parent / "run"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _client(args: argparse.Namespace) -> Any:
    from services.gateway.client import GenfleetClient

    return GenfleetClient(args.target, token=args.token or os.environ.get("GENFLEET_TOKEN"),
                          tls_ca=Path(args.tls_ca) if args.tls_ca else None, timeout=args.timeout)


# ---------------------------------------------------------------------------- up
def gateway_config(args: argparse.Namespace) -> Any:
    """The gateway's settings from the flags ``gateway_args`` defines, validated: a
    misconfiguration refuses to start (InvalidArgument, exit 2) before any other work."""
    from services.gateway.server import GatewayConfig

    token = args.token if args.token is not None else os.environ.get("GENFLEET_TOKEN")
    config = GatewayConfig(
        host=args.host, port=args.port, token=token,
        tls_cert=Path(args.tls_cert) if args.tls_cert is not None else None,
        tls_key=Path(args.tls_key) if args.tls_key is not None else None,
        tls_client_ca=Path(args.tls_client_ca) if args.tls_client_ca is not None else None,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_request_bytes_in_flight=args.max_inflight_mib * 1024 * 1024,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        health_port=None if args.health_port < 0 else args.health_port)
    config.validate()
    return config


def gateway_args(p: argparse.ArgumentParser) -> None:
    """Flags of the gRPC gateway (``up`` and ``gateway``)."""
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--token", default=None, help="require this bearer token ($GENFLEET_TOKEN)")
    p.add_argument("--tls-cert", default=None)
    p.add_argument("--tls-key", default=None)
    p.add_argument("--tls-client-ca", default=None, help="require client certificates (mTLS)")
    p.add_argument("--max-concurrent-rpcs", type=int, default=1024,
                   help="RPCs in flight; beyond: RESOURCE_EXHAUSTED at once")
    p.add_argument("--max-inflight-mib", type=int, default=512,
                   help="request bytes held by the RPCs in flight, MiB; beyond: RESOURCE_EXHAUSTED")
    p.add_argument("--metrics-port", type=int, default=8080,
                   help="gateway Prometheus /metrics port (0: any free port, -1: none)")
    p.add_argument("--health-port", type=int, default=-1,
                   help="also serve grpc.health.v1 alone, in plaintext and without auth, on this "
                        "port (for Kubernetes gRPC probes, which speak no TLS; -1: none)")
    p.add_argument("--grace", type=float, default=10.0, help="shutdown grace period, seconds")


def _train_missing(store: Any, names: list[str], minutes: float, progress: bool) -> None:
    from services.models import FAMILIES
    from services.training.recipes import train_and_save

    for name in names:
        if store.versions(name):
            continue
        if name not in FAMILIES:
            raise InvalidArgument("models", f"{name!r} has no checkpoint and is not a family name; "
                                            f"train it: genfleet train FAMILY --local --name {name}")
        print(f"[{name}] no checkpoint in {store.root}: training (cap {minutes} min)", flush=True)
        train_and_save(name, store=store, train_overrides={"max_minutes": minutes},
                       progress=progress)


async def _serve_gateway(args: argparse.Namespace, store: Any, config: Any, started: float,
                         gateway_settings: Any) -> None:
    from cluster.batch.manager import BatchManager
    from services.gateway.server import Gateway
    from services.serving import app as serving
    from services.serving.backend import ServeBackend

    batch_root = Path(args.batch_root) if args.batch_root else store.root.parent / "batches"
    batches = BatchManager(store, batch_root)
    gateway = Gateway(ServeBackend(config.app_name), batches=batches, config=gateway_settings)

    async def announce(port: int) -> None:
        target = f"{args.host}:{port}"
        metrics = ({"gateway": f"http://{args.host}:{gateway.metrics_port}/metrics"}
                   if gateway.metrics_port is not None else {})
        metrics.update(await asyncio.to_thread(serving.metrics_endpoints))
        state = {"pid": os.getpid(), "target": target, "app": config.app_name,
                 "models": list(config.models), "started": time.time(), "metrics": metrics}
        (_run_dir(store) / "up.json").write_text(json.dumps(state))
        print(f"genfleet is up in {time.perf_counter() - started:.1f} s", flush=True)
        print(f"  gRPC gateway     {target}  (genfleet.v1.GenerationService, grpc.health.v1, "
              f"reflection{security_note(gateway)})")
        print(f"  models           "
              f"{', '.join(f'{m}@{c.version}' for m, c in config.models.items())}")
        print(f"  model store      {store.root}")
        print(f"  batch jobs       genfleet.v1.BatchService, outputs under {batch_root}")
        for what, where in metrics.items():
            print(f"  metrics          {where}  ({what})")
        if args.dashboard_port >= 0 and args.address is None:
            print(f"  Ray dashboard    http://127.0.0.1:{args.dashboard_port}")
        print("  stop with        genfleet down  (or Ctrl-C)", flush=True)
        if args.demo:
            await asyncio.to_thread(_demo, target, list(config.models), Path(args.demo), args)

    await serve_until_signal(gateway, args.grace, announce)


def security_note(gateway: Any) -> str:
    """What the start-up line says of transport security: TLS and/or token auth."""
    c = gateway.config
    return f"{', TLS' if c.tls else ''}{', mTLS' if c.tls_client_ca else ''}" \
           f"{', token auth' if c.token else ''}"


async def serve_until_signal(gateway: Any, grace: float,
                             announce: Callable[[int], Awaitable[None]]) -> None:
    """Start ``gateway``, ``announce(port)``, serve until SIGINT or SIGTERM, then report
    NOT_SERVING and let the calls in flight finish (``grace`` seconds)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before start: a signal never goes unheard
        loop.add_signal_handler(sig, stop.set)
    await announce(await gateway.start())
    await stop.wait()
    print("shutting down: health NOT_SERVING, finishing in-flight requests", flush=True)
    await gateway.stop(grace=grace)


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
    from services.core.store import ModelStore
    from services.serving import app as serving
    from services.serving.config import load_config

    started = time.perf_counter()
    settings = gateway_config(args)  # a misconfiguration refuses before any work
    store = ModelStore(args.store)
    config = load_config(args.config, models=args.models or None)
    _train_missing(store, list(config.models), args.train_minutes, not args.quiet)
    print("starting Ray and the Serve application ...", flush=True)
    serving.start_cluster(args.address, num_cpus=args.num_cpus,
                          metrics_port=None if args.ray_metrics_port < 0 else args.ray_metrics_port,
                          dashboard_port=None if args.dashboard_port < 0 else args.dashboard_port)
    embedded = args.address is None
    try:
        serving.deploy(config, store)
        asyncio.run(_serve_gateway(args, store, config, started, settings))
    finally:
        (_run_dir(store) / "up.json").unlink(missing_ok=True)
        serving.stop_cluster(embedded=embedded)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from services.core.store import ModelStore

    path = _run_dir(ModelStore(args.store)) / "up.json"
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
    from services.serving import app as serving

    serving.connect(args.address)


def cmd_status(args: argparse.Namespace) -> int:
    from services.core.store import ModelStore
    from services.serving import app as serving

    store = ModelStore(args.store)
    config = serving.load_state(store)
    _connect(args)
    print(f"{'model':<16}{'version':>8}{'status':>12}{'replicas':>10}{'min':>5}{'max':>5}"
          f"{'queued':>8}{'running':>9}  states")
    for row in serving.status(config):
        running = row.replicas.get("RUNNING", 0)
        queued = "-" if row.queued is None else row.queued
        busy = "-" if row.running is None else row.running
        print(f"{row.name:<16}{row.version or '-':>8}{row.status:>12}{running:>10}"
              f"{row.min_replicas:>5}{row.max_replicas:>5}{queued:>8}{busy:>9}  {row.replicas}")
    up = _run_dir(store) / "up.json"
    if up.exists():
        target = json.loads(up.read_text())["target"]
        args.target = target
        with _client(args) as client:
            print(f"gateway {target}: {client.health()}")
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    from services.core.store import ModelStore
    from services.serving import app as serving

    _connect(args)
    config = serving.scale(ModelStore(args.store), args.model, min_replicas=args.min,
                           max_replicas=args.max, gpus=args.gpus)
    m = config.models[args.model]
    print(f"{args.model}: replicas {m.autoscaling_config['min_replicas']}.."
          f"{m.autoscaling_config['max_replicas']}, GPUs per replica "
          f"{m.ray_actor_options.get('num_gpus', 0)}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from services.core.store import ModelStore
    from services.serving import app as serving

    _connect(args)
    store = ModelStore(args.store)
    batching = {k: v for k, v in (("max_batch_size", args.max_batch_size),
                                  ("batch_wait_timeout_s", args.batch_wait_s)) if v is not None}
    config = serving.rollout(store, args.model, args.version, batching=batching)
    m = config.models[args.model]
    print(f"{args.model} serves version {m.version} (batching {m.batching})")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from services.cli import _parse_sets
    from services.evaluation.grid import save_grid

    labels = [int(v) for v in args.labels.split(",")] if args.labels else None
    with _client(args) as client:
        started = time.perf_counter()
        out = client.generate(args.model, args.num_samples, seed=args.seed, labels=labels,
                              options=_parse_sets(args.set), output="both")
        ms = 1000 * (time.perf_counter() - started)
    print(f"{out.model}@{out.version}: {args.num_samples} samples in {ms:.0f} ms "
          f"(server {out.timings.total_ms:.0f} ms)")
    for line in out.text:
        print(repr(line))
    if out.samples is not None and out.samples.ndim == 4:
        path = save_grid(out.samples, Path(args.out), ncols=min(10, args.num_samples), scale=6,
                         title=f"{out.model}@{out.version} seed {args.seed}")
        print(f"grid: {path}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    import numpy as np

    from services.core import data as datasets

    test = datasets.split(datasets.load(args.data)).test
    x = test.as_float()[: args.num]
    labels = test.labels[: args.num].tolist() if (args.labels and test.labels is not None) else None
    with _client(args) as client:
        resp = client.score(args.model, x, labels=labels)
    kind = {1: "exact", 2: "lower bound", 3: "unnormalised"}.get(resp.kind, "?")
    print(f"{resp.model}@{resp.version} on {len(x)} test examples of {args.data} ({kind}):")
    print(f"  mean log p = {np.mean(resp.log_prob):.2f} nats"
          + (f", {np.mean(resp.bits_per_dim):.3f} bits/dim" if resp.bits_per_dim else ""))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from services.bench import format_report, run_grpc_load, run_raw
    from services.cli import _parse_sets

    options = _parse_sets(args.set)
    report: dict[str, Any] = {"model": args.model, "concurrency": args.concurrency,
                              "samples_per_request": args.samples, "options": options}
    if not args.raw_only:
        report["served"] = run_grpc_load(
            args.target, args.model, concurrency=args.concurrency, duration_s=args.duration,
            samples=args.samples, options=options, token=args.token, warmup_s=args.warmup)
    if args.raw or args.raw_only:
        from services.core.store import ModelStore
        report["raw_batched"] = run_raw(ModelStore(args.store), args.model,
                                        batch=args.concurrency * args.samples,
                                        duration_s=args.duration, options=options)
        report["raw_unbatched"] = run_raw(ModelStore(args.store), args.model, batch=args.samples,
                                          duration_s=args.duration, options=options)
    print(format_report(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"json: {args.json}")
    return 0


# ------------------------------------------------------------------------ parser
def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=os.environ.get("GENFLEET_TARGET", DEFAULT_TARGET),
                   help="gateway host:port")
    p.add_argument("--token", default=None, help="bearer token (or $GENFLEET_TOKEN)")
    p.add_argument("--tls-ca", default=None, help="CA certificate to verify a TLS gateway")
    p.add_argument("--timeout", type=float, default=120.0, help="deadline per call, seconds")


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
                   help="training cap for a family that has no checkpoint")
    p.add_argument("--demo", default=None, metavar="DIR",
                   help="after start-up, write a grid from every model (via gRPC) to DIR")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="stop what genfleet up started")
    p.add_argument("--wait", type=float, default=60.0)
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("status", help="replicas, versions and gateway health")
    p.add_argument("--address", default=None)
    _client_args(p)
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

    p = sub.add_parser("generate", help="draw samples through the gateway")
    p.add_argument("model")
    p.add_argument("-n", "--num-samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labels", default=None, help="comma-separated class per sample")
    p.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE")
    p.add_argument("--out", default="grid.png")
    _client_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("score", help="score real test data through the gateway")
    p.add_argument("model")
    p.add_argument("--data", default="digits")
    p.add_argument("-n", "--num", type=int, default=100)
    p.add_argument("--labels", action="store_true", help="score given the true labels")
    _client_args(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("bench", help="closed-loop gRPC load; --raw adds the in-process model")
    p.add_argument("model")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--samples", type=int, default=1, help="samples per request")
    p.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE")
    p.add_argument("--raw", action="store_true", help="also measure the model in-process")
    p.add_argument("--raw-only", action="store_true")
    p.add_argument("--json", default=None)
    _client_args(p)
    p.set_defaults(func=cmd_bench)
