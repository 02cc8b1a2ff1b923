"""A new user's first run: ``genfleet up`` on an empty store, with its defaults, timed from
the command's start to the gateway's first answer and to each family's first successful
Generate (the families train in the background, one at a time, in the config's order).
Also the p50 latency of 1-sample Generate calls to the first family served while the
others train, against the same calls once every family serves (what the background
training costs the models that already serve).

    python -m cluster.bench.first_run [--models vae gan ...] [--train-minutes 5]

Prints a table and writes ``.docs/bench/first_run.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from services.gateway.client import GenfleetClient


def _latency_ms(client: GenfleetClient, name: str, calls: int = 20) -> float:
    """p50 of ``calls`` sequential 1-sample Generate calls."""
    times = []
    for i in range(calls):
        started = time.perf_counter()
        client.generate(name, 1, seed=i)
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def run(models: list[str] | None, minutes: float, out: Path, timeout_s: float) -> dict[str, Any]:
    exe = Path(sys.executable).parent / "genfleet"
    with tempfile.TemporaryDirectory(prefix="genfleet-first-run-") as tmp:
        base = Path(tmp)
        flags = ["--models", *models] if models else []
        log_path = base / "up.log"
        started = time.monotonic()
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                [str(exe), "--store", str(base / "store"), "up", "--port", "0",
                 "--http-port", "-1", "--metrics-port", "-1", "--ray-metrics-port", "-1",
                 "--train-minutes", str(minutes), *flags],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return _watch(proc, base, log_path, started, timeout_s)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _watch(proc: subprocess.Popen[bytes], base: Path, log_path: Path, started: float,
           timeout_s: float) -> dict[str, Any]:
    def check() -> None:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() - started < timeout_s, "timed out"

    state_file = base / "run" / "up.json"
    while not state_file.exists():
        check()
        time.sleep(0.2)
    state = json.loads(state_file.read_text())
    names: list[str] = list(state["models"])
    with GenfleetClient(state["target"], timeout=30, retries=0) as client:  # poll, no waits
        while True:  # the gateway's first answer
            try:
                client.list_models()
                break
            except grpc.RpcError:
                check()
                time.sleep(0.2)
        answered = time.monotonic() - started
        served: dict[str, float] = {}
        during: float | None = None
        while len(served) < len(names):
            check()
            for name in names:
                if name in served:
                    continue
                try:
                    client.generate(name, 1, seed=0)
                    served[name] = time.monotonic() - started
                    print(f"  {name:<16} first Generate at {served[name]:7.1f} s", flush=True)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
            if served and during is None and len(served) < len(names):
                during = _latency_ms(client, next(iter(served)))
            time.sleep(0.5)
        first = next(iter(served))
        time.sleep(30)  # the last family's evaluation finishes in the background
        after = _latency_ms(client, first)
    return {"gateway_answers_s": round(answered, 1),
            "first_generate_s": round(min(served.values()), 1),
            "all_serving_s": round(max(served.values()), 1),
            "first_generate_per_model_s": {k: round(v, 1) for k, v in served.items()},
            "latency_probe_model": first,
            "p50_ms_while_training": None if during is None else round(during, 2),
            "p50_ms_after": round(after, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=None, help="default: the serve config's")
    parser.add_argument("--train-minutes", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--out", default=".docs/bench/first_run.json")
    args = parser.parse_args()
    result = run(args.models, args.train_minutes, Path(args.out), args.timeout)
    result = {"machine": {"cpus": os.cpu_count()}, "train_minutes": args.train_minutes,
              **result}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\n{'start -> gateway answers':<34}{result['gateway_answers_s']:>8.1f} s")
    print(f"{'start -> first Generate':<34}{result['first_generate_s']:>8.1f} s")
    print(f"{'start -> every family serves':<34}{result['all_serving_s']:>8.1f} s")
    if result["p50_ms_while_training"] is not None:
        print(f"{'p50 1-sample ' + result['latency_probe_model'] + ', others training':<34}"
              f"{result['p50_ms_while_training']:>8.2f} ms")
    print(f"{'p50 1-sample ' + result['latency_probe_model'] + ', all trained':<34}"
          f"{result['p50_ms_after']:>8.2f} ms")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
