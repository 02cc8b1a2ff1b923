"""Distributed training: the one loop of ``services.training`` as a Ray Train job.

``run`` submits a ``TorchTrainer`` (DDP over ``workers`` processes) to the connected Ray
cluster. Each worker runs ``train_worker``, which is ``services.training.loop.run_epochs``
(the loop ``genfleet train --local`` runs) plus only what distribution needs:

- the same ``TrainSpec`` -> data, model config and ``TrainConfig`` (``spec.prepare``);
  identical initial weights on every rank, then per-rank noise seeds;
- its rank's share of every global batch (``rank``/``world``), so N workers on a global
  batch B take the same optimiser steps as 1 worker on B (DDP averages the gradients),
  and an all-reduce of the epoch's losses;
- a checkpoint every epoch through ``ray.train.report`` (model, EMA, optimisers,
  schedulers, history; ``torch.load(weights_only=True)`` reads it back, never a pickle);
- on start, ``ray.train.get_checkpoint()``: a replaced worker (``FailureConfig``) or a
  re-run of the same job name continues after the last saved epoch.

When the job ends the driver loads the final weights (EMA or best validation, like the
in-process loop), evaluates them and writes a new version to the model store with the
metrics and the training record (``services.training.recipes.export``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services.core.store import ModelStore
from services.training.spec import TrainSpec

STATE_FILE = "state.pt"
PROGRESS_FILE = "progress.jsonl"  # one JSON line per epoch, appended by rank 0


# ----------------------------------------------------------------------- worker side
def load_state(directory: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint's state (``Trainer.state_dict`` + ``Run.state_dict``), without
    unpickling arbitrary objects."""
    state: dict[str, Any] = torch.load(directory / STATE_FILE, map_location=device,
                                       weights_only=True)
    return state


def train_worker(spec_dict: dict[str, Any]) -> None:
    """One Ray Train worker (all ranks run this)."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from cluster.train.metrics import TrainMetrics
    from services.models import model_class
    from services.training.loop import (
        Run,
        Trainer,
        noise_seed,
        run_epochs,
        steps_per_epoch,
        tensors,
    )
    from services.training.spec import prepare

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not a line per report
    run_dir = Path(spec_dict["run_dir"])
    spec = TrainSpec(**{k: v for k, v in spec_dict.items() if k != "run_dir"})
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, spec.threads_per_worker))
    setup = prepare(spec)
    cfg = setup.train
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = model_class(spec.family)(setup.config).to(device)
    x, y = tensors(setup.splits.train, device)
    model.prepare(x, y)
    state: dict[str, Any] | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_state(Path(directory), device)
        model.load_state_dict(state["model"])
    module = ray.train.torch.prepare_model(
        model, move_to_device=False,
        parallel_strategy_kwargs={"find_unused_parameters": len(model.phases) > 1})
    trainer = Trainer(model, cfg, module=module,
                      total_steps=steps_per_epoch(len(x), cfg.batch_size, world) * cfg.epochs)
    run = Run()
    if state is not None:
        trainer.load_state_dict(state)
        run = Run.from_state(state)
    metrics = TrainMetrics(spec.name, spec.family)
    seen = 0

    def report(run: Run, row: dict[str, float]) -> None:
        nonlocal seen
        metrics.worker_epoch(run.samples - seen)
        seen = run.samples
        if rank != 0:
            ray.train.report(row)
            return
        metrics.epoch(run.epoch, row)
        with (run_dir / PROGRESS_FILE).open("a") as f:
            f.write(json.dumps({**row, "epochs": cfg.epochs, "wall": time.time()}) + "\n")
        with tempfile.TemporaryDirectory() as tmp:
            torch.save({**trainer.state_dict(), **run.state_dict()}, Path(tmp) / STATE_FILE)
            ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    torch.manual_seed(noise_seed(cfg.seed, rank, run.epoch))  # per-rank, per-attempt noise
    run_epochs(trainer, x, y, setup.splits.val if rank == 0 else None, run=run, rank=rank,
               world=world, all_reduce=dist.all_reduce if world > 1 else None,
               on_epoch=report)


# ----------------------------------------------------------------------- driver side
@dataclass
class JobResult:
    ref: str  # name@version written to the store
    epochs: int
    resumed_from: int  # epoch the last attempt started after (0: from scratch)
    history: list[dict[str, float]]
    seconds: float
    samples_per_s: float  # mean over the epochs of the last attempt
    metrics: dict[str, Any]


class _Progress:
    """Follows the job's progress file and shows a bar: epoch, losses, samples/s."""

    def __init__(self, path: Path, job: str, *, enabled: bool) -> None:
        self.path, self.job, self.enabled = path, job, enabled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> _Progress:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join(5)

    def _follow(self) -> None:
        from tqdm.auto import tqdm

        offset = self.path.stat().st_size if self.path.exists() else 0
        bar = None
        while True:
            stopping = self._stop.wait(0.5)
            if self.path.exists():
                with self.path.open() as f:
                    f.seek(offset)
                    lines = f.readlines()
                    offset = f.tell()
                for line in lines:
                    row = json.loads(line)
                    if bar is None:
                        bar = tqdm(total=int(row["epochs"]), initial=int(row["epoch"]) - 1,
                                   desc=f"train {self.job}", unit="epoch", dynamic_ncols=True)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in row.items()
                                     if k not in ("epoch", "epochs", "resumed_from", "wall")},
                                    refresh=False)
                    bar.update(int(row["epoch"]) - bar.n)
            if stopping:
                break
        if bar is not None:
            bar.close()


def storage_path(store_root: Path | str) -> Path:
    """Where Ray Train keeps job runs and checkpoints (beside the model store)."""
    return Path(store_root).resolve().parent / "train-runs"


def run(spec: TrainSpec, store: ModelStore, *, evaluate: bool = True, eval_samples: int = 1000,
        progress: bool = True) -> JobResult:
    """Run (or resume, when a run named ``spec.job`` exists) the job and export the final
    model to ``store`` as a new version. A re-run of a job that had already finished
    trains nothing and returns the version it exported then. Ray must be initialised."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from services.models import model_class
    from services.training.loop import final_weights, tensors
    from services.training.recipes import export
    from services.training.spec import prepare

    started = time.perf_counter()
    run_dir = storage_path(store.root) / spec.job
    run_dir.mkdir(parents=True, exist_ok=True)
    resources: dict[str, float] = {"CPU": spec.cpus_per_worker}
    if spec.gpus_per_worker:
        resources["GPU"] = spec.gpus_per_worker
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={**spec.to_dict(), "run_dir": str(run_dir)},
        scaling_config=ScalingConfig(num_workers=spec.workers,
                                     use_gpu=spec.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=spec.job, storage_path=str(storage_path(store.root)),
                             failure_config=FailureConfig(max_failures=spec.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    with _Progress(run_dir / PROGRESS_FILE, spec.job, enabled=progress):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training job {spec.job} ended without a checkpoint "
                           f"({result.error})")
    with result.checkpoint.as_directory() as directory:
        state = load_state(Path(directory))
    done = _exported(store, spec, state)
    if done is not None:  # a re-run of a finished job: nothing was trained
        history = [dict(h) for h in state["history"]]
        return JobResult(ref=done.ref, epochs=int(state["epoch"]),
                         resumed_from=int(state["epoch"]), history=history,
                         seconds=time.perf_counter() - started, samples_per_s=0.0,
                         metrics=dict(done.metrics))
    setup = prepare(spec)
    model = model_class(spec.family)(setup.config)
    model.prepare(*tensors(setup.splits.train))
    model.load_state_dict(final_weights(state))
    model.eval()
    history = [dict(h) for h in state["history"]]
    resumed_from = int(history[-1]["resumed_from"])
    last_attempt = [h for h in history if int(h["resumed_from"]) == resumed_from]
    samples_per_s = sum(h["samples_per_s"] for h in last_attempt) / max(1, len(last_attempt))
    training = {
        "job": spec.job, "preset": setup.preset, "workers": spec.workers,
        "gpus_per_worker": spec.gpus_per_worker,
        "epochs": int(state["epoch"]), "steps": int(state["step_count"]),
        "resumed_from": resumed_from,
        "samples_per_second": round(samples_per_s, 1), "best_val": state["best_val"],
        "config": dataclasses.asdict(setup.train), "final": history[-1],
        "seconds": round(time.perf_counter() - started, 2), "finished": time.time(),
    }
    checkpoint = export(store, spec.name, spec.family, setup.config, model, setup.data,
                        setup.splits, training,
                        evaluate=evaluate, eval_samples=eval_samples, progress=progress)
    return JobResult(ref=checkpoint.ref, epochs=int(state["epoch"]),
                     resumed_from=resumed_from, history=history,
                     seconds=time.perf_counter() - started, samples_per_s=samples_per_s,
                     metrics=dict(checkpoint.metrics))


def _exported(store: ModelStore, spec: TrainSpec, state: dict[str, Any]) -> Any:
    """The stored version this job already exported from this very state, if any."""
    for version in reversed(store.versions(spec.name) if spec.name in store.names() else []):
        meta = store.meta(f"{spec.name}@{version}")
        record = meta.training or {}
        if (record.get("job") == spec.job and record.get("steps") == int(state["step_count"])
                and record.get("epochs") == int(state["epoch"])):
            return meta
    return None


def describe(result: JobResult) -> str:
    """One line for the CLI."""
    if result.resumed_from >= result.epochs:
        return (f"job had already finished ({result.epochs} epochs): nothing trained; "
                f"its model is {result.ref}")
    resumed = f", resumed after epoch {result.resumed_from}" if result.resumed_from else ""
    return (f"trained {result.ref} in {result.seconds:.0f} s, {result.epochs} epochs"
            f"{resumed}, {result.samples_per_s:.0f} samples/s")
