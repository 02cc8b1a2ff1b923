"""``genfleet generate`` and ``genfleet score``: calls to a running gateway."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from cluster.cli.common import client, client_args, parse_sets


def cmd_generate(args: argparse.Namespace) -> int:
    from services.evaluation.grid import save_grid

    labels = [int(v) for v in args.labels.split(",")] if args.labels else None
    with client(args) as gateway:
        started = time.perf_counter()
        out = gateway.generate(args.model, args.num_samples, seed=args.seed, labels=labels,
                               options=parse_sets(args.set), output="both")
        ms = 1000 * (time.perf_counter() - started)
    print(f"{out.model}@{out.version}: {args.num_samples} samples in {ms:.0f} ms "
          f"(server {out.timings.total_ms:.0f} ms)")
    for line in out.text:
        print(repr(line))
    if out.samples is not None and out.samples.ndim == 4:
        path = save_grid(out.samples, Path(args.out), ncols=min(10, args.num_samples), scale=6,
                         title=f"{out.model}@{out.version} seed {args.seed}")
        print(f"grid: {path}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    import numpy as np

    from services.core import data as datasets

    test = datasets.split(datasets.load(args.data)).test
    x = test.as_float()[: args.num]
    labels = test.labels[: args.num].tolist() if (args.labels and test.labels is not None) else None
    with client(args) as gateway:
        resp = gateway.score(args.model, x, labels=labels)
    kind = resp.kind.replace("_", " ")
    print(f"{resp.model}@{resp.version} on {len(x)} test examples of {args.data} ({kind}):")
    print(f"  mean log p = {np.mean(resp.log_prob):.2f} nats"
          + (f", {np.mean(resp.bits_per_dim):.3f} bits/dim" if resp.bits_per_dim else ""))
    return 0


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("generate", help="draw samples through the gateway")
    p.add_argument("model")
    p.add_argument("-n", "--num-samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labels", default=None, help="comma-separated class per sample")
    p.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE")
    p.add_argument("--out", default="grid.png")
    client_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("score", help="score real test data through the gateway")
    p.add_argument("model")
    p.add_argument("--data", default="digits")
    p.add_argument("-n", "--num", type=int, default=100)
    p.add_argument("--labels", action="store_true", help="score given the true labels")
    client_args(p)
    p.set_defaults(func=cmd_score)
