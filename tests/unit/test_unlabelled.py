"""A call without labels to a conditional family: each sample draws its class from its
own stream and takes the conditional path (diffusion's null-label branch is an explicit
option), and the quality report shows both paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.core import data as datasets
from services.core.errors import InvalidArgument
from services.core.store import ModelStore
from services.evaluation.report import evaluate_model
from services.models import build, load_model, sample_seeds
from services.models.diffusion import DiffusionModel
from tests.conftest import TINY_CONFIGS


@pytest.fixture(scope="module")
def model() -> DiffusionModel:
    torch.manual_seed(0)
    m = build("diffusion", TINY_CONFIGS["diffusion"])
    assert isinstance(m, DiffusionModel)
    return m.eval()


def test_unlabelled_samples_take_the_conditional_path_with_a_class_of_their_own(
        model: DiffusionModel) -> None:
    seeds = sample_seeds(7, 6)
    prior = model.class_prior.clone()
    try:
        model.class_prior.zero_()
        model.class_prior[3] = 1.0  # every sample must draw class 3
        free = model.sample(seeds)
        assert torch.equal(free, model.sample(seeds, labels=torch.full((6,), 3)))
        null = model.sample(seeds, unlabelled="unconditional")  # the unconditional branch, on request
        assert not torch.equal(free, null)
        assert torch.equal(null, model.sample(seeds, unlabelled="unconditional"))
    finally:
        model.class_prior.copy_(prior)
    # batch invariance holds for the drawn classes: a sample alone equals itself in a batch
    batch = model.sample(sample_seeds(1, 5))
    for i in (0, 4):
        assert torch.equal(batch[i], model.sample(sample_seeds(1, 5)[i:i + 1])[0])


def test_unlabelled_option_is_advertised_and_checked(model: DiffusionModel) -> None:
    spec = model.option_specs()["unlabelled"]
    assert spec.default == "prior" and spec.choices == ("prior", "unconditional")
    with pytest.raises(InvalidArgument, match="unlabelled"):
        model.sample([1], unlabelled="cond")
    unconditional = build("diffusion", {**TINY_CONFIGS["diffusion"], "num_classes": 0})
    assert "unlabelled" not in unconditional.option_specs()


def test_class_prior_is_fitted_saved_and_defaults_for_old_checkpoints(tmp_path: Path) -> None:
    m = build("diffusion", TINY_CONFIGS["diffusion"])
    labels = torch.tensor([0] * 30 + [1] * 10)
    m.prepare(torch.zeros(40, 1, 8, 8), labels)
    assert isinstance(m, DiffusionModel)
    assert m.class_prior[0] > m.class_prior[1] > m.class_prior[2] > 0
    store = ModelStore(tmp_path)
    state = m.state_dict()
    store.save("d", family="diffusion", config=m.config.to_dict(), state=state)
    loaded, _ = load_model(store, "d")
    assert torch.equal(loaded.class_prior, m.class_prior)  # type: ignore[arg-type]
    del state["class_prior"]  # a checkpoint written before the prior was kept
    store.save("d", family="diffusion", config=m.config.to_dict(), state=state)
    old, _ = load_model(store, "d@2")
    assert torch.allclose(old.class_prior, torch.full((10,), 0.1))  # type: ignore[arg-type]


def test_quality_report_shows_labelled_and_unlabelled_calls(tmp_path: Path) -> None:
    splits = datasets.split(datasets.load("digits"))
    m = build("diffusion", TINY_CONFIGS["diffusion"]).eval()
    report = evaluate_model(m, splits, store=ModelStore(tmp_path), num_samples=60,
                            batch_size=60)
    assert report.fd_ratio is not None and report.unlabelled_fd_ratio is not None
    assert report.unlabelled_fd_ratio != report.fd_ratio
    assert "FD / floor, no labels" in report.table()
    assert "unlabelled_fd" in report.to_json()
    skipped = evaluate_model(m, splits, store=ModelStore(tmp_path), num_samples=60,
                             batch_size=60, without_labels=False, score=False)
    assert skipped.unlabelled_fd is None and skipped.test_bits_per_dim is None
    assert report.test_bits_per_dim is not None
    # a sampler option named like the report's switches still reaches the sampler
    branch = evaluate_model(m, splits, store=ModelStore(tmp_path), num_samples=60,
                            batch_size=60, score=False, unlabelled="unconditional")
    assert branch.fd == report.fd and branch.unlabelled_fd != report.unlabelled_fd
