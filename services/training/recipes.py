"""From a data spec to a trained, evaluated checkpoint in the store.

``model_config`` fills the data-dependent fields of a family's config (shape, levels,
classes) from the dataset; ``train_and_save`` runs the in-process loop, evaluates the
result and writes a new version to the model store.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from services.core import data as datasets
from services.core.errors import InvalidArgument
from services.core.store import Checkpoint, ModelStore
from services.models import GenerativeModel, ModelConfig, model_class
from services.training.loop import TrainConfig, TrainResult, fit


def model_config(family: str, data: datasets.Dataset,
                 overrides: Mapping[str, Any] | None = None) -> ModelConfig:
    """The family's default config, fitted to ``data``'s shape, then ``overrides``."""
    klass = model_class(family)
    fields = {f.name for f in dataclasses.fields(klass.Config)}
    values: dict[str, Any] = {}
    if data.kind == "text":
        if "data_kind" not in fields:
            raise InvalidArgument("data", f"{family} models images; text needs autoregressive")
        values.update(data_kind="text", seq_len=data.shape[0], levels=data.levels, num_classes=0)
    else:
        c, h, w = data.shape
        if h != w:
            raise InvalidArgument("data", f"images must be square, got {h}x{w}")
        values.update(channels=c, image_size=h, levels=data.levels, num_classes=data.num_classes)
    values.update(overrides or {})
    return klass.Config.from_dict(values)


def train_and_save(
    family: str,
    *,
    store: ModelStore,
    name: str | None = None,
    data_spec: str = "digits",
    config_overrides: Mapping[str, Any] | None = None,
    train_overrides: Mapping[str, Any] | None = None,
    evaluate: bool = True,
    eval_samples: int = 1000,
    progress: bool = True,
    log: Callable[[dict[str, float]], None] | None = None,
) -> tuple[Checkpoint, TrainResult]:
    """Train ``family`` on ``data_spec`` in-process, evaluate, and store a new version."""
    name = name or family
    data = datasets.load(data_spec)
    splits = datasets.split(data)
    config = model_config(family, data, config_overrides)
    klass = model_class(family)
    train_cfg = TrainConfig.for_model(klass(config), **dict(train_overrides or {}))
    torch.manual_seed(train_cfg.seed)
    model = klass(config)
    result = fit(model, splits, train_cfg, progress=progress, log=log)
    training = {
        "steps": result.steps, "epochs": result.epochs, "seconds": round(result.seconds, 2),
        "samples_per_second": round(result.samples_per_second, 1), "best_val": result.best_val,
        "config": {k: v for k, v in dataclasses.asdict(train_cfg).items()},
        "final": result.history[-1] if result.history else {}, "finished": time.time(),
    }
    checkpoint = export(store, name, family, config, result.model, data, splits, training,
                        evaluate=evaluate, eval_samples=eval_samples, progress=progress)
    return checkpoint, result


def export(store: ModelStore, name: str, family: str, config: ModelConfig,
           model: GenerativeModel, data: datasets.Dataset, splits: datasets.Splits,
           training: Mapping[str, Any], *, evaluate: bool = True, eval_samples: int = 1000,
           progress: bool = True) -> Checkpoint:
    """Evaluate a trained model (FD, bits/dim, ... on the test split) and write it to the
    store as a new version of ``name`` with the metrics and the training record."""
    metrics: dict[str, Any] = {}
    if evaluate:
        from services.evaluation.report import evaluate_model

        metrics = evaluate_model(model, splits, store=store, num_samples=eval_samples,
                                 progress=progress).to_json()
    return store.save(name, family=family, config=config.to_dict(), state=model.state_dict(),
                      data=data.describe(), metrics=metrics, training=dict(training))
