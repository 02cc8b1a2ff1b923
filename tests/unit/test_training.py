"""The one training loop and the one settings path, in-process (no Ray): what the Ray
Train worker adds is exercised by tests/integration/test_train.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from services.core import data as datasets
from services.core.errors import InvalidArgument
from services.core.store import ModelStore
from services.models import build, model_class
from services.training.loop import (
    Run,
    TrainConfig,
    Trainer,
    final_weights,
    fit,
    run_epochs,
    tensors,
    warmed_ema,
)
from services.training.recipes import train_and_save
from services.training.spec import prepare, spec_from_config
from tests.conftest import TINY_CONFIGS


def _trainer(family: str = "vae", **config: Any) -> tuple[Trainer, torch.Tensor, torch.Tensor]:
    data = datasets.load("digits")
    x, y = tensors(data)
    x, y = x[:96], y[:96] if y is not None else None
    model = build(family, TINY_CONFIGS[family])
    model.prepare(x, y)
    return Trainer(model, TrainConfig(batch_size=32, **config)), x, y


def test_names_are_checked_before_any_work() -> None:
    with pytest.raises(InvalidArgument, match="model names match"):
        spec_from_config("gan", name="MyGan")
    with pytest.raises(InvalidArgument, match="job names match"):
        spec_from_config("gan", name="gan", job="my job")
    with pytest.raises(InvalidArgument, match="unknown family"):
        spec_from_config("gann")


def test_family_defaults_are_read_without_building_a_model(monkeypatch: pytest.MonkeyPatch) -> None:
    klass = model_class("diffusion")

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was built")

    monkeypatch.setattr(klass, "__init__", refuse)
    cfg = TrainConfig.for_family(klass, epochs=3)
    assert cfg.epochs == 3 and cfg.ema_decay == klass.train_defaults["ema_decay"]


def test_local_training_reads_the_train_yaml_then_the_arguments(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("defaults: {train: {epochs: 5, batch_size: 64}}\n"
                    "families: {gan: {model: {width: 8, latent_dim: 4, embed_dim: 4},"
                    " train: {epochs: 1}}}\n")
    store = ModelStore(tmp_path / "store")
    checkpoint, result = train_and_save("gan", store=store, config_path=path, name="g",
                                        train_overrides={"lr": 1e-3}, evaluate=False,
                                        progress=False)
    training = checkpoint.training["config"]
    assert (training["epochs"], training["batch_size"], training["lr"]) == (1, 64, 1e-3)
    assert checkpoint.config["width"] == 8 and result.epochs == 1


def test_the_local_and_the_ray_path_prepare_the_same_run() -> None:
    spec = spec_from_config("flow", train={"epochs": 2})
    local, ray = prepare(spec, distributed=False), prepare(spec)
    assert local.config == ray.config and local.train == ray.train  # no GPU: amp off in both
    assert len(local.splits.train) == len(ray.splits.train)


def test_the_ema_of_a_short_run_follows_its_recent_weights() -> None:
    """A weight that is t after update t: a fixed 0.995 decay would still hold ~64 % of the
    first value after 88 updates; the warmed-up EMA sits in the run's last tenth, and
    settles into the plain decay once (1 + t) / (10 + t) passes it."""
    from torch.optim.swa_utils import AveragedModel

    weight = torch.nn.Linear(1, 1, bias=False)
    ema = AveragedModel(weight, multi_avg_fn=warmed_ema(0.995), use_buffers=True)
    for t in range(1, 89):
        weight.weight.data.fill_(float(t))
        ema.update_parameters(weight)
    value = float(ema.module.weight.detach())
    assert 78.0 < value < 88.0, value
    fixed = AveragedModel(weight, multi_avg_fn=warmed_ema(0.5), use_buffers=True)
    for t in range(1, 200):
        weight.weight.data.fill_(float(t))
        fixed.update_parameters(weight)
    assert float(fixed.module.weight.detach()) == pytest.approx(198.0, abs=0.01)  # a 0.5 EMA lags a ramp by 1


@pytest.mark.parametrize(("warmup", "kept"), [(True, 2 / 11), (False, 0.9)])
def test_the_ema_warmup_setting_decides_how_much_of_the_first_step_is_kept(
        warmup: bool, kept: float) -> None:
    trainer, x, y = _trainer(ema_decay=0.9, ema_warmup=warmup)
    seen = []
    for i in range(2):  # the first update copies the weights, the second averages
        trainer.step(x[32 * i:32 * (i + 1)], y[32 * i:32 * (i + 1)])
        seen.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
    ema = dict(trainer.inference_model().state_dict())
    key = next(k for k, v in seen[0].items() if v.is_floating_point()
               and not torch.equal(v, seen[1][k]))
    torch.testing.assert_close(ema[key], kept * seen[0][key] + (1 - kept) * seen[1][key])


def test_final_weights_prefer_best_then_ema_then_trained() -> None:
    trainer, x, y = _trainer(ema_decay=0.9)
    for _ in range(2):  # the first update copies the weights, the second averages
        trainer.step(x[:32], y[:32])
    state = trainer.state_dict()
    ema = final_weights({**state, "best_state": None})
    torch.testing.assert_close(ema, dict(trainer.inference_model().state_dict()))
    assert not all(torch.equal(ema[k], state["model"][k]) for k in ema)
    best = {k: torch.zeros_like(v) for k, v in state["model"].items()}
    assert final_weights({**state, "best_state": best}) is best
    assert final_weights({**state, "ema": None}) is state["model"]


def test_every_rank_stops_at_the_epoch_any_rank_runs_out_of_time() -> None:
    """``max_minutes`` is decided together: a flag in the all-reduced totals."""
    trainer, x, y = _trainer(epochs=5)

    def another_rank_is_late(totals: torch.Tensor) -> None:
        totals[-1] += 1.0  # the other rank's clock passed the budget

    rows: list[dict[str, float]] = []
    run = run_epochs(trainer, x, y, None, all_reduce=another_rank_is_late,
                     on_epoch=lambda _, row: rows.append(row))
    assert run.epoch == 1 and len(rows) == 1


def test_a_run_continues_from_its_state() -> None:
    trainer, x, y = _trainer(epochs=3)
    first = run_epochs(trainer, x, y, None)
    assert first.epoch == 3 and [r["resumed_from"] for r in first.history] == [0.0] * 3
    resumed = Run.from_state(first.state_dict())
    trainer.config = TrainConfig(batch_size=32, epochs=4)
    second = run_epochs(trainer, x, y, None, run=resumed)
    assert second.epoch == 4 and second.history[-1]["resumed_from"] == 3.0
    assert len(second.history) == 4


def test_fit_returns_the_selected_weights_in_eval_mode() -> None:
    data = datasets.load("digits")
    splits = datasets.split(data)
    model = build("gan", TINY_CONFIGS["gan"])
    result = fit(model, splits, TrainConfig(epochs=1, batch_size=256), progress=False)
    assert result.model is model and not model.training
    assert result.epochs == 1 and result.steps > 0 and "val_loss" in result.history[-1]
