"""Slow: real photographs nobody here made. Crops of scikit-learn's two sample
photographs (``patches:sklearn``, 32x32 RGB) train the GAN and the VAE at the cifar10
preset for two minutes each; their samples' FD must be well below uniform noise's, in
the feature space of the evaluation classifier (trained to tell the two photographs
apart: not the model's own), and their grids are in colour."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from services.core import data as datasets
from services.core.store import ModelStore
from services.evaluation.classifier import embed
from services.evaluation.fid import frechet_distance
from services.evaluation.report import evaluate_model, get_classifier, write_grid
from services.models import load_model
from services.training.recipes import train_and_save

pytestmark = pytest.mark.slow

SPEC = "patches:sklearn"
MINUTES = 2.0
MARGIN = 3.0  # samples' FD must be below noise FD / MARGIN
# CPU-sized: the preset's GAN (width 64) sees too few images in two minutes on 2 cores
OVERRIDES = {"gan": {"width": 32}, "vae": {}}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    return ModelStore(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def splits() -> datasets.Splits:
    return datasets.split(datasets.load(SPEC))


@pytest.fixture(scope="module")
def noise_fd(store: ModelStore, splits: datasets.Splits) -> float:
    clf = get_classifier(store, splits.train)
    rng = np.random.default_rng(0)
    noise = torch.from_numpy(rng.integers(0, 256, (500, 3, 32, 32)).astype(np.float32) / 255)
    f_noise, _ = embed(clf, noise)
    f_test, _ = embed(clf, torch.from_numpy(splits.test.as_float()))
    return frechet_distance(f_noise.numpy(), f_test.numpy())


@pytest.mark.parametrize("family", sorted(OVERRIDES))
def test_trains_on_photographs_far_better_than_noise(
        family: str, store: ModelStore, splits: datasets.Splits, noise_fd: float,
        tmp_path: Path) -> None:
    torch.set_num_threads(2)
    meta, result = train_and_save(family, store=store, data_spec=SPEC,
                                  config_overrides=OVERRIDES[family],
                                  train_overrides={"max_minutes": MINUTES}, evaluate=False,
                                  progress=False)
    assert meta.training["preset"] == "cifar10" and result.steps > 0
    model, _ = load_model(store, meta.ref)
    report = evaluate_model(model, splits, store=store, num_samples=500, unlabelled=False)
    assert report.fd is not None and report.fd_floor is not None
    assert report.fd < noise_fd / MARGIN, (family, report.fd, noise_fd)
    grid = write_grid(model, tmp_path / f"{family}.png")
    with Image.open(grid) as im:
        pixels = np.asarray(im.convert("RGB")).astype(int)
    assert (np.abs(pixels[..., 0] - pixels[..., 2]) > 20).mean() > 0.01, "grid is not in colour"
    print(f"{family}: FD {report.fd:.1f}, floor {report.fd_floor:.1f}, noise {noise_fd:.1f}, "
          f"{result.steps} steps in {result.seconds:.0f} s")
