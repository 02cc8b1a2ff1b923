"""``genfleet`` commands for running on Kubernetes: ``gateway`` (the gRPC gateway alone,
in front of a Serve application someone else deployed, e.g. a KubeRay RayService) and
``k8s-serve-config`` (regenerate or check the RayService's serveConfigV2 patches)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from services.cli_serve import gateway_args, gateway_config, security_note, serve_until_signal


async def _gateway(args: argparse.Namespace, settings: Any) -> None:
    from services.gateway.server import Gateway
    from services.serving.backend import ServeBackend

    batches = None
    if args.batch_root:
        from cluster.batch.manager import BatchManager
        from services.core.store import ModelStore

        batches = BatchManager(ModelStore(args.store), Path(args.batch_root))
    gateway = Gateway(ServeBackend(args.app), batches=batches, config=settings)

    async def announce(port: int) -> None:
        print(f"genfleet gateway on {args.host}:{port} for Serve application {args.app!r}"
              f"{security_note(gateway)}", flush=True)
        if gateway.health_port is not None:
            print(f"  grpc.health.v1 (plaintext) {args.host}:{gateway.health_port}", flush=True)
        if gateway.metrics_port is not None:
            print(f"  metrics {args.host}:{gateway.metrics_port}/metrics", flush=True)

    await serve_until_signal(gateway, args.grace, announce)


def cmd_gateway(args: argparse.Namespace) -> int:
    from services.serving import app as serving

    settings = gateway_config(args)  # a misconfiguration refuses before any work
    if args.join:
        serving.join_node(args.join)
    serving.connect("auto" if args.join else args.address)
    try:
        asyncio.run(_gateway(args, settings))
    finally:
        serving.stop_cluster(embedded=False)
    return 0


def cmd_k8s_serve_config(args: argparse.Namespace) -> int:
    from services.serving import kube

    changed = kube.regenerate(Path(args.dir), Path(args.config) if args.config else None,
                              check=args.check)
    if args.check:
        for path in changed:
            print(f"stale: {path} (run genfleet k8s-serve-config)", file=sys.stderr)
        return 1 if changed else 0
    for path in changed:
        print(f"wrote {path}")
    if not changed:
        print("serveConfigV2 patches are up to date")
    return 0


def add_parsers(sub: Any) -> None:
    from services.serving.config import DEFAULT_CONFIG

    p = sub.add_parser("gateway", help="run the gRPC gateway for an already deployed Serve app "
                                       "(Kubernetes: next to a RayService)")
    p.add_argument("--address", default="auto",
                   help="Ray cluster to join as a driver (this node must run a raylet)")
    p.add_argument("--join", default=None, metavar="HOST:PORT",
                   help="first start a raylet here that joins the cluster whose GCS is at "
                        "HOST:PORT, with no CPUs or GPUs for tasks (a gateway pod)")
    p.add_argument("--app", default="genfleet", help="the Serve application's name")
    p.add_argument("--batch-root", default=None,
                   help="offer BatchService, outputs below this directory (default: off)")
    gateway_args(p)
    p.set_defaults(func=cmd_gateway)

    repo = DEFAULT_CONFIG.parents[2]
    p = sub.add_parser("k8s-serve-config",
                       help="regenerate deploy/k8s serveConfigV2 patches from the serve YAML")
    p.add_argument("--dir", default=str(repo / "deploy" / "k8s"))
    p.add_argument("--config", default=None, help="serve YAML (default cluster/configs/serve.yaml)")
    p.add_argument("--check", action="store_true", help="only report stale patches (exit 1)")
    p.set_defaults(func=cmd_k8s_serve_config)
