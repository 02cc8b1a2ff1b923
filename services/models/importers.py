"""Models trained elsewhere, read into a genfleet family.

``diffusers_pipeline`` reads a pixel-space diffusers pipeline directory in the layout
``DDPMPipeline.save_pretrained`` writes::

    model_index.json             {"_class_name": "DDPMPipeline", "unet": [...], "scheduler": [...]}
    unet/config.json             a UNet2DModel config (class-conditional: num_class_embeds)
    unet/diffusion_pytorch_model.safetensors   (or a sharded index, or .bin)
    scheduler/scheduler_config.json            a DDPM-style (discrete-time VP) scheduler

and returns a ``DiffusionModel`` with the UNet's weights and the scheduler's noising
process: genfleet's own solvers, guidance, bound and DDIM encode/decode then run on it.
Weights are read from safetensors, or from a ``.bin`` with ``torch.load(weights_only=True)``
only; nothing is unpickled beyond tensors. Every unsupported layout is refused with one
line naming what is missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from services.core.errors import InvalidArgument
from services.models.diffusion import (
    NOISE_SCHEDULE_KEYS,
    PREDICTION_TYPES,
    DiffusionConfig,
    DiffusionModel,
)

# schedulers over the same discrete-time variance-preserving process as DDPM: only their
# noising process (betas) and prediction type are taken; genfleet brings its own solvers
SCHEDULERS = frozenset({
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler",
    "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
    "LMSDiscreteScheduler", "KDPM2DiscreteScheduler",
})
WEIGHTS = "diffusion_pytorch_model"
_LATENT_PARTS = ("vae", "vqvae")
_TEXT_PARTS = ("text_encoder", "tokenizer", "image_encoder")


def _refuse(directory: Path, what: str) -> InvalidArgument:
    return InvalidArgument("pipeline", f"{directory}: {what}")


def _read_json(directory: Path, path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise _refuse(directory, f"no {path.relative_to(directory)} (expected the layout "
                                 f"DDPMPipeline.save_pretrained writes)")
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _refuse(directory, f"{path.relative_to(directory)} is not valid JSON ({exc})"
                      ) from None
    if not isinstance(value, dict):
        raise _refuse(directory, f"{path.relative_to(directory)} is not a JSON object")
    return value


def _check_index(directory: Path, index: dict[str, Any]) -> None:
    parts = {k for k in index if not k.startswith("_") and index[k] not in (None, [None, None])}
    latent = [p for p in _LATENT_PARTS if p in parts]
    if latent:
        raise _refuse(directory, f"a latent diffusion pipeline (component {latent[0]!r}); "
                                 f"genfleet imports pixel-space UNet2DModel pipelines only")
    text = [p for p in _TEXT_PARTS if p in parts]
    if text:
        raise _refuse(directory, f"a text-conditioned pipeline (component {text[0]!r}); "
                                 f"genfleet imports unconditional and class-conditional "
                                 f"UNet2DModel pipelines only")
    for part in ("unet", "scheduler"):
        if part not in parts:
            raise _refuse(directory, f"model_index.json has no {part!r} component")


def _check_unet(directory: Path, unet: dict[str, Any]) -> tuple[int, int, int]:
    """(channels, image size, class embeddings) of a supported UNet2DModel config."""
    name = unet.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise _refuse(directory, f"unet is a {name}; genfleet imports UNet2DModel only "
                                 f"(text-conditioned UNet2DConditionModel is not supported)")
    c_in, c_out = unet.get("in_channels", 3), unet.get("out_channels", 3)
    if c_in != c_out:
        raise _refuse(directory, f"unet has {c_in} input and {c_out} output channels; a "
                                 f"learned-variance UNet (out = 2 x in) is not supported")
    size = unet.get("sample_size")
    if isinstance(size, list | tuple):
        if len(size) != 2 or size[0] != size[1]:
            raise _refuse(directory, f"unet sample_size {size} is not square")
        size = size[0]
    if not isinstance(size, int) or size < 1:
        raise _refuse(directory, f"unet sample_size {size!r} is not a positive integer")
    levels = len(unet.get("down_block_types", ()))
    if levels and size % 2 ** (levels - 1):
        raise _refuse(directory, f"unet sample_size {size} is not divisible by "
                                 f"2**{levels - 1} ({levels} down blocks)")
    embeds = unet.get("num_class_embeds") or 0
    if unet.get("class_embed_type") is not None:
        raise _refuse(directory, f"unet class_embed_type {unet['class_embed_type']!r}: only "
                                 f"class labels through num_class_embeds are supported")
    if unet.get("time_embedding_type", "positional") != "positional":
        raise _refuse(directory, f"unet time_embedding_type "
                                 f"{unet['time_embedding_type']!r}: only the discrete-time "
                                 f"(positional) UNet is supported")
    return c_in, size, int(embeds)


def _check_scheduler(directory: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The noising process and prediction type of a supported scheduler config."""
    name = config.get("_class_name")
    if name not in SCHEDULERS:
        raise _refuse(directory, f"scheduler {name!r} is not a DDPM-style (discrete-time "
                                 f"variance-preserving) scheduler; supported: "
                                 f"{', '.join(sorted(SCHEDULERS))}")
    if config.get("rescale_betas_zero_snr"):
        raise _refuse(directory, "scheduler rescale_betas_zero_snr=true (zero terminal SNR) "
                                 "is not supported")
    kind = config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise _refuse(directory, f"scheduler prediction_type {kind!r}; supported: "
                                 f"{list(PREDICTION_TYPES)}")
    variance = config.get("variance_type") or "fixed_small"
    if str(variance).startswith("learned"):
        raise _refuse(directory, f"scheduler variance_type {variance!r} (learned variance) is "
                                 f"not supported")
    steps = config.get("num_train_timesteps", 1000)
    if not isinstance(steps, int) or steps < 2:
        raise _refuse(directory, f"scheduler num_train_timesteps {steps!r} is not an integer "
                                 f">= 2")
    schedule = {k: config[k] for k in NOISE_SCHEDULE_KEYS if config.get(k) is not None}
    from diffusers import DDPMScheduler

    try:
        DDPMScheduler(num_train_timesteps=steps, **schedule)
    except (NotImplementedError, ValueError, TypeError) as exc:
        raise _refuse(directory, f"scheduler noise schedule not supported ({exc})") from None
    return {"num_train_steps": steps, "noise_schedule": schedule, "prediction_type": kind}


def _load_file(directory: Path, path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as exc:  # a corrupt file: any error of the reader
            raise _refuse(directory, f"{path.relative_to(directory)} is not a readable "
                                     f"safetensors file ({exc})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError and friends: refuse, never unpickle more
        raise _refuse(directory, f"{path.relative_to(directory)} cannot be read with "
                                 f"torch.load(weights_only=True) ({type(exc).__name__}); "
                                 f"convert it to safetensors") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise _refuse(directory, f"{path.relative_to(directory)} is not a state dict of tensors")
    return state


def _read_weights(directory: Path, unet_dir: Path) -> dict[str, Tensor]:
    """The UNet's tensors: safetensors (single or sharded), else a weights-only .bin."""
    for suffix in (".safetensors", ".bin"):
        single = unet_dir / f"{WEIGHTS}{suffix}"
        if single.is_file():
            return _load_file(directory, single)
        index = unet_dir / f"{WEIGHTS}{suffix}.index.json"
        if index.is_file():
            weight_map = _read_json(directory, index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise _refuse(directory, f"{index.relative_to(directory)} has no weight_map")
            state: dict[str, Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                shard_path = (unet_dir / str(shard)).resolve()
                if shard_path.parent != unet_dir.resolve():
                    raise _refuse(directory, f"shard {shard!r} lies outside unet/")
                state.update(_load_file(directory, shard_path))
            return state
    found = sorted(p.name for p in unet_dir.iterdir()) if unet_dir.is_dir() else []
    raise _refuse(directory, f"no unet/{WEIGHTS}.safetensors or .bin (unet/ holds {found})")


def diffusers_pipeline(directory: Path | str, *, null_label: bool = False, levels: int = 256,
                       sampling_steps: int = 20, invariant_batch: int = 8) -> DiffusionModel:
    """A ``DiffusionModel`` holding the pipeline's UNet and noising process (eval mode).

    Args:
        directory: the pipeline directory (``save_pretrained`` layout).
        null_label: class-conditional UNets: the last class embedding is the
            unconditional label it was trained with (label dropout), which enables
            classifier-free guidance; without it every call needs labels or draws them.
        levels: values per pixel of the data it models (256: 8-bit images).
        sampling_steps: default solver steps of a call.
        invariant_batch: the UNet runs on chunks of this many rows, so a sample's bits do
            not depend on its batch-mates (0: off, faster for single samples).

    Raises:
        InvalidArgument: an unsupported or unreadable pipeline, one line naming what.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise _refuse(directory, "not a directory")
    _check_index(directory, _read_json(directory, directory / "model_index.json"))
    unet = _read_json(directory, directory / "unet" / "config.json")
    channels, size, embeds = _check_unet(directory, unet)
    schedule = _check_scheduler(directory,
                                _read_json(directory, directory / "scheduler" / "scheduler_config.json"))
    if null_label and embeds < 2:
        raise _refuse(directory, "null_label needs a class-conditional UNet (num_class_embeds "
                                 ">= 2)")
    state = _read_weights(directory, directory / "unet")
    try:
        config = DiffusionConfig(
            channels=channels, image_size=size, levels=levels,
            num_classes=embeds - 1 if null_label else embeds, null_label=null_label or not embeds,
            sampling_steps=min(sampling_steps, schedule["num_train_steps"]),
            invariant_batch=invariant_batch,
            unet={k: v for k, v in unet.items() if not k.startswith("_")}, **schedule)
        with torch.device("meta"):  # the config's size, allocating nothing
            wanted = sum(p.numel() for p in DiffusionModel(config).net.parameters())
        # a config larger than its weights is refused before it is built (a hostile or
        # mistaken config.json could otherwise ask for terabytes)
        if wanted != sum(v.numel() for v in state.values()):
            raise _refuse(directory, f"unet weights do not fit its config ({wanted:,} "
                                     f"parameters in the config, "
                                     f"{sum(v.numel() for v in state.values()):,} in the weights)")
        model = DiffusionModel(config)
    except (ValueError, TypeError) as exc:
        raise _refuse(directory, f"unet config not supported ({exc})") from None
    try:
        model.net.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:2] or [str(exc)]
        raise _refuse(directory, f"unet weights do not fit its config ({first[0].strip()})"
                      ) from None
    return model.eval()
