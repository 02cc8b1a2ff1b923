"""The model zoo: six generative families behind one interface (see ``base``), and any
family a Python package registers as a plugin.

Adding a built-in family: one file, one row in ``BUILTIN``, one tiny config in the tests.
A plugin family: a package with an entry point in the ``genfleet.families`` group,
``name = package.module:Class`` where ``Class`` is a ``GenerativeModel`` whose ``family``
is ``name``; it is listed in ``FAMILIES`` and imported only when used. A plugin that takes
a built-in's name is ignored (``PLUGIN_PROBLEMS`` says so); one that fails to import fails
only when that family is used, with one error naming the entry point.
Model code imports only torch, its model libraries and ``services.core.errors``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from services.core.errors import CheckpointError, InvalidArgument
from services.core.options import OptionSpec
from services.core.store import Checkpoint, ModelStore
from services.models.base import (
    PRESET_SHAPES,
    Capability,
    GenerativeModel,
    LossOutput,
    ModelConfig,
    Preset,
    ScoreKind,
)
from services.models.noise import Noise, sample_seed, sample_seeds

# family -> (module, class). Imported lazily: a process that serves one family loads one.
BUILTIN: dict[str, tuple[str, str]] = {
    "autoregressive": ("services.models.autoregressive", "AutoregressiveModel"),
    "diffusion": ("services.models.diffusion", "DiffusionModel"),
    "ebm": ("services.models.ebm", "EnergyModel"),
    "flow": ("services.models.flow", "FlowModel"),
    "gan": ("services.models.gan", "GANModel"),
    "vae": ("services.models.vae", "VAEModel"),
}
PLUGIN_GROUP = "genfleet.families"


def _describe(entry: importlib.metadata.EntryPoint) -> str:
    dist = getattr(entry, "dist", None)
    package = f" (package {dist.name})" if dist is not None else ""
    return f"entry point '{entry.name} = {entry.value}' in group {PLUGIN_GROUP}{package}"


def discover(entries: Iterable[importlib.metadata.EntryPoint]
             ) -> tuple[dict[str, tuple[str, str]], dict[str, str], list[str]]:
    """Plugin families from entry points: (family -> (module, class), family -> the entry
    point's description, problems). Nothing is imported here."""
    found: dict[str, tuple[str, str]] = {}
    where: dict[str, str] = {}
    problems: list[str] = []
    for entry in entries:
        module, _, attr = entry.value.partition(":")
        if entry.name in BUILTIN:
            problems.append(f"{_describe(entry)}: {entry.name!r} is a built-in family; the "
                            f"plugin is ignored (give it another name)")
        elif entry.name in found:
            problems.append(f"{_describe(entry)}: {entry.name!r} is registered twice (also "
                            f"{where[entry.name]}); the second is ignored")
        elif not attr or not module:
            problems.append(f"{_describe(entry)}: the value must be 'package.module:Class'; "
                            f"ignored")
        else:
            found[entry.name] = (module, attr)
            where[entry.name] = _describe(entry)
    return found, where, problems


PLUGINS, _PLUGIN_SOURCES, PLUGIN_PROBLEMS = discover(
    importlib.metadata.entry_points(group=PLUGIN_GROUP))
# every family this process knows: the built-ins, then the plugins
FAMILIES: dict[str, tuple[str, str]] = {**BUILTIN, **PLUGINS}


def family_source(family: str) -> str:
    """Where ``family`` comes from: "built-in", or its plugin entry point."""
    return "built-in" if family in BUILTIN else _PLUGIN_SOURCES.get(family, "unknown")


def model_class(family: str) -> type[GenerativeModel]:
    """The class of ``family`` (a plugin's is imported on first use).

    Raises:
        InvalidArgument: ``family`` is not in ``FAMILIES``, or its plugin fails to import or
            is not a ``GenerativeModel`` of that family (the message names the entry point).
    """
    if family not in FAMILIES:
        hint = f"; plugin problems: {PLUGIN_PROBLEMS}" if PLUGIN_PROBLEMS else ""
        raise InvalidArgument("family", f"unknown family {family!r}; known: {sorted(FAMILIES)}"
                                        f"{hint}")
    module, cls = FAMILIES[family]
    if family in BUILTIN:
        klass = getattr(importlib.import_module(module), cls)
        assert issubclass(klass, GenerativeModel)
        return klass
    where = _PLUGIN_SOURCES[family]
    try:
        klass = getattr(importlib.import_module(module), cls)
    except Exception as exc:  # any failure of someone else's import: one clear line
        raise InvalidArgument("family", f"plugin {family!r} failed to load from {where}: "
                                        f"{type(exc).__name__}: {exc}") from None
    if not (isinstance(klass, type) and issubclass(klass, GenerativeModel)):
        raise InvalidArgument("family", f"plugin {family!r} from {where} is not a "
                                        f"services.models.GenerativeModel subclass")
    if getattr(klass, "family", None) != family:
        raise InvalidArgument("family", f"plugin {family!r} from {where}: its class says "
                                        f"family = {getattr(klass, 'family', None)!r}; they "
                                        f"must match")
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
    "BUILTIN",
    "FAMILIES",
    "PLUGIN_GROUP",
    "PLUGIN_PROBLEMS",
    "PRESET_SHAPES",
    "Capability",
    "GenerativeModel",
    "LossOutput",
    "ModelConfig",
    "Noise",
    "OptionSpec",
    "Preset",
    "ScoreKind",
    "build",
    "discover",
    "family_source",
    "load_model",
    "model_class",
    "sample_seed",
    "sample_seeds",
]
