"""``genfleet import diffusers``: pipelines the tests build and save themselves (tiny random
UNet2DModels, 32x32, 1 and 3 channels, unconditional and class-conditional) are imported,
sample exactly as the diffusers schedulers do from the same noise, and serve over gRPC.

Tolerance: samples are compared on the 256-level grid both sides snap to; a pixel may
differ by one level (float rounding: v-prediction is converted to noise in another order,
and the reference runs the batch without fixed-size chunks), in under 3 % of pixels.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    UNet2DModel,
)
from safetensors.torch import load_file

from cluster.cli.main import main as genfleet
from services.core.errors import InvalidArgument
from services.core.store import ModelStore
from services.gateway.client import GenfleetClient
from services.gateway.grpc_server import GatewayConfig
from services.models import load_model, sample_seeds
from services.models.diffusion import DiffusionModel
from services.models.importers import WEIGHTS, diffusers_pipeline
from services.models.noise import Noise
from services.serving.inprocess import InProcessBackend
from tests.helpers import GatewayThread

STEPS = 10  # divides 1000: diffusers' DDIM steps to t - T//K, the next point of the grid


def save_pipeline(directory: Path, *, channels: int, classes: int = 0,
                  scheduler: Any = None, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=32, in_channels=channels, out_channels=channels,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
        norm_num_groups=8, attention_head_dim=8, num_class_embeds=classes or None)
    DDPMPipeline(unet=unet, scheduler=scheduler or DDPMScheduler()).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def rgb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Unconditional RGB, DDPM linear schedule, epsilon prediction."""
    return save_pipeline(tmp_path_factory.mktemp("rgb"), channels=3)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Class-conditional grey (3 classes + the null label), cosine schedule, v-prediction."""
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    return save_pipeline(tmp_path_factory.mktemp("labelled"), channels=1, classes=4,
                         scheduler=scheduler, seed=1)


def _reference(directory: Path, x: torch.Tensor, labels: torch.Tensor | None,
               solver: str) -> torch.Tensor:
    """The diffusers UNet and scheduler's own loop from noise ``x``, snapped to 8 bits."""
    unet = UNet2DModel.from_pretrained(directory / "unet").eval()
    config = json.loads((directory / "scheduler" / "scheduler_config.json").read_text())
    scheduler: Any
    if solver == "ddim":
        scheduler = DDIMScheduler.from_config(config, timestep_spacing="trailing",
                                              clip_sample=True, set_alpha_to_one=True)
    else:
        scheduler = DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing",
            thresholding=True, sample_max_value=1.0)
    scheduler.set_timesteps(STEPS)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(x, t, class_labels=labels).sample
            x = scheduler.step(out, t, x).prev_sample
    return ((x / 2 + 0.5).clamp(0, 1) * 255).round() / 255


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    diff = (ours - theirs).abs()
    assert float(diff.max()) <= 1 / 255 + 1e-6, float(diff.max())
    assert float((diff > 0).float().mean()) < 0.03


@pytest.mark.parametrize("solver", ["ddim", "dpmsolver++"])
def test_unconditional_rgb_samples_equal_the_diffusers_schedulers(rgb: Path, solver: str) -> None:
    model = diffusers_pipeline(rgb)
    assert model.data_shape == (3, 32, 32) and model.config.num_classes == 0
    seeds = sample_seeds(5, 3)
    ours = model.sample(seeds, steps=STEPS, sampler=solver)
    _assert_close(ours, _reference(rgb, Noise(seeds).randn(3, 32, 32), None, solver))
    alone = model.sample(seeds[1:2], steps=STEPS, sampler=solver)  # batch invariance
    assert torch.equal(alone[0], ours[1])
    z = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    _assert_close(model.decode(z, steps=STEPS), _reference(rgb, z, None, "ddim"))


def test_decode_equals_the_ddim_pipelines_own_output(rgb: Path) -> None:
    """``DDIMPipeline.__call__`` itself (eta 0) from the noise its generator draws."""
    config = json.loads((rgb / "scheduler" / "scheduler_config.json").read_text())
    pipe = DDIMPipeline(unet=UNet2DModel.from_pretrained(rgb / "unet").eval(),
                        scheduler=DDIMScheduler.from_config(
                            config, timestep_spacing="trailing", clip_sample=True,
                            set_alpha_to_one=True))
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), eta=0.0,
                  num_inference_steps=STEPS, output_type="np").images  # (B, H, W, C)
    theirs = (torch.from_numpy(images).permute(0, 3, 1, 2) * 255).round() / 255
    z = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))  # its noise
    _assert_close(diffusers_pipeline(rgb).decode(z, steps=STEPS), theirs)


@pytest.mark.parametrize("solver", ["ddim", "dpmsolver++"])
def test_class_conditional_v_prediction_equals_diffusers(labelled: Path, solver: str) -> None:
    model = diffusers_pipeline(labelled, null_label=True)
    assert model.config.num_classes == 3 and model.config.prediction_type == "v_prediction"
    seeds, labels = sample_seeds(2, 3), torch.tensor([0, 2, 1])
    ours = model.sample(seeds, labels=labels, steps=STEPS, sampler=solver)
    _assert_close(ours, _reference(labelled, Noise(seeds).randn(1, 32, 32), labels, solver))
    # the null label: guidance and unlabelled scoring/encoding work
    guided = model.sample(seeds, labels=labels, steps=STEPS, guidance=3.0)
    assert not torch.equal(guided, ours) or solver == "ddim"
    assert torch.isfinite(model.log_prob(ours, timesteps=5)).all()
    assert model.encode(ours, steps=STEPS).shape == (3, 1, 32, 32)


def test_without_a_null_label_guidance_and_unlabelled_branches_are_refused(
        labelled: Path) -> None:
    model = diffusers_pipeline(labelled)  # all four embeddings are classes
    assert model.config.num_classes == 4 and not model.config.null_label
    assert model.option_specs()["unlabelled"].choices == ("prior",)
    x = model.sample(sample_seeds(0, 2), steps=2)  # classes drawn from the prior
    with pytest.raises(InvalidArgument, match="guidance"):
        model.sample([0], labels=torch.tensor([1]), guidance=2.0)
    with pytest.raises(InvalidArgument, match="unlabelled"):
        model.sample([0], unlabelled="unconditional")
    with pytest.raises(InvalidArgument, match="pass labels"):
        model.log_prob(x, timesteps=2)
    assert torch.isfinite(model.log_prob(x, labels=torch.tensor([0, 3]), timesteps=2)).all()


def _edit_json(path: Path, **changes: Any) -> None:
    value = json.loads(path.read_text())
    value.update(changes)
    path.write_text(json.dumps(value))


@pytest.mark.parametrize("change,message", [
    (lambda d: _edit_json(d / "model_index.json", vae=["diffusers", "AutoencoderKL"]),
     "latent diffusion pipeline"),
    (lambda d: _edit_json(d / "model_index.json", text_encoder=["transformers", "CLIPTextModel"]),
     "text-conditioned pipeline"),
    (lambda d: _edit_json(d / "unet" / "config.json", _class_name="UNet2DConditionModel"),
     "UNet2DModel only"),
    (lambda d: _edit_json(d / "scheduler" / "scheduler_config.json",
                          _class_name="ScoreSdeVeScheduler"), "not a DDPM-style"),
    (lambda d: _edit_json(d / "unet" / "config.json", sample_size=33), "not divisible"),
    (lambda d: _edit_json(d / "unet" / "config.json", sample_size=[32, 16]), "not square"),
    (lambda d: _edit_json(d / "unet" / "config.json", out_channels=6), "learned-variance"),
    (lambda d: _edit_json(d / "scheduler" / "scheduler_config.json",
                          prediction_type="flow"), "prediction_type"),
    (lambda d: _edit_json(d / "scheduler" / "scheduler_config.json",
                          rescale_betas_zero_snr=True), "zero terminal SNR"),
    (lambda d: (d / "scheduler" / "scheduler_config.json").unlink(), "no scheduler"),
    (lambda d: (d / "unet" / f"{WEIGHTS}.safetensors").unlink(), "no unet/"),
    (lambda d: (d / "unet" / f"{WEIGHTS}.safetensors").write_bytes(b"garbage"),
     "not a readable safetensors"),
    (lambda d: _edit_json(d / "unet" / "config.json", block_out_channels=[16, 64]),
     "weights do not fit"),
    (lambda d: _edit_json(d / "unet" / "config.json", block_out_channels=[10**6, 10**6]),
     "weights do not fit"),  # terabytes of parameters: refused before anything is built
])
def test_unsupported_layouts_are_refused_in_one_line(rgb: Path, tmp_path: Path, change: Any,
                                                     message: str) -> None:
    directory = shutil.copytree(rgb, tmp_path / "p")
    change(directory)
    with pytest.raises(InvalidArgument, match=message) as info:
        diffusers_pipeline(directory)
    assert "\n" not in str(info.value)


class _Payload:  # a pickled object weights_only=True must refuse to build
    pass


def test_bin_weights_load_only_as_plain_tensors(rgb: Path, tmp_path: Path) -> None:
    directory = shutil.copytree(rgb, tmp_path / "bin")
    state = load_file(directory / "unet" / f"{WEIGHTS}.safetensors")
    (directory / "unet" / f"{WEIGHTS}.safetensors").unlink()
    torch.save(state, directory / "unet" / f"{WEIGHTS}.bin")
    seeds = sample_seeds(0, 2)
    assert torch.equal(diffusers_pipeline(directory).sample(seeds, steps=2),
                       diffusers_pipeline(rgb).sample(seeds, steps=2))
    torch.save({**state, "payload": _Payload()}, directory / "unet" / f"{WEIGHTS}.bin")
    with pytest.raises(InvalidArgument, match=r"weights_only=True.*safetensors"):
        diffusers_pipeline(directory)


@pytest.fixture(scope="module")
def store(rgb: Path, labelled: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    rng = np.random.default_rng(0)
    data = root.parent / "grey.npz"
    np.savez(data, x=rng.integers(0, 256, (40, 1, 32, 32), dtype=np.uint8),
             y=np.array([0] * 25 + [1] * 5 + [2] * 10))
    assert genfleet(["-q", "--store", str(root), "import", "diffusers", str(rgb),
                     "--name", "photos"]) == 0
    assert genfleet(["-q", "--store", str(root), "import", "diffusers", str(labelled),
                     "--name", "grey", "--null-label", "--steps", "4",
                     "--data", f"npz:{data}"]) == 0
    return root


def test_import_writes_a_store_version_with_prior_and_data(store: Path, capsys: Any) -> None:
    model, meta = load_model(ModelStore(store), "grey")
    assert isinstance(model, DiffusionModel) and meta.family == "diffusion"
    assert meta.training["imported"] == "diffusers" and meta.data["shape"] == [1, 32, 32]
    assert model.option_specs()["steps"].default == 4
    assert float(model.class_prior[0]) > float(model.class_prior[2]) > float(model.class_prior[1])
    # the data must fit the model: shape and classes
    bad = store.parent / "small.npz"
    np.savez(bad, x=np.zeros((4, 1, 8, 8), np.uint8))
    assert genfleet(["-q", "--store", str(store), "import", "diffusers",
                     str(meta.training["source"]), "--name", "x", "--data", f"npz:{bad}"]) == 2
    assert "(1, 8, 8)" in capsys.readouterr().err


@pytest.fixture(scope="module")
def gateway(store: Path) -> Iterator[GatewayThread]:
    thread = GatewayThread(lambda: InProcessBackend(store, ["grey", "photos"]),
                           GatewayConfig(host="127.0.0.1", port=0))
    yield thread
    thread.stop()


def test_imported_models_serve_over_grpc(store: Path, gateway: GatewayThread) -> None:
    model, _ = load_model(ModelStore(store), "photos")
    with GenfleetClient(gateway.target, retries=0, timeout=120) as client:
        infos = {m.name: m for m in client.list_models()}
        assert infos["photos"].family == "diffusion"
        assert {"sample", "log_prob", "encode", "decode"} <= set(infos["photos"].capabilities)
        assert "conditional" in infos["grey"].capabilities
        out = client.generate("photos", 2, seed=9, options={"steps": 3})
        assert out.samples is not None and out.samples.shape == (2, 3, 32, 32)
        expected = model.sample(sample_seeds(9, 2), steps=3).numpy()
        assert out.samples.tobytes() == expected.astype(out.samples.dtype).tobytes()
        score = client.score("photos", out.samples, options={"timesteps": 3})
        assert score.kind == "lower_bound" and all(np.isfinite(score.log_prob))
        guided = client.generate("grey", 2, seed=1, labels=[0, 2],
                                 options={"guidance": 2.0, "steps": 2})
        assert guided.samples is not None and guided.samples.shape == (2, 1, 32, 32)
        latents = client.encode("grey", guided.samples, labels=[0, 2], options={"steps": 2})
        assert latents.shape == (2, 1, 32, 32)


def test_eval_of_an_imported_model_takes_a_data_spec(store: Path, tmp_path: Path,
                                                      capsys: Any) -> None:
    from PIL import Image

    args = ["-q", "--store", str(store), "eval", "photos", "-n", "20", "--set", "steps=2"]
    assert genfleet(args) == 2  # no training data recorded: one line asking for --data
    assert "pass --data SPEC" in capsys.readouterr().err
    grid, report = tmp_path / "photos.png", tmp_path / "report.json"
    assert genfleet([*args, "--data", "patches:sklearn?stride=64&limit=80", "--out", str(grid),
                     "--json", str(report)]) == 0
    metrics = json.loads(report.read_text())
    assert metrics["fd"] > 0 and metrics["fd_floor"] > 0 and "test_bits_per_dim" in metrics
    with Image.open(grid) as im:  # 32x32 RGB samples, tiled in colour
        pixels = np.asarray(im.convert("RGB")).astype(int)
    assert im.width > 10 * 32 and (np.abs(pixels[..., 0] - pixels[..., 2]) > 20).mean() > 0.01
