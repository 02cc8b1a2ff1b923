"""Distributed training: the generic loop of ``services.training`` as a Ray Train job.

``run`` submits a ``TorchTrainer`` (DDP over ``workers`` processes) to the connected Ray
cluster. Each worker runs ``train_worker``:

- the same model, data split, ``TrainConfig`` and ``Trainer.step`` as ``genfleet train
  --local``; identical initial weights on every rank, then per-rank noise seeds;
- a distributed sampler (``loop.batches`` with ``rank``/``world``): every epoch one
  permutation (seeded by the epoch), each global batch split across ranks, so N workers
  on a global batch B take the same optimiser steps as 1 worker on B (DDP averages the
  gradients);
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from services.core.errors import InvalidArgument

STATE_FILE = "state.pt"
PROGRESS_FILE = "progress.jsonl"  # one JSON line per epoch, appended by rank 0


@dataclass
class JobSpec:
    """What to train, where, and with how many workers."""

    family: str
    name: str  # model name in the store
    job: str = ""  # Ray Train run name (default: ``name``); a re-run of it resumes
    data: str = "digits"
    workers: int = 2
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    threads_per_worker: int = 1
    max_failures: int = 3
    config_overrides: dict[str, Any] = field(default_factory=dict)
    train_overrides: dict[str, Any] = field(default_factory=dict)  # epochs, batch_size, ...

    def __post_init__(self) -> None:
        self.job = self.job or self.name
        for what, value in (("name", self.name), ("job", self.job)):
            if not value or any(c in value for c in "/@ "):
                raise InvalidArgument(what, f"must be non-empty without '/', '@' or spaces, "
                                            f"got {value!r}")
        if self.workers < 1:
            raise InvalidArgument("workers", f"must be >= 1, got {self.workers}")
        if self.gpus_per_worker < 0 or self.cpus_per_worker < 0:
            raise InvalidArgument("gpus_per_worker", "resources per worker must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def train_config(self) -> dict[str, Any]:
        """``TrainConfig`` overrides: bf16 autocast on GPU workers unless ``amp`` is set."""
        return {"amp": self.gpus_per_worker > 0, **self.train_overrides}


# ----------------------------------------------------------------------- worker side
def _save_state(directory: Path, trainer: Any, epoch: int, history: list[dict[str, float]],
                best: tuple[float, dict[str, torch.Tensor]] | None) -> None:
    state = {
        "epoch": epoch,
        "step_count": trainer.step_count,
        "model": trainer.model.state_dict(),
        "ema": trainer.ema.state_dict() if trainer.ema is not None else None,
        "optimizers": {k: o.state_dict() for k, o in trainer.optimizers.items()},
        "schedulers": {k: s.state_dict() for k, s in trainer.schedulers.items()},
        "history": history,
        "best_val": best[0] if best else None,
        "best_state": best[1] if best else None,
    }
    torch.save(state, directory / STATE_FILE)


def load_state(directory: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint's state, without unpickling arbitrary objects."""
    state: dict[str, Any] = torch.load(directory / STATE_FILE, map_location=device,
                                       weights_only=True)
    return state


def train_worker(spec_dict: dict[str, Any]) -> None:
    """One Ray Train worker (all ranks run this)."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from cluster.train.metrics import TrainMetrics
    from services.core import data as datasets
    from services.models import model_class
    from services.training.loop import (
        TrainConfig,
        Trainer,
        batches,
        steps_per_epoch,
        tensors,
        validation_loss,
    )
    from services.training.recipes import model_config

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not a line per report
    spec = JobSpec(**{k: v for k, v in spec_dict.items() if k != "run_dir"})
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, spec.threads_per_worker))
    data = datasets.load(spec.data)
    splits = datasets.split(data)
    config = model_config(spec.family, data, spec.config_overrides)
    klass = model_class(spec.family)
    cfg = TrainConfig.for_model(klass(config), **spec.train_config())
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = klass(config).to(device)
    x, y = tensors(splits.train, device)
    model.prepare(x, y)
    per_epoch = steps_per_epoch(len(x), cfg.batch_size, world)
    checkpoint = ray.train.get_checkpoint()
    resumed = 0
    state: dict[str, Any] | None = None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_state(Path(directory), device)
        model.load_state_dict(state["model"])
        resumed = int(state["epoch"])
    module = ray.train.torch.prepare_model(
        model, move_to_device=False,
        parallel_strategy_kwargs={"find_unused_parameters": len(model.phases) > 1})
    trainer = Trainer(model, cfg, module=module, total_steps=per_epoch * cfg.epochs)
    history: list[dict[str, float]] = []
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    if state is not None:
        for k, opt in trainer.optimizers.items():
            opt.load_state_dict(state["optimizers"][k])
        for k, sched in trainer.schedulers.items():
            sched.load_state_dict(state["schedulers"][k])
        if trainer.ema is not None and state["ema"] is not None:
            trainer.ema.load_state_dict(state["ema"])
        trainer.step_count = int(state["step_count"])
        history = list(state["history"])
        if state["best_state"] is not None:
            best = (float(state["best_val"]), state["best_state"])
    metrics = TrainMetrics(spec.name, spec.family)
    torch.manual_seed(cfg.seed + 7919 * (rank + 1) + resumed)  # per-rank, per-attempt noise
    model.train()
    for epoch in range(resumed + 1, cfg.epochs + 1):
        started = time.perf_counter()
        sums: dict[str, float] = {}
        seen = 0
        # one permutation per epoch, seeded by the epoch: a resumed run sees the same order
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        for xb, yb in batches(x, y, cfg.batch_size, gen, rank=rank, world=world):
            for k, v in trainer.step(xb, yb).items():
                sums[k] = sums.get(k, 0.0) + v
            seen += len(xb)
        names = sorted(sums)
        totals = torch.tensor([sums[k] for k in names] + [float(seen)], dtype=torch.float64,
                              device=device)
        if world > 1:
            dist.all_reduce(totals)  # losses averaged over ranks, samples summed
        seconds = time.perf_counter() - started
        row: dict[str, float] = {"epoch": float(epoch),
                                 **{k: float(v) / (per_epoch * world)
                                    for k, v in zip(names, totals[:-1].tolist(), strict=True)},
                                 "samples_per_s": float(totals[-1]) / seconds,
                                 "resumed_from": float(resumed)}
        if rank == 0 and len(splits.val) and (epoch % cfg.val_every == 0 or epoch == cfg.epochs):
            val = validation_loss(trainer.inference_model(), splits.val)
            row["val_loss"] = val
            if cfg.select_best and (best is None or val < best[0]):
                best = (val, {k: v.detach().clone()
                              for k, v in trainer.inference_model().state_dict().items()})
            model.train()
        history.append(row)
        metrics.worker_epoch(seen)
        if rank == 0:
            metrics.epoch(epoch, row)
            with (Path(spec_dict["run_dir"]) / PROGRESS_FILE).open("a") as f:
                f.write(json.dumps({**row, "epochs": cfg.epochs, "wall": time.time()}) + "\n")
            with tempfile.TemporaryDirectory() as tmp:
                _save_state(Path(tmp), trainer, epoch, history, best)
                ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(row)


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


def run(spec: JobSpec, store: Any, *, evaluate: bool = True, eval_samples: int = 1000,
        progress: bool = True) -> JobResult:
    """Run (or resume, when a run named ``spec.job`` exists) the job and export the final
    model to ``store`` as a new version. A re-run of a job that had already finished
    trains nothing and returns the version it exported then. Ray must be initialised."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from services.core import data as datasets
    from services.models import model_class
    from services.training.loop import TrainConfig, tensors
    from services.training.recipes import export, model_config

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
    data = datasets.load(spec.data)
    splits = datasets.split(data)
    config = model_config(spec.family, data, spec.config_overrides)
    klass = model_class(spec.family)
    model = klass(config)
    model.prepare(*tensors(splits.train))
    cfg = TrainConfig.for_model(model, **spec.train_config())
    if state["best_state"] is not None:
        weights = state["best_state"]
    elif state["ema"] is not None:  # AveragedModel's keys: "module.<name>" + n_averaged
        weights = {k.removeprefix("module."): v for k, v in state["ema"].items()
                   if k.startswith("module.")}
    else:
        weights = state["model"]
    model.load_state_dict(weights)
    model.eval()
    history = [dict(h) for h in state["history"]]
    resumed_from = int(history[-1]["resumed_from"])
    last_attempt = [h for h in history if int(h["resumed_from"]) == resumed_from]
    samples_per_s = sum(h["samples_per_s"] for h in last_attempt) / max(1, len(last_attempt))
    training = {
        "job": spec.job, "workers": spec.workers, "gpus_per_worker": spec.gpus_per_worker,
        "epochs": int(state["epoch"]), "steps": int(state["step_count"]),
        "resumed_from": resumed_from,
        "samples_per_second": round(samples_per_s, 1), "best_val": state["best_val"],
        "config": dataclasses.asdict(cfg), "final": history[-1],
        "seconds": round(time.perf_counter() - started, 2), "finished": time.time(),
    }
    checkpoint = export(store, spec.name, spec.family, config, model, data, splits, training,
                        evaluate=evaluate, eval_samples=eval_samples, progress=progress)
    return JobResult(ref=checkpoint.ref, epochs=int(state["epoch"]),
                     resumed_from=resumed_from, history=history,
                     seconds=time.perf_counter() - started, samples_per_s=samples_per_s,
                     metrics=dict(checkpoint.metrics))


def _exported(store: Any, spec: JobSpec, state: dict[str, Any]) -> Any:
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


DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train.yaml"
_SPEC_KEYS = {"data", "workers", "cpus_per_worker", "gpus_per_worker", "threads_per_worker",
              "max_failures", "model", "train"}


def spec_from_config(family: str, *, path: Path | str | None = None,
                     **overrides: Any) -> JobSpec:
    """A job for ``family`` from the train YAML (defaults, then the family's section),
    then ``overrides`` (None values ignored; ``model``/``train`` maps are merged).

    Raises:
        InvalidArgument: unknown family or keys in the file.
    """
    import yaml

    from services.models import FAMILIES

    if family not in FAMILIES:
        raise InvalidArgument("family", f"unknown family {family!r} (known: {sorted(FAMILIES)})")
    raw = yaml.safe_load(Path(path or DEFAULT_CONFIG).read_text()) or {}
    merged: dict[str, Any] = {"model": {}, "train": {}}
    for section, where in ((raw.get("defaults") or {}, "defaults"),
                           ((raw.get("families") or {}).get(family) or {}, f"families.{family}")):
        unknown = sorted(set(section) - _SPEC_KEYS)
        if unknown:
            raise InvalidArgument(where, f"unknown keys {unknown} (known: {sorted(_SPEC_KEYS)})")
        for key, value in section.items():
            merged[key] = {**merged[key], **value} if key in ("model", "train") else value
    for key, value in overrides.items():
        if value is None:
            continue
        merged[key] = {**merged.get(key, {}), **value} if key in ("model", "train") else value
    model, train = merged.pop("model"), merged.pop("train")
    name = merged.pop("name", None) or family
    return JobSpec(family=family, name=name, config_overrides=model, train_overrides=train,
                   **merged)
