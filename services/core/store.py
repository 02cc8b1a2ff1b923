"""The model store: versioned checkpoints on a local directory.

Layout::

    <root>/<name>/v000001/model.safetensors   weights (safetensors: nothing is unpickled)
    <root>/<name>/v000001/meta.json           family, config, data, metrics, version, created,
                                              weights: {file, bytes, sha256}

A version is written to a temporary directory beside the others and renamed into place,
so a reader sees a complete version or none; version numbers only grow. Names are
``[a-z0-9][a-z0-9_.-]*``; a model is addressed as ``name`` (latest) or ``name@version``.

Integrity: meta.json records the size and sha256 of the weights, written before the
rename. ``problems`` tells what is wrong with a version (malformed meta, missing or
partial weights, a checksum mismatch); such a version is *broken*: ``name`` resolves to
the latest intact version, loading a broken one raises CheckpointError naming it, and
``genfleet models`` lists it as broken. Versions written before checksums existed carry
no ``weights`` entry and stay loadable.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from services.core.errors import CheckpointError, InvalidArgument, ModelNotFound
from services.core.options import show

if TYPE_CHECKING:  # torch is imported by the calls that move tensors, not by the gateway
    import torch

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


def check_name(name: str, what: str = "model") -> str:
    """``name`` if it is a valid store name (also the rule for run and output names).

    Raises:
        InvalidArgument: naming the field ``what``.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidArgument(what, f"{what} names match {_NAME.pattern}, got {show(name)}")
    return name


def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


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
    weights: dict[str, Any] = field(default_factory=dict)  # file, bytes, sha256 ({}: older)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "version": self.version, "family": self.family,
            "config": self.config, "data": self.data, "metrics": self.metrics,
            "training": self.training, "created": self.created, "weights": self.weights,
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
        """``name`` (its latest intact version) or ``name@version`` -> (name, version).

        Raises:
            ModelNotFound: no such model or version.
            CheckpointError: ``name`` has versions, but every one is broken.
        """
        name, version = parse_ref(ref)
        versions = self.versions(name)
        if not versions:
            known = self.names()
            raise ModelNotFound(f"no model named {name!r} in {self.root} (known: {known})")
        if version is None:
            for candidate in reversed(versions):
                if not self.problems(name, candidate):
                    return name, candidate
            raise CheckpointError(f"every version of {name} in {self.root} is broken "
                                  f"({self.problems(name, versions[-1])[0]})")
        if version not in versions:
            raise ModelNotFound(f"model {name!r} has no version {version} (has {versions})")
        return name, version

    def _read_meta(self, name: str, version: int) -> Checkpoint:
        path = self._version_dir(name, version)
        where = f"{name}@{version} ({path / META})"
        try:
            raw = json.loads((path / META).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{where}: unreadable metadata ({exc})") from exc
        if not isinstance(raw, dict):
            raise CheckpointError(f"{where}: metadata is not a JSON object")
        kinds: dict[str, type | tuple[type, ...]] = {
            "family": str, "config": dict, "data": dict, "metrics": dict, "training": dict,
            "created": (int, float), "weights": dict}
        missing = [k for k in ("family", "config") if k not in raw]
        wrong = [k for k, t in kinds.items() if k in raw and not isinstance(raw[k], t)]
        if missing or wrong:
            raise CheckpointError(f"{where}: malformed metadata (missing {missing}, "
                                  f"wrong type {wrong})")
        return Checkpoint(
            name=name, version=version, family=raw["family"], config=raw["config"],
            data=raw.get("data", {}), metrics=raw.get("metrics", {}),
            training=raw.get("training", {}), created=float(raw.get("created", 0.0)),
            path=path, weights=raw.get("weights", {}),
        )

    def meta(self, ref: str) -> Checkpoint:
        """Metadata of a version (see ``resolve``).

        Raises:
            ModelNotFound: no such model or version.
            CheckpointError: the metadata is unreadable or malformed.
        """
        return self._read_meta(*self.resolve(ref))

    def problems(self, name: str, version: int, *, checksum: bool = False) -> list[str]:
        """What is wrong with a version ([] : intact). Without ``checksum`` only what is
        cheap to see (metadata, presence and size of the weights)."""
        try:
            meta = self._read_meta(name, version)
        except CheckpointError as exc:
            return [str(exc)]
        weights = meta.path / WEIGHTS
        if not weights.is_file():
            return [f"{meta.ref}: weights file {weights} is missing"]
        expected = meta.weights
        if not expected:
            return []  # written before checksums: nothing to compare
        size = weights.stat().st_size
        if size != expected.get("bytes"):
            return [f"{meta.ref}: weights are {size} bytes, metadata says {expected.get('bytes')} "
                    f"(partial or replaced file)"]
        if checksum and file_digest(weights)[1] != expected.get("sha256"):
            return [f"{meta.ref}: weights do not match their sha256 in the metadata"]
        return []

    def verify(self, ref: str) -> Checkpoint:
        """The metadata of an intact version, checksum included.

        Raises:
            ModelNotFound: no such model or version.
            CheckpointError: the version is broken; the message says why.
        """
        name, version = self.resolve(ref)
        problems = self.problems(name, version, checksum=True)
        if problems:
            raise CheckpointError(f"{name}@{version} is broken and is never served: {problems[0]}")
        return self._read_meta(name, version)

    def list(self) -> list[Checkpoint]:
        """The latest intact version of every model (see ``resolve``)."""
        out = []
        for name in self.names():
            try:
                out.append(self.meta(name))
            except CheckpointError:
                continue  # every version broken: ``problems`` tells why
        return out

    def load_state(self, ref: str) -> tuple[Checkpoint, dict[str, torch.Tensor]]:
        """Metadata and weights of an intact version (safetensors only; nothing is
        unpickled); the weights' checksum is verified first.

        Raises:
            ModelNotFound: no such model or version.
            CheckpointError: the version is broken or its weights are unreadable.
        """
        meta = self.verify(ref)
        try:
            from safetensors.torch import load_file

            state = load_file(meta.path / WEIGHTS)
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"{meta.ref} ({meta.path / WEIGHTS}): unreadable weights "
                                  f"({exc})") from exc
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
            from safetensors.torch import save_file

            save_file(tensors, tmp / WEIGHTS)
            size, sha256 = file_digest(tmp / WEIGHTS)
            weights = {"file": WEIGHTS, "bytes": size, "sha256": sha256}
            while True:
                existing = self.versions(name)
                version = (existing[-1] + 1) if existing else 1
                meta = Checkpoint(name, version, family, config, data or {}, metrics or {},
                                  training or {}, created=time.time(), weights=weights)
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
