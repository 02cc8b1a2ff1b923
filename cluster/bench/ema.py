"""The training loop's EMA warm-up, with and without, in one run: a family trained twice
on its default data and schedule (the same seed, so the same steps and batches) with a
fixed-decay EMA of the weights (``ema_warmup=False``: torch's ``get_ema_multi_avg_fn``, the
average starts at the first step's weights) and warmed up (the default, ``warmed_ema``),
each evaluated as ``genfleet train`` records it (FD/floor in the evaluation classifier's
features and in fixed random features; the same classifier for both).

    python -m cluster.bench.ema [--family gan] [--store DIR] --out .docs/bench/ema.json

Prints a table and writes JSON. ~9 minutes for the GAN on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from services.core.store import ModelStore
from services.training.recipes import train_and_save

KEYS = ("fd_ratio", "unlabelled_fd_ratio", "fixed_fd_ratio")


def run(family: str, store: ModelStore) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, warmup in (("fixed", False), ("warmed", True)):
        started = time.perf_counter()
        meta, result = train_and_save(family, store=store, name=f"{family}-ema-{name}",
                                      train_overrides={"ema_warmup": warmup}, progress=False)
        out[name] = {"steps": result.steps, "seconds": time.perf_counter() - started,
                     **{k: meta.metrics.get(k) for k in KEYS}}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="gan")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--store", help="a store to train into (default: a temporary one)")
    parser.add_argument("--out", default=".docs/bench/ema.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(args.family, ModelStore(Path(args.store or tmp)))
    print(f"{'EMA':<8} {'steps':>6} {'train+eval s':>13} " + " ".join(f"{k:>20}" for k in KEYS))
    for name, row in rows.items():
        print(f"{name:<8} {row['steps']:>6} {row['seconds']:>13.1f} "
              + " ".join(f"{row[k]:>20.3f}" for k in KEYS))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"family": args.family, "threads": args.threads,
                                          "runs": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
