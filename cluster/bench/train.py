"""Training benchmark: Ray Train (1 worker, then 2) against the in-process loop on the same
config, measured in one run.

    python -m cluster.bench.train --family diffusion --epochs 5 --out .docs/bench/train.json

- in-process: ``services.training.loop.fit`` with 1 torch thread;
- Ray Train, 1 worker with 1 torch thread: start-up (``fit()`` called -> first epoch
  reported) and steady-state samples/s (wall clock between the first and last epoch
  reports: training, validation, checkpoint and report included);
- Ray Train, 2 workers (1 thread each): the same two numbers.

Prints a table and writes JSON. Runs on an embedded local cluster in a temporary store.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cluster.bench import print_table


def _in_process(family: str, epochs: int, batch: int) -> dict[str, Any]:
    import torch

    from services.models import model_class
    from services.training.loop import fit
    from services.training.spec import prepare, spec_from_config

    torch.set_num_threads(1)
    spec = spec_from_config(family, train={"epochs": epochs, "batch_size": batch})
    setup = prepare(spec, distributed=False)
    torch.manual_seed(setup.train.seed)
    model = model_class(family)(setup.config)
    started = time.perf_counter()
    result = fit(model, setup.splits, setup.train, progress=False)
    return {"seconds": time.perf_counter() - started,
            "samples_per_s": result.samples_per_second, "epochs": epochs}


def _ray_job(store: Any, family: str, workers: int, epochs: int, batch: int) -> dict[str, Any]:
    from cluster.train import job
    from services.training.spec import spec_from_config

    spec = spec_from_config(family, name=f"{family}-w{workers}", workers=workers,
                                cpus_per_worker=1, train={"epochs": epochs, "batch_size": batch})
    started = time.time()
    result = job.run(spec, store, evaluate=False, progress=False)
    rows = [json.loads(line) for line in
            (job.storage_path(store.root) / spec.job / job.PROGRESS_FILE).read_text().splitlines()]
    first, last = rows[0], rows[-1]
    from services.core import data as datasets
    from services.training.loop import steps_per_epoch

    n_train = len(datasets.split(datasets.load("digits")).train)
    per_epoch = steps_per_epoch(n_train, batch, workers) * batch
    first_epoch_s = per_epoch / first["samples_per_s"]
    steady = per_epoch * (len(rows) - 1) / (last["wall"] - first["wall"])
    return {"workers": workers, "seconds": time.time() - started,
            "startup_s": first["wall"] - first_epoch_s - started,
            "samples_per_s": steady, "ref": result.ref}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="diffusion")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default=".docs/bench/train.json")
    args = parser.parse_args()

    from services.core.store import ModelStore
    from services.serving import ray_cluster

    results: dict[str, Any] = {"machine": f"{os.cpu_count()} CPUs", "family": args.family,
                               "epochs": args.epochs, "global_batch": args.batch_size}
    results["in_process"] = _in_process(args.family, args.epochs, args.batch_size)
    print(f"in-process: {results['in_process']['samples_per_s']:.0f} samples/s", flush=True)
    ray_cluster.start_cluster(None, num_cpus=4)
    with tempfile.TemporaryDirectory() as tmp:
        store = ModelStore(Path(tmp) / "store")
        for workers in (1, 2):
            row = _ray_job(store, args.family, workers, args.epochs, args.batch_size)
            results[f"ray_{workers}_worker"] = row
            print(f"ray train, {workers} worker(s): start-up {row['startup_s']:.1f} s, "
                  f"{row['samples_per_s']:.0f} samples/s", flush=True)
    import ray

    ray.shutdown()
    base = results["in_process"]["samples_per_s"]
    results["ray_1_over_in_process"] = results["ray_1_worker"]["samples_per_s"] / base
    results["ray_2_over_ray_1"] = (results["ray_2_worker"]["samples_per_s"]
                                   / results["ray_1_worker"]["samples_per_s"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    table = [
        ("in-process samples/s (1 thread)", f"{base:.0f}", ""),
        ("Ray Train 1 worker samples/s (after start-up)",
         f"{results['ray_1_worker']['samples_per_s']:.0f}", ""),
        ("  ratio to in-process", f"{results['ray_1_over_in_process']:.2f}", ">= 0.9"),
        ("Ray Train start-up, 1 worker (s)", f"{results['ray_1_worker']['startup_s']:.1f}", ""),
        ("Ray Train 2 workers samples/s", f"{results['ray_2_worker']['samples_per_s']:.0f}", ""),
        ("  ratio to 1 worker", f"{results['ray_2_over_ray_1']:.2f}", ""),
        ("Ray Train start-up, 2 workers (s)", f"{results['ray_2_worker']['startup_s']:.1f}", ""),
    ]
    print_table(table, title=f"{args.family}, {args.epochs} epochs, global batch "
                             f"{args.batch_size}", out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
