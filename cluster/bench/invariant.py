"""The price of batch invariance: samples/s with the sampling network on fixed chunks of
``invariant_batch`` rows against the batch as it comes, per family, in one run.

    python -m cluster.bench.invariant [--families gan vae flow diffusion] \
        --out .docs/bench/invariant.json

Diffusion at the digits default and every family at the cifar10 preset (random weights:
speed only), batches of 1, 8 and 64, one torch thread count for both settings; also
whether any of 32 samples differs alone and in one batch of 32 (its bits) each way.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from services.models import Capability, build, model_class, sample_seeds


def rate(model: Any, batch: int, reps: int) -> float:
    model.sample(sample_seeds(0, batch))  # warm-up
    started = time.perf_counter()
    for r in range(reps):
        model.sample(sample_seeds(r + 1, batch))
    return reps * batch / (time.perf_counter() - started)


def differing(model: Any, n: int) -> int:
    """Samples of ``n`` whose bits differ drawn alone and in one batch of ``n``."""
    seeds = sample_seeds(7, n)
    conditional = Capability.CONDITIONAL in model.capabilities
    labels = torch.arange(n) % model.config.num_classes if conditional else None
    batched = model.sample(seeds, labels=labels)
    alone = torch.cat([model.sample(seeds[i:i + 1],
                                    labels=None if labels is None else labels[i:i + 1])
                       for i in range(n)])
    return int((batched != alone).flatten(1).any(1).sum())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--families", nargs="*", default=["gan", "vae", "flow", "diffusion"])
    parser.add_argument("--out", default=".docs/bench/invariant.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models: dict[str, Any] = {}
    for family in args.families:
        if family == "diffusion":
            models["diffusion digits"] = build("diffusion").eval()
        preset = model_class(family).presets["cifar10"]
        models[f"{family} cifar10"] = build(family, {**preset.model, "channels": 3,
                                                     "image_size": 32, "levels": 256}).eval()
    rows = []
    print(f"{'model':<18}{'batch':>6}{'chunked/s':>11}{'as-is/s':>10}{'ratio':>7}"
          f"{'differ, chunked':>17}{'differ, as-is':>15}", flush=True)
    for name, model in models.items():
        base = model.config
        differ = {}
        for chunk in (0, args.chunk):
            model.config = dataclasses.replace(base, invariant_batch=chunk)
            differ[chunk] = differing(model, 32)
        for batch, reps in ((1, 3), (8, 2), (64, 1)):
            measured = {}
            for chunk in (0, args.chunk):
                model.config = dataclasses.replace(base, invariant_batch=chunk)
                measured[chunk] = rate(model, batch, reps)
            ratio = measured[args.chunk] / measured[0]
            rows.append({"model": name, "batch": batch, "chunked": round(measured[args.chunk], 2),
                         "as_is": round(measured[0], 2), "ratio": round(ratio, 2),
                         "differing_of_32_chunked": differ[args.chunk],
                         "differing_of_32_as_is": differ[0]})
            print(f"{name:<18}{batch:>6}{measured[args.chunk]:>11.2f}{measured[0]:>10.2f}"
                  f"{ratio:>7.2f}{differ[args.chunk]:>17}{differ[0]:>15}", flush=True)
        model.config = base
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"chunk": args.chunk, "threads": args.threads, "rows": rows},
                              indent=2))
    print(f"\njson: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
