"""The gateway's event loop, asyncio vs uvloop, measured in one run without Ray.

    python -m cluster.bench.event_loop --store /work/bstore

A gateway process over an in-process backend that answers every call with one 1-sample
``gan`` result computed at the first call (the gateway's own path: admission, validation,
codec, metrics, gRPC; no model compute, no Ray) runs on one loop, then on the other,
alternately ``--rounds`` times; the same client process as ``genfleet bench`` (N concurrent callers on
one channel, 1-sample ``Generate``) measures calls/s and p50, and ``/proc`` the gateway
process's CPU per call. Without Ray and its replicas the machine is quieter than under
``genfleet up``, so what differs between the loops shows through. Prints a table and
writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cluster.bench import print_table
from cluster.bench.fastpath import run_client

LOOPS = ("asyncio", "uvloop")
GATEWAY = "gateway"


def _serve(store_root: str, loop: str, port_file: str) -> None:
    """A gateway over ``gan`` in this process, on ``loop``, until terminated."""
    import asyncio

    from services.gateway import event_loop
    from services.gateway.grpc_server import Gateway, GatewayConfig
    from services.serving.inprocess import InProcessBackend

    class Replayed(InProcessBackend):
        """The first result, computed once, answers every call: the gateway's own path
        (admission, validation, codec, metrics, gRPC) without the model's compute."""

        first: Any = None

        async def _generate(self, name: str, request: Any) -> Any:
            if self.first is None:
                self.first = await super()._generate(name, request)
            return self.first

    async def main() -> None:
        gateway = Gateway(Replayed(store_root, ["gan"]), GatewayConfig(host="127.0.0.1", port=0))
        port = await gateway.start()
        Path(port_file).write_text(str(port))
        await asyncio.Event().wait()

    event_loop.run(main(), loop)


def _measure(store: str, loop: str, callers: int, duration: float, workdir: Path
             ) -> dict[str, Any]:
    port_file = workdir / f"port-{loop}"
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "cluster.bench.event_loop", "_serve", store,
                             loop, str(port_file)])
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists() or not port_file.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway on {loop} did not start")
            time.sleep(0.05)
        result = run_client(f"127.0.0.1:{port_file.read_text()}", "gan", callers, duration,
                            own={proc.pid: GATEWAY})
    finally:
        proc.terminate()
        proc.wait(30)
    if result["errors"]:
        raise RuntimeError(f"calls failed on {loop}: {result['errors']}")
    return {"loop": loop, "calls_per_s": result["calls_per_s"], "p50_ms": result["p50_ms"],
            "gateway_cpu_ms_per_call": result["cpu_ms_per_call"].get(GATEWAY),
            "cpu_ms_per_call": result["cpu_ms_per_call"]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_serve":
        _serve(*argv[1:4])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", required=True, help="a store with a gan checkpoint")
    parser.add_argument("--callers", nargs="+", type=int, default=[16, 32])
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating asyncio/uvloop pairs")
    parser.add_argument("--out", default=".docs/bench/event_loop.json")
    args = parser.parse_args(argv)

    cells: list[dict[str, Any]] = []
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for callers in args.callers:
            runs: dict[str, list[dict[str, Any]]] = {loop: [] for loop in LOOPS}
            for r in range(args.rounds):
                # alternate which loop goes first: a drifting machine favours neither
                for loop in LOOPS if r % 2 == 0 else LOOPS[::-1]:
                    runs[loop].append(_measure(args.store, loop, callers, args.duration,
                                               Path(tmp)))
            pairs = list(zip(runs["asyncio"], runs["uvloop"], strict=True))
            rate = [u["calls_per_s"] / a["calls_per_s"] for a, u in pairs]
            cpu = [u["gateway_cpu_ms_per_call"] / a["gateway_cpu_ms_per_call"]
                   for a, u in pairs]
            p50 = [u["p50_ms"] / a["p50_ms"] for a, u in pairs]
            cell = {"callers": callers, "runs": runs,
                    "calls_ratio_uvloop_over_asyncio": statistics.median(rate),
                    "calls_ratio_per_round": rate,
                    "gateway_cpu_ratio": statistics.median(cpu), "gateway_cpu_ratio_per_round": cpu,
                    "p50_ratio": statistics.median(p50), "p50_ratio_per_round": p50}
            cells.append(cell)

            def med(loop: str, key: str, rs: dict[str, list[dict[str, Any]]] = runs) -> float:
                return statistics.median(x[key] for x in rs[loop])

            def spread(xs: list[float]) -> str:
                return ", ".join(f"{x:.2f}" for x in xs)

            rows += [
                (f"{callers} callers: calls/s asyncio | uvloop",
                 f"{med('asyncio', 'calls_per_s'):.0f} | {med('uvloop', 'calls_per_s'):.0f} = "
                 f"{cell['calls_ratio_uvloop_over_asyncio']:.2f}x ({spread(rate)})", ""),
                (f"{callers} callers: gateway CPU ms per call asyncio | uvloop",
                 f"{med('asyncio', 'gateway_cpu_ms_per_call'):.2f} | "
                 f"{med('uvloop', 'gateway_cpu_ms_per_call'):.2f} = "
                 f"{cell['gateway_cpu_ratio']:.2f}x ({spread(cpu)})", ""),
                (f"{callers} callers: p50 ms asyncio | uvloop",
                 f"{med('asyncio', 'p50_ms'):.1f} | {med('uvloop', 'p50_ms'):.1f} = "
                 f"{cell['p50_ratio']:.2f}x ({spread(p50)})", "")]
    results = {"store": args.store, "duration_s": args.duration, "rounds": args.rounds,
               "cells": cells}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print_table(rows, title="gateway event loop, replayed gan result (medians; per-round "
                            "ratios uvloop / asyncio)", out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
