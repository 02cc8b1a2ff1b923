"""``genfleet gateway``: the gRPC gateway alone, in front of a Serve application someone
else deployed (e.g. a KubeRay RayService)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cluster.cli.common import (
    gateway_args,
    gateway_config,
    gateway_loop,
    open_store,
    security_note,
    serve_until_signal,
)


async def _gateway(args: argparse.Namespace, settings: Any, loop: str) -> None:
    from services.gateway.grpc_server import Gateway
    from services.serving.serve_backend import ServeBackend

    batches = None
    if args.batch_root:
        from cluster.batch.manager import BatchManager

        batches = BatchManager(open_store(args), Path(args.batch_root))
    gateway = Gateway(ServeBackend(args.app), batches=batches, config=settings)

    async def announce(port: int) -> None:
        print(f"genfleet gateway on {args.host}:{port} for Serve application {args.app!r}"
              f"{security_note(gateway)}, event loop {loop}", flush=True)
        print("  OIP v2 gRPC on the same port (inference.GRPCInferenceService)", flush=True)
        if gateway.http_port is not None:
            scheme = "https" if gateway.config.tls else "http"
            print(f"  OIP v2 REST {scheme}://{args.host}:{gateway.http_port}/v2", flush=True)
        if gateway.health_port is not None:
            print(f"  grpc.health.v1 (plaintext) {args.host}:{gateway.health_port}", flush=True)
        if gateway.metrics_port is not None:
            print(f"  metrics {args.host}:{gateway.metrics_port}/metrics", flush=True)

    await serve_until_signal(gateway, args.grace, announce)


def cmd_gateway(args: argparse.Namespace) -> int:
    from services.gateway import event_loop
    from services.serving import ray_cluster

    settings = gateway_config(args)  # a misconfiguration refuses before any work
    loop = gateway_loop(args)
    if args.join:
        ray_cluster.join_node(args.join)
    ray_cluster.connect("auto" if args.join else args.address)
    try:
        event_loop.run(_gateway(args, settings, loop), loop)
    finally:
        ray_cluster.stop_cluster(embedded=False)
    return 0


def add_parsers(sub: Any) -> None:
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
