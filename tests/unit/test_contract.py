"""One contract over every FAMILIES entry: the built-ins with tiny configs, and every
installed plugin family with its own defaults (a plugin meets the same contract)."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import torch

from services.core.data import load_digits
from services.core.errors import InvalidArgument, UnsupportedOperation
from services.core.store import ModelStore
from services.models import (
    BUILTIN,
    FAMILIES,
    Capability,
    GenerativeModel,
    build,
    load_model,
    sample_seeds,
)
from services.training.loop import TrainConfig, Trainer
from tests.conftest import TINY_CONFIGS

FAMILY_NAMES = sorted(FAMILIES)


@functools.cache
def _trained(family: str) -> GenerativeModel:
    """A tiny model trained for a few steps on real digits (untrained ones can be
    degenerate, e.g. a uniform decoder whose mean is the same for every seed)."""
    data = load_digits()
    x = torch.from_numpy(data.as_float()[:64])
    y = torch.from_numpy(data.labels[:64])  # type: ignore[index]
    torch.manual_seed(0)
    model = build(family, TINY_CONFIGS.get(family))  # a plugin: its own defaults
    model.prepare(x, y)
    trainer = Trainer(model, TrainConfig(lr=3e-3))
    for _ in range(15):
        trainer.step(x, y)
    return model


def _model(family: str, batch: tuple[torch.Tensor, torch.Tensor]) -> GenerativeModel:
    return copy.deepcopy(_trained(family))


def _labels(model, n: int) -> torch.Tensor | None:
    if Capability.CONDITIONAL in model.capabilities:
        return torch.arange(n) % model.config.num_classes
    return None


def test_every_family_has_a_tiny_config() -> None:
    assert set(TINY_CONFIGS) == set(BUILTIN)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_loss_and_gradients_are_finite_in_every_phase(family: str, digits_batch) -> None:
    model = _model(family, digits_batch).train()
    x, y = digits_batch
    for phase in model.phases:
        model.zero_grad(set_to_none=True)
        out = model(x, labels=y, phase=phase)
        assert out.loss.dim() == 0 and torch.isfinite(out.loss), phase
        out.loss.backward()
        grads = [p.grad for p in model.param_groups(phase) if p.grad is not None]
        assert grads, f"{family}/{phase}: no parameter received a gradient"
        assert all(torch.isfinite(g).all() for g in grads), phase


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_samples_have_the_data_shape_range_and_dtype(family: str, digits_batch) -> None:
    model = _model(family, digits_batch).eval()
    x = model.sample(sample_seeds(3, 5), labels=_labels(model, 5))
    assert x.shape == (5, 1, 8, 8)
    assert x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    levels = x * 16
    torch.testing.assert_close(levels, levels.round())  # on the 17-level grid


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_sampling_is_reproducible_and_batch_invariant(family: str, digits_batch) -> None:
    model = _model(family, digits_batch).eval()
    seeds = sample_seeds(7, 16)
    labels = _labels(model, 16)
    a = model.sample(seeds, labels=labels)
    b = model.sample(seeds, labels=labels)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    alone = model.sample(seeds[5:6], labels=None if labels is None else labels[5:6])
    torch.testing.assert_close(alone[0], a[5], rtol=0, atol=1e-5)
    other = model.sample(sample_seeds(8, 16), labels=labels)
    assert not torch.equal(a, other), "different seeds gave identical samples"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_unconditional_sampling_is_batch_invariant(family: str, digits_batch) -> None:
    model = _model(family, digits_batch).eval()
    seeds = sample_seeds(11, 8)
    a = model.sample(seeds)
    torch.testing.assert_close(model.sample(seeds[3:4])[0], a[3], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_unsupported_capabilities_raise_clear_errors(family: str, digits_batch) -> None:
    model = _model(family, digits_batch).eval()
    x, _y = digits_batch
    calls = {
        Capability.LOG_PROB: lambda: model.log_prob(x),
        Capability.ENCODE: lambda: model.encode(x),
        Capability.DECODE: lambda: model.decode(torch.zeros(2, 3)),
    }
    for capability, call in calls.items():
        if capability not in model.capabilities:
            with pytest.raises(UnsupportedOperation, match=capability.value):
                call()
    if Capability.CONDITIONAL not in model.capabilities:
        with pytest.raises(InvalidArgument, match="labels"):
            model.sample(sample_seeds(0, 2), labels=torch.tensor([0, 1]))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_bad_inputs_raise_invalid_argument(family: str, digits_batch) -> None:
    model = _model(family, digits_batch).eval()
    with pytest.raises(InvalidArgument, match=r"options\.bogus"):
        model.sample(sample_seeds(0, 2), bogus=1)
    with pytest.raises(InvalidArgument, match="num_samples"):
        model.sample([])
    if Capability.CONDITIONAL in model.capabilities:
        with pytest.raises(InvalidArgument, match=r"labels: must be in \[0, 9\]"):
            model.sample(sample_seeds(0, 2), labels=torch.tensor([0, 10]))
    if Capability.LOG_PROB in model.capabilities:
        with pytest.raises(InvalidArgument, match="data"):
            model.log_prob(torch.zeros(2, 1, 4, 4))
        with pytest.raises(InvalidArgument, match=r"data: values must be finite and in \[0, 1\]"):
            model.log_prob(torch.full((2, 1, 8, 8), 2.0))
    for name, spec in model.option_specs().items():
        if spec.max is not None and spec.kind in ("int", "float"):
            with pytest.raises(InvalidArgument, match=f"options.{name}"):
                model.sample(sample_seeds(0, 1), **{name: spec.max + 1})


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_log_prob_is_finite_per_sample(family: str, digits_batch) -> None:
    model = _model(family, digits_batch).eval()
    if Capability.LOG_PROB not in model.capabilities:
        pytest.skip(f"{family} has no log_prob")
    x, _ = digits_batch
    lp = model.log_prob(x)
    assert lp.shape == (6,) and torch.isfinite(lp).all()
    if model.score_kind.value != "unnormalized":
        bpd = model.bits_per_dim(lp)
        assert (bpd > 0).all(), "a discrete likelihood cannot exceed 1"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_encode_decode_shapes(family: str, digits_batch) -> None:
    model = _model(family, digits_batch).eval()
    x, y = digits_batch
    labels = y if Capability.CONDITIONAL in model.capabilities else None
    if Capability.ENCODE in model.capabilities:
        z = model.encode(x, labels=labels)
        assert z.shape == (6, *model.latent_shape)
    if Capability.DECODE in model.capabilities:
        z = torch.randn(6, *model.latent_shape)
        out = model.decode(z, labels=labels)
        assert out.shape == (6, 1, 8, 8)
        with pytest.raises(InvalidArgument, match="latents"):
            model.decode(torch.zeros(6, 999))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_checkpoint_round_trip_gives_identical_outputs(
        family: str, digits_batch, tmp_path: Path) -> None:
    model = _model(family, digits_batch)
    x, y = digits_batch
    for phase in model.phases:  # move the weights off their initial values
        model(x, labels=y, phase=phase).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.01 * p.grad
    model.eval()
    store = ModelStore(tmp_path)
    meta = store.save("m", family=family, config=model.config.to_dict(), state=model.state_dict())
    loaded, meta2 = load_model(store, "m")
    assert meta2.version == meta.version == 1
    seeds, labels = sample_seeds(1, 4), _labels(model, 4)
    torch.testing.assert_close(loaded.sample(seeds, labels=labels),
                               model.sample(seeds, labels=labels), rtol=0, atol=0)
    if Capability.LOG_PROB in model.capabilities:
        torch.testing.assert_close(loaded.log_prob(x), model.log_prob(x), rtol=0, atol=0)
