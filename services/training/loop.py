"""One training loop for every family.

``Trainer.step`` is the unit the distributed job reuses: it runs each phase of the
family through ``module`` (the model itself, or its DDP wrapper) and steps that phase's
optimiser. ``fit`` adds the in-process driver: shuffling, EMA, validation, a time
budget, a progress bar, and selection of the best validation checkpoint.
"""

from __future__ import annotations

import copy
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
    def for_model(cls, model: GenerativeModel, **overrides: Any) -> TrainConfig:
        """The family's defaults, then ``overrides`` (None values are ignored)."""
        values = {**model.train_defaults, **{k: v for k, v in overrides.items() if v is not None}}
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
                model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True
            )
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


def fit(model: GenerativeModel, splits: Splits, config: TrainConfig, *,
        progress: bool = True, log: Callable[[dict[str, float]], None] | None = None
        ) -> TrainResult:
    """Train ``model`` in-process on ``splits.train``; validate on ``splits.val``."""
    torch.manual_seed(config.seed)
    device = model.device
    x, y = tensors(splits.train, device)
    model.prepare(x, y)
    per_epoch = max(1, steps_per_epoch(len(x), config.batch_size))
    trainer = Trainer(model, config, total_steps=per_epoch * config.epochs)
    gen = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, float]] = []
    best_val: float | None = None
    best_state: dict[str, Tensor] | None = None
    start = time.perf_counter()
    deadline = start + config.max_minutes * 60 if config.max_minutes > 0 else math.inf
    seen = 0
    model.train()
    bar = tqdm(total=config.epochs, desc=f"train {model.family}", unit="epoch",
               disable=not progress, dynamic_ncols=True)
    epoch = 0
    for epoch in range(1, config.epochs + 1):
        sums: dict[str, float] = {}
        for xb, yb in batches(x, y, config.batch_size, gen):
            for k, v in trainer.step(xb, yb).items():
                sums[k] = sums.get(k, 0.0) + v
            seen += len(xb)
        row = {"epoch": float(epoch), **{k: v / per_epoch for k, v in sums.items()}}
        out_of_time = time.perf_counter() >= deadline
        if splits.val is not None and len(splits.val) and (
            epoch % config.val_every == 0 or epoch == config.epochs or out_of_time
        ):
            val = validation_loss(trainer.inference_model(), splits.val)
            row["val_loss"] = val
            if config.select_best and (best_val is None or val < best_val):
                best_val = val
                best_state = copy.deepcopy(trainer.inference_model().state_dict())
        history.append(row)
        if log is not None:
            log(row)
        bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k != "epoch"}, refresh=False)
        bar.update(1)
        if out_of_time:
            break
    bar.close()
    seconds = time.perf_counter() - start
    final = trainer.inference_model()
    if best_state is not None:
        final.load_state_dict(best_state)
    final.eval()
    return TrainResult(final, history, trainer.step_count, epoch, seconds, seen / seconds,
                       best_val)
