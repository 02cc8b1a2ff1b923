"""Load generation: closed-loop gRPC clients against the gateway, and the same model run
in-process without serving (``raw``), so reports can give served/raw ratios measured in
one run. Numbers go to a table and JSON; they are never asserted in unit tests."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import numpy as np


def _percentiles(latencies_ms: list[float]) -> dict[str, float]:
    if not latencies_ms:
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan")}
    arr = np.asarray(latencies_ms)
    return {f"p{q}_ms": float(np.percentile(arr, q)) for q in (50, 95, 99)}


def run_grpc_load(target: str, model: str, *, concurrency: int, duration_s: float,
                  samples: int = 1, options: dict[str, Any] | None = None,
                  token: str | None = None, warmup_s: float = 2.0,
                  timeout_s: float = 60.0) -> dict[str, Any]:
    """``concurrency`` closed-loop clients, each sending Generate(samples) back to back.

    Every request uses a new seed; requests that finish during ``warmup_s`` are not
    counted. Returns throughput, latency percentiles and errors by status code.
    """
    import grpc

    from services.gateway.client import GenfleetClient

    lock = threading.Lock()
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    counted = [0]
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s
    client = GenfleetClient(target, token=token, timeout=timeout_s, retries=0)

    def worker(index: int) -> None:
        seed = index * 1_000_003
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            seed += 1
            try:
                client.generate(model, samples, seed=seed, options=options)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            t1 = time.perf_counter()
            if t0 >= measure_from and t1 <= stop_at:
                with lock:
                    if code == "OK":
                        latencies.append(1000 * (t1 - t0))
                        counted[0] += 1
                    else:
                        errors[code] += 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.close()
    ok = counted[0]
    return {"requests_per_s": ok / duration_s, "samples_per_s": ok * samples / duration_s,
            "ok": ok, "errors": dict(errors), **_percentiles(latencies)}


def run_raw(store: Any, model_ref: str, *, batch: int, duration_s: float,
            options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The stored model in this process, ``model.sample`` at ``batch`` back to back."""
    import torch

    from services.models import Capability, load_model, sample_seeds

    model, meta = load_model(store, model_ref)
    conditional = Capability.CONDITIONAL in model.capabilities and model.config.num_classes > 0
    labels = torch.arange(batch) % model.config.num_classes if conditional else None
    model.sample(sample_seeds(0, batch), labels=labels, **(options or {}))  # warm-up
    done, seed = 0, 1
    latencies = []
    start = time.perf_counter()
    while time.perf_counter() - start < duration_s:
        t0 = time.perf_counter()
        model.sample(sample_seeds(seed, batch), labels=labels, **(options or {}))
        latencies.append(1000 * (time.perf_counter() - t0))
        done += batch
        seed += 1
    elapsed = time.perf_counter() - start
    return {"batch": batch, "samples_per_s": done / elapsed, "version": meta.version,
            "torch_threads": torch.get_num_threads(), **_percentiles(latencies)}


def format_report(report: dict[str, Any]) -> str:
    """A small aligned table of a bench report."""
    lines = [f"model {report['model']}: {report['concurrency']} clients x "
             f"{report['samples_per_request']} sample(s) per request"]
    header = f"{'run':<16}{'samples/s':>11}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}  errors"
    lines += [header, "-" * len(header)]
    for key in ("served", "raw_batched", "raw_unbatched"):
        r = report.get(key)
        if not r:
            continue
        name = key if key != "raw_batched" else f"raw (batch {r['batch']})"
        if key == "raw_unbatched":
            name = f"raw (batch {r['batch']})"
        lines.append(f"{name:<16}{r['samples_per_s']:>11.1f}{r.get('requests_per_s', float('nan')):>9.1f}"
                     f"{r['p50_ms']:>9.2f}{r['p95_ms']:>9.2f}{r['p99_ms']:>9.2f}  "
                     f"{r.get('errors', {}) or '-'}")
    if "served" in report and "raw_batched" in report:
        ratio = report["served"]["samples_per_s"] / report["raw_batched"]["samples_per_s"]
        report["served_over_raw"] = ratio
        lines.append(f"served / raw (same batch size): {ratio:.2f}")
    return "\n".join(lines)
