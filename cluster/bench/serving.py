"""Serving benchmark: every ratio the serving issue targets, measured in one run.

    python -m cluster.bench.serving --store /work/zoo-store --out .docs/bench/serving.json

The system under test is a real ``genfleet up`` (all six models, gateway in its own
process); this process only runs the gRPC clients and changes batching live (rollout).

1. diffusion at saturation: served samples/s vs the raw model in-process at the batch
   size the server forms (one replica, same torch threads);
2. dynamic batching: gan, vae, flow with 16 clients x 1 sample: max_batch_size 1 vs the
   default (32, 5 ms window), measured alternately ``--rounds`` times (ratio of medians),
   and once tuned for closed-loop load (16, 50 ms); one replica;
3. gateway overhead: p50 of a 1-sample gan request through gRPC vs a direct
   DeploymentHandle call from the same process;
4. ``genfleet up`` with checkpoints present -> first successful Generate.

Prints a table and writes JSON. Needs trained checkpoints of gan, vae, flow, diffusion.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cluster.bench import print_table

MODELS = ["autoregressive", "diffusion", "ebm", "flow", "gan", "vae"]


def _set_batching(store: Any, name: str, size: int, wait: float) -> None:
    from services.serving import operations

    operations.rollout(store, name, None, batching={"max_batch_size": size,
                                                 "batch_wait_timeout_s": wait})
    time.sleep(3.0)  # the gateway re-reads batching settings every 2 s


def _pin_replicas(store: Any, names: list[str], count: int | None) -> None:
    """One replica per model while ratios are measured (the autoscaler would otherwise give
    the unbatched runs, which keep more requests in flight, a second replica); ``None``
    restores the configured bounds."""
    from services.serving import operations
    from services.serving.config import load_config

    for name in names:
        if count is None:
            bounds = load_config(models=[name]).models[name].autoscaling_config
            operations.scale(store, name, min_replicas=int(bounds["min_replicas"]),
                          max_replicas=int(bounds["max_replicas"]))
        else:
            operations.scale(store, name, min_replicas=count, max_replicas=count)
    time.sleep(5.0)


def _handle_p50(name: str, n: int = 300) -> float:
    """p50 of direct DeploymentHandle calls from this process (a Ray driver)."""
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


def _start_up(store_root: Path, port: int) -> tuple[subprocess.Popen[bytes], float]:
    """Launch ``genfleet up``; return it and the seconds to its first successful Generate."""
    import grpc

    from services.gateway.client import GenfleetClient

    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "--store", str(store_root), "-q", "up",
         "--port", str(port), "--http-port", "-1", "--models", *MODELS],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    with GenfleetClient(f"127.0.0.1:{port}", retries=0, timeout=5) as client:
        while time.perf_counter() - t0 < 180:
            try:
                client.generate("gan", 1)
                return proc, time.perf_counter() - t0
            except grpc.RpcError:
                time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    raise RuntimeError("genfleet up did not serve within 180 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--out", default=".docs/bench/serving.json")
    parser.add_argument("--port", type=int, default=50977)
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating unbatched/batched measurements per model")
    args = parser.parse_args()
    # after disconnecting, Serve's router thread must not start a new local Ray instance
    os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"

    import ray
    import torch

    from cluster.bench.load import run_grpc_load, run_raw
    from services.core.store import ModelStore
    from services.serving import operations, ray_cluster
    from services.serving.config import load_config

    store = ModelStore(args.store)
    results: dict[str, Any] = {"machine": f"{os.cpu_count()} CPUs", "duration_s": args.duration,
                               "setup": "genfleet up (gateway in its own process, embedded Ray, "
                                        "replicas pinned to 1 per model, 1 torch thread each); "
                                        "clients in this process"}
    proc, startup = _start_up(store.root, args.port)
    results["startup_to_first_generate_s"] = startup
    print(f"genfleet up -> first Generate: {startup:.1f} s", flush=True)
    target = f"127.0.0.1:{args.port}"
    try:
        ray_cluster.connect("auto")
        _pin_replicas(store, ["diffusion", "gan", "vae", "flow"], 1)
        # 1. diffusion at saturation vs raw in-process at the batch the server forms
        config = operations.load_state(store)
        threads = config.models["diffusion"].threads
        # saturation: twice as many clients as a batch holds, so a full batch always waits
        batch, conc = 32, 64
        _set_batching(store, "diffusion", batch, 0.05)
        served = run_grpc_load(target, "diffusion", concurrency=conc, duration_s=args.duration,
                               samples=1)
        torch.set_num_threads(threads)
        raw = run_raw(store, "diffusion", batch=batch, duration_s=args.duration)
        results["diffusion_saturation"] = {"concurrency": conc, "torch_threads": threads,
                                           "batching": [batch, 0.05], "served": served,
                                           "raw": raw, "served_over_raw": served["samples_per_s"] /
                                           raw["samples_per_s"]}
        print(f"diffusion: served {served['samples_per_s']:.1f} samples/s, raw "
              f"{raw['samples_per_s']:.1f} -> {results['diffusion_saturation']['served_over_raw']:.2f}",
              flush=True)
        # 2. dynamic batching vs max_batch_size=1 at 16 clients x 1 sample; the two are
        #    measured alternately, `rounds` times, and compared by their medians (this
        #    shared machine drifts by more than the effect between runs minutes apart)
        results["batching"] = {}
        for name in ("gan", "vae", "flow"):
            row: dict[str, Any] = {"rounds": args.rounds}
            for _ in range(args.rounds):
                for size, wait in ((1, 0.0), (32, 0.005)):
                    _set_batching(store, name, size, wait)
                    row.setdefault(f"batch_{size}_wait_{wait}", []).append(run_grpc_load(
                        target, name, concurrency=16, duration_s=args.duration, samples=1))
            _set_batching(store, name, 16, 0.05)
            row["batch_16_wait_0.05"] = [run_grpc_load(
                target, name, concurrency=16, duration_s=args.duration, samples=1)]

            def median(key: str, row: dict[str, Any] = row) -> float:
                return statistics.median(r["samples_per_s"] for r in row[key])

            base = median("batch_1_wait_0.0")
            row["unbatched_samples_per_s"] = base
            row["ratio_default"] = median("batch_32_wait_0.005") / base
            row["ratio_tuned"] = median("batch_16_wait_0.05") / base
            row["ratio_default_per_round"] = [
                b["samples_per_s"] / u["samples_per_s"]
                for u, b in zip(row["batch_1_wait_0.0"], row["batch_32_wait_0.005"], strict=True)]
            results["batching"][name] = row
            print(f"{name}: unbatched {base:.0f}, default {row['ratio_default']:.2f}x "
                  f"(rounds {', '.join(f'{r:.2f}' for r in row['ratio_default_per_round'])}), "
                  f"tuned {row['ratio_tuned']:.2f}x", flush=True)
        # 3. gateway overhead on a 1-sample gan request (no batching window on either path)
        _set_batching(store, "gan", 1, 0.0)
        handle_p50 = _handle_p50("gan")
        grpc_p50 = _grpc_p50(target, "gan")
        results["gateway_overhead"] = {"handle_p50_ms": handle_p50, "grpc_p50_ms": grpc_p50,
                                       "overhead_ms": grpc_p50 - handle_p50}
        print(f"gan 1 sample p50: handle {handle_p50:.2f} ms, gRPC {grpc_p50:.2f} ms", flush=True)
        for name in ("gan", "vae", "flow", "diffusion"):
            default = load_config(models=[name]).models[name].batching
            _set_batching(store, name, default["max_batch_size"], default["batch_wait_timeout_s"])
        _pin_replicas(store, ["diffusion", "gan", "vae", "flow"], None)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    finally:
        # Serve's handle threads in this process keep pushing metrics after the disconnect
        logging.getLogger("ray.serve").setLevel(logging.CRITICAL)
        ray.shutdown()  # disconnect first: the cluster belongs to the `up` process
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(120)

    table = [
        ("diffusion served / raw (saturation)",
         f"{results['diffusion_saturation']['served_over_raw']:.2f}", ">= 0.8"),
        *[(f"{n} batched / max_batch_size=1, 16 clients: default | tuned",
           f"{r['ratio_default']:.2f} | {r['ratio_tuned']:.2f}", ">= 3")
          for n, r in results["batching"].items()],
        ("gateway p50 - handle p50, gan 1 sample (ms)",
         f"{results['gateway_overhead']['overhead_ms']:.2f}", "<= 3"),
    ]
    table.append(("genfleet up -> first Generate (s)",
                  f"{results['startup_to_first_generate_s']:.1f}", "<= 30"))
    print_table(table, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
