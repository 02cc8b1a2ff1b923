"""The model zoo: six generative families behind one interface (see ``base``).

Adding a family: one file, one row in ``FAMILIES``, one tiny config in the tests.
Model code imports only torch, its model libraries and ``services.core.errors``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import torch

from services.core.errors import CheckpointError, InvalidArgument
from services.core.options import OptionSpec
from services.core.store import Checkpoint, ModelStore
from services.models.base import Capability, GenerativeModel, LossOutput, ModelConfig, ScoreKind
from services.models.noise import Noise, sample_seed, sample_seeds

# family -> (module, class). Imported lazily: a process that serves one family loads one.
FAMILIES: dict[str, tuple[str, str]] = {
    "autoregressive": ("autoregressive", "AutoregressiveModel"),
    "diffusion": ("diffusion", "DiffusionModel"),
    "ebm": ("ebm", "EnergyModel"),
    "flow": ("flow", "FlowModel"),
    "gan": ("gan", "GANModel"),
    "vae": ("vae", "VAEModel"),
}


def model_class(family: str) -> type[GenerativeModel]:
    """The class of ``family``.

    Raises:
        InvalidArgument: ``family`` is not in ``FAMILIES``.
    """
    if family not in FAMILIES:
        raise InvalidArgument("family", f"unknown family {family!r}; known: {sorted(FAMILIES)}")
    module, cls = FAMILIES[family]
    klass = getattr(importlib.import_module(f"services.models.{module}"), cls)
    assert issubclass(klass, GenerativeModel)
    return klass


def build(family: str, config: ModelConfig | Mapping[str, Any] | None = None) -> GenerativeModel:
    """A fresh model of ``family`` from a config object or dict (defaults when None)."""
    klass = model_class(family)
    if config is None:
        config = klass.Config()
    elif not isinstance(config, ModelConfig):
        config = klass.Config.from_dict(config)
    return klass(config)


def load_model(store: ModelStore, ref: str, device: torch.device | str = "cpu"
               ) -> tuple[GenerativeModel, Checkpoint]:
    """Build the model a stored checkpoint describes and load its weights (eval mode).

    The store hands out metadata and tensors; building the model is this package's job.

    Raises:
        ModelNotFound: unknown name or version.
        CheckpointError: unreadable files, or weights that do not fit the config.
    """
    meta, state = store.load_state(ref)
    try:
        model = build(meta.family, meta.config)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, InvalidArgument, TypeError, ValueError) as exc:
        raise CheckpointError(f"{meta.path}: weights do not fit {meta.family} config ({exc})"
                              ) from exc
    return model.to(device).eval(), meta


__all__ = [
    "FAMILIES",
    "Capability",
    "GenerativeModel",
    "LossOutput",
    "ModelConfig",
    "Noise",
    "OptionSpec",
    "ScoreKind",
    "build",
    "load_model",
    "model_class",
    "sample_seed",
    "sample_seeds",
]
