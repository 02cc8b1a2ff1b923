"""The fast path, measured against a running gateway with the operator's own settings.

    genfleet up &                                      # or any deployment you can reach
    python -m cluster.bench.fastpath --target 127.0.0.1:50051 --store ~/.genfleet/store

For each model (gan, vae, flow by default) and each client count (16, 32), one plain
grpc.aio client process (N concurrent callers on one channel, 1-sample ``Generate``, a new
seed per call) runs against the gateway and against a **bare grpc.aio server** that
returns a reply of the same size without doing anything: the ratio of calls/s and of p50
says what genfleet costs over what this machine's Python gRPC stack allows. The two are
measured alternately ``--rounds`` times and compared by medians (a shared machine drifts
between runs minutes apart); the spread across rounds is reported with them.

With ``--store`` (the store the deployment serves): diffusion at saturation (served
samples/s vs the raw model in this process at its best batch size, same torch threads).
With ``--address`` (a Ray cluster to join, e.g. ``auto`` beside ``genfleet up``): the
p50 of one caller through the gateway vs a direct call to a replica (a Serve handle from
this process), i.e. what the gateway and its coalescing add at low load.

Prints a table and writes JSON (``--out``). Nothing here changes the deployment.
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
from pathlib import Path
from typing import Any

from cluster.bench import print_table
from services.gateway import event_loop

SERVICE = "genfleet.v1.GenerationService"
GATEWAY_LABEL = "gateway (genfleet up: gRPC, coalescing, Ray driver)"


# ------------------------------------------------------------------ the bare server
async def _bare_server(reply: bytes, port_file: str) -> None:
    """A grpc.aio server whose Generate parses the request and returns ``reply`` (a
    serialized GenerateResponse): the same protobuf work per call as any server, nothing
    else."""
    import grpc

    from services.gateway.client import generation_protocol

    pb, _ = generation_protocol()
    response = pb.GenerateResponse.FromString(reply)

    async def generate(request: Any, context: Any) -> Any:
        return response

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Generate": grpc.unary_unary_rpc_method_handler(
            generate, request_deserializer=pb.GenerateRequest.FromString,
            response_serializer=pb.GenerateResponse.SerializeToString)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    Path(port_file).write_text(str(port))
    await server.wait_for_termination()


class BareServer:
    """The bare server in a process of its own (as the gateway is)."""

    def __init__(self, reply: bytes, workdir: Path, loop: str = "asyncio") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        reply_path, port_path = workdir / "reply.bin", workdir / "port"
        reply_path.write_bytes(reply)
        port_path.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.bench.fastpath", "_bare", str(reply_path),
             str(port_path), loop])
        deadline = time.monotonic() + 60
        while not port_path.exists() or not port_path.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the bare server did not start")
            time.sleep(0.05)
        self.target = f"127.0.0.1:{port_path.read_text()}"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# ------------------------------------------------------------------- CPU accounting
def _label(cmdline: str, own: dict[int, str], pid: int) -> str:
    if pid in own:
        return own[pid]
    if "ServeReplica:" in cmdline:
        return "replica " + cmdline.split("ServeReplica:", 1)[1].split()[0].split(".")[0]
    if "genfleet" in cmdline and (" up" in cmdline or " gateway" in cmdline):
        return GATEWAY_LABEL
    if "ray" in cmdline or "raylet" in cmdline or "gcs_server" in cmdline:
        return "Ray and Serve (controller, GCS, raylet, agents)"
    return "other"


def cpu_snapshot(own: dict[int, str] | None = None) -> dict[int, tuple[float, str]]:
    """CPU seconds (user + system) of every process, labelled (Linux ``/proc``)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[float, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(entry)] = ((int(fields[11]) + int(fields[12])) / tick,
                           _label(cmdline, own or {}, int(entry)))
    return out


def cpu_per_call(before: dict[int, tuple[float, str]], after: dict[int, tuple[float, str]],
                 calls: int) -> dict[str, float]:
    """CPU ms per call by label between two snapshots."""
    spent: dict[str, float] = {}
    for pid, (cpu, label) in after.items():
        spent[label] = spent.get(label, 0.0) + cpu - before.get(pid, (0.0, label))[0]
    return {k: 1000 * v / max(1, calls) for k, v in sorted(spent.items()) if v > 0}


# ------------------------------------------------------------------------- the client
async def _client(target: str, model: str, concurrency: int, duration_s: float,
                  warmup_s: float, samples: int, token: str | None) -> dict[str, Any]:
    """``concurrency`` closed-loop callers on one grpc.aio channel, generated stubs only."""
    import grpc

    from services.gateway.client import generation_protocol

    pb, stub_class = generation_protocol()
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    latencies: list[float] = []
    errors: dict[str, int] = {}
    total, done = [0], [0]
    start = time.perf_counter()
    measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s
    async with grpc.aio.insecure_channel(target) as channel:
        stub = stub_class(channel)

        async def caller(index: int) -> None:
            seed = index * 1_000_003
            while (t0 := time.perf_counter()) < stop_at:
                seed += 1
                try:
                    await stub.Generate(pb.GenerateRequest(model=model, num_samples=samples,
                                                           seed=seed), timeout=60,
                                        metadata=metadata)
                    code = "OK"
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                t1 = time.perf_counter()
                total[0] += 1
                if measure_from <= t1 <= stop_at:  # throughput: completions in the window
                    if code == "OK":
                        done[0] += 1
                        if t0 >= measure_from:  # latency: calls wholly inside it
                            latencies.append(1000 * (t1 - t0))
                    else:
                        errors[code] = errors.get(code, 0) + 1

        await asyncio.gather(*(caller(i) for i in range(concurrency)))
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    return {"calls_per_s": done[0] / duration_s, "samples_per_s":
            done[0] * samples / duration_s, "ok": done[0], "errors": errors,
            "p50_ms": pct(0.5), "p99_ms": pct(0.99), "calls_total": total[0]}


def run_client(target: str, model: str, concurrency: int, duration_s: float, *,
               warmup_s: float = 2.0, samples: int = 1, token: str | None = None,
               own: dict[int, str] | None = None) -> dict[str, Any]:
    """The client in a process of its own (it must not share this process's GIL); with
    ``/proc``, also the CPU ms per call of every process while it ran (``cpu_ms_per_call``;
    ``own``: pids of this benchmark's processes and their labels)."""
    own = dict(own or {})
    before = cpu_snapshot(own) if Path("/proc/self/stat").exists() else None
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.bench.fastpath", "_client", target, model,
         str(concurrency), str(duration_s), str(warmup_s), str(samples)],
        stdout=subprocess.PIPE, text=True,
        env={**os.environ, **({"GENFLEET_TOKEN": token} if token else {})})
    own[proc.pid] = "client (grpc.aio, this benchmark)"
    before = None if before is None else {**before, proc.pid: (0.0, own[proc.pid])}
    # the client reports its own CPU time (it has exited before the second snapshot)
    stdout, _ = proc.communicate(timeout=duration_s + warmup_s + 300)
    if proc.returncode != 0:
        raise RuntimeError(f"the benchmark client failed ({proc.returncode})")
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    if before is not None:
        after = cpu_snapshot(own)
        after[proc.pid] = (result.pop("client_cpu_s"), own[proc.pid])
        result["cpu_ms_per_call"] = cpu_per_call(before, after, result["calls_total"])
    else:
        result.pop("client_cpu_s", None)
    return result


def sample_reply(target: str, model: str, token: str | None) -> bytes:
    """One real 1-sample GenerateResponse from the gateway, serialized."""
    import grpc

    from services.gateway.client import generation_protocol

    pb, stub_class = generation_protocol()
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with grpc.insecure_channel(target) as channel:
        stub = stub_class(channel)
        reply = stub.Generate(pb.GenerateRequest(model=model, num_samples=1, seed=1),
                              timeout=120, metadata=metadata)
    return bytes(reply.SerializeToString())


# --------------------------------------------------------------------- measurements
def compare(target: str, bare: BareServer, model: str, concurrency: int, duration_s: float,
            rounds: int, token: str | None) -> dict[str, Any]:
    """Served and bare, alternately ``rounds`` times; ratios of medians and per round."""
    served, baseline = [], []
    own = {bare.proc.pid: "bare grpc.aio server"}
    for _ in range(rounds):
        baseline.append(run_client(bare.target, model, concurrency, duration_s, own=own))
        served.append(run_client(target, model, concurrency, duration_s, token=token, own=own))

    def med(runs: list[dict[str, Any]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    per_round = [s["calls_per_s"] / b["calls_per_s"] for s, b in zip(served, baseline,
                                                                     strict=True)]
    return {"model": model, "concurrency": concurrency, "served": served, "bare": baseline,
            "calls_ratio": med(served, "calls_per_s") / med(baseline, "calls_per_s"),
            "calls_ratio_per_round": per_round,
            "p50_ratio": med(served, "p50_ms") / med(baseline, "p50_ms"),
            "served_calls_per_s": med(served, "calls_per_s"),
            "bare_calls_per_s": med(baseline, "calls_per_s"),
            "served_p50_ms": med(served, "p50_ms"), "bare_p50_ms": med(baseline, "p50_ms"),
            "errors": sum(sum(r["errors"].values()) for r in served),
            "cpu_ms_per_call_served": _median_budget(served),
            "cpu_ms_per_call_bare": _median_budget(baseline)}


def _median_budget(runs: list[dict[str, Any]]) -> dict[str, float]:
    labels = sorted({k for r in runs for k in r.get("cpu_ms_per_call", {})})
    return {k: statistics.median(r.get("cpu_ms_per_call", {}).get(k, 0.0) for r in runs)
            for k in labels}


def diffusion_saturation(target: str, store_root: str, duration_s: float,
                         token: str | None, threads: int) -> dict[str, Any]:
    """Served samples/s with twice the largest batch of clients vs the raw model in this
    process at its best batch size (8 .. 128), on ``threads`` torch threads."""
    import torch

    from cluster.bench.load import run_raw
    from services.core.store import ModelStore

    # a group of 64 takes seconds: a longer window, after the queue has filled
    served = run_client(target, "diffusion", 128, max(duration_s, 20.0), warmup_s=10.0,
                        token=token)
    torch.set_num_threads(threads)
    store = ModelStore(Path(store_root))
    raw = {b: run_raw(store, "diffusion", batch=b, duration_s=duration_s)["samples_per_s"]
           for b in (8, 16, 32, 64, 128)}
    best = max(raw, key=lambda b: raw[b])
    return {"served": served, "raw_by_batch": raw, "raw_best_batch": best,
            "ratio": served["samples_per_s"] / raw[best], "torch_threads": threads}


def low_load_overhead(target: str, address: str, calls: int, token: str | None,
                      auth_mode: str | None = None, bare_target: str | None = None
                      ) -> dict[str, Any]:
    """p50 of one caller, 1-sample gan: through the gateway, and straight to a replica
    (its lane, and a Serve handle) from this process (a Ray driver), alternately in 3
    rounds; with ``bare_target``, also the same client against the bare server: the
    floor of the one gRPC hop the gateway adds (client process -> server -> client)."""
    os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
    from ray import serve

    from services.core import api
    from services.serving import ray_cluster

    ray_cluster.connect(address, auth_mode=auth_mode)
    handle = serve.get_deployment_handle("gan", "genfleet")

    from services.serving.lane import LaneAddress, LaneClient

    try:
        lanes = serve.get_app_handle("genfleet").lanes.remote().result().get("gan", [])
    except Exception:  # a release without lanes: the Serve handle is the direct call
        lanes = []

    def via_handle() -> float:
        lat = []
        for i in range(calls):
            t0 = time.perf_counter()
            api.unwrap(handle.generate_batch.remote(
                [api.GenerateRequest("gan", 1, seed=i)]).result()[0])
            lat.append(1000 * (time.perf_counter() - t0))
        return statistics.median(lat[calls // 10:])

    async def via_lane() -> float:
        client = LaneClient(LaneAddress.from_dict(lanes[0]))
        lat = []
        for i in range(calls):
            t0 = time.perf_counter()
            api.unwrap((await client.generate_batch(
                [api.GenerateRequest("gan", 1, seed=i)], False, 30))[0])
            lat.append(1000 * (time.perf_counter() - t0))
        await client.close()
        return statistics.median(lat[calls // 10:])

    rounds = []
    for _ in range(3):
        row = {"handle_p50_ms": via_handle()}
        if lanes:
            row["lane_p50_ms"] = asyncio.run(via_lane())
        row["gateway_p50_ms"] = run_client(target, "gan", 1, duration_s=calls * 0.006,
                                           warmup_s=0.5, token=token)["p50_ms"]
        if bare_target is not None:
            row["bare_p50_ms"] = run_client(bare_target, "gan", 1, duration_s=calls * 0.003,
                                            warmup_s=0.5)["p50_ms"]
        rounds.append(row)
    import ray

    ray.shutdown()
    direct = "lane_p50_ms" if lanes else "handle_p50_ms"
    added = statistics.median(r["gateway_p50_ms"] - r[direct] for r in rounds)
    result = {"rounds": rounds, "direct": direct, "added_p50_ms": added}
    if bare_target is not None:
        result["bare_p50_ms"] = statistics.median(r["bare_p50_ms"] for r in rounds)
        # what the gateway adds beyond the hop itself: its own work per call
        result["added_beyond_hop_ms"] = statistics.median(
            r["gateway_p50_ms"] - r[direct] - r["bare_p50_ms"] for r in rounds)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_bare":
        event_loop.run(_bare_server(Path(argv[1]).read_bytes(), argv[2]), argv[3])
        return 0
    if argv and argv[0] == "_client":
        target, model, conc, dur, warm, samples = argv[1:7]
        out = asyncio.run(_client(target, model, int(conc), float(dur), float(warm),
                                  int(samples), os.environ.get("GENFLEET_TOKEN")))
        times = os.times()
        out["client_cpu_s"] = times.user + times.system
        print(json.dumps(out))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=os.environ.get("GENFLEET_TARGET", "127.0.0.1:50051"))
    parser.add_argument("--token", default=os.environ.get("GENFLEET_TOKEN"))
    parser.add_argument("--models", nargs="+", default=["gan", "vae", "flow"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[16, 32])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating served/bare pairs")
    parser.add_argument("--store", default=None,
                        help="the served store: adds diffusion at saturation vs raw")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the raw diffusion run (the replicas' setting)")
    parser.add_argument("--address", default=None,
                        help="a Ray cluster to join (e.g. auto): adds gateway vs direct replica "
                             "call at low load")
    parser.add_argument("--bare-loop", default="auto", choices=event_loop.CHOICES,
                        help="the bare server's event loop (auto: the gateway's default, "
                             "uvloop where installed)")
    parser.add_argument("--out", default=".docs/bench/fastpath.json")


def run(args: argparse.Namespace) -> int:
    import tempfile

    loop = event_loop.resolve(args.bare_loop, "--bare-loop")
    results: dict[str, Any] = {"machine": f"{os.cpu_count()} CPUs", "target": args.target,
                               "duration_s": args.duration, "rounds": args.rounds,
                               "bare_event_loop": loop,
                               "gateway_event_loop": getattr(args, "gateway_loop", None),
                               "cells": []}
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            reply = sample_reply(args.target, model, args.token)
            bare = BareServer(reply, Path(tmp) / model, loop)
            try:
                for conc in args.concurrency:
                    cell = compare(args.target, bare, model, conc, args.duration, args.rounds,
                                   args.token)
                    cell["reply_bytes"] = len(reply)
                    results["cells"].append(cell)
                    spread = ", ".join(f"{r:.2f}" for r in cell["calls_ratio_per_round"])
                    rows.append((f"{model} 1 sample, {conc} callers: calls/s served | bare",
                                 f"{cell['served_calls_per_s']:.0f} | {cell['bare_calls_per_s']:.0f}"
                                 f" = {cell['calls_ratio']:.2f} ({spread})", ">= 0.5"))
                    rows.append((f"{model} 1 sample, {conc} callers: p50 ms served | bare",
                                 f"{cell['served_p50_ms']:.1f} | {cell['bare_p50_ms']:.1f}"
                                 f" = {cell['p50_ratio']:.1f}x", "<= 3x"))
                    print(rows[-2][0], rows[-2][1], flush=True)
            finally:
                bare.close()
    if args.store:
        sat = diffusion_saturation(args.target, args.store, args.duration, args.token,
                                   args.threads)
        results["diffusion_saturation"] = sat
        rows.append(("diffusion at saturation: samples/s served | raw (best batch "
                     f"{sat['raw_best_batch']})",
                     f"{sat['served']['samples_per_s']:.1f} | "
                     f"{sat['raw_by_batch'][sat['raw_best_batch']]:.1f} = {sat['ratio']:.2f}",
                     ">= 0.9"))
    if args.address:
        with tempfile.TemporaryDirectory() as tmp:
            bare = BareServer(sample_reply(args.target, "gan", args.token), Path(tmp) / "low",
                              loop)
            try:
                low = low_load_overhead(args.target, args.address, 400, args.token,
                                        getattr(args, "auth_mode", None), bare.target)
            finally:
                bare.close()
        results["low_load"] = low
        rows.append(("gan 1 caller: gateway p50 - direct replica call p50 (ms)",
                     f"{low['added_p50_ms']:.2f} (" + ", ".join(
                         f"{r['gateway_p50_ms']:.2f}-{r[low['direct']]:.2f}"
                         for r in low["rounds"]) + ")", "<= 1"))
        rows.append(("gan 1 caller: bare server p50, the added hop's floor (ms)",
                     ", ".join(f"{r['bare_p50_ms']:.2f}" for r in low["rounds"]), ""))
        rows.append(("gan 1 caller: gateway - direct - bare hop, the gateway's own (ms)",
                     f"{low['added_beyond_hop_ms']:.2f}", ""))
        rows.append(("gan 1 caller p50 via a Serve handle, for comparison (ms)",
                     ", ".join(f"{r['handle_p50_ms']:.2f}" for r in low["rounds"]), ""))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    loops = f"event loops: gateway {results['gateway_event_loop'] or 'unknown'}, bare {loop}"
    print_table(rows, title=f"fast path (medians of alternating rounds; per-round ratios; "
                            f"{loops})", out=args.out)
    for cell in results["cells"]:
        served, bare = cell["cpu_ms_per_call_served"], cell["cpu_ms_per_call_bare"]
        if served:
            print(f"\nCPU ms per call, {cell['model']} {cell['concurrency']} callers "
                  f"(served | bare):")
            for label in sorted(set(served) | set(bare), key=lambda k: -served.get(k, 0.0)):
                print(f"  {label:<52} {served.get(label, 0.0):6.2f} | {bare.get(label, 0.0):6.2f}")
            print(f"  {'total':<52} {sum(served.values()):6.2f} | {sum(bare.values()):6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
