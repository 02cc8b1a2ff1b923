"""``genfleet bench``: the fast-path table against a running gateway
(``cluster.bench.fastpath``: served vs a bare grpc.aio server, diffusion vs raw, gateway vs
a direct replica call); ``genfleet bench MODEL``: closed-loop load on one model, ``--raw``
adds the same model in this process (``cluster.bench.load``)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from cluster.cli.common import client_args, open_store, parse_sets, up_cluster, up_state
from services.gateway.event_loop import CHOICES as EVENT_LOOPS


def cmd_fastpath(args: argparse.Namespace) -> int:
    from cluster.bench import fastpath

    store = open_store(args)
    up = up_cluster(store)  # genfleet up runs here, on this store (its Ray cluster)
    gateway_loop = (up_state(store) or {}).get("event_loop")
    ns = argparse.Namespace(
        target=args.target, token=args.token or os.environ.get("GENFLEET_TOKEN"),
        models=args.models, concurrency=args.callers, duration=args.duration,
        rounds=args.rounds, threads=args.threads,
        store=str(store.root) if up and not args.no_raw else None,
        address=up[0] if up and not args.no_direct else None,
        auth_mode=up[1] if up else None, bare_loop=args.bare_loop,
        gateway_loop=gateway_loop if isinstance(gateway_loop, str) else None,
        out=args.json or ".docs/bench/fastpath.json")
    return fastpath.run(ns)


def cmd_bench(args: argparse.Namespace) -> int:
    from cluster.bench.load import format_report, run_grpc_load, run_raw

    if args.model is None:
        return cmd_fastpath(args)

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
    p = sub.add_parser("bench", help="the fast-path table against the running gateway; with "
                                     "MODEL: closed-loop load on that model")
    p.add_argument("model", nargs="?", default=None,
                   help="one model under closed-loop load (default: the fast-path table)")
    p.add_argument("--concurrency", type=int, default=16, help="clients (with MODEL)")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    p.add_argument("--models", nargs="+", default=["gan", "vae", "flow"],
                   help="fast path: models compared with the bare server")
    p.add_argument("--callers", nargs="+", type=int, default=[16, 32],
                   help="fast path: concurrent callers per measurement")
    p.add_argument("--rounds", type=int, default=3, help="fast path: alternating served/bare pairs")
    p.add_argument("--threads", type=int, default=1,
                   help="fast path: torch threads of the raw diffusion run (the replicas')")
    p.add_argument("--no-raw", action="store_true",
                   help="fast path: skip diffusion vs the raw model (needs the served store)")
    p.add_argument("--bare-loop", default="auto", choices=EVENT_LOOPS,
                   help="fast path: the bare server's event loop (auto: as the gateway's "
                        "default, uvloop where installed)")
    p.add_argument("--no-direct", action="store_true",
                   help="fast path: skip the gateway vs direct replica call (joins Ray)")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--samples", type=int, default=1, help="samples per request")
    p.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE")
    p.add_argument("--raw", action="store_true", help="also measure the model in-process")
    p.add_argument("--raw-only", action="store_true")
    p.add_argument("--json", default=None)
    client_args(p)
    p.set_defaults(func=cmd_bench)
