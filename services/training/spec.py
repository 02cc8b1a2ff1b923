"""What to train, and the one path its settings take: ``cluster/configs/train.yaml``
(``defaults``, then the family's section), then command-line flags. ``genfleet train
--local`` and the Ray Train job both start from a ``TrainSpec``; ``prepare`` turns it into
the data, model config and ``TrainConfig`` that both loops train with.

Names (model and run) are checked here, by the store's rule, before any work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from services.core import data as datasets
from services.core.errors import InvalidArgument
from services.core.store import check_name
from services.models import FAMILIES, ModelConfig, Preset, model_class
from services.training.loop import TrainConfig

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "cluster" / "configs" / "train.yaml"
_SPEC_KEYS = {"data", "preset", "workers", "cpus_per_worker", "gpus_per_worker", "threads_per_worker",
              "max_failures", "model", "train"}


@dataclass
class TrainSpec:
    """A training run: the model, its data, overrides, and (Ray Train) the workers."""

    family: str
    name: str  # model name in the store
    job: str = ""  # Ray Train run name (default: ``name``); a re-run of it resumes
    data: str = "digits"
    preset: str = ""  # the family's named sizes; "": the preset named after the data's shape
    workers: int = 2
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    threads_per_worker: int = 1
    max_failures: int = 3
    config_overrides: dict[str, Any] = field(default_factory=dict)  # the family's Config
    train_overrides: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise InvalidArgument("family", f"unknown family {self.family!r} "
                                            f"(known: {sorted(FAMILIES)})")
        self.job = self.job or self.name
        check_name(self.name)
        check_name(self.job, "job")
        if self.preset and self.preset not in (presets := model_class(self.family).presets):
            raise InvalidArgument("preset", f"{self.family} has no preset {self.preset!r} "
                                            f"(has: {sorted(presets)})")
        if self.workers < 1:
            raise InvalidArgument("workers", f"must be >= 1, got {self.workers}")
        if self.gpus_per_worker < 0 or self.cpus_per_worker < 0:
            raise InvalidArgument("gpus_per_worker", "resources per worker must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def train_config(self, *, distributed: bool = True) -> dict[str, Any]:
        """``TrainConfig`` overrides; a Ray job on GPU workers uses bf16 autocast unless
        ``amp`` is set."""
        amp = {"amp": self.gpus_per_worker > 0} if distributed else {}
        return {**amp, **self.train_overrides}


def model_config(family: str, data: datasets.Dataset,
                 overrides: Mapping[str, Any] | None = None) -> ModelConfig:
    """The family's default config, fitted to ``data``'s shape, then ``overrides``."""
    klass = model_class(family)
    fields = {f.name for f in dataclasses.fields(klass.Config)}
    values: dict[str, Any] = {}
    if data.kind == "text":
        if "data_kind" not in fields:
            raise InvalidArgument("data", f"{family} models images; text needs autoregressive")
        values.update(data_kind="text", seq_len=data.shape[0], levels=data.levels, num_classes=0)
    else:
        c, h, w = data.shape
        if h != w:
            raise InvalidArgument("data", f"images must be square, got {h}x{w}")
        values.update(channels=c, image_size=h, levels=data.levels, num_classes=data.num_classes)
    values.update(overrides or {})
    return klass.Config.from_dict(values)


def choose_preset(family: str, data: datasets.Dataset, name: str = "") -> tuple[str, Preset]:
    """The family's preset ``name``, or (``""``) the one sized for ``data``'s shape
    (``("", Preset())`` when none is: the family's defaults)."""
    presets = model_class(family).presets
    if name:
        if name not in presets:
            raise InvalidArgument("preset", f"{family} has no preset {name!r} "
                                            f"(has: {sorted(presets)})")
        return name, presets[name]
    if data.kind == "image":
        for key, preset in presets.items():
            if tuple(preset.shape) == tuple(data.shape):
                return key, preset
    return "", Preset((0, 0, 0))


@dataclass
class Prepared:
    """What both loops train with."""

    data: datasets.Dataset
    splits: datasets.Splits
    config: ModelConfig
    train: TrainConfig
    preset: str = ""


def prepare(spec: TrainSpec, *, distributed: bool = True) -> Prepared:
    """Load the data; fit the family's config to it, then its preset (``choose_preset``),
    then ``config_overrides``; the family's training defaults, the preset's, then
    ``train_overrides``.

    Raises:
        InvalidArgument: a bad data spec, config or training option.
    """
    data = datasets.load(spec.data)
    name, preset = choose_preset(spec.family, data, spec.preset)
    config = model_config(spec.family, data, {**preset.model, **spec.config_overrides})
    train = TrainConfig.for_family(model_class(spec.family),
                                   **{**preset.train, **spec.train_config(distributed=distributed)})
    return Prepared(data, datasets.split(data), config, train, name)


def spec_from_config(family: str, *, path: Path | str | None = None,
                     **overrides: Any) -> TrainSpec:
    """A run of ``family`` from the train YAML (defaults, then the family's section),
    then ``overrides`` (None values ignored; ``model``/``train`` maps are merged).

    Raises:
        InvalidArgument: unknown keys in the file; an unknown family or a bad name
            (``TrainSpec``).
    """
    raw = yaml.safe_load(Path(path or DEFAULT_CONFIG).read_text()) or {}
    merged: dict[str, Any] = {"model": {}, "train": {}}
    for section, where in ((raw.get("defaults") or {}, "defaults"),
                           ((raw.get("families") or {}).get(family) or {}, f"families.{family}")):
        unknown = sorted(set(section) - _SPEC_KEYS)
        if unknown:
            raise InvalidArgument(where, f"unknown keys {unknown} (known: {sorted(_SPEC_KEYS)})")
        for key, value in section.items():
            merged[key] = {**merged[key], **value} if key in ("model", "train") else value
    for key, value in overrides.items():
        if value is None:
            continue
        merged[key] = {**merged.get(key, {}), **value} if key in ("model", "train") else value
    model, train = merged.pop("model"), merged.pop("train")
    name = merged.pop("name", None) or family
    return TrainSpec(family=family, name=name, config_overrides=model, train_overrides=train,
                     **merged)
