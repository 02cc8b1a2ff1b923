"""The model store: versioned checkpoints on a local directory.

Layout::

    <root>/<name>/v000001/model.safetensors   weights (safetensors: nothing is unpickled)
    <root>/<name>/v000001/meta.json           family, config, data, metrics, version, created

A version is written to a temporary directory beside the others and renamed into place,
so a reader sees a complete version or none; version numbers only grow. Names are
``[a-z0-9][a-z0-9_.-]*``; a model is addressed as ``name`` (latest) or ``name@version``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from services.core.errors import CheckpointError, InvalidArgument, ModelNotFound

WEIGHTS = "model.safetensors"
META = "meta.json"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_VERSION_DIR = re.compile(r"^v(\d{6})$")


def default_root() -> Path:
    """``$GENFLEET_STORE`` or ``~/.genfleet/store``."""
    return Path(os.environ.get("GENFLEET_STORE", "~/.genfleet/store")).expanduser()


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``name`` or ``name@version`` -> (name, version or None for latest).

    Raises:
        InvalidArgument: a malformed name or version.
    """
    name, sep, version = ref.partition("@")
    check_name(name)
    if not sep:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise InvalidArgument("model", f"version must be a positive integer, got {version!r}")
    return name, int(version)


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidArgument("model", f"model names match {_NAME.pattern}, got {name!r}")
    return name


@dataclass
class Checkpoint:
    """Metadata of one stored version (weights are loaded on demand)."""

    name: str
    version: int
    family: str
    config: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    path: Path = Path()

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "version": self.version, "family": self.family,
            "config": self.config, "data": self.data, "metrics": self.metrics,
            "training": self.training, "created": self.created,
        }


class ModelStore:
    """Versioned checkpoints under ``root`` (see the module docstring)."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()

    # ------------------------------------------------------------------ reading
    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and _NAME.match(p.name) and self.versions(p.name))

    def versions(self, name: str) -> list[int]:
        d = self.root / check_name(name)
        if not d.is_dir():
            return []
        found = (_VERSION_DIR.match(p.name) for p in d.iterdir())
        return sorted(int(m.group(1)) for m in found if m and (d / m.group(0) / META).exists())

    def resolve(self, ref: str) -> tuple[str, int]:
        """``name`` or ``name@version`` -> an existing (name, version).

        Raises:
            ModelNotFound: no such model or version.
        """
        name, version = parse_ref(ref)
        versions = self.versions(name)
        if not versions:
            known = self.names()
            raise ModelNotFound(f"no model named {name!r} in {self.root} (known: {known})")
        if version is None:
            return name, versions[-1]
        if version not in versions:
            raise ModelNotFound(f"model {name!r} has no version {version} (has {versions})")
        return name, version

    def meta(self, ref: str) -> Checkpoint:
        name, version = self.resolve(ref)
        path = self._version_dir(name, version)
        try:
            raw = json.loads((path / META).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path / META}: unreadable metadata ({exc})") from exc
        return Checkpoint(
            name=name, version=version, family=raw["family"], config=raw["config"],
            data=raw.get("data", {}), metrics=raw.get("metrics", {}),
            training=raw.get("training", {}), created=raw.get("created", 0.0), path=path,
        )

    def list(self) -> list[Checkpoint]:
        """The latest version of every model."""
        return [self.meta(n) for n in self.names()]

    def load_state(self, ref: str) -> tuple[Checkpoint, dict[str, torch.Tensor]]:
        """Metadata and weights (safetensors only; nothing is unpickled)."""
        meta = self.meta(ref)
        try:
            state = load_file(meta.path / WEIGHTS)
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"{meta.path / WEIGHTS}: unreadable weights ({exc})") from exc
        return meta, state

    # ------------------------------------------------------------------ writing
    def save(self, name: str, *, family: str, config: dict[str, Any],
             state: dict[str, torch.Tensor], data: dict[str, Any] | None = None,
             metrics: dict[str, Any] | None = None, training: dict[str, Any] | None = None
             ) -> Checkpoint:
        """Write a new version atomically and return its metadata."""
        check_name(name)
        model_dir = self.root / name
        model_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=model_dir))
        try:
            tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
            save_file(tensors, tmp / WEIGHTS)
            while True:
                existing = self.versions(name)
                version = (existing[-1] + 1) if existing else 1
                meta = Checkpoint(name, version, family, config, data or {}, metrics or {},
                                  training or {}, created=time.time())
                (tmp / META).write_text(json.dumps(meta.to_json(), indent=2, sort_keys=True))
                for f in (tmp / WEIGHTS, tmp / META):
                    with f.open("rb") as fh:
                        os.fsync(fh.fileno())
                try:
                    os.rename(tmp, self._version_dir(name, version))  # atomic on one filesystem
                    break
                except OSError:
                    if self._version_dir(name, version).exists():
                        continue  # a concurrent writer took this number: take the next
                    raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        meta.path = self._version_dir(name, version)
        return meta

    def update_metrics(self, ref: str, metrics: dict[str, Any]) -> Checkpoint:
        """Merge ``metrics`` into a version's metadata (atomic replace of meta.json)."""
        meta = self.meta(ref)
        meta.metrics = {**meta.metrics, **metrics}
        tmp = meta.path / f".{META}.tmp"
        tmp.write_text(json.dumps(meta.to_json(), indent=2, sort_keys=True))
        os.replace(tmp, meta.path / META)
        return meta

    def _version_dir(self, name: str, version: int) -> Path:
        return self.root / name / f"v{version:06d}"


def load_model(store: ModelStore, ref: str, device: torch.device | str = "cpu"
               ) -> tuple[Any, Checkpoint]:
    """Build the model a checkpoint describes and load its weights (eval mode).

    Returns:
        (GenerativeModel, Checkpoint).

    Raises:
        ModelNotFound: unknown name or version.
        CheckpointError: unreadable files, or weights that do not fit the config.
    """
    from services.models import build  # core must not import models at module level

    meta, state = store.load_state(ref)
    try:
        model = build(meta.family, meta.config)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, InvalidArgument, TypeError, ValueError) as exc:
        raise CheckpointError(f"{meta.path}: weights do not fit {meta.family} config ({exc})"
                              ) from exc
    return model.to(device).eval(), meta
