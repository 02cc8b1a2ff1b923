"""Batch-generation benchmark: samples/s a job writes vs the raw model in this process.

    python -m cluster.bench.batch --store /work/zoo-store --out .docs/bench/batch.json

For GAN and diffusion: the raw model (``model.sample`` in chunks of 256, all cores'
torch threads, nothing written), then ``genfleet batch`` as a Ray Data job on an
embedded cluster with 1 and with 2 workers (parquet shards of tensors, balanced labels,
checksums and manifest included; the job's wall time from planning to manifest, actor
start-up and model loading included, the cluster start not), split into the time to the
first shard and the steady rate after it. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from cluster.bench import print_table

SAMPLES = {"gan": 200_000, "diffusion": 3000}
SHARD = {"gan": 4000, "diffusion": 500}  # forward passes of 256 (the raw runs' size) inside


def _raw(store: Any, name: str, n: int) -> float:
    import torch

    from services.models import load_model, sample_seeds

    torch.set_num_threads(os.cpu_count() or 1)
    model, _ = load_model(store, name)
    labels = torch.arange(256) % model.config.num_classes
    model.sample(sample_seeds(0, 256), labels=labels)  # warm-up
    started = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, n, 256):
            k = min(256, n - lo)
            model.sample(sample_seeds(1, k, lo), labels=labels[:k])
    return n / (time.perf_counter() - started)


def _job(store: Any, name: str, n: int, workers: int, fmt: str) -> dict[str, Any]:
    from cluster.batch import job
    from services.core.batch import BatchRequest

    out = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    try:
        spec = BatchRequest(name, n, str(out / "data"), format=fmt, shard_size=SHARD[name],
                         seed=1, labels="balanced", workers=workers)
        started = time.perf_counter()
        stamps: list[tuple[float, int]] = []  # (seconds since start, samples written)
        manifest = job.run(spec, store, progress=False, on_progress=lambda written, _: (
            stamps.append((time.perf_counter() - started, written))))
        seconds = time.perf_counter() - started
        size = sum(p.stat().st_size for p in (out / "data").rglob("*") if p.is_file())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    (t0, w0), (t1, w1) = stamps[0], stamps[-1]
    return {"workers": workers, "format": fmt, "samples": n, "seconds": seconds,
            "samples_per_s": n / seconds, "shards": manifest["num_shards"], "bytes": size,
            # start-up: planning, actors, model loading until the first shard is written;
            # steady: samples/s from the first shard to the last
            "first_shard_s": t0, "steady_samples_per_s": (w1 - w0) / (t1 - t0) if t1 > t0
            else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--out", default=".docs/bench/batch.json")
    parser.add_argument("--models", nargs="*", default=list(SAMPLES))
    args = parser.parse_args()

    from services.core.store import ModelStore
    from services.serving import ray_cluster

    store = ModelStore(args.store)
    results: dict[str, Any] = {"machine": f"{os.cpu_count()} CPUs", "models": {}}
    ray_cluster.start_cluster(None, num_cpus=4)
    for name in args.models:
        n = SAMPLES[name]
        raw = _raw(store, name, n)
        runs = [_job(store, name, n, w, "parquet") for w in (1, 2)]
        results["models"][name] = {"raw_samples_per_s": raw, "jobs": runs,
                                   "ratio_1_worker": runs[0]["samples_per_s"] / raw,
                                   "ratio_2_workers": runs[1]["samples_per_s"] / raw,
                                   "scaling_2_over_1": runs[1]["samples_per_s"]
                                   / runs[0]["samples_per_s"]}
        print(f"{name}: raw {raw:.0f}/s, job 1 worker {runs[0]['samples_per_s']:.0f}/s, "
              f"2 workers {runs[1]['samples_per_s']:.0f}/s", flush=True)
    ray_cluster.stop_cluster(embedded=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    rows = []
    for name, r in results["models"].items():
        rows.append((f"{name}: job (1 worker) / raw in-process", f"{r['ratio_1_worker']:.2f}",
                     ">= 0.7"))
        rows.append((f"{name}: job (2 workers) / raw in-process", f"{r['ratio_2_workers']:.2f}",
                     ">= 0.7"))
        rows.append((f"{name}: 2 workers / 1 worker", f"{r['scaling_2_over_1']:.2f}", ""))
        for run in r["jobs"]:
            steady = run["steady_samples_per_s"]
            rows.append((f"{name}: {run['workers']} worker(s): first shard after",
                         f"{run['first_shard_s']:.1f} s", ""))
            rows.append((f"{name}: {run['workers']} worker(s): steady / raw",
                         "-" if steady is None else f"{steady / r['raw_samples_per_s']:.2f}", ""))
    print_table(rows, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
