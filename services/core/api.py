"""Domain types of the serving API: what the gateway decodes protobuf into, what the Ray
Serve replicas take and return. Plain dataclasses and numpy arrays: no torch, grpc or ray.

Arrays: images are float32 ``(B, C, H, W)`` in [0, 1]; text is int64 ``(B, L)``; latents
are float32 ``(B, *latent_shape)``.
"""

from __future__ import annotations

import importlib
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from services.core import errors
from services.core.options import OptionSpec

_log = logging.getLogger("genfleet.errors")

Output = Literal["tensor", "png", "both"]
OUTPUTS: tuple[Output, ...] = ("tensor", "png", "both")


@dataclass(frozen=True)
class OptionInfo:
    name: str
    spec: OptionSpec


@dataclass(frozen=True)
class Limits:
    """Per-model caps on the cost of one request (DESIGN.md §8), set per model in
    ``serve.yaml``, reported by ListModels and checked before any work."""

    max_samples_per_request: int = 256     # Generate, and each GenerateStream message
    max_samples_per_stream: int = 65536    # a whole GenerateStream
    max_examples_per_request: int = 1024   # Score, Encode, Decode
    # examples (or samples) x the options that multiply work (steps, importance samples):
    # e.g. 256 diffusion samples at 1000 steps, or 1024 examples at 256 IWAE samples
    max_work_per_request: int = 262144

    def __post_init__(self) -> None:
        for name in ("max_samples_per_request", "max_samples_per_stream",
                     "max_examples_per_request", "max_work_per_request"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**31 - 1:
                raise errors.InvalidArgument(name, f"must be an integer in [1, 2^31 - 1], "
                                                   f"got {value!r}")
        if self.max_samples_per_stream < self.max_samples_per_request:
            raise errors.InvalidArgument("max_samples_per_stream",
                                         "must be >= max_samples_per_request")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    version: int
    capabilities: tuple[str, ...]
    sample_shape: tuple[int, ...]
    sample_dtype: str  # float32 or int64
    levels: int
    classes: tuple[str, ...]
    data_kind: str  # image or text
    sampler_options: tuple[OptionInfo, ...]
    score_options: tuple[OptionInfo, ...]
    score_kind: str | None
    latent_shape: tuple[int, ...] | None
    limits: Limits = field(default_factory=Limits)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Timings:
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    total_ms: float = 0.0


@dataclass
class GenerateRequest:
    model: str
    num_samples: int
    seed: int = 0
    labels: tuple[int, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    output: Output = "tensor"
    start_index: int = 0
    deadline: float | None = None  # absolute time.time(); work stops when it passes
    max_response_bytes: int | None = None  # the caller's message limit (None: no limit)


@dataclass
class Samples:
    """Samples out: a tensor and/or one PNG per image (one string per text sample)."""

    model: str
    version: int
    samples: np.ndarray | None
    png: list[bytes]
    text: list[str]
    timings: Timings


@dataclass
class GenerateResult(Samples):
    seeds: list[int]  # the per-sample seeds used
    labels: list[int]  # the labels requested (empty when none were given)
    start_index: int  # index of the first sample within the request


@dataclass
class DataRequest:
    """A request that carries examples: one row of ``data`` per example."""

    model: str
    data: np.ndarray
    labels: tuple[int, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    deadline: float | None = None
    max_response_bytes: int | None = None


@dataclass
class ScoreRequest(DataRequest):
    """The log-likelihood (or its bound, or an energy) of each example."""


@dataclass
class ScoreResult:
    model: str
    version: int
    log_prob: list[float]
    bits_per_dim: list[float]
    kind: str
    timings: Timings


@dataclass
class EncodeRequest(DataRequest):
    """The latent of each example."""


@dataclass
class EncodeResult:
    model: str
    version: int
    latents: np.ndarray
    timings: Timings


@dataclass
class DecodeRequest:
    model: str
    latents: np.ndarray
    labels: tuple[int, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    output: Output = "tensor"
    deadline: float | None = None
    max_response_bytes: int | None = None


@dataclass
class DecodeResult(Samples):
    """Samples decoded from latents."""


@dataclass
class BatchStatus:
    id: str
    state: str  # running | succeeded | failed | cancelled
    model: str
    version: int
    num_samples: int
    samples_written: int
    output_uri: str
    manifest_uri: str = ""
    error: str = ""
    created: float = 0.0
    finished: float = 0.0


@dataclass(frozen=True)
class ErrorResult:
    """A user-caused error carried as data across process boundaries (Ray, threads).

    ``error`` is the name of a class in ``services.core.errors``.
    """

    error: str
    message: str

    @classmethod
    def of(cls, exc: errors.GenfleetError) -> ErrorResult:
        """``exc`` as data, named by its nearest class in ``services.core.errors`` (a
        subclass defined elsewhere travels as that class)."""
        klass = next(k for k in type(exc).__mro__ if getattr(errors, k.__name__, None) is k)
        return cls(klass.__name__, str(exc))

    @classmethod
    def failure(cls, exc: BaseException, what: str) -> ErrorResult:
        """What a caller gets for ``exc`` raised while doing ``what``: a user error as it
        is; anything else is logged here with its traceback and a request id, and answered
        as Internal with that id (never a traceback on the wire)."""
        if isinstance(exc, errors.GenfleetError):
            return cls.of(exc)
        request_id = uuid.uuid4().hex[:12]
        _log.error("%s failed, request id %s", what, request_id, exc_info=exc)
        return cls.of(errors.Internal(f"{what} failed: internal error; request id "
                                      f"{request_id} (see the replica log)"))

    def exception(self) -> errors.GenfleetError:
        """The domain exception to raise on this side."""
        klass = getattr(importlib.import_module("services.core.errors"), self.error, None)
        if not (isinstance(klass, type) and issubclass(klass, errors.GenfleetError)):
            klass = errors.GenfleetError
        exc = klass.__new__(klass)
        Exception.__init__(exc, self.message)
        if isinstance(exc, errors.InvalidArgument):
            exc.field = self.message.split(":", 1)[0]
        return exc


def unwrap(value: Any) -> Any:
    """Raise the domain exception an ErrorResult carries; return anything else."""
    if isinstance(value, ErrorResult):
        raise value.exception()
    return value
