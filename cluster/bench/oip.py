"""Open Inference Protocol v2 vs the native API, one running gateway, one run.

    genfleet up &
    python -m cluster.bench.oip --target 127.0.0.1:50051 --http 127.0.0.1:8000

For each client count (16, 32 by default): 1-sample ``gan`` generation, a new seed per
call, N closed-loop callers in a client process of their own, over (a) the native
``genfleet.v1.GenerationService/Generate``, (b) v2 gRPC ``ModelInfer`` (tritonclient's
generated stub on a grpc.aio channel) and (c) v2 REST ``POST /v2/models/gan/infer``
(aiohttp, JSON in and out, as curl or a plain HTTP client would). The three are measured
in turn ``--rounds`` times and compared by medians, with the spread across rounds; the
ratio v2/native is what the protocol costs over the native path. Prints a table and
writes JSON (``--out``). Nothing here changes the deployment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cluster.bench import print_table
from cluster.bench.fastpath import GATEWAY_LABEL

PROTOCOLS = ("native", "v2-grpc", "v2-rest")



def _summary(latencies: list[float], done: int, errors: dict[str, int], duration_s: float
             ) -> dict[str, Any]:
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    return {"calls_per_s": done / duration_s, "ok": done, "errors": errors,
            "p50_ms": pct(0.5), "p99_ms": pct(0.99)}


async def _closed_loop(call: Callable[[int], Awaitable[None]], concurrency: int,
                       duration_s: float, warmup_s: float, failure: type[BaseException],
                       code: Callable[[BaseException], str]) -> dict[str, Any]:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    done, calls = [0], [0]
    start = time.perf_counter()
    measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s

    async def caller(index: int) -> None:
        seed = index * 1_000_003
        while (t0 := time.perf_counter()) < stop_at:
            seed += 1
            try:
                await call(seed)
                status = "OK"
            except failure as exc:
                status = code(exc)
            t1 = time.perf_counter()
            calls[0] += 1
            if measure_from <= t1 <= stop_at:
                if status == "OK":
                    done[0] += 1
                    if t0 >= measure_from:
                        latencies.append(1000 * (t1 - t0))
                else:
                    errors[status] = errors.get(status, 0) + 1

    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    result = _summary(latencies, done[0], errors, duration_s)
    result["calls_total"] = calls[0]
    cpu = os.times()
    result["client_cpu_s"] = cpu.user + cpu.system
    return result


async def _client(protocol: str, target: str, model: str, concurrency: int, duration_s: float,
                  warmup_s: float, token: str | None) -> dict[str, Any]:
    """One protocol's closed loop (run in a process of its own)."""
    import grpc

    auth = (("authorization", f"Bearer {token}"),) if token else None
    if protocol == "native":
        from services.gateway.client import generation_protocol

        pb, stub_class = generation_protocol()
        async with grpc.aio.insecure_channel(target) as channel:
            stub = stub_class(channel)

            async def native(seed: int) -> None:
                await stub.Generate(pb.GenerateRequest(model=model, num_samples=1, seed=seed),
                                    timeout=60, metadata=auth)

            return await _closed_loop(native, concurrency, duration_s, warmup_s,
                                      grpc.aio.AioRpcError, lambda e: e.code().name)  # type: ignore[attr-defined]
    if protocol == "v2-grpc":
        from tritonclient.grpc import service_pb2 as v2
        from tritonclient.grpc import service_pb2_grpc as v2_grpc

        async with grpc.aio.insecure_channel(target) as channel:
            infer = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer

            async def v2_call(seed: int) -> None:
                request = v2.ModelInferRequest(model_name=model)
                request.inputs.add(name="SEED", datatype="UINT64",
                                   shape=[1]).contents.uint64_contents.append(seed)
                request.outputs.add(name="SAMPLES")
                await infer(request, timeout=60, metadata=auth)

            return await _closed_loop(v2_call, concurrency, duration_s, warmup_s,
                                      grpc.aio.AioRpcError, lambda e: e.code().name)  # type: ignore[attr-defined]
    import aiohttp

    headers = {"Content-Type": "application/json",
               **({"Authorization": f"Bearer {token}"} if token else {})}
    url = f"http://{target}/v2/models/{model}/infer"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:

        async def rest(seed: int) -> None:
            body = {"inputs": [{"name": "SEED", "shape": [1], "datatype": "UINT64",
                                "data": [seed]}], "outputs": [{"name": "SAMPLES"}]}
            async with http.post(url, data=json.dumps(body), headers=headers,
                                 timeout=aiohttp.ClientTimeout(total=60)) as response:
                payload = await response.read()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}")
                json.loads(payload)

        return await _closed_loop(rest, concurrency, duration_s, warmup_s, RuntimeError, str)


def run_client(protocol: str, target: str, model: str, concurrency: int, duration_s: float,
               warmup_s: float, token: str | None) -> dict[str, Any]:
    """One protocol's client in a process of its own; with ``/proc``, also the CPU ms per
    call of every process while it ran (``cpu_ms_per_call``, by process label: the
    gateway's own cost per protocol, and the client's)."""
    from cluster.bench.fastpath import cpu_per_call, cpu_snapshot

    measured = Path("/proc/self/stat").exists()
    before = cpu_snapshot() if measured else {}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.bench.oip", "_client", protocol, target, model,
         str(concurrency), str(duration_s), str(warmup_s)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **({"GENFLEET_TOKEN": token} if token else {})})
    stdout, stderr = proc.communicate(timeout=duration_s + warmup_s + 300)
    if proc.returncode != 0:
        raise RuntimeError(f"the {protocol} client failed: {stderr[-2000:]}")
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    if measured:
        after = cpu_snapshot()
        calls = max(1, int(result.pop("calls_total")))
        costs = cpu_per_call(before, after, calls)
        costs["client (this benchmark)"] = 1000 * result.pop("client_cpu_s") / calls
        result["cpu_ms_per_call"] = costs
    return result


def run(args: argparse.Namespace) -> int:
    report: dict[str, Any] = {"model": args.model, "rounds": args.rounds,
                              "duration_s": args.duration, "cases": {}}
    rows: list[tuple[str, str, str]] = []
    for n in args.concurrency:
        runs: dict[str, list[dict[str, Any]]] = {p: [] for p in PROTOCOLS}
        for _ in range(args.rounds):
            for protocol in PROTOCOLS:
                target = args.http if protocol == "v2-rest" else args.target
                runs[protocol].append(run_client(protocol, target, args.model, n, args.duration,
                                                 args.warmup, args.token))
        case: dict[str, Any] = {}
        for protocol in PROTOCOLS:
            calls = [r["calls_per_s"] for r in runs[protocol]]
            p50 = [r["p50_ms"] for r in runs[protocol]]
            case[protocol] = {"calls_per_s": statistics.median(calls),
                              "calls_per_s_range": [min(calls), max(calls)],
                              "p50_ms": statistics.median(p50), "p50_ms_range": [min(p50), max(p50)],
                              "errors": [r["errors"] for r in runs[protocol]], "runs": runs[protocol]}
            gateway = [r["cpu_ms_per_call"].get(GATEWAY_LABEL, float("nan")) for r in runs[protocol]
                       if "cpu_ms_per_call" in r]
            if gateway:
                case[protocol]["gateway_cpu_ms_per_call"] = statistics.median(gateway)
        base = case["native"]
        for protocol in PROTOCOLS:
            c = case[protocol]
            c["calls_ratio_vs_native"] = c["calls_per_s"] / base["calls_per_s"]
            c["p50_ratio_vs_native"] = c["p50_ms"] / base["p50_ms"]
            lo, hi = c["calls_per_s_range"]
            rows.append((f"{args.model} {n} callers {protocol} calls/s",
                         f"{c['calls_per_s']:.0f}",
                         f"{c['calls_ratio_vs_native']:.2f}x native (rounds {lo:.0f}-{hi:.0f})"))
            rows.append((f"{args.model} {n} callers {protocol} p50 ms", f"{c['p50_ms']:.1f}",
                         f"{c['p50_ratio_vs_native']:.2f}x native"))
            if "gateway_cpu_ms_per_call" in c:
                rows.append((f"{args.model} {n} callers {protocol} gateway CPU ms/call",
                             f"{c['gateway_cpu_ms_per_call']:.2f}", ""))
        report["cases"][str(n)] = case
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print_table(rows, f"OIP v2 vs native, 1-sample {args.model}, medians of {args.rounds} rounds",
                args.out)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--target", default="127.0.0.1:50051", help="the gateway's gRPC port")
    p.add_argument("--http", default="127.0.0.1:8000", help="the gateway's v2 REST host:port")
    p.add_argument("--model", default="gan")
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 32])
    p.add_argument("--duration", type=float, default=6.0)
    p.add_argument("--warmup", type=float, default=1.5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--token", default=os.environ.get("GENFLEET_TOKEN"))
    p.add_argument("--out", default=".docs/bench/oip.json")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_client":
        protocol, target, model, n, duration, warmup = argv[1:7]
        print(json.dumps(asyncio.run(_client(protocol, target, model, int(n), float(duration),
                                             float(warmup), os.environ.get("GENFLEET_TOKEN")))))
        return 0
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
