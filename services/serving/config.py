"""Serve configuration: ``cluster/configs/serve.yaml`` parsed and validated (no Ray).

The same structure is the desired state that ``genfleet scale`` / ``genfleet deploy``
edit and re-apply, so a later change never reverts an earlier one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from services.core.api import Limits
from services.core.errors import InvalidArgument
from services.core.store import check_name

REQUESTS_POLICY = "services.serving.autoscaling:requests_policy"
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "cluster" / "configs" / "serve.yaml"

_MODEL_KEYS = {"device", "autocast", "threads", "limits", "max_ongoing_requests",
               "max_queued_requests", "autoscaling_config", "ray_actor_options", "batching",
               "version", "warmup", "lane"}
_LIMIT_KEYS = {f.name for f in dataclasses.fields(Limits)}


@dataclass
class ModelServeConfig:
    name: str
    device: str = "auto"
    autocast: str | None = None
    threads: int = 1
    # per-request caps (api.Limits): max_samples_per_request, max_samples_per_stream,
    # max_examples_per_request, max_work_per_request; unset keys take Limits' defaults
    limits: dict[str, int] = field(default_factory=dict)
    max_ongoing_requests: int = 32
    max_queued_requests: int = 64
    autoscaling_config: dict[str, Any] = field(default_factory=lambda: {
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8})
    ray_actor_options: dict[str, Any] = field(default_factory=lambda: {"num_cpus": 0.25})
    batching: dict[str, Any] = field(default_factory=lambda: {
        "max_batch_size": 32, "batch_wait_timeout_s": 0.005})
    version: int | None = None  # None: the latest in the store when deployed
    warmup: bool = True  # run a synthetic batch before a replica (or a rollout) serves
    lane: bool = True  # gateways send Generate groups straight to replicas (serving/lane.py)

    def validate(self) -> None:
        check_name(self.name)
        unknown = set(self.limits) - _LIMIT_KEYS
        if unknown:
            raise InvalidArgument(f"{self.name}.limits", f"unknown keys {sorted(unknown)}; "
                                                         f"known: {sorted(_LIMIT_KEYS)}")
        try:
            Limits(**self.limits)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{self.name}.limits.{exc.field}",
                                  str(exc).split(": ", 1)[1]) from None
        scaling = self.autoscaling_config
        lo, hi = int(scaling.get("min_replicas", 1)), int(scaling.get("max_replicas", 1))
        if not 0 <= lo <= hi or hi < 1:
            raise InvalidArgument(f"{self.name}.autoscaling_config",
                                  f"need 0 <= min_replicas <= max_replicas, max >= 1; got {lo}, {hi}")
        if self.max_queued_requests < 1 and self.max_queued_requests != -1:
            raise InvalidArgument(f"{self.name}.max_queued_requests", "must be >= 1 (or -1)")
        if int(self.batching.get("max_batch_size", 1)) < 1:
            raise InvalidArgument(f"{self.name}.batching.max_batch_size", "must be >= 1")
        if float(self.ray_actor_options.get("num_gpus", 0)) < 0:
            raise InvalidArgument(f"{self.name}.ray_actor_options.num_gpus", "must be >= 0")
        if self.autocast not in (None, "bf16", "fp16"):
            raise InvalidArgument(f"{self.name}.autocast", "must be bf16, fp16 or null")

    def user_config(self) -> dict[str, Any]:
        """What the replicas' ``reconfigure`` receives (changeable without a restart): the
        version, dynamic batching, and the admission limits the gateway enforces in
        requests (Serve's own limits count handle calls, and a coalesced group is one)."""
        return {"version": self.version, **self.batching,
                "max_ongoing_requests": self.max_ongoing_requests,
                "max_queued_requests": self.max_queued_requests}

    def autoscaling(self) -> dict[str, Any]:
        """``autoscaling_config`` for Serve: scaled on requests held by the replicas
        (``services.serving.autoscaling.requests_policy``) unless a policy is given."""
        out = dict(self.autoscaling_config)
        if out.get("min_replicas") != out.get("max_replicas"):
            out.setdefault("policy", {"policy_function": REQUESTS_POLICY})
        return out


@dataclass
class ServeConfig:
    app_name: str = "genfleet"
    models: dict[str, ModelServeConfig] = field(default_factory=dict)

    def model(self, name: str) -> ModelServeConfig:
        if name not in self.models:
            raise InvalidArgument("model", f"{name!r} is not served; served: {sorted(self.models)}")
        return self.models[name]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ServeConfig:
        """The inverse of ``to_dict`` (validated).

        Raises:
            InvalidArgument: missing or unknown keys, bad values.
        """
        try:
            out = cls(str(raw["app_name"]),
                      {k: ModelServeConfig(**v) for k, v in dict(raw["models"]).items()})
        except (KeyError, TypeError) as exc:
            raise InvalidArgument("config", f"not a serve config: {exc}") from exc
        for model in out.models.values():
            model.validate()
        return out

    @classmethod
    def from_json(cls, text: str) -> ServeConfig:
        return cls.from_dict(json.loads(text))


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` laid over ``base``, mappings merged key by key (neither is modified)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: Path | str | None = None, *, models: list[str] | None = None
                ) -> ServeConfig:
    """Parse a serve YAML; ``models`` restricts it to those names (in that order).

    Raises:
        InvalidArgument: unknown keys, bad values, or a requested model not in the file.
    """
    return parse_config(read_yaml(path), origin=str(path or DEFAULT_CONFIG), models=models)


def read_yaml(path: Path | str | None = None) -> dict[str, Any]:
    """A serve YAML as a mapping (``DEFAULT_CONFIG`` when ``path`` is None)."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidArgument("config", f"{path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise InvalidArgument("config", f"{path}: expected a mapping at the top level")
    return raw


def parse_config(raw: dict[str, Any], *, origin: str = "config",
                 models: list[str] | None = None) -> ServeConfig:
    """Validate a serve YAML's content (see ``load_config``)."""
    path = origin
    unknown_top = set(raw) - {"app_name", "defaults", "models"}
    if unknown_top:
        raise InvalidArgument("config", f"{path}: unknown keys {sorted(unknown_top)}")
    defaults = raw.get("defaults", {}) or {}
    entries: dict[str, Any] = raw.get("models", {}) or {}
    unknown = set(defaults) - _MODEL_KEYS
    if unknown:
        raise InvalidArgument("config", f"{path}: unknown default keys {sorted(unknown)}")
    if models is not None:
        entries = {m: entries.get(m, {}) for m in models}
    out = ServeConfig(app_name=str(raw.get("app_name", "genfleet")))
    for name, own in entries.items():
        own = own or {}
        unknown = set(own) - _MODEL_KEYS
        if unknown:
            raise InvalidArgument("config", f"{path}: {name}: unknown keys {sorted(unknown)}")
        model = ModelServeConfig(name=name, **merge(defaults, own))
        model.validate()
        out.models[name] = model
    return out
