"""What the metrics cost on the request path, measured in one run.

    python -m cluster.bench.overhead --store /work/zoo-store

1. the gateway's metrics interceptor: p50 of 1-sample gan Generate calls through an
   in-process gateway (no Ray) with the interceptor and with a pass-through in its place,
   alternated ``--rounds`` times;
2. a replica's metrics: microseconds per ``ReplicaMetrics.batch`` call inside a Ray actor,
   for batches of 1 and of 16 requests.

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from cluster.bench import print_table


def _gateway_p50(store_root: str, instrumented: bool, calls: int) -> float:
    import asyncio

    from services.gateway import grpc_server as server
    from services.gateway.client import GenfleetClient
    from services.gateway.metrics import MetricsInterceptor
    from services.serving.inprocess import InProcessBackend

    class PassThrough(MetricsInterceptor):
        async def intercept_service(self, continuation: Any, details: Any) -> Any:
            return await continuation(details)

    def load(target: str) -> list[float]:
        with GenfleetClient(target, retries=0) as client:
            latencies = []
            for i in range(calls):
                started = time.perf_counter()
                client.generate("gan", 1, seed=i)
                latencies.append(1000 * (time.perf_counter() - started))
        return latencies

    async def measure() -> list[float]:
        gateway = server.Gateway(InProcessBackend(store_root, ["gan"]),
                                 server.GatewayConfig(host="127.0.0.1", port=0))
        port = await gateway.start()
        try:
            return await asyncio.to_thread(load, f"127.0.0.1:{port}")
        finally:
            await gateway.stop(1.0)

    server.MetricsInterceptor = MetricsInterceptor if instrumented else PassThrough  # type: ignore[misc]
    try:
        latencies = asyncio.run(measure())
    finally:
        server.MetricsInterceptor = MetricsInterceptor  # type: ignore[misc]
    return statistics.median(latencies[100:])


def _replica_metrics_us(calls: int) -> dict[int, float]:
    import ray

    @ray.remote
    class Probe:
        def __init__(self) -> None:
            from services.serving.metrics import ReplicaMetrics

            self.metrics = ReplicaMetrics("gan", "gan")

        def run(self, requests: int) -> float:
            started = time.perf_counter()
            for _ in range(calls):
                self.metrics.batch(requests=requests, samples=requests, queue_s=[0.003] * requests,
                                   compute_s=0.01, steps=1)
            return 1e6 * (time.perf_counter() - started) / calls

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR,
             log_to_driver=False)
    try:
        probe = Probe.remote()  # type: ignore[attr-defined]
        return {n: float(ray.get(probe.run.remote(n))) for n in (1, 16)}
    finally:
        ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--out", default=".docs/bench/overhead.json")
    parser.add_argument("--calls", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rounds = [(_gateway_p50(args.store, True, args.calls), _gateway_p50(args.store, False, args.calls))
              for _ in range(args.rounds)]
    replica = _replica_metrics_us(2000)
    results = {"gateway_p50_ms": [{"with": a, "without": b} for a, b in rounds],
               "interceptor_ms_median": statistics.median(a - b for a, b in rounds),
               "replica_metrics_us_per_batch": replica}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print_table([
        ("gateway p50 with / without metrics interceptor (ms), per round",
         " | ".join(f"{a:.3f}/{b:.3f}" for a, b in rounds), ""),
        ("interceptor cost, median of rounds (ms)", f"{results['interceptor_ms_median']:.3f}", ""),
        ("replica metrics per batch of 1 / 16 requests (us)",
         f"{replica[1]:.0f} / {replica[16]:.0f}", ""),
    ], out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
