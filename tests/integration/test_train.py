"""Integration: Ray Train jobs on the session's local Ray cluster (CPU workers, DDP over
gloo), exported to a model store that serving loads."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from cluster.train import job
from services.core.store import ModelStore
from services.models import load_model
from services.serving.engine import ReplicaEngine
from services.training.spec import TrainSpec, spec_from_config
from tests.conftest import TINY_CONFIGS
from tests.helpers import RayMetricsWatcher, scrape_ray_metrics

pytestmark = pytest.mark.integration


def _spec(family: str, name: str, *, workers: int = 2, epochs: int = 2,
          model: dict[str, Any] | None = None, **train: Any) -> TrainSpec:
    return spec_from_config(
        family, name=name, workers=workers, cpus_per_worker=1, max_failures=2,
        model=model if model is not None else TINY_CONFIGS[family],
        train={"epochs": epochs, "batch_size": 64, **train})


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


def _served_sample(store: ModelStore, name: str) -> None:
    from services.core import api
    from services.serving.engine import CancelToken

    server = ReplicaEngine(store.root, name)
    result = server.generate_many([(api.GenerateRequest(name, 2, seed=3), CancelToken(), 0.0)])[0]
    assert isinstance(result, api.GenerateResult) and result.samples is not None
    assert result.samples.shape[0] == 2 and result.version == server.version


def test_two_worker_job_exports_an_evaluated_servable_checkpoint(
        ray_cluster: None, store: ModelStore) -> None:
    with RayMetricsWatcher() as watcher:
        result = job.run(_spec("vae", "vae-ddp"), store, eval_samples=200, progress=False)
    assert result.ref == "vae-ddp@1" and store.versions("vae-ddp") == [1]
    meta = store.meta(result.ref)
    assert meta.training["workers"] == 2 and meta.training["job"] == "vae-ddp"
    assert meta.training["epochs"] == 2 and result.resumed_from == 0
    assert "fd_ratio" in meta.metrics and "test_bits_per_dim" in meta.metrics
    assert [int(h["epoch"]) for h in result.history] == [1, 2]
    _served_sample(store, "vae-ddp")
    # training metrics reached Ray's Prometheus endpoint: the gauges while the workers ran
    # (Ray evicts a dead worker's gauges after ~20 s), the counter for good
    assert watcher.saw("ray_genfleet_train_epoch_epochs{", 'model="vae-ddp"')
    assert watcher.saw("ray_genfleet_train_loss{", 'phase="main"', 'model="vae-ddp"')
    scrape_ray_metrics('ray_genfleet_train_samples_total{', 'model="vae-ddp"')


def test_two_worker_gan_trains_both_phases(ray_cluster: None, store: ModelStore) -> None:
    result = job.run(_spec("gan", "gan-ddp", epochs=1), store, evaluate=False, progress=False)
    row = result.history[-1]
    assert "discriminator/loss" in row and "generator/loss" in row
    model, _ = load_model(store, result.ref)
    assert model.family == "gan"
    _served_sample(store, "gan-ddp")


def test_one_and_two_workers_take_the_same_steps(ray_cluster: None, store: ModelStore) -> None:
    """Deterministic setting (no dropout, no noise in the AR loss): 2 workers x 32 samples
    with averaged gradients == 1 worker x 64 samples, to float32 round-off."""
    refs = {}
    for workers in (1, 2):
        refs[workers] = job.run(_spec("autoregressive", f"ar-w{workers}", workers=workers,
                                      epochs=1), store, evaluate=False, progress=False).ref
    one, _ = load_model(store, refs[1])
    two, _ = load_model(store, refs[2])
    diffs = [float((a - b).abs().max()) for a, b in
             zip(one.state_dict().values(), two.state_dict().values(), strict=True)]
    assert max(diffs) < 1e-5, max(diffs)  # measured 4.9e-7 after one epoch (21 steps)


def test_rerun_by_name_resumes_at_the_next_epoch(ray_cluster: None, store: ModelStore) -> None:
    first = job.run(_spec("flow", "flow-resume", epochs=1), store, evaluate=False,
                    progress=False)
    assert first.resumed_from == 0
    second = job.run(_spec("flow", "flow-resume", epochs=3), store, evaluate=False,
                     progress=False)
    assert second.resumed_from == 1
    assert [int(h["epoch"]) for h in second.history] == [1, 2, 3]
    assert [int(h["resumed_from"]) for h in second.history] == [0, 1, 1]
    assert second.ref == "flow-resume@2"
    # the job has finished: a re-run trains nothing and exports nothing new
    third = job.run(_spec("flow", "flow-resume", epochs=3), store, evaluate=False,
                    progress=False)
    assert third.ref == "flow-resume@2" and store.versions("flow-resume") == [1, 2]


def _checkpoints(store: ModelStore, name: str) -> list[Path]:
    run_dir = job.storage_path(store.root) / name
    return sorted(run_dir.glob("checkpoint_*")) if run_dir.exists() else []


def _train_worker_pids() -> list[int]:
    """Processes of Ray Train workers (their titles read ``ray::RayTrainWorker...``)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            title = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::RayTrainWorker"):
            pids.append(int(cmdline.parent.name))
    return sorted(pids)


def test_a_killed_worker_is_replaced_and_training_resumes(
        ray_cluster: None, store: ModelStore) -> None:
    # a model large enough that an epoch takes a few seconds: a checkpoint reported just
    # before a crash may not be registered yet (DESIGN.md §7)
    spec = _spec("diffusion", "diff-kill", epochs=6,
                 model={**TINY_CONFIGS["diffusion"], "base_width": 16})
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.update(
        result=job.run(spec, store, evaluate=False, progress=False)))
    thread.start()
    deadline = time.monotonic() + 300
    while len(_checkpoints(store, "diff-kill")) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(_checkpoints(store, "diff-kill")) >= 2, "no checkpoints were written"
    time.sleep(1.0)
    pids = _train_worker_pids()
    assert pids, "no train workers found"
    os.kill(pids[-1], signal.SIGKILL)  # a real process kill
    thread.join(600)
    assert not thread.is_alive()
    result: job.JobResult = out["result"]
    assert result.epochs == 6
    assert result.resumed_from >= 1, result.history  # not from scratch
    assert [int(h["epoch"]) for h in result.history] == list(range(1, 7))
    model, _ = load_model(store, result.ref)
    assert torch.isfinite(model.sample([1, 2], labels=torch.tensor([0, 1]))).all()


def test_train_with_deploy_rolls_serving_to_the_new_version(ray_cluster: None,
                                                            tmp_path: Path) -> None:
    from ray import serve

    from cluster.cli.main import main
    from services.core import api
    from services.serving import operations
    from services.serving.config import load_config
    from tests.helpers import tiny_store

    store = tiny_store(tmp_path / "store", families=["vae"])  # vae@1, served below
    config = load_config(models=["vae"])
    config.models["vae"].autoscaling_config = {"min_replicas": 1, "max_replicas": 1,
                                               "initial_replicas": 1}
    operations.deploy(config, store)
    try:
        handle = serve.get_deployment_handle("vae", "genfleet")
        assert api.unwrap(handle.info.remote().result()).version == 1
        sets = [f"--set={k}={v}" for k, v in TINY_CONFIGS["vae"].items()]
        assert main(["--store", str(store.root), "-q", "train", "vae", "--workers", "1",
                     "--cpus-per-worker", "1", "--epochs", "1", "--no-eval", "--deploy",
                     *sets]) == 0
        assert store.versions("vae") == [1, 2]
        result = api.unwrap(handle.generate.remote(api.GenerateRequest("vae", 2)).result())
        assert result.version == 2
        assert operations.load_state(store).models["vae"].version == 2
    finally:
        serve.delete("genfleet")
