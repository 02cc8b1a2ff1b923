"""Faults under load: kill what genfleet runs on while clients call it, and count.

    python -m cluster.bench.chaos                 # every fault, table + .docs/bench/chaos.json
    python -m cluster.bench.chaos --only replica-gan-1 gateway

Each fault runs against a fresh Serve application on one local Ray cluster (started here,
4 logical CPUs), behind gateways in their own processes (``genfleet gateway``), under
steady seeded load from client threads (``GenfleetClient`` with retries off, i.e. a client
with no retry logic, unless a fault says otherwise). A call's answer is compared
with the reference answer for its seed, taken before the fault: a call counts as failed
when it errs or differs. The table gives, per fault: calls, failed, the p99 latency of the
calls that ran during recovery (from the fault until throughput was back), and the time
to recover (until completions per second are back to half the pre-fault rate, held).

The same functions back the ``slow`` tests in ``tests/integration/test_chaos.py`` (with
less load), so what the README quotes is what CI checks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from services.core.store import ModelStore
from services.serving.ray_cluster import descendants

OUT = Path(".docs/bench")
GENFLEET = str(Path(sys.executable).parent / "genfleet")


# ------------------------------------------------------------------ processes
def _cmdline(pid: int | str) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def find_processes(pattern: str, root: int | None = None) -> list[int]:
    """Processes below ``root`` (default: this one) whose command line matches
    ``pattern``: only what this process (or the one it started) owns is ever killed."""
    rx = re.compile(pattern)
    return sorted(p for p in descendants(root or os.getpid()) if rx.search(_cmdline(p)))


def replica_pids(app: str, model: str, root: int | None = None) -> list[int]:
    """The replica processes of deployment ``model`` in Serve application ``app``."""
    return find_processes(rf"ray::(ServeReplica:{re.escape(app)}:{re.escape(model)}\b|"
                          rf"SERVE_REPLICA::{re.escape(app)}#{re.escape(model)}#)", root)


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str,
             period_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(period_s)
    raise TimeoutError(f"not within {timeout_s:.0f} s: {what}")


class GatewayProcess:
    """``genfleet gateway`` for Serve application ``app`` on this cluster, in its own
    process (the deployment shape of deploy/k8s: gateways beside the Ray cluster)."""

    def __init__(self, app: str, gcs_address: str, log_path: Path, *extra: str) -> None:
        self.log_path = log_path
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            [GENFLEET, "gateway", "--address", gcs_address, "--app", app, "--port", "0",
             "--http-port", "-1", "--metrics-port", "-1", "--grace", "2", *extra],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        port = wait_for(self._port, 120, f"gateway for {app} to listen")
        self.target = f"127.0.0.1:{port}"

    def _port(self) -> int | None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"genfleet gateway exited: {self.log_path.read_text()[-2000:]}")
        match = re.search(r"genfleet gateway on [\d.]+:(\d+)", self.log_path.read_text())
        return int(match.group(1)) if match else None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


# ----------------------------------------------------------------------- load
@dataclass
class Record:
    started: float
    ended: float
    ok: bool
    code: str  # OK, WRONG (answer differs from the reference) or the status code


Call = Callable[[int], bytes]  # seed -> the answer's bytes (raises grpc.RpcError)


def clients(stack: contextlib.ExitStack, target: str, n: int, *, retries: int = 0,
            timeout_s: float = 60.0) -> list[Any]:
    """``n`` ``GenfleetClient``s on ``target``, each with its own channel, closed with
    ``stack``. ``retries=0``: a client with no retry logic, as a plain gRPC client (a
    target naming several gateways is spread over them round-robin either way)."""
    from services.gateway.client import GenfleetClient

    return [stack.enter_context(GenfleetClient(target, retries=retries, timeout=timeout_s))
            for _ in range(n)]


def generate_call(client: Any, model: str, n: int, options: dict[str, Any] | None = None
                  ) -> Call:
    """Generate of ``n`` samples of ``model`` for a seed -> the samples' bytes."""
    def call(seed: int) -> bytes:
        samples = client.generate(model, n, seed=seed, options=options).samples
        return b"" if samples is None else bytes(samples.tobytes())
    return call


class Load:
    """``clients`` threads calling back to back, each cycling through its own seeds; every
    answer is checked against ``references[seed]``."""

    def __init__(self, calls: Sequence[Call], references: dict[int, bytes],
                 seeds_per_client: int) -> None:
        self.calls = calls
        self.references = references
        self.seeds_per_client = seeds_per_client
        self.records: list[Record] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(len(calls))]

    def _run(self, client: int) -> None:
        call, i = self.calls[client], 0
        while not self._stop.is_set():
            seed = client * self.seeds_per_client + i % self.seeds_per_client
            i += 1
            started = time.monotonic()
            try:
                ok = call(seed) == self.references[seed]
                code = "OK" if ok else "WRONG"
            except grpc.RpcError as exc:
                ok, code = False, exc.code().name
            with self._lock:
                self.records.append(Record(started, time.monotonic(), ok, code))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)


def references(call: Call, seeds: int) -> dict[int, bytes]:
    """The answer for every seed, taken before any fault."""
    return {s: call(s) for s in range(seeds)}


@dataclass
class Result:
    fault: str
    calls: int
    failed: int
    p50_ms: float  # before the fault
    p99_recovery_ms: float  # calls in flight or started between the fault and recovery
    recover_s: float  # fault -> completions per second back to half the pre-fault rate
    codes: dict[str, int] = field(default_factory=dict)
    notes: str = ""
    extra: dict[str, float] = field(default_factory=dict)  # per-fault facts, for tests

    def row(self) -> str:
        return (f"{self.fault:<22} {self.calls:>7} {self.failed:>7} {self.p50_ms:>9.1f} "
                f"{self.p99_recovery_ms:>13.1f} {self.recover_s:>10.2f}  {self.notes}")


HEADER = (f"{'fault':<22} {'calls':>7} {'failed':>7} {'p50 ms':>9} {'p99 recov ms':>13} "
          f"{'recover s':>10}  notes")


def summarize(fault: str, records: list[Record], fault_at: float, notes: str = "") -> Result:
    """Counts, the pre-fault p50, and recovery as defined in the module docstring."""
    before = [r for r in records if r.ended < fault_at]
    p50 = float(np.percentile([1000 * (r.ended - r.started) for r in before], 50)) \
        if before else float("nan")
    t0 = min((r.started for r in records), default=fault_at)
    rate = len(before) / max(fault_at - t0, 1e-9)  # completions per second before
    end = max((r.ended for r in records), default=fault_at)
    recovered = end
    second = fault_at
    while second + 1.0 <= end:  # first 1-s window after the fault at >= half the rate,
        window = [r for r in records if second <= r.ended < second + 1.0 and r.ok]
        if len(window) >= 0.5 * rate:  # measured from its start
            recovered = second
            break
        second += 0.25
    recovering = [1000 * (r.ended - r.started) for r in records
                  if r.ended >= fault_at and r.started <= recovered + 1.0]
    codes: dict[str, int] = {}
    for r in records:
        codes[r.code] = codes.get(r.code, 0) + 1
    return Result(fault, len(records), sum(not r.ok for r in records), p50,
                  float(np.percentile(recovering, 99)) if recovering else float("nan"),
                  recovered - fault_at, codes, notes)


# --------------------------------------------------------------------- stacks
def gcs_address() -> str:
    import ray

    address: str = ray.get_runtime_context().gcs_address
    return address


def deploy(store: ModelStore, app: str, model: str, *, replicas: int = 1,
           batching: dict[str, Any] | None = None, **overrides: Any) -> None:
    """Serve application ``app`` with the one model ``model`` at the default config and
    a fixed number of replicas (``overrides``: other ModelServeConfig fields)."""
    from services.serving import operations
    from services.serving.config import load_config

    config = load_config(models=[model])
    config.app_name = app
    m = config.models[model]
    m.autoscaling_config = {"min_replicas": replicas, "max_replicas": replicas,
                            "initial_replicas": replicas}
    if batching:
        m.batching = batching
    for key, value in overrides.items():
        setattr(m, key, value)
    operations.deploy(config, store)
    wait_for(lambda: len(replica_pids(app, model)) == replicas, 120, f"{replicas} replicas")


@contextlib.contextmanager
def application(store: ModelStore, app: str, model: str, workdir: Path, gateways: int = 1,
                **deploy_kw: Any) -> Iterator[list[GatewayProcess]]:
    """``deploy`` + ``gateways`` gateway processes; everything removed afterwards."""
    from ray import serve

    deploy(store, app, model, **deploy_kw)
    procs: list[GatewayProcess] = []
    try:
        for i in range(gateways):
            procs.append(GatewayProcess(app, gcs_address(), workdir / f"{app}-gw{i}.log"))
        yield procs
    finally:
        for p in procs:
            p.stop()
        serve.delete(app)


# --------------------------------------------------------------------- faults
def replica_kill(store: ModelStore, workdir: Path, model: str, *, replicas: int = 1,
                 count: int = 8, n: int = 4, options: dict[str, Any] | None = None,
                 before_s: float = 5.0, after_s: float = 20.0) -> Result:
    """SIGKILL one replica of ``model`` under load from ``count`` clients with no retry
    logic, through one gateway."""
    app = f"chaos-{model}-{replicas}"
    with application(store, app, model, workdir, replicas=replicas) as (gw,), \
            contextlib.ExitStack() as stack:
        calls = [generate_call(c, model, n, options) for c in clients(stack, gw.target, count)]
        refs = references(calls[0], count * 4)
        with Load(calls, refs, 4) as load:
            time.sleep(before_s)
            victim = replica_pids(app, model)[0]
            os.kill(victim, signal.SIGKILL)
            fault_at = time.monotonic()
            time.sleep(after_s)
        back = wait_for(lambda: len([p for p in replica_pids(app, model) if p != victim])
                        == replicas, 120, "the replica to be replaced")
        return summarize(f"replica-{model}-{replicas}", load.records, fault_at,
                         f"{replicas} replica(s); killed pid {victim}, replaced: {bool(back)}")


def gateway_kill(store: ModelStore, workdir: Path, model: str = "gan", *, count: int = 8,
                 n: int = 4, before_s: float = 5.0, after_s: float = 10.0) -> list[Result]:
    """Two gateways; ``GenfleetClient`` spreads calls over both (round-robin) and retries
    on UNAVAILABLE; SIGKILL one gateway. Also: the same with clients that do not retry
    (round-robin too), to state their failure mode."""
    app = f"chaos-gw-{model}"
    out = []
    with application(store, app, model, workdir, gateways=3) as gateways:
        for retrying in (True, False):
            pair = gateways[:2] if retrying else [gateways[0], gateways[2]]
            target = "ipv4:" + ",".join(g.target for g in pair)
            with contextlib.ExitStack() as stack:
                calls = [generate_call(c, model, n) for c in
                         clients(stack, target, count, retries=4 if retrying else 0)]
                refs = references(calls[0], count * 4)
                with Load(calls, refs, 4) as load:
                    time.sleep(before_s)
                    victim = pair[1]
                    victim.kill()
                    fault_at = time.monotonic()
                    time.sleep(after_s)
            kind = "GenfleetClient (retries)" if retrying else "a client without retries"
            out.append(summarize(f"gateway-{'client' if retrying else 'plain'}", load.records,
                                 fault_at, f"2 gateways, round-robin, {kind}"))
    return out


def autoscale(store: ModelStore, workdir: Path, model: str = "diffusion", *,
              count: int = 24, quiet: int = 2, n: int = 2,
              timeout_s: float = 240.0) -> Result:
    """min 1, max 2 replicas, scaled on requests: heavy load must add the second replica,
    light load afterwards must remove it, with no failed call while it drains."""
    from ray import serve

    from services.serving import operations
    from services.serving.config import load_config

    app = f"chaos-scale-{model}"
    config = load_config(models=[model])
    config.app_name = app
    m = config.models[model]
    m.autoscaling_config = {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 1,
                            "target_ongoing_requests": 8, "upscale_delay_s": 2,
                            "downscale_delay_s": 5,
                            # > Serve's metrics push interval (10 s), as Serve requires
                            "look_back_period_s": 12}
    operations.deploy(config, store)
    gw = GatewayProcess(app, gcs_address(), workdir / f"{app}-gw.log")
    timeline: list[tuple[float, int]] = []

    def replicas() -> int:
        dep = serve.status().applications[app].deployments[model]
        return int(sum(k for s, k in dep.replica_states.items() if str(s).endswith("RUNNING")))

    try:
        with contextlib.ExitStack() as stack:
            calls = [generate_call(c, model, n) for c in clients(stack, gw.target, count)]
            refs = references(calls[0], count * 4)
            started = time.monotonic()
            with Load(calls, refs, 4) as heavy:
                up = wait_for(lambda: replicas() == 2, timeout_s, "scale-up to 2 replicas")
                timeline.append((time.monotonic() - started, 2))
            fault_at = time.monotonic()  # load drops: the second replica must go
            with Load(calls[:quiet], refs, 4) as light:
                wait_for(lambda: replicas() == 1, timeout_s, "scale-down to 1 replica")
                timeline.append((time.monotonic() - started, 1))
                time.sleep(3.0)
        records = heavy.records + light.records
        result = summarize(f"autoscale-{model}", records, fault_at,
                           f"1->2 after {timeline[0][0]:.0f} s of {count} clients, "
                           f"2->1 {timeline[1][0] - timeline[0][0]:.0f} s after load fell "
                           f"to {quiet}")
        result.recover_s = float("nan")
        result.extra = {"scaled_up": float(bool(up)), "up_s": timeline[0][0],
                        "down_s": timeline[1][0] - timeline[0][0]}
        return result
    finally:
        gw.stop()
        serve.delete(app)


def batch_actor_kill(store: ModelStore, workdir: Path, *, samples: int = 600,
                     shard_size: int = 20) -> Result:
    """A 2-worker batch job on this cluster; SIGKILL one of its Ray Data actors mid-way.
    Ray restarts the actor and retries its shard; the dataset must equal an uninterrupted
    run's, file for file."""
    from cluster.batch import job
    from services.core.batch import BatchRequest

    def spec(out: Path, workers: int) -> BatchRequest:
        return BatchRequest("diffusion", samples, str(out), shard_size=shard_size, seed=5,
                            labels="balanced", options={"steps": 20}, workers=workers)

    out, ref = workdir / "batch-killed", workdir / "batch-ref"
    killed: list[int] = []

    def killer() -> None:
        pattern = r"ray::(MapWorker|_RayShardWriter)"
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: len(list((out / "data").glob("shard-*"))) >= 3, 300, "3 shards")
            victims = wait_for(lambda: find_processes(pattern), 30, "a batch actor")
            os.kill(victims[0], signal.SIGKILL)
            killed.append(victims[0])

    thread = threading.Thread(target=killer, daemon=True)
    started = time.monotonic()
    thread.start()
    job.run(spec(out, 2), store, progress=False)
    took = time.monotonic() - started
    thread.join(5)
    job.run(spec(ref, 1), store, local=True, progress=False)

    def files(root: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted((root / "data").glob("shard-*"))}

    got, want = files(out), files(ref)
    same = got == want
    manifest = job.read_manifest(out) or {}
    count = int(manifest.get("num_samples", 0))
    failed = 0 if same and count == samples else samples
    return Result("batch-actor", samples, failed, float("nan"), float("nan"), took,
                  {}, extra={"identical": float(same), "samples": float(count),
                             "killed_pid": float(killed[0] if killed else 0)},
                  notes=f"2 workers, killed actor pid {killed[0] if killed else None}; "
                        f"{count} samples, byte-identical to an uninterrupted run: {same}")


def head_kill(store_root: Path, workdir: Path, model: str = "gan", *, count: int = 4,
              before_s: float = 3.0, timeout_s: float = 60.0) -> Result:
    """``genfleet up`` (its own embedded cluster), load; SIGKILL its GCS. The gateway must
    report NOT_SERVING within seconds, calls fail fast with UNAVAILABLE, and ``genfleet
    up`` exit non-zero with one clear line."""
    log_path = workdir / "up-head.log"
    state_file = store_root.parent / "run" / "up.json"
    state_file.unlink(missing_ok=True)  # a stale one from an earlier run
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [GENFLEET, "--store", str(store_root), "up", "--models", model, "--port", "0",
             "--http-port", "-1", "--metrics-port", "-1", "--ray-metrics-port", "-1", "--num-cpus", "4",
             "--grace", "2"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def state() -> dict[str, Any] | None:
            if proc.poll() is not None:
                raise RuntimeError(f"genfleet up exited: {log_path.read_text()[-2000:]}")
            return json.loads(state_file.read_text()) if state_file.exists() else None
        target = wait_for(state, 300, "genfleet up")["target"]
        with contextlib.ExitStack() as stack:
            calls = [generate_call(c, model, 1)
                     for c in clients(stack, target, count, timeout_s=30)]
            refs = references(calls[0], count * 4)
            with Load(calls, refs, 4) as load:
                time.sleep(before_s)
                gcs = find_processes(r"/gcs_server\b", proc.pid)
                os.kill(gcs[0], signal.SIGKILL)
                fault_at = time.monotonic()
                code = proc.wait(timeout_s)
                exited = time.monotonic() - fault_at
                time.sleep(1.0)
        after = [r for r in load.records if r.started > fault_at + exited]
        slowest = max((r.ended - r.started for r in after), default=float("nan"))
        last = log_path.read_text().strip().splitlines()[-1]
        result = summarize("head-gcs", load.records, fault_at,
                           f"genfleet up exit {code} after {exited:.1f} s; calls after it "
                           f"failed in <= {1000 * slowest:.0f} ms; last line: {last!r}")
        result.recover_s = exited
        result.extra = {"exit_code": float(code if code is not None else -1),
                        "exit_s": exited, "slowest_after_ms": 1000 * slowest,
                        "calls_after": float(len(after))}
        return result
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        for pid in descendants(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _new_version(store: ModelStore, model: str) -> int:
    """Save the latest version of ``model`` again as a new version (same weights)."""
    from services.models import load_model

    net, meta = load_model(store, model)
    return store.save(model, family=meta.family, config=meta.config, state=net.state_dict(),
                      data=meta.data, metrics=meta.metrics).version


def warm_start(store: ModelStore, workdir: Path, models: Sequence[str] = ("vae", "diffusion"),
               *, calls: int = 30, rollouts: int = 3) -> list[Result]:
    """The first call after a replica starts and after each of ``rollouts`` rollouts to a
    new version, against the steady median, with warm-up on (the default) and off: the
    replica's own compute time (``timings.compute_ms``: the gateway's first lookups of a
    model, its settings and its replicas are not the model's warmth) and end to end.
    Runs on a copy of each model in ``workdir`` (rollouts add versions)."""
    import shutil

    from services.gateway.client import GenfleetClient
    from services.serving import operations

    out = []
    for model in models:
        options = {"steps": 20} if model == "diffusion" else None
        for warmup in (True, False):
            copy = ModelStore(workdir / f"warm-store-{model}-{int(warmup)}")
            shutil.copytree(store.root / model, copy.root / model)
            app = f"chaos-warm-{model}-{int(warmup)}"
            with application(copy, app, model, workdir, warmup=warmup) as (gw,), \
                    GenfleetClient(gw.target, timeout=60) as client:
                def timed(seed: int, model: str = model, options: Any = options
                          ) -> tuple[float, float, int]:
                    started = time.perf_counter()
                    result = client.generate(model, 1, seed=seed, options=options)
                    return (1000 * (time.perf_counter() - started), result.timings.compute_ms,
                            result.version)
                first = timed(0)[:2]
                steady = np.median([timed(s)[:2] for s in range(1, calls)], axis=0)
                after = []
                for i in range(rollouts):
                    version = _new_version(copy, model)
                    operations.rollout(copy, model, version, app_name=app)
                    deadline = time.monotonic() + 60
                    while time.monotonic() < deadline:  # the first call the new version serves
                        ms, compute, served = timed(calls + i)
                        if served == version:
                            after.append((ms, compute))
                            break
                        time.sleep(0.05)
                rolled = np.median(after, axis=0)
            out.append(Result(
                f"warm-{'on' if warmup else 'off'}-{model}", calls + rollouts, 0,
                float(steady[0]), float("nan"), float("nan"),
                notes=f"compute: first after start {first[1]:.1f} ms, first after a rollout "
                      f"{rolled[1]:.1f} ms (median of {rollouts}), steady {steady[1]:.1f} ms; "
                      f"end to end: {first[0]:.1f} / {rolled[0]:.1f} / {steady[0]:.1f} ms",
                extra={"first_ms": first[0], "first_compute_ms": first[1],
                       "rollout_ms": float(rolled[0]), "rollout_compute_ms": float(rolled[1]),
                       "steady_ms": float(steady[0]), "steady_compute_ms": float(steady[1])}))
    return out


# ----------------------------------------------------------------------- main
FAULTS = ("replica-gan-1", "replica-diffusion-1", "replica-gan-2", "replica-diffusion-2",
          "gateway", "head", "batch-actor", "autoscale", "warm")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=FAULTS, default=list(FAULTS))
    parser.add_argument("--store", default=None,
                        help="model store (default: every family untrained, in a temp dir)")
    parser.add_argument("--out", default=str(OUT / "chaos.json"))
    args = parser.parse_args(argv)

    from services.serving import ray_cluster

    with tempfile.TemporaryDirectory(prefix="genfleet-chaos-") as tmp:
        workdir = Path(tmp)
        if args.store:
            store_root = Path(args.store)
        else:
            from cluster.bench.untrained_store import main as make_store

            store_root = workdir / "store"
            make_store(str(store_root))
        store = ModelStore(store_root)
        results: list[Result] = []
        ray_cluster.start_cluster(num_cpus=4)
        try:
            for fault in (f for f in args.only if f != "head"):  # head: after this cluster
                print(f"--- {fault}", flush=True)
                if fault.startswith("replica-"):
                    _, model, k = fault.split("-")
                    options = {"steps": 20} if model == "diffusion" else None
                    got = [replica_kill(store, workdir, model, replicas=int(k),
                                        options=options)]
                elif fault == "gateway":
                    got = gateway_kill(store, workdir)
                elif fault == "batch-actor":
                    got = [batch_actor_kill(store, workdir)]
                elif fault == "autoscale":
                    got = [autoscale(store, workdir)]
                else:
                    got = warm_start(store, workdir)
                for r in got:
                    print(r.row(), flush=True)
                results.extend(got)
        finally:
            ray_cluster.stop_cluster(embedded=True)
        if "head" in args.only:
            print("--- head", flush=True)
            r = head_kill(store_root, workdir)
            print(r.row(), flush=True)
            results.append(r)
    print()
    print(HEADER)
    for r in results:
        print(r.row())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python -m cluster.bench.chaos " +
                               " ".join(sys.argv[1:] if argv is None else argv),
                               "when": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "results": [asdict(r) for r in results]}, indent=2))
    print(f"\nwrote {out}")
    return 0 if all(r.failed == 0 or r.fault in ("gateway-plain", "head-gcs")
                    for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
