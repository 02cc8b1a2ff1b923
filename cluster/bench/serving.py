"""Serving benchmark: every ratio the serving issue targets, measured in one run.

    python -m cluster.bench.serving --store /work/zoo-store --out .docs/bench/serving.json

1. diffusion at saturation: served samples/s vs the raw model in-process at the batch
   size the server forms (same torch threads);
2. dynamic batching: gan, vae, flow with 16 clients x 1 sample, max_batch_size 32 vs 1;
3. gateway overhead: p50 of a 1-sample gan request through gRPC vs a direct
   DeploymentHandle call from the same process;
4. ``genfleet up`` with checkpoints present -> first successful Generate.

Prints a table and writes JSON. Needs trained checkpoints of gan, vae, flow, diffusion.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

MODELS = ["gan", "vae", "flow", "diffusion"]


class _GatewayThread:
    def __init__(self, app_name: str) -> None:
        from services.gateway.server import Gateway, GatewayConfig
        from services.serving.backend import ServeBackend

        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.gateway = Gateway(ServeBackend(app_name), GatewayConfig(port=0))
        port = asyncio.run_coroutine_threadsafe(self.gateway.start(), self.loop).result(60)
        self.target = f"127.0.0.1:{port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.gateway.stop(2), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)


def _set_batching(store: Any, name: str, size: int, wait: float) -> None:
    from services.serving import app as serving

    serving.rollout(store, name, None, batching={"max_batch_size": size,
                                                 "batch_wait_timeout_s": wait})
    time.sleep(1.0)


def _handle_p50(name: str, n: int = 300) -> float:
    from ray import serve

    from services.core import api

    handle = serve.get_deployment_handle(name, "genfleet")
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        api.unwrap(handle.generate.remote(api.GenerateRequest(name, 1, seed=i)).result())
        lat.append(1000 * (time.perf_counter() - t0))
    return statistics.median(lat[20:])


def _grpc_p50(target: str, name: str, n: int = 300) -> float:
    from services.gateway.client import GenfleetClient

    lat = []
    with GenfleetClient(target, retries=0) as client:
        for i in range(n):
            t0 = time.perf_counter()
            client.generate(name, 1, seed=i)
            lat.append(1000 * (time.perf_counter() - t0))
    return statistics.median(lat[20:])


def _startup(store_root: Path, port: int) -> float:
    """Seconds from launching ``genfleet up`` to the first successful Generate."""
    import grpc

    from services.gateway.client import GenfleetClient

    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "--store", str(store_root), "-q", "up",
         "--port", str(port), "--models", *MODELS],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        with GenfleetClient(f"127.0.0.1:{port}", retries=0, timeout=5) as client:
            while time.perf_counter() - t0 < 180:
                try:
                    client.generate("gan", 1)
                    return time.perf_counter() - t0
                except grpc.RpcError:
                    time.sleep(0.2)
        raise RuntimeError("genfleet up did not serve within 180 s")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--out", default=".docs/bench/serving.json")
    parser.add_argument("--skip-startup", action="store_true")
    args = parser.parse_args()

    import ray
    import torch
    from ray import serve

    from services.bench import run_grpc_load, run_raw
    from services.core.store import ModelStore
    from services.serving import app as serving
    from services.serving.config import load_config

    store = ModelStore(args.store)
    results: dict[str, Any] = {"machine": f"{os.cpu_count()} CPUs", "duration_s": args.duration}
    if not args.skip_startup:
        results["startup_to_first_generate_s"] = _startup(store.root, 50977)
        print(f"genfleet up -> first Generate: {results['startup_to_first_generate_s']:.1f} s",
              flush=True)

    serving.start_cluster(num_cpus=4)
    config = load_config(models=MODELS)
    for m in config.models.values():
        m.autoscaling_config = {"min_replicas": 1, "max_replicas": 1, "initial_replicas": 1}
    serving.deploy(config, store)
    gateway = _GatewayThread(config.app_name)
    try:
        # 1. diffusion at saturation vs raw in-process at the batch the server forms
        threads = config.models["diffusion"].threads
        torch.set_num_threads(threads)
        conc = 32
        served = run_grpc_load(gateway.target, "diffusion", concurrency=conc,
                               duration_s=args.duration, samples=1)
        raw = run_raw(store, "diffusion", batch=min(conc, 64), duration_s=args.duration)
        results["diffusion_saturation"] = {"concurrency": conc, "torch_threads": threads,
                                           "served": served, "raw": raw,
                                           "served_over_raw": served["samples_per_s"] /
                                           raw["samples_per_s"]}
        print(f"diffusion: served {served['samples_per_s']:.1f} samples/s, raw "
              f"{raw['samples_per_s']:.1f} -> {results['diffusion_saturation']['served_over_raw']:.2f}",
              flush=True)
        # 2. dynamic batching vs max_batch_size=1 at 16 clients x 1 sample
        results["batching"] = {}
        for name in ("gan", "vae", "flow"):
            row = {}
            for size in (1, 32):
                _set_batching(store, name, size, 0.005)
                row[f"max_batch_{size}"] = run_grpc_load(
                    gateway.target, name, concurrency=16, duration_s=args.duration, samples=1)
            row["ratio"] = row["max_batch_32"]["samples_per_s"] / row["max_batch_1"]["samples_per_s"]
            results["batching"][name] = row
            print(f"{name}: batched {row['max_batch_32']['samples_per_s']:.0f} vs unbatched "
                  f"{row['max_batch_1']['samples_per_s']:.0f} samples/s -> {row['ratio']:.2f}x",
                  flush=True)
        # 3. gateway overhead on a 1-sample gan request
        handle_p50 = _handle_p50("gan")
        grpc_p50 = _grpc_p50(gateway.target, "gan")
        results["gateway_overhead"] = {"handle_p50_ms": handle_p50, "grpc_p50_ms": grpc_p50,
                                       "overhead_ms": grpc_p50 - handle_p50}
        print(f"gan 1 sample p50: handle {handle_p50:.2f} ms, gRPC {grpc_p50:.2f} ms", flush=True)
    finally:
        gateway.stop()
        serve.shutdown()
        ray.shutdown()

    table = [
        ("diffusion served / raw (saturation)",
         f"{results['diffusion_saturation']['served_over_raw']:.2f}", ">= 0.8"),
        *[(f"{n} batched / max_batch_size=1 (16 clients)", f"{r['ratio']:.2f}", ">= 3")
          for n, r in results["batching"].items()],
        ("gateway p50 - handle p50, gan 1 sample (ms)",
         f"{results['gateway_overhead']['overhead_ms']:.2f}", "<= 3"),
    ]
    if "startup_to_first_generate_s" in results:
        table.append(("genfleet up -> first Generate (s)",
                      f"{results['startup_to_first_generate_s']:.1f}", "<= 30"))
    width = max(len(r[0]) for r in table)
    print(f"\n{'measure':<{width}}  {'value':>8}  target")
    for name, value, target in table:
        print(f"{name:<{width}}  {value:>8}  {target}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\njson: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
