"""Every built-in family at each preset: parameters, training samples/s and sampling
samples/s on this machine, measured in one run.

    python -m cluster.bench.presets --out .docs/bench/presets.json

- training: ``Trainer.step`` on batches of the preset's training batch size (capped by
  ``--train-batch``) of random data on the preset's level grid, after one warm-up step;
  samples/s over ``--train-steps`` steps;
- sampling: ``model.sample`` with the family's default options on a batch of
  ``--sample-batch`` after a warm-up call of one sample;
- ``--device cuda --bf16`` measures the same on a GPU (bf16 autocast).

Random weights: these are costs, not quality. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from services.models import BUILTIN, PRESET_SHAPES, build, model_class, sample_seeds
from services.training.loop import TrainConfig, Trainer

LEVELS = {"digits": 17, "mnist": 256, "cifar10": 256}


@contextlib.contextmanager
def _autocast(device: str, bf16: bool) -> Iterator[None]:
    if bf16:
        with torch.autocast(device, dtype=torch.bfloat16):
            yield
    else:
        yield


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(family: str, preset: str, *, device: str, bf16: bool, train_steps: int,
            train_batch: int, sample_batch: int) -> dict[str, Any]:
    klass = model_class(family)
    p = klass.presets[preset]
    c, h, _ = p.shape
    torch.manual_seed(0)
    model = build(family, {**p.model, "channels": c, "image_size": h, "levels": LEVELS[preset],
                           "num_classes": 10}).to(device)
    params = sum(x.numel() for x in model.parameters())
    batch = min(train_batch, int({**klass.train_defaults, **p.train}.get("batch_size", 64)))
    top = LEVELS[preset] - 1
    x = torch.randint(0, top + 1, (batch, c, h, h), device=device).float() / top
    y = torch.randint(0, 10, (batch,), device=device)
    model.prepare(x, y)
    trainer = Trainer(model, TrainConfig.for_family(klass, amp=bf16 and device == "cuda"))
    model.train()
    trainer.step(x, y)  # warm-up
    _sync(device)
    started = time.perf_counter()
    for _ in range(train_steps):
        trainer.step(x, y)
    _sync(device)
    train_rate = train_steps * batch / (time.perf_counter() - started)
    model.eval()
    with _autocast(device, bf16):
        model.sample(sample_seeds(0, 1))  # warm-up
        _sync(device)
        started = time.perf_counter()
        model.sample(sample_seeds(1, sample_batch))
        _sync(device)
    sample_rate = sample_batch / (time.perf_counter() - started)
    return {"family": family, "preset": preset, "shape": [c, h, h], "params": params,
            "train_batch": batch, "train_samples_per_s": round(train_rate, 1),
            "sample_batch": sample_batch, "samples_per_s": round(sample_rate, 2),
            "device": device, "bf16": bf16}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="*", default=sorted(BUILTIN))
    parser.add_argument("--presets", nargs="*", default=list(PRESET_SHAPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--sample-batch", type=int, default=8)
    parser.add_argument("--out", default=".docs/bench/presets.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'family':<16}{'preset':<9}{'shape':<10}{'params':>12}{'train/s':>10}{'sample/s':>10}",
          flush=True)
    for family in args.families:
        for preset in args.presets:
            r = measure(family, preset, device=args.device, bf16=args.bf16,
                        train_steps=args.train_steps, train_batch=args.train_batch,
                        sample_batch=args.sample_batch)
            rows.append(r)
            shape = "x".join(str(v) for v in r["shape"])
            print(f"{family:<16}{preset:<9}{shape:<10}{r['params']:>12,}"
                  f"{r['train_samples_per_s']:>10}{r['samples_per_s']:>10}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "device": args.device,
                               "rows": rows}, indent=2))
    print(f"\njson: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
