"""Slow: photographs nobody here made. Crops of scikit-learn's two sample photographs
(``patches:sklearn``, 32x32 RGB, the cifar10 preset) train the GAN and the VAE for a fixed
number of epochs each (not minutes: the result must not hang on the machine's speed); the
FD of their samples (default options) to the held-out crops must be under half of uniform
noise's, in a fixed random feature space (``services.evaluation.features``: trained on
nothing, so neither the model's own nor fitted to these data's labels), and their grids are
in colour. About 2 and 2.5 minutes on a 2-core CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from services.core import data as datasets
from services.core.store import ModelStore
from services.evaluation.features import RandomFeatures
from services.evaluation.report import write_grid
from services.models import load_model
from services.training.recipes import train_and_save

pytestmark = pytest.mark.slow

SPEC = "patches:sklearn"
# ~90 and ~150 steps of 64 crops; FD / noise's FD was 0.32 and 0.17 here (13 VAE epochs
# gave 0.20 in 1.6x the time)
EPOCHS = {"gan": 4, "vae": 7}
SAMPLES = 390  # as many as the test split holds


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    return ModelStore(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def space() -> tuple[RandomFeatures, torch.Tensor, dict[str, float]]:
    splits = datasets.split(datasets.load(SPEC))
    train, test = (torch.from_numpy(s.as_float()) for s in (splits.train, splits.test))
    features = RandomFeatures(3).fit(train)
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:len(test)]
    noise = torch.rand(len(test), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = {"floor": features.fd(train[pick], test), "noise": features.fd(noise, test)}
    return features, test, reference


@pytest.mark.parametrize("family", ["gan", "vae"])
def test_trains_on_photographs_far_better_than_noise(
        family: str, store: ModelStore,
        space: tuple[RandomFeatures, torch.Tensor, dict[str, float]], tmp_path: Path) -> None:
    features, test, reference = space
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        meta, result = train_and_save(family, store=store, data_spec=SPEC,
                                      train_overrides={"epochs": EPOCHS[family]},
                                      evaluate=False, progress=False)
        assert meta.training["preset"] == "cifar10" and result.steps > 0
        model, _ = load_model(store, meta.ref)
        with torch.no_grad():
            samples = model.sample(list(range(SAMPLES)))
    finally:
        torch.set_num_threads(threads)
    fd = features.fd(samples.float().clamp(0, 1), test)
    print(f"{family}: FD {fd:.1f}, real floor {reference['floor']:.1f}, noise "
          f"{reference['noise']:.1f}; {result.steps} steps in {result.seconds:.0f} s")
    assert reference["floor"] < reference["noise"] / 20  # the feature space tells them apart
    assert fd < reference["noise"] / 2, (family, fd, reference)
    grid = write_grid(model, tmp_path / f"{family}.png")
    with Image.open(grid) as im:
        pixels = np.asarray(im.convert("RGB")).astype(int)
    assert (np.abs(pixels[..., 0] - pixels[..., 2]) > 20).mean() > 0.01, "grid is not in colour"
