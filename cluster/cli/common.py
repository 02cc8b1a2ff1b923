"""What the ``genfleet`` commands share: flag parsing, the store and client from the
flags, and the gateway process's flags, settings and serve loop (``up`` and ``gateway``).
Imports nothing of ``cluster.cli``: every command module imports this one, never another.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from services.core.errors import InvalidArgument
from services.core.store import ModelStore
from services.gateway import event_loop

DEFAULT_TARGET = "127.0.0.1:50051"


def parse_sets(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are parsed as JSON when they parse, else strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise InvalidArgument("--set", f"expected key=value, got {pair!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def threads(n: int | None) -> None:
    import torch

    torch.set_num_threads(n or max(1, min(os.cpu_count() or 1, 8)))


def open_store(args: argparse.Namespace) -> ModelStore:
    """The model store the flags name (``--store``, else $GENFLEET_STORE, else the default)."""
    return ModelStore(args.store)


def run_dir(store: ModelStore) -> Path:
    """Where ``up`` keeps its run state (beside the store)."""
    path: Path = store.root.parent / "run"
    path.mkdir(parents=True, exist_ok=True)
    return path


def up_state(store: ModelStore) -> dict[str, Any] | None:
    """The run state of the ``genfleet up`` that runs for ``store`` (its ``up.json``), or
    None when none runs: no file, an unreadable one, or one left by a killed ``up``."""
    path = run_dir(store) / "up.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict):
        return None
    pid = state.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)  # a state file left by a killed ``up`` names nothing that runs
    except OSError:
        return None
    return state


def up_cluster(store: ModelStore) -> tuple[str, str] | None:
    """(Ray address, Ray auth mode) of the cluster ``genfleet up`` runs for ``store``
    (recorded in its run state), or None when none runs. Commands that join "the running
    cluster" use it before Ray's ``auto`` (``join_cluster``): with two Ray clusters on one
    machine (a test session's beside ``genfleet up``'s), ``auto`` joins whichever ``ps``
    lists first."""
    state = up_state(store)
    if state is None:
        return None
    address = state.get("ray_address")
    if not isinstance(address, str) or not address:
        return None
    auth = state.get("ray_auth_mode")
    return address, auth if isinstance(auth, str) else ""


def join_cluster(address: str | None, store: ModelStore) -> None:
    """Join ``address``, else the cluster ``genfleet up`` runs for ``store`` (with its auth
    mode: Ray turns its token auth on by itself only for ``auto``), else Ray's ``auto``."""
    from services.serving import ray_cluster

    up = None if address else up_cluster(store)
    if up is not None:
        ray_cluster.connect(up[0], auth_mode=up[1] or None)
    else:
        ray_cluster.connect(address)


def client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=os.environ.get("GENFLEET_TARGET", DEFAULT_TARGET),
                   help="gateway host:port")
    p.add_argument("--token", default=None, help="bearer token (or $GENFLEET_TOKEN)")
    p.add_argument("--tls-ca", default=None, help="CA certificate to verify a TLS gateway")
    p.add_argument("--timeout", type=float, default=120.0, help="deadline per call, seconds")


def client(args: argparse.Namespace) -> Any:
    """A gateway client from the ``client_args`` flags."""
    from services.gateway.client import GenfleetClient

    return GenfleetClient(args.target, token=args.token or os.environ.get("GENFLEET_TOKEN"),
                          tls_ca=Path(args.tls_ca) if args.tls_ca else None, timeout=args.timeout)


def format_metrics(metrics: dict[str, Any]) -> str:
    keys = ("fd_ratio", "min_class_share", "mean_confidence", "label_accuracy",
            "test_bits_per_dim", "init_fd_ratio", "sample_ms")
    return "  ".join(f"{k}={metrics[k]:.3f}" for k in keys if isinstance(metrics.get(k), float))


# ------------------------------------------------------------ the gateway process
def gateway_config(args: argparse.Namespace) -> Any:
    """The gateway's settings from the flags ``gateway_args`` defines, validated: a
    misconfiguration refuses to start (InvalidArgument, exit 2) before any other work."""
    from services.gateway.grpc_server import GatewayConfig

    token = args.token if args.token is not None else os.environ.get("GENFLEET_TOKEN")
    config = GatewayConfig(
        host=args.host, port=args.port, token=token,
        tls_cert=Path(args.tls_cert) if args.tls_cert is not None else None,
        tls_key=Path(args.tls_key) if args.tls_key is not None else None,
        tls_client_ca=Path(args.tls_client_ca) if args.tls_client_ca is not None else None,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_request_bytes_in_flight=args.max_inflight_mib * 1024 * 1024,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        health_port=None if args.health_port < 0 else args.health_port,
        http_port=None if args.http_port < 0 else args.http_port)
    config.validate()
    return config


def gateway_loop(args: argparse.Namespace) -> str:
    """The event loop the gateway process runs on (``uvloop`` or ``asyncio``), from
    ``--event-loop``; ``uvloop`` asked for where it is not installed refuses (exit 2)."""
    return event_loop.resolve(args.event_loop)


def gateway_args(p: argparse.ArgumentParser) -> None:
    """Flags of the gRPC gateway (``up`` and ``gateway``)."""
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--token", default=None, help="require this bearer token ($GENFLEET_TOKEN)")
    p.add_argument("--tls-cert", default=None)
    p.add_argument("--tls-key", default=None)
    p.add_argument("--tls-client-ca", default=None, help="require client certificates (mTLS)")
    p.add_argument("--max-concurrent-rpcs", type=int, default=1024,
                   help="RPCs in flight; beyond: RESOURCE_EXHAUSTED at once")
    p.add_argument("--max-inflight-mib", type=int, default=512,
                   help="request bytes held by the RPCs in flight, MiB; beyond: RESOURCE_EXHAUSTED")
    p.add_argument("--metrics-port", type=int, default=8080,
                   help="gateway Prometheus /metrics port (0: any free port, -1: none)")
    p.add_argument("--http-port", type=int, default=8000,
                   help="Open Inference Protocol v2 over HTTP/REST on this port, with the same "
                        "TLS and token (0: any free port, -1: none); v2 over gRPC is always on "
                        "--port")
    p.add_argument("--health-port", type=int, default=-1,
                   help="also serve grpc.health.v1 alone, in plaintext and without auth, on this "
                        "port (for Kubernetes gRPC probes, which speak no TLS; -1: none)")
    p.add_argument("--grace", type=float, default=10.0, help="shutdown grace period, seconds")
    p.add_argument("--event-loop", default="auto", choices=event_loop.CHOICES,
                   help="the gateway's asyncio event loop: uvloop costs less per call (auto: "
                        "uvloop where installed, as it is with ray[serve]; else asyncio)")


def security_note(gateway: Any) -> str:
    """What the start-up line says of transport security: TLS and/or token auth."""
    c = gateway.config
    return f"{', TLS' if c.tls else ''}{', mTLS' if c.tls_client_ca else ''}" \
           f"{', token auth' if c.token else ''}"


async def serve_until_signal(gateway: Any, grace: float,
                             announce: Callable[[int], Awaitable[None]],
                             watch: Callable[[Callable[[str], None]],
                                             Callable[[], None] | None] | None = None,
                             leave: Callable[[str], None] | None = None) -> str | None:
    """Start ``gateway``, ``announce(port)``, serve until SIGINT or SIGTERM, then report
    NOT_SERVING and let the calls in flight finish (``grace`` seconds).

    ``watch(lost)``: starts watching what the gateway depends on, calls ``lost(reason)``
    (from any thread) when it is gone, and returns the function that stops the watch
    (called before an orderly shutdown). When ``lost`` is called the gateway stops at
    once (calls in flight and new ones: UNAVAILABLE) and the reason is returned. Returns
    None after a signal.

    ``leave(reason)``: after a loss, ends the process (it does not return) while the gateway
    still answers every call UNAVAILABLE. grpc's own stop would answer the calls that race
    it (arrived, not yet given to a handler) CANCELLED, as if their callers had cancelled
    them (grpc/grpc#41785), and retrying clients would give up on them; a connection that
    closes with its process fails every call on it UNAVAILABLE.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    reasons: list[str] = []
    for sig in (signal.SIGINT, signal.SIGTERM):  # before start: a signal never goes unheard
        loop.add_signal_handler(sig, stop.set)

    def lost(reason: str) -> None:
        reasons.append(reason)
        with contextlib.suppress(RuntimeError):  # the loop has closed: shutting down anyway
            loop.call_soon_threadsafe(stop.set)

    unwatch = watch(lost) if watch is not None else None
    try:
        await announce(await gateway.start())
        await stop.wait()
    finally:
        if unwatch is not None:
            unwatch()  # an orderly shutdown stops the head next: that is no loss
    if reasons:
        await gateway.lose(reasons[0])  # NOT_SERVING; calls in flight: UNAVAILABLE now
        if leave is not None:
            await asyncio.to_thread(leave, reasons[0])  # the loop answers until the exit
        await gateway.stop(grace=min(grace, 1.0))
        return reasons[0]
    print("shutting down: health NOT_SERVING, finishing in-flight requests", flush=True)
    await gateway.stop(grace=grace)
    return None
