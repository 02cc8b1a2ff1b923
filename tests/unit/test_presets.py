"""Every built-in family at real image sizes: the presets named after MNIST (28x28 grey)
and CIFAR-10 (32x32 RGB) are chosen from the data's shape, train a few steps on data the
test makes (digits enlarged to 28x28; crops of scikit-learn's sample photographs), and the
models generate, score and encode through the gateway. Slow (~3 min on 2 cores): the
32x32x3 autoregressive model alone takes ~16 s per sample (3,072 tokens) on this CPU."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from services.core import data as datasets
from services.core.store import ModelStore
from services.gateway.client import GenfleetClient
from services.gateway.grpc_server import GatewayConfig
from services.models import BUILTIN, PRESET_SHAPES, Capability, model_class
from services.serving.inprocess import InProcessBackend
from services.training.recipes import train_and_save
from tests.helpers import GatewayThread

pytestmark = pytest.mark.slow

SIZES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
# per-request options that keep iterative samplers and bounds short in a unit test
FAST = {"diffusion": {"steps": 2}, "ebm": {"steps": 3}}
FAST_SCORE = {"diffusion": {"timesteps": 2}, "vae": {"samples": 2}, "flow": {"samples": 1}}


@pytest.fixture(scope="module")
def specs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Data specs of the two sizes: digits enlarged to 28x28, photograph crops."""
    digits = datasets.load_digits()
    big = np.stack([np.asarray(Image.fromarray((d[0] * 255 // 16).astype(np.uint8))
                               .resize((28, 28), Image.Resampling.BILINEAR))
                    for d in digits.values[:16]])
    path = tmp_path_factory.mktemp("data") / "digits28.npz"
    np.savez(path, x=big, y=digits.labels[:16])  # type: ignore[index]
    return {"mnist": f"npz:{path}", "cifar10": "patches:sklearn?stride=64&limit=16"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, specs: dict[str, str]) -> ModelStore:
    store = ModelStore(tmp_path_factory.mktemp("store"))
    for preset, spec in specs.items():
        for family in sorted(BUILTIN):
            meta, result = train_and_save(
                family, store=store, name=f"{family}-{preset}", data_spec=spec,
                train_overrides={"epochs": 1, "batch_size": 4}, evaluate=False, progress=False)
            assert result.steps >= 2 and meta.training["preset"] == preset
            assert meta.config["image_size"] == SIZES[preset][1]
            for key, value in model_class(family).presets[preset].model.items():
                stored = meta.config[key]
                assert (list(stored) if isinstance(stored, tuple | list) else stored) == \
                    (list(value) if isinstance(value, tuple) else value)
    return store


def test_presets_are_named_after_the_data_they_fit() -> None:
    for family in BUILTIN:
        presets = model_class(family).presets
        assert set(presets) == set(PRESET_SHAPES)
        assert all(tuple(p.shape) == PRESET_SHAPES[name] for name, p in presets.items())


@pytest.fixture(scope="module")
def gateway(store: ModelStore) -> Iterator[GatewayThread]:
    names = store.names()
    thread = GatewayThread(lambda: InProcessBackend(store.root, names, warmup=False),
                           GatewayConfig(host="127.0.0.1", port=0))
    yield thread
    thread.stop()


@pytest.mark.parametrize("preset", sorted(SIZES))
@pytest.mark.parametrize("family", sorted(BUILTIN))
def test_family_serves_at_preset_size(family: str, preset: str, gateway: GatewayThread) -> None:
    name = f"{family}-{preset}"
    shape = SIZES[preset]
    capabilities = model_class(family).capabilities
    with GenfleetClient(gateway.target, retries=0, timeout=120) as client:
        n = 1 if name == "autoregressive-cifar10" else 2  # ~16 s per sample
        out = client.generate(name, n, seed=1, options=FAST.get(family))
        assert out.samples is not None and out.samples.shape == (n, *shape)
        levels = out.samples * 255
        assert np.array_equal(levels, np.round(levels)), "samples off the 256-level grid"
        if n > 1:
            again = client.generate(name, 1, seed=1, options=FAST.get(family))
            assert again.samples is not None
            assert again.samples[0].tobytes() == out.samples[0].tobytes()  # alone == batched
        if Capability.LOG_PROB in capabilities:
            score = client.score(name, out.samples, options=FAST_SCORE.get(family))
            assert np.isfinite(score.log_prob).all()
        if Capability.ENCODE in capabilities:
            latents = client.encode(name, out.samples, labels=[0, 1][:n],
                                    options=FAST.get(family))
            assert latents.shape[0] == n and np.isfinite(latents).all()


def test_unknown_preset_is_one_clear_error() -> None:
    from services.core.errors import InvalidArgument
    from services.training.spec import spec_from_config

    with pytest.raises(InvalidArgument, match=r"gan has no preset 'imagenet' \(has: "):
        spec_from_config("gan", preset="imagenet")
