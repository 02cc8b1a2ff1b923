"""From a training spec to a trained, evaluated checkpoint in the store.

``train_and_save`` runs the in-process loop (``genfleet train --local``, ``zoo``, ``up``
for a family without a checkpoint); ``export`` evaluates a trained model and writes a new
version to the model store (the Ray Train job's driver calls it too).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from services.core import data as datasets
from services.core.store import Checkpoint, ModelStore
from services.models import GenerativeModel, ModelConfig, model_class
from services.training.loop import TrainResult, fit
from services.training.spec import Prepared, TrainSpec, prepare, spec_from_config


def train_and_save(
    family: str,
    *,
    store: ModelStore,
    name: str | None = None,
    data_spec: str | None = None,
    config_overrides: Mapping[str, Any] | None = None,
    train_overrides: Mapping[str, Any] | None = None,
    evaluate: bool = True,
    eval_samples: int = 1000,
    progress: bool = True,
    log: Callable[[dict[str, float]], None] | None = None,
    config_path: Path | str | None = None,
) -> tuple[Checkpoint, TrainResult]:
    """Train ``family`` in-process, evaluate, and store a new version.

    Settings take the one path every run takes (``spec.spec_from_config``): the train
    YAML's defaults, its section for ``family``, then these arguments.
    """
    spec = spec_from_config(family, path=config_path, name=name, data=data_spec,
                            model=dict(config_overrides or {}),
                            train=dict(train_overrides or {}))  # None: the default
    return train_spec_locally(spec, store=store, evaluate=evaluate, eval_samples=eval_samples,
                              progress=progress, log=log)


def train_spec_locally(spec: TrainSpec, *, store: ModelStore, evaluate: bool = True,
                       eval_samples: int = 1000, progress: bool = True,
                       log: Callable[[dict[str, float]], None] | None = None,
                       setup: Prepared | None = None) -> tuple[Checkpoint, TrainResult]:
    """``spec`` trained in this process (no Ray: its worker settings are ignored);
    ``setup``: ``prepare(spec, distributed=False)`` when the caller has it already."""
    setup = setup or prepare(spec, distributed=False)
    torch.manual_seed(setup.train.seed)  # the initial weights
    model = model_class(spec.family)(setup.config)
    result = fit(model, setup.splits, setup.train, progress=progress, log=log)
    training = {
        "preset": setup.preset, "steps": result.steps, "epochs": result.epochs,
        "seconds": round(result.seconds, 2),
        "samples_per_second": round(result.samples_per_second, 1), "best_val": result.best_val,
        "config": dataclasses.asdict(setup.train),
        "final": result.history[-1] if result.history else {}, "finished": time.time(),
    }
    checkpoint = export(store, spec.name, spec.family, setup.config, result.model, setup.data,
                        setup.splits, training, evaluate=evaluate, eval_samples=eval_samples,
                        progress=progress)
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


def evaluate_stored(store: ModelStore, ref: str, spec: TrainSpec, *, eval_samples: int = 1000,
                    progress: bool = False) -> dict[str, Any]:
    """Evaluate the stored version ``ref`` on the test split of ``spec``'s data (what
    ``export`` does before it saves) and merge the metrics into its metadata."""
    from services.evaluation.report import evaluate_model
    from services.models import load_model

    splits = prepare(spec, distributed=False).splits
    model, _ = load_model(store, ref)
    metrics: dict[str, Any] = evaluate_model(model, splits, store=store,
                                             num_samples=eval_samples,
                                             progress=progress).to_json()
    store.update_metrics(ref, metrics)
    return metrics
