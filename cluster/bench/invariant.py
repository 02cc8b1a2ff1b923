"""The price of batch-invariant diffusion: samples/s with the network on fixed chunks of
``invariant_batch`` rows against the batch as it comes, in one run.

    python -m cluster.bench.invariant --out .docs/bench/invariant.json

The digits default and the cifar10 preset (random weights: speed only), batches of 1, 8
and 64, one torch thread count for both settings. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from services.models import build, model_class, sample_seeds


def rate(model: Any, batch: int, reps: int) -> float:
    model.sample(sample_seeds(0, batch))  # warm-up
    started = time.perf_counter()
    for r in range(reps):
        model.sample(sample_seeds(r + 1, batch))
    return reps * batch / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=".docs/bench/invariant.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    presets = model_class("diffusion").presets
    models = {
        "digits": build("diffusion").eval(),
        "cifar10": build("diffusion", {**presets["cifar10"].model, "channels": 3,
                                       "image_size": 32, "levels": 256}).eval(),
    }
    rows = []
    print(f"{'model':<9}{'batch':>6}{'chunked/s':>11}{'as-is/s':>10}{'ratio':>7}", flush=True)
    for name, model in models.items():
        base = model.config
        for batch, reps in ((1, 3), (8, 2), (64, 1)):
            measured = {}
            for chunk in (0, args.chunk):
                model.config = dataclasses.replace(base, invariant_batch=chunk)  # type: ignore[call-arg]
                measured[chunk] = rate(model, batch, reps)
            ratio = measured[args.chunk] / measured[0]
            rows.append({"model": name, "batch": batch, "chunked": round(measured[args.chunk], 2),
                         "as_is": round(measured[0], 2), "ratio": round(ratio, 2)})
            print(f"{name:<9}{batch:>6}{measured[args.chunk]:>11.2f}{measured[0]:>10.2f}"
                  f"{ratio:>7.2f}", flush=True)
        model.config = base
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"chunk": args.chunk, "threads": args.threads, "rows": rows},
                              indent=2))
    print(f"\njson: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
