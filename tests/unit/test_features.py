"""The fixed random feature space (services.evaluation.features): the same features in
every run, a small FD between two halves of real data, a large one for noise; the quality
report gives its FD for every image dataset, labelled or not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from services.core import data as datasets
from services.core.store import ModelStore
from services.evaluation.features import RandomFeatures
from services.evaluation.report import evaluate_model
from services.models import build
from tests.conftest import TINY_CONFIGS


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    data = datasets.load("patches:sklearn?stride=32")  # ~490 crops, 32x32 RGB
    return torch.from_numpy(data.as_float())


def test_the_space_is_the_same_in_every_run(photos: torch.Tensor) -> None:
    a = RandomFeatures(3).fit(photos)(photos[:16])
    b = RandomFeatures(3).fit(photos)(photos[:16])
    assert np.array_equal(a, b)
    assert a.shape[0] == 16 and 400 < a.shape[1] <= 2 * (32 + 64 + 128)  # barely varying: dropped
    assert not np.array_equal(RandomFeatures(3, seed=1).fit(photos)(photos[:16]), a)


def test_real_halves_are_close_and_noise_and_flat_images_are_far(photos: torch.Tensor) -> None:
    order = torch.randperm(len(photos), generator=torch.Generator().manual_seed(0))
    half = len(photos) // 2
    a, b = photos[order[:half]], photos[order[half:]]
    space = RandomFeatures(3).fit(a)
    floor = space.fd(a, b)
    noise = space.fd(torch.rand(half, 3, 32, 32, generator=torch.Generator().manual_seed(0)), b)
    flat = space.fd(torch.full((half, 3, 32, 32), 0.5), b)
    assert noise > 20 * floor and flat > 20 * floor, (floor, noise, flat)


def test_it_works_at_any_size_and_channel_count() -> None:
    x = torch.rand(8, 1, 8, 8)
    assert RandomFeatures(1).fit(x)(x).shape[0] == 8
    with pytest.raises(RuntimeError, match="fit"):
        RandomFeatures(1)(x)


def test_the_report_gives_an_fd_for_unlabelled_images_too(tmp_path: Path) -> None:
    digits = datasets.load("digits")
    unlabelled = datasets.Dataset(digits.values, None, digits.levels, [], name="no-labels")
    splits = datasets.split(unlabelled)
    torch.manual_seed(0)
    model = build("vae", {**TINY_CONFIGS["vae"], "num_classes": 0}).eval()
    report = evaluate_model(model, splits, store=ModelStore(tmp_path), num_samples=100,
                            batch_size=100, score=False)
    assert report.fd is None  # no labels: no classifier to train
    assert report.fixed_fd is not None and report.fixed_fd_floor is not None
    assert report.fixed_fd_ratio is not None and report.fixed_fd_ratio > 3  # untrained
    assert "FD / floor, fixed features" in report.table()
    assert "fixed_fd_ratio" in report.to_json()
