"""The one place where a serving request is checked against the model it addresses.

Every check a user's input needs happens here, before the request joins a batch: types,
ranges, finiteness, shapes, label counts and classes, options (through their specs), the
model's per-request caps (``api.Limits``), the compute budget of options that multiply
work, and the predicted size of the response against the caller's message limit. The
gateway runs these functions before it coalesces a request; a replica runs the same ones
on what it receives (it can be called by other drivers too), and the sampler trusts the
result. Each function returns the request with its options resolved (defaults filled in).

Pure Python and numpy: no torch, ray or grpc.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from services.core import api
from services.core.errors import InvalidArgument, UnsupportedOperation
from services.core.options import OptionSpec, resolve_options, work_factor

MAX_SEED = 2**64 - 1
MAX_INDEX = 2**62  # start_index + num_samples stays below this
MAX_LATENT = 1e6  # |latent| bound: larger values only make the decoder overflow
_ENVELOPE = 512  # bytes of a response besides its per-sample payload (names, timings)
R = TypeVar("R", api.ScoreRequest, api.EncodeRequest, api.DecodeRequest)


def _specs(options: Sequence[api.OptionInfo]) -> dict[str, OptionSpec]:
    return {o.name: o.spec for o in options}


def _require(info: api.ModelInfo, capability: str, rpc: str) -> None:
    if capability not in info.capabilities:
        raise UnsupportedOperation(f"{info.name} ({info.family}) does not support {rpc}; "
                                   f"it supports {list(info.capabilities)}")


def _labels(labels: Sequence[int], n: int, info: api.ModelInfo) -> tuple[int, ...]:
    if not labels:
        return ()
    if "conditional" not in info.capabilities or not info.classes:
        raise InvalidArgument("labels", f"{info.name} is not class-conditional: give no labels")
    if len(labels) != n:
        raise InvalidArgument("labels", f"give none or exactly {n} (one per sample), "
                                        f"got {len(labels)}")
    k = len(info.classes)
    lo, hi = min(labels), max(labels)
    if lo < 0 or hi >= k:
        raise InvalidArgument("labels", f"must be in [0, {k - 1}], got {lo if lo < 0 else hi}")
    return tuple(int(v) for v in labels)


def _budget(info: api.ModelInfo, items: int, specs: dict[str, OptionSpec],
            options: dict[str, object], what: str) -> None:
    work = items * work_factor(specs, options)
    cap = info.limits.max_work_per_request
    if work > cap:
        costly = [n for n, s in specs.items() if s.cost]
        raise InvalidArgument("options", f"{what} x {' x '.join(costly)} = {work} exceeds "
                                         f"max_work_per_request={cap} of {info.name}")


def _itemsize(info: api.ModelInfo) -> int:
    return 8 if info.sample_dtype == "int64" else 4


def _png_bytes(shape: Sequence[int]) -> int:
    """An upper bound of one 8-bit PNG of a (C, H, W) image (deflate's stored blocks)."""
    c, h, w = [*shape, 1, 1, 1][:3]
    raw = h * (w * c + 1)
    return raw + 5 * math.ceil(raw / 16383 + 1) + 128


def _sample_bytes(info: api.ModelInfo, output: str) -> int:
    """Upper bound of the bytes one sample adds to a Generate/Decode response."""
    dims = math.prod(info.sample_shape)
    size = 24  # seed, label, repeated-field tags
    if output in ("tensor", "both"):
        size += dims * _itemsize(info)
    if output in ("png", "both"):
        size += dims * 4 + 8 if info.data_kind == "text" else _png_bytes(info.sample_shape)
    return size


def _check_size(predicted: int, limit: int | None, field: str) -> None:
    if limit is not None and predicted > limit:
        raise InvalidArgument(field, f"the response would take up to {predicted} bytes, over the "
                                     f"message limit of {limit} bytes; send fewer per request"
                                     f"{' or use GenerateStream' if field == 'num_samples' else ''}")


def check_generate(req: api.GenerateRequest, info: api.ModelInfo, *,
                   chunk: int | None = None) -> api.GenerateRequest:
    """Validate a Generate request (``chunk``: a GenerateStream sending ``chunk`` samples per
    message, whose total is capped by ``max_samples_per_stream``).

    Raises:
        UnsupportedOperation: the model cannot sample.
        InvalidArgument: naming the field, the allowed range or cap, and the value.
    """
    _require(info, "sample", "Generate")
    lim = info.limits
    n = req.num_samples
    if chunk is None:
        cap, cap_name, per_message = lim.max_samples_per_request, "max_samples_per_request", n
    else:
        cap, cap_name = lim.max_samples_per_stream, "max_samples_per_stream"
        if not 1 <= chunk <= lim.max_samples_per_request:
            raise InvalidArgument("chunk_size", f"must be in [1, {lim.max_samples_per_request}] "
                                                f"(max_samples_per_request), got {chunk}")
        per_message = min(chunk, n)
    if not 1 <= n <= cap:
        raise InvalidArgument("num_samples", f"must be in [1, {cap}] ({cap_name} of "
                                             f"{info.name}), got {n}")
    if not 0 <= req.seed <= MAX_SEED:
        raise InvalidArgument("seed", f"must be in [0, 2^64 - 1], got {req.seed}")
    if not 0 <= req.start_index <= MAX_INDEX - n:
        raise InvalidArgument("start_index", f"must be in [0, 2^62 - num_samples], "
                                             f"got {req.start_index}")
    if req.output not in api.OUTPUTS:
        raise InvalidArgument("output", f"must be one of {list(api.OUTPUTS)}, got {req.output!r}")
    labels = _labels(req.labels, n, info)
    specs = _specs(info.sampler_options)
    options = resolve_options(specs, req.options)
    _budget(info, per_message, specs, options, "num_samples" if chunk is None else "chunk_size")
    _check_size(_ENVELOPE + per_message * _sample_bytes(info, req.output), req.max_response_bytes,
                "num_samples" if chunk is None else "chunk_size")
    return dataclasses.replace(req, labels=labels, options=options)


def _check_data(data: np.ndarray, info: api.ModelInfo) -> None:
    shape = tuple(info.sample_shape)
    if data.ndim != len(shape) + 1 or tuple(data.shape[1:]) != shape or data.shape[0] < 1:
        raise InvalidArgument("data", f"expected shape (B>=1, {', '.join(map(str, shape))}), "
                                      f"got {list(data.shape)}")
    top = info.levels - 1
    if data.dtype.kind == "f":
        if info.sample_dtype == "int64":
            raise InvalidArgument("data", f"{info.name} models tokens: send integer ids in "
                                          f"[0, {top}], not {data.dtype}")
        if not np.isfinite(data).all():
            raise InvalidArgument("data", "values must be finite (no NaN or infinity)")
        if data.min() < 0.0 or data.max() > 1.0:
            raise InvalidArgument("data", "float values must be in [0, 1]")
    elif data.dtype.kind in "iu":
        if data.min() < 0 or data.max() > top:
            raise InvalidArgument("data", f"integer levels must be in [0, {top}]")
    else:
        raise InvalidArgument("data", f"unsupported dtype {data.dtype}")


def _check_latents(latents: np.ndarray, info: api.ModelInfo) -> None:
    shape = tuple(info.latent_shape or ())
    if latents.ndim != len(shape) + 1 or tuple(latents.shape[1:]) != shape or latents.shape[0] < 1:
        raise InvalidArgument("latents", f"expected shape (B>=1, {', '.join(map(str, shape))}), "
                                         f"got {list(latents.shape)}")
    if latents.dtype.kind != "f":
        raise InvalidArgument("latents", f"must be float32, got {latents.dtype}")
    if not np.isfinite(latents).all() or np.abs(latents).max() > MAX_LATENT:
        raise InvalidArgument("latents", f"values must be finite and within +-{MAX_LATENT:g}")


def _check_examples(n: int, info: api.ModelInfo, field: str) -> None:
    cap = info.limits.max_examples_per_request
    if n > cap:
        raise InvalidArgument(field, f"at most {cap} examples per request "
                                     f"(max_examples_per_request of {info.name}), got {n}")


def check_score(req: api.ScoreRequest, info: api.ModelInfo) -> api.ScoreRequest:
    """Validate a Score request (see ``check_generate`` for what is raised)."""
    _require(info, "log_prob", "Score")
    _check_examples(len(req.data), info, "data")
    _check_data(req.data, info)
    return _common(req, info, _specs(info.score_options), len(req.data), "data", bytes_each=24)


def check_encode(req: api.EncodeRequest, info: api.ModelInfo) -> api.EncodeRequest:
    """Validate an Encode request (see ``check_generate`` for what is raised)."""
    _require(info, "encode", "Encode")
    _check_examples(len(req.data), info, "data")
    _check_data(req.data, info)
    return _common(req, info, _specs(info.sampler_options), len(req.data), "data",
                   bytes_each=4 * math.prod(info.latent_shape or ()))


def check_decode(req: api.DecodeRequest, info: api.ModelInfo) -> api.DecodeRequest:
    """Validate a Decode request (see ``check_generate`` for what is raised)."""
    _require(info, "decode", "Decode")
    if req.output not in api.OUTPUTS:
        raise InvalidArgument("output", f"must be one of {list(api.OUTPUTS)}, got {req.output!r}")
    _check_examples(len(req.latents), info, "latents")
    _check_latents(req.latents, info)
    return _common(req, info, _specs(info.sampler_options), len(req.latents), "latents",
                   bytes_each=_sample_bytes(info, req.output))


def _common(req: R, info: api.ModelInfo, specs: dict[str, OptionSpec], n: int, field: str, *,
            bytes_each: int) -> R:
    labels = _labels(req.labels, n, info)
    options = resolve_options(specs, req.options)
    _budget(info, n, specs, options, "examples")
    _check_size(_ENVELOPE + n * bytes_each, req.max_response_bytes, field)
    return dataclasses.replace(req, labels=labels, options=options)
