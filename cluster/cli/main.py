"""The ``genfleet`` command line (one entry point; DESIGN.md §5).

One module per group of commands, each with ``add_parsers``; they share
``cluster.cli.common`` and never import each other:

- ``train``: train a family (a Ray Train job, or ``--local``)
- ``zoo``: train every family that lacks a checkpoint, evaluate all
- ``models``: ``models`` (stored or served), ``eval`` (quality report of a stored model)
- ``serve``: ``up``, ``down``, ``status``, ``scale``, ``deploy``
- ``client``: ``generate``, ``score`` through the gateway
- ``bench``: closed-loop load against the gateway
- ``batch``: fill a dataset (Ray Data)
- ``gateway``: the gRPC gateway alone (Kubernetes); ``kube``: ``k8s-serve-config``
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Sequence

from cluster.cli import batch, bench, client, gateway, kube, models, serve, train, zoo
from services.core.errors import GenfleetError

log = logging.getLogger("genfleet")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genfleet", description="Train, serve and generate from deep generative models.")
    parser.add_argument("--store", default=None,
                        help="model store directory (default $GENFLEET_STORE or ~/.genfleet/store)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (train, models, serve, client, bench, batch, gateway, kube, zoo):
        module.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    try:
        code: int = args.func(args)
    except GenfleetError as exc:
        print(f"genfleet: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("genfleet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `genfleet models | head`: the reader left; not an error of ours
        with contextlib.suppress(OSError, ValueError):  # no flush error at exit either
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        answer = _rpc_error(exc)
        if answer is None:
            raise
        print(f"genfleet: error: {answer}", file=sys.stderr)
        return 1
    log.debug("done in %.1f s", time.perf_counter() - started)
    return code


def _rpc_error(exc: BaseException) -> str | None:
    """A gRPC error from the gateway (``grpc.RpcError`` with a status: the gateway refused
    the call, or could not be reached) as one line; None for anything else (a bug: its
    traceback stays). Checked without importing grpc, which most commands never load."""
    grpc = sys.modules.get("grpc")
    if grpc is None or not isinstance(exc, grpc.RpcError) or not hasattr(exc, "code"):
        return None
    code = exc.code()
    details = exc.details() if hasattr(exc, "details") else ""
    return f"{getattr(code, 'name', code)}: {details}"


if __name__ == "__main__":
    sys.exit(main())
