"""The fixed random feature space (services.evaluation.features): the same features in
every run, a small FD between two halves of real data, a large one for noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.core import data as datasets
from services.evaluation.features import RandomFeatures


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    data = datasets.load("patches:sklearn?stride=32")  # ~490 crops, 32x32 RGB
    return torch.from_numpy(data.as_float())


def test_the_space_is_the_same_in_every_run(photos: torch.Tensor) -> None:
    a = RandomFeatures(3).fit(photos)(photos[:16])
    b = RandomFeatures(3).fit(photos)(photos[:16])
    assert np.array_equal(a, b)
    assert a.shape == (16, 2 * (32 + 64 + 128))
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
    assert RandomFeatures(1).fit(x)(x).shape == (8, 448)
    with pytest.raises(RuntimeError, match="fit"):
        RandomFeatures(1)(x)
