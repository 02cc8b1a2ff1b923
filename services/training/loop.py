"""One training loop for every family, in-process or inside Ray Train.

- ``Trainer.step``: each phase of the family through ``module`` (the model itself, or its
  DDP wrapper), then that phase's optimiser; EMA of the weights when enabled.
- ``run_epochs``: the epoch loop both ``fit`` (``genfleet train --local``) and the Ray
  Train worker (``cluster.train.job``) run: shuffling (one permutation per epoch, seeded by
  the epoch, split across ranks), averaged losses, validation, the time budget, and the
  best validation weights. A distributed run passes its rank, world size, an all-reduce
  and a per-epoch callback (checkpoints); that is all it adds.
- ``final_weights``: the weights to serve from a run's state (best validation, else EMA,
  else the trained weights), whether the state is live or read back from a checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from services.core.data import Dataset, Splits
from services.core.errors import InvalidArgument
from services.models.base import GenerativeModel


def warmed_ema(decay: float) -> Any:
    """An ``AveragedModel`` update: EMA whose decay at update ``t`` is
    ``min(decay, (1 + t) / (10 + t))``. A fixed decay starts from the first step's weights
    and forgets them slowly (0.995 keeps 64 % of them after 88 steps), so a short run's EMA
    is mostly its random start; the warm-up averages over about the last tenth of the run
    until ``decay`` takes over (as diffusers' ``EMAModel`` and timm do)."""

    @torch.no_grad()
    def update(averaged: list[Tensor], current: list[Tensor], updates: Tensor) -> None:
        t = int(updates)
        d = min(decay, (1 + t) / (10 + t))
        if torch.is_floating_point(averaged[0]) or torch.is_complex(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1 - d)
        else:  # integer buffers: as torch's own EMA update treats them
            for a, c in zip(averaged, current, strict=True):
                a.copy_(a * d + c * (1 - d))

    return update


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    phase_lr: dict[str, float] = field(default_factory=dict)  # per-phase lr overrides
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    ema_decay: float = 0.0  # EMA of the weights used for eval/sampling; 0 = off
    ema_warmup: bool = True  # step t averages with min(ema_decay, (1 + t) / (10 + t)), see
    # ``warmed_ema``; False: the fixed decay from the first step (what runs before had)
    lr_warmup_steps: int = 0
    cosine_decay: bool = False  # cosine-decay the lr to 10 % over the run
    max_minutes: float = 0.0  # stop after this wall time; 0 = no limit
    val_every: int = 5  # epochs between validations
    select_best: bool = False  # keep the weights with the best validation loss
    seed: int = 0
    amp: bool = False  # bf16 autocast (CUDA only)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise InvalidArgument("epochs", "epochs and batch_size must be >= 1")
        if self.lr <= 0:
            raise InvalidArgument("lr", "must be > 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise InvalidArgument("ema_decay", "must be in [0, 1)")

    @classmethod
    def for_family(cls, family: type[GenerativeModel], **overrides: Any) -> TrainConfig:
        """The family's defaults (a class attribute), then ``overrides`` (None values are
        ignored)."""
        values = {**family.train_defaults,
                  **{k: v for k, v in overrides.items() if v is not None}}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise InvalidArgument("train", f"unknown training options {unknown}")
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return cls(**values)


@dataclass
class TrainResult:
    model: GenerativeModel  # weights to serve (EMA / best validation where enabled)
    history: list[dict[str, float]]
    steps: int
    epochs: float
    seconds: float
    samples_per_second: float
    best_val: float | None


class Trainer:
    """Optimisers, EMA and one training step over all phases of a family."""

    def __init__(self, model: GenerativeModel, config: TrainConfig, *,
                 module: nn.Module | None = None, total_steps: int | None = None) -> None:
        self.model = model
        self.module = module if module is not None else model
        self.config = config
        self.optimizers = {
            phase: torch.optim.AdamW(
                model.param_groups(phase), lr=config.phase_lr.get(phase, config.lr),
                betas=config.betas, weight_decay=config.weight_decay,
            )
            for phase in model.phases
        }
        self.schedulers = {
            phase: torch.optim.lr_scheduler.LambdaLR(opt, self._lr_factor(total_steps))
            for phase, opt in self.optimizers.items()
        }
        self.ema: AveragedModel | None = None
        if config.ema_decay > 0:
            self.ema = AveragedModel(
                model, use_buffers=True,
                multi_avg_fn=(warmed_ema(config.ema_decay) if config.ema_warmup
                              else get_ema_multi_avg_fn(config.ema_decay)))
        self.step_count = 0

    def _lr_factor(self, total_steps: int | None) -> Callable[[int], float]:
        warmup, cosine = self.config.lr_warmup_steps, self.config.cosine_decay

        def factor(step: int) -> float:
            f = min(1.0, (step + 1) / warmup) if warmup else 1.0
            if cosine and total_steps:
                progress = min(1.0, step / total_steps)
                f *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
            return f

        return factor

    def step(self, x: Tensor, labels: Tensor | None) -> dict[str, float]:
        """One optimiser step per phase on batch ``x``; returns the logged metrics."""
        metrics: dict[str, float] = {}
        device_type = x.device.type
        for phase in self.model.phases:  # ("main",) or ("discriminator", "generator")
            with torch.autocast(device_type, dtype=torch.bfloat16,
                                enabled=self.config.amp and device_type == "cuda"):
                out = self.module(x, labels=labels, phase=phase)  # through the DDP wrapper
            opt = self.optimizers[phase]
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            if self.config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.param_groups(phase), self.config.grad_clip)
            opt.step()
            self.schedulers[phase].step()
            prefix = "" if len(self.model.phases) == 1 else f"{phase}/"
            metrics[f"{prefix}loss"] = float(out.loss.detach())
            metrics.update({f"{prefix}{k}": v for k, v in out.metrics.items()})
        self.step_count += 1
        self.model.on_train_step(self.step_count)
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """Model, EMA, optimisers, schedulers and the step count (a checkpoint's body)."""
        return {
            "step_count": self.step_count,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        for k, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][k])
        for k, sched in self.schedulers.items():
            sched.load_state_dict(state["schedulers"][k])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.step_count = int(state["step_count"])

    def inference_model(self) -> GenerativeModel:
        """The weights to evaluate and serve: the EMA copy when enabled."""
        if self.ema is None:
            return self.model
        module = self.ema.module
        assert isinstance(module, GenerativeModel)
        return module


def steps_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    """Optimiser steps in one epoch of ``batches`` over ``n`` examples."""
    size = min(batch_size, n - n % world)
    return max(0, (n - size) // size + 1) if size > 0 else 0


def batches(x: Tensor, y: Tensor | None, batch_size: int, generator: torch.Generator, *,
            rank: int = 0, world: int = 1) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Shuffled mini-batches; the last partial batch is dropped when a full one exists.

    With ``world`` > 1 (distributed training) every batch of ``batch_size`` is split across
    the ranks and this yields rank ``rank``'s share, so the ranks together take the same
    steps as one process on the whole batch.
    """
    if batch_size % world:
        raise InvalidArgument("batch_size", f"the global batch {batch_size} must be a "
                                            f"multiple of the {world} workers")
    n = x.shape[0]
    order = torch.randperm(n, generator=generator).to(x.device)
    size = min(batch_size, n - n % world)
    for start in range(0, n - size + 1, size):
        idx = order[start:start + size][rank::world]
        yield x[idx], (None if y is None else y[idx])


def tensors(data: Dataset, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor | None]:
    """A dataset as model-ready tensors (floats in [0, 1] for images, ids for text)."""
    x = torch.from_numpy(data.as_float()).to(device)
    y = None if data.labels is None else torch.from_numpy(data.labels).to(device)
    return x, y


@torch.no_grad()
def validation_loss(model: GenerativeModel, data: Dataset, batch_size: int = 256,
                    seed: int = 1234) -> float:
    """Mean training loss of the first phase over ``data`` (eval mode, fixed noise)."""
    if len(data) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    devices_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    x, y = tensors(data, model.device)
    total, count = 0.0, 0
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size]
        yb = None if y is None else y[start:start + batch_size]
        out = model(xb, labels=yb, phase=model.phases[0])
        total += float(out.loss) * len(xb)
        count += len(xb)
    torch.random.set_rng_state(devices_state)
    model.train(was_training)
    return total / count


def noise_seed(seed: int, rank: int = 0, resumed: int = 0) -> int:
    """The torch seed of training noise: per rank, and per attempt of a resumed run."""
    return seed + 7919 * (rank + 1) + resumed


@dataclass
class Run:
    """Where a run of ``run_epochs`` stands: its rows, and the best validation weights."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_val: float | None = None
    best_state: dict[str, Tensor] | None = None
    epoch: int = 0  # the last epoch finished
    samples: int = 0  # this rank's samples in this attempt
    seconds: float = 0.0  # wall time of this attempt

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "history": self.history, "best_val": self.best_val,
                "best_state": self.best_state}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Run:
        return cls(history=[dict(h) for h in state["history"]], best_val=state["best_val"],
                   best_state=state["best_state"], epoch=int(state["epoch"]))


def run_epochs(trainer: Trainer, x: Tensor, y: Tensor | None, val: Dataset | None, *,
               run: Run | None = None, rank: int = 0, world: int = 1,
               all_reduce: Callable[[Tensor], None] | None = None,
               on_epoch: Callable[[Run, dict[str, float]], None] | None = None,
               progress: bool = False, desc: str = "train") -> Run:
    """Train from ``run.epoch + 1`` to ``config.epochs`` (or until ``max_minutes``).

    Args:
        trainer: optimisers and step; its model is in train mode on return.
        x, y: the whole training split (every rank holds it; each takes its share).
        val: validation data, evaluated on rank 0 only (None or empty: none).
        run: the state to continue (a resumed job); a new one when None.
        rank, world, all_reduce: distributed training; ``all_reduce`` sums a tensor
            across the ranks in place, so every rank sees the same losses and stops at the
            same epoch.
        on_epoch: called on every rank after each epoch with the run and the epoch's row.
        progress: a progress bar (in-process runs).
    """
    config = trainer.config
    run = run or Run()
    resumed = run.epoch
    per_epoch = max(1, steps_per_epoch(len(x), config.batch_size, world))
    started = time.perf_counter()
    deadline = started + config.max_minutes * 60 if config.max_minutes > 0 else math.inf
    trainer.model.train()
    bar = tqdm(total=config.epochs, initial=resumed, desc=desc, unit="epoch",
               disable=not progress, dynamic_ncols=True)
    for epoch in range(resumed + 1, config.epochs + 1):
        epoch_start = time.perf_counter()
        sums: dict[str, float] = {}
        seen = 0
        # one permutation per epoch, seeded by the epoch: a resumed run sees the same order
        gen = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        for xb, yb in batches(x, y, config.batch_size, gen, rank=rank, world=world):
            for k, v in trainer.step(xb, yb).items():
                sums[k] = sums.get(k, 0.0) + v
            seen += len(xb)
        names = sorted(sums)
        out_of_time = float(time.perf_counter() >= deadline)
        totals = torch.tensor([sums[k] for k in names] + [float(seen), out_of_time],
                              dtype=torch.float64, device=x.device)
        if all_reduce is not None:
            all_reduce(totals)  # losses averaged over ranks, samples summed, any rank's clock
        values = totals.tolist()
        stop = values[-1] > 0
        seconds = time.perf_counter() - epoch_start
        row: dict[str, float] = {
            "epoch": float(epoch),
            **{k: v / (per_epoch * world) for k, v in zip(names, values[:-2], strict=True)},
            "samples_per_s": values[-2] / seconds, "resumed_from": float(resumed)}
        last = epoch == config.epochs or stop
        if rank == 0 and val is not None and len(val) and (epoch % config.val_every == 0
                                                           or last):
            model = trainer.inference_model()
            row["val_loss"] = validation_loss(model, val)
            if config.select_best and (run.best_val is None or row["val_loss"] < run.best_val):
                run.best_val = row["val_loss"]
                run.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            trainer.model.train()
        run.history.append(row)
        run.epoch = epoch
        run.samples += seen
        run.seconds = time.perf_counter() - started
        if on_epoch is not None:
            on_epoch(run, row)
        bar.set_postfix({k: f"{v:.4g}" for k, v in row.items()
                         if k not in ("epoch", "resumed_from")}, refresh=False)
        bar.update(1)
        if stop:
            break
    bar.close()
    return run


def final_weights(state: dict[str, Any]) -> dict[str, Tensor]:
    """The weights to evaluate and serve from a run's state (``Trainer.state_dict`` merged
    with ``Run.state_dict``): the best validation weights when kept, else the EMA, else
    the trained weights."""
    if state.get("best_state") is not None:
        best: dict[str, Tensor] = state["best_state"]
        return best
    if state.get("ema") is not None:  # AveragedModel's keys: "module.<name>" + n_averaged
        return {k.removeprefix("module."): v for k, v in state["ema"].items()
                if k.startswith("module.")}
    model: dict[str, Tensor] = state["model"]
    return model


def fit(model: GenerativeModel, splits: Splits, config: TrainConfig, *,
        progress: bool = True, log: Callable[[dict[str, float]], None] | None = None
        ) -> TrainResult:
    """Train ``model`` in-process on ``splits.train``; validate on ``splits.val``; the
    returned model holds ``final_weights`` in eval mode."""
    x, y = tensors(splits.train, model.device)
    model.prepare(x, y)
    per_epoch = max(1, steps_per_epoch(len(x), config.batch_size))
    trainer = Trainer(model, config, total_steps=per_epoch * config.epochs)
    torch.manual_seed(noise_seed(config.seed))
    run = run_epochs(trainer, x, y, splits.val, progress=progress, desc=f"train {model.family}",
                     on_epoch=None if log is None else (lambda _, row: log(row)))
    model.load_state_dict(final_weights({**trainer.state_dict(), **run.state_dict()}))
    model.eval()
    seconds = max(run.seconds, 1e-9)
    return TrainResult(model, run.history, trainer.step_count, run.epoch, seconds,
                       run.samples / seconds, run.best_val)
