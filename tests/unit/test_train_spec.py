"""Training settings (both --local and the Ray Train job): the train YAML, command-line
overrides, and their checks (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.core.errors import InvalidArgument
from services.training.spec import spec_from_config


def test_yaml_defaults_then_family_section_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("defaults: {workers: 3, train: {lr: 0.01}, model: {width: 8}}\n"
                    "families: {vae: {workers: 4, train: {epochs: 9}}}\n")
    spec = spec_from_config("vae", path=path, train={"epochs": 2}, model={"hidden": 16},
                            workers=None)
    assert spec.workers == 4 and spec.name == "vae" and spec.job == "vae"
    assert spec.train_overrides == {"lr": 0.01, "epochs": 2}
    assert spec.config_overrides == {"width": 8, "hidden": 16}


def test_gpu_workers_use_bf16_autocast_unless_told_otherwise() -> None:
    assert spec_from_config("gan", name="g").train_config()["amp"] is False
    assert spec_from_config("gan", name="g", gpus_per_worker=1).train_config()["amp"] is True
    assert spec_from_config("gan", name="g", gpus_per_worker=1,
                            train={"amp": False}).train_config()["amp"] is False


def test_the_shipped_config_covers_every_family() -> None:
    from services.models import BUILTIN as FAMILIES

    for family in FAMILIES:
        assert spec_from_config(family).family == family


@pytest.mark.parametrize(("yaml_text", "problem"), [
    ("defaults: {wokers: 2}\n", "unknown keys \\['wokers'\\]"),
    ("families: {vae: {gpus: 1}}\n", "families.vae"),
])
def test_unknown_keys_are_named(tmp_path: Path, yaml_text: str, problem: str) -> None:
    path = tmp_path / "train.yaml"
    path.write_text(yaml_text)
    with pytest.raises(InvalidArgument, match=problem):
        spec_from_config("vae", path=path)
