"""``genfleet bench``: closed-loop gRPC load against a running gateway; ``--raw`` adds
the same model in this process (``cluster.bench.load``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cluster.cli.common import client_args, open_store, parse_sets


def cmd_bench(args: argparse.Namespace) -> int:
    from cluster.bench.load import format_report, run_grpc_load, run_raw

    options = parse_sets(args.set)
    report: dict[str, Any] = {"model": args.model, "concurrency": args.concurrency,
                              "samples_per_request": args.samples, "options": options}
    if not args.raw_only:
        report["served"] = run_grpc_load(
            args.target, args.model, concurrency=args.concurrency, duration_s=args.duration,
            samples=args.samples, options=options, token=args.token, warmup_s=args.warmup)
    if args.raw or args.raw_only:
        report["raw_batched"] = run_raw(open_store(args), args.model,
                                        batch=args.concurrency * args.samples,
                                        duration_s=args.duration, options=options)
        report["raw_unbatched"] = run_raw(open_store(args), args.model, batch=args.samples,
                                          duration_s=args.duration, options=options)
    print(format_report(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"json: {args.json}")
    return 0


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("bench", help="closed-loop gRPC load; --raw adds the in-process model")
    p.add_argument("model")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--samples", type=int, default=1, help="samples per request")
    p.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE")
    p.add_argument("--raw", action="store_true", help="also measure the model in-process")
    p.add_argument("--raw-only", action="store_true")
    p.add_argument("--json", default=None)
    client_args(p)
    p.set_defaults(func=cmd_bench)
