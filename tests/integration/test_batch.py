"""Batch generation on Ray Data: 1 vs 2 workers, a driver killed mid-way and re-run,
cancel. Reference datasets come from the local runner (tests/unit/test_batch.py checks
formats and validation there)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cluster.batch import job
from cluster.batch.manager import BatchManager
from services.core.batch import BatchRequest
from services.core.errors import Cancelled
from services.core.store import ModelStore
from services.gateway.client import GenfleetClient
from services.gateway.grpc_server import GatewayConfig
from services.gateway.pb.genfleet.v1 import batch_pb2 as bpb
from services.serving.inprocess import InProcessBackend
from tests.helpers import GatewayThread, scrape_ray_metrics, tiny_store

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    return tiny_store(tmp_path_factory.mktemp("batch-store") / "store", ["gan", "diffusion"],
                      steps=2)


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", "job.json")}


def _spec(out: Path, **kw: object) -> BatchRequest:
    return BatchRequest(**{"model": "gan", "num_samples": 120, "out": str(out), "shard_size": 25,
                        "seed": 11, "labels": "balanced", **kw})  # type: ignore[arg-type]


def _written(text: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for f in text_string_to_metric_families(text)
               if f.name == "ray_genfleet_batch_written_samples" for s in f.samples
               if s.labels.get("model") == "gan" and s.name.endswith("_total"))


def test_one_and_two_workers_write_identical_datasets(ray_cluster: None, store: ModelStore,
                                                      tmp_path: Path) -> None:
    before = _written(scrape_ray_metrics())
    local = job.run(_spec(tmp_path / "local"), store, local=True, progress=False)
    one = job.run(_spec(tmp_path / "one", workers=1), store, progress=False)
    two = job.run(_spec(tmp_path / "two", workers=2), store, progress=False)
    assert _files(tmp_path / "one") == _files(tmp_path / "two") == _files(tmp_path / "local")
    assert one["shards"] == two["shards"] == local["shards"]
    assert one["num_shards"] == 5 and not list((tmp_path / "two").rglob(".*.tmp-*"))
    # the actors' batch metrics reach Ray's metrics port: both Ray runs, every sample
    deadline = time.monotonic() + 30
    while (written := _written(scrape_ray_metrics())) < before + 240:
        assert time.monotonic() < deadline, f"{written - before} of 240 samples exported"
        time.sleep(1)
    assert written == before + 240


def test_cancel_stops_the_job_and_leaves_only_complete_shards(ray_cluster: None,
                                                              store: ModelStore,
                                                              tmp_path: Path) -> None:
    cancel = threading.Event()
    spec = _spec(tmp_path / "c", model="diffusion", num_samples=400, shard_size=10,
                 options={"steps": 20}, workers=1)
    written: list[int] = []

    def progress(done: int, total: int) -> None:
        written.append(done)
        if done >= 20:
            cancel.set()

    with pytest.raises(Cancelled, match="re-run"):
        job.run(spec, store, progress=False, on_progress=progress, cancel=cancel)
    out = tmp_path / "c"
    shards = sorted((out / "data").glob("shard-*.parquet"))
    assert 2 <= len(shards) < 40
    assert not (out / "manifest.json").exists()
    assert not list(out.rglob(".*.tmp-*"))
    time.sleep(2)  # at most the shard in flight at the cancel lands after the return
    assert len(list((out / "data").glob("shard-*.parquet"))) <= len(shards) + 1
    # the rest is finished by a re-run, and equals an uninterrupted run
    job.run(spec, store, progress=False)
    job.run(_spec(tmp_path / "ref", model="diffusion", num_samples=400, shard_size=10,
                  options={"steps": 20}), store, local=True, progress=False)
    assert _files(out) == _files(tmp_path / "ref")


# samples of the killed job: 40 shards, so the kill (after 3) lands mid-way with seconds
# to spare; 2,000 at 50 steps took 147 s of CI for the same check
N_KILLED = 800


@pytest.mark.slow
def test_killed_driver_then_rerun_gives_exactly_the_uninterrupted_dataset(
        store: ModelStore, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    args = ["--store", str(store.root), "-q", "batch", "diffusion", "-n", str(N_KILLED),
            "--shard-size", "20", "--out", str(out), "--seed", "5", "--labels", "balanced",
            "--set", "steps=20", "--workers", "2"]
    exe = str(Path(sys.executable).parent / "genfleet")
    proc = subprocess.Popen([exe, *args], start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while len(list((out / "data").glob("shard-*.parquet"))) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "job did not start"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)  # the driver, mid-way
        proc.wait(30)
    finally:
        with contextlib.suppress(ProcessLookupError):  # and what is left of its cluster
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(1)
    complete = len(list((out / "data").glob("shard-*.parquet")))
    assert complete < N_KILLED // 20 and not (out / "manifest.json").exists(), "finished before the kill"
    done = subprocess.run([exe, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    reference = job.run(BatchRequest("diffusion", N_KILLED, str(tmp_path / "ref"), shard_size=20,
                                  seed=5, labels="balanced", options={"steps": 20}),
                        store, local=True, progress=False)
    assert _files(out) == _files(tmp_path / "ref")  # every sample once, no partials
    manifest = job.read_manifest(out)
    assert manifest is not None and manifest["shards"] == reference["shards"]
    assert manifest["last_run"]["samples_written"] == N_KILLED - 20 * complete


def test_grpc_batch_job_runs_on_ray_and_outlives_its_client(ray_cluster: None,
                                                            store: ModelStore,
                                                            tmp_path: Path) -> None:
    thread = GatewayThread(lambda: InProcessBackend(store.root, ["gan"]),
                           GatewayConfig(host="127.0.0.1", port=0),
                           batches=lambda: BatchManager(store, tmp_path / "root"))
    try:
        with GenfleetClient(thread.target, retries=0) as client:
            submitted = client.submit_batch("gan", 120, "digits", shard_size=25, seed=11,
                                            labels="balanced", workers=2)
        with GenfleetClient(thread.target, retries=0) as client:  # a new connection
            done = client.wait_batch(submitted.id, timeout=120)
    finally:
        thread.stop()
    assert done.state == bpb.BATCH_STATE_SUCCEEDED, done.error
    job.run(_spec(tmp_path / "local"), store, local=True, progress=False)
    assert _files(tmp_path / "root" / "digits") == _files(tmp_path / "local")
