"""protobuf <-> domain (services.core.api). Only wire-level checks happen here, each in
O(1) before anything is converted: tensor dtypes, shapes (exact integers, no overflow),
byte lengths, enum values, and counts of repeated fields and map entries. Everything about
the model (ranges, options, caps) is ``services.core.validation``'s. No torch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np

from services.core import api
from services.core.batch import DEFAULT_SHARD_SIZE, BatchRequest
from services.core.errors import InvalidArgument
from services.core.options import MAX_OPTIONS, OptionSpec
from services.gateway.pb.genfleet.v1 import batch_pb2 as bpb
from services.gateway.pb.genfleet.v1 import generation_pb2 as pb

_DTYPES: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_UINT8: np.dtype("u1"),
}
_PB_DTYPES = {"float32": pb.DTYPE_FLOAT32, "int64": pb.DTYPE_INT64, "uint8": pb.DTYPE_UINT8}
_OUTPUTS = {pb.OUTPUT_FORMAT_UNSPECIFIED: "tensor", pb.OUTPUT_FORMAT_TENSOR: "tensor",
            pb.OUTPUT_FORMAT_PNG: "png", pb.OUTPUT_FORMAT_BOTH: "both"}
_SCORE_KINDS = {"exact": pb.SCORE_KIND_EXACT, "lower_bound": pb.SCORE_KIND_LOWER_BOUND,
                "unnormalized": pb.SCORE_KIND_UNNORMALIZED}
D = TypeVar("D", api.ScoreRequest, api.EncodeRequest)
MAX_TENSOR_ELEMENTS = 1 << 26
MAX_TENSOR_RANK = 8
MAX_LABELS = 1 << 17  # more labels than any request can have samples (caps are below this)


# ---------------------------------------------------------------- tensors
def tensor_to_array(tensor: pb.Tensor, field: str) -> np.ndarray:
    """A wire Tensor -> numpy array, checking dtype, shape and byte length.

    Raises:
        InvalidArgument: naming ``field`` and what is wrong.
    """
    if tensor.dtype not in _DTYPES:
        raise InvalidArgument(f"{field}.dtype", "must be DTYPE_FLOAT32, DTYPE_INT64 or DTYPE_UINT8")
    if not 1 <= len(tensor.shape) <= MAX_TENSOR_RANK:
        raise InvalidArgument(f"{field}.shape", f"must have 1 to {MAX_TENSOR_RANK} dimensions, "
                                                f"got {len(tensor.shape)}")
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{field}.shape", f"must be non-negative, got {list(shape)}")
    count = 1
    for d in shape:  # Python integers: a product that overflows int64 is still caught
        count *= d
    # each dimension too: [0, 2^62] has no elements but is no array numpy can shape
    if count > MAX_TENSOR_ELEMENTS or max(shape) > MAX_TENSOR_ELEMENTS:
        raise InvalidArgument(f"{field}.shape", f"at most {MAX_TENSOR_ELEMENTS} elements, "
                                                f"got {list(shape)}")
    dtype = _DTYPES[tensor.dtype]
    expected = count * dtype.itemsize
    if len(tensor.data) != expected:
        raise InvalidArgument(f"{field}.data", f"shape {list(shape)} of {dtype.name} needs "
                                               f"{expected} bytes, got {len(tensor.data)}")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def array_to_tensor(array: np.ndarray) -> pb.Tensor:
    name = array.dtype.name
    if name not in _PB_DTYPES:
        array = array.astype(np.float32)
        name = "float32"
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return pb.Tensor(dtype=_PB_DTYPES[name], shape=list(array.shape), data=data)


# ---------------------------------------------------------------- options
def oneof_values(entries: Mapping[str, Any], oneof: str, field: str, limit: int
                 ) -> dict[str, Any]:
    """A protobuf map of messages with one ``oneof`` each -> name: the value set (the
    native options, the v2 parameters).

    Raises:
        InvalidArgument: more than ``limit`` entries, or an entry with no value.
    """
    if len(entries) > limit:
        raise InvalidArgument(field, f"at most {limit} entries, got {len(entries)}")
    out: dict[str, Any] = {}
    for name, value in entries.items():
        kind = value.WhichOneof(oneof)
        if kind is None:
            raise InvalidArgument(f"{field}.{name[:40]}", "has no value")
        out[name] = getattr(value, kind)
    return out


def options_from_pb(options: Mapping[str, pb.OptionValue]) -> dict[str, Any]:
    return oneof_values(options, "value", "options", MAX_OPTIONS)


def option_value(value: Any) -> pb.OptionValue:
    if isinstance(value, bool):
        return pb.OptionValue(flag=value)
    if isinstance(value, int | float):
        return pb.OptionValue(number=float(value))
    return pb.OptionValue(text=str(value))


def _labels(labels: Any) -> tuple[int, ...]:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument("labels", f"at most {MAX_LABELS} entries, got {len(labels)}")
    return tuple(labels)


def _output(value: int) -> api.Output:
    output = _OUTPUTS.get(value)  # type: ignore[call-overload]
    if output is None:
        raise InvalidArgument("output", f"unknown OutputFormat {value}")
    return output


def _model(name: str) -> str:
    if not name:
        raise InvalidArgument("model", "is required (name or name@version)")
    return name


# ---------------------------------------------------------------- requests
# ``limit``: the gateway's message limit, against which the response size is predicted
def generate_request_from_pb(req: pb.GenerateRequest, deadline: float | None,
                             limit: int | None = None) -> api.GenerateRequest:
    return api.GenerateRequest(
        model=_model(req.model), num_samples=req.num_samples, seed=req.seed,
        labels=_labels(req.labels), options=options_from_pb(req.options),
        output=_output(req.output), start_index=req.start_index, deadline=deadline,
        max_response_bytes=limit)


def _data_request(kind: type[D], req: pb.ScoreRequest | pb.EncodeRequest,
                  deadline: float | None, limit: int | None) -> D:
    return kind(model=_model(req.model), labels=_labels(req.labels),
                options=options_from_pb(req.options), data=tensor_to_array(req.data, "data"),
                deadline=deadline, max_response_bytes=limit)


def score_request_from_pb(req: pb.ScoreRequest, deadline: float | None,
                          limit: int | None = None) -> api.ScoreRequest:
    return _data_request(api.ScoreRequest, req, deadline, limit)


def encode_request_from_pb(req: pb.EncodeRequest, deadline: float | None,
                           limit: int | None = None) -> api.EncodeRequest:
    return _data_request(api.EncodeRequest, req, deadline, limit)


def decode_request_from_pb(req: pb.DecodeRequest, deadline: float | None,
                           limit: int | None = None) -> api.DecodeRequest:
    return api.DecodeRequest(model=_model(req.model), labels=_labels(req.labels),
                             options=options_from_pb(req.options),
                             latents=tensor_to_array(req.latents, "latents"),
                             output=_output(req.output), deadline=deadline,
                             max_response_bytes=limit)


# ---------------------------------------------------------------- responses
def _timings(t: api.Timings) -> pb.Timings:
    return pb.Timings(queue_ms=t.queue_ms, compute_ms=t.compute_ms, total_ms=t.total_ms)


def generate_response_to_pb(result: api.GenerateResult) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        model=result.model, version=result.version,
        samples=array_to_tensor(result.samples) if result.samples is not None else None,
        png=result.png, text=result.text, seeds=result.seeds, labels=result.labels,
        start_index=result.start_index, timings=_timings(result.timings))


def score_response_to_pb(result: api.ScoreResult) -> pb.ScoreResponse:
    return pb.ScoreResponse(model=result.model, version=result.version,
                            log_prob=result.log_prob, bits_per_dim=result.bits_per_dim,
                            kind=_SCORE_KINDS.get(result.kind, pb.SCORE_KIND_UNSPECIFIED),
                            timings=_timings(result.timings))


def encode_response_to_pb(result: api.EncodeResult) -> pb.EncodeResponse:
    return pb.EncodeResponse(model=result.model, version=result.version,
                             latents=array_to_tensor(result.latents),
                             timings=_timings(result.timings))


def decode_response_to_pb(result: api.DecodeResult) -> pb.DecodeResponse:
    return pb.DecodeResponse(
        model=result.model, version=result.version,
        samples=array_to_tensor(result.samples) if result.samples is not None else None,
        png=result.png, text=result.text, timings=_timings(result.timings))


# ------------------------------------------------- responses, read back (the client)
_SCORE_KIND_NAMES = {v: k for k, v in _SCORE_KINDS.items()}


def _timings_from_pb(t: pb.Timings) -> api.Timings:
    return api.Timings(queue_ms=t.queue_ms, compute_ms=t.compute_ms, total_ms=t.total_ms)


def _samples_from_pb(resp: pb.GenerateResponse | pb.DecodeResponse) -> np.ndarray | None:
    return tensor_to_array(resp.samples, "samples") if resp.HasField("samples") else None


def generate_result_from_pb(resp: pb.GenerateResponse) -> api.GenerateResult:
    return api.GenerateResult(
        model=resp.model, version=resp.version, samples=_samples_from_pb(resp),
        png=list(resp.png), text=list(resp.text), seeds=list(resp.seeds),
        labels=list(resp.labels), start_index=resp.start_index,
        timings=_timings_from_pb(resp.timings))


def score_result_from_pb(resp: pb.ScoreResponse) -> api.ScoreResult:
    return api.ScoreResult(
        model=resp.model, version=resp.version, log_prob=list(resp.log_prob),
        bits_per_dim=list(resp.bits_per_dim), kind=_SCORE_KIND_NAMES.get(resp.kind, "unknown"),
        timings=_timings_from_pb(resp.timings))


def decode_result_from_pb(resp: pb.DecodeResponse) -> api.DecodeResult:
    return api.DecodeResult(
        model=resp.model, version=resp.version, samples=_samples_from_pb(resp),
        png=list(resp.png), text=list(resp.text), timings=_timings_from_pb(resp.timings))


def _option_info(o: api.OptionInfo) -> pb.OptionInfo:
    s: OptionSpec = o.spec
    return pb.OptionInfo(name=o.name, kind=s.kind, default_value=option_value(s.default),
                         min=s.min, max=s.max, choices=list(s.choices), help=s.help,
                         multiplies_work=s.cost)


def model_info_to_pb(info: api.ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=info.name, family=info.family, version=info.version,
        capabilities=list(info.capabilities), sample_shape=list(info.sample_shape),
        sample_dtype=_PB_DTYPES[info.sample_dtype], levels=info.levels,
        classes=list(info.classes), data_kind=info.data_kind,
        sampler_options=[_option_info(o) for o in info.sampler_options],
        score_options=[_option_info(o) for o in info.score_options],
        score_kind=_SCORE_KINDS.get(info.score_kind or "", pb.SCORE_KIND_UNSPECIFIED),
        latent_shape=list(info.latent_shape or ()),
        max_samples_per_request=info.limits.max_samples_per_request,
        max_samples_per_stream=info.limits.max_samples_per_stream,
        max_examples_per_request=info.limits.max_examples_per_request,
        max_work_per_request=info.limits.max_work_per_request, metrics=info.metrics)


# ---------------------------------------------------------------- batch jobs
_BATCH_FORMATS = {bpb.BATCH_FORMAT_UNSPECIFIED: "parquet", bpb.BATCH_FORMAT_PARQUET: "parquet",
                  bpb.BATCH_FORMAT_PNG: "png", bpb.BATCH_FORMAT_NPZ: "npz"}
_BATCH_STATES = {"running": bpb.BATCH_STATE_RUNNING, "succeeded": bpb.BATCH_STATE_SUCCEEDED,
                 "failed": bpb.BATCH_STATE_FAILED, "cancelled": bpb.BATCH_STATE_CANCELLED}


def batch_request_from_pb(request: bpb.SubmitBatchRequest) -> BatchRequest:
    """``out`` is the client's directory name, resolved below the batch root by the server."""
    if request.format not in _BATCH_FORMATS:
        raise InvalidArgument("format", "must be BATCH_FORMAT_PARQUET, _PNG or _NPZ")
    if request.workers < 0 or request.shard_size < 0:
        raise InvalidArgument("workers" if request.workers < 0 else "shard_size", "must be >= 0")
    return BatchRequest(
        model=request.model, num_samples=request.num_samples, out=request.output,
        format=_BATCH_FORMATS[request.format], encoding=request.encoding or "tensor",
        shard_size=request.shard_size or DEFAULT_SHARD_SIZE,
        seed=request.seed, labels=request.labels, options=options_from_pb(request.options),
        workers=request.workers or 1, gpus_per_worker=request.gpus_per_worker)


def batch_status_to_pb(status: api.BatchStatus) -> bpb.BatchJob:
    return bpb.BatchJob(
        id=status.id, state=_BATCH_STATES[status.state], model=status.model,
        version=status.version, num_samples=status.num_samples,
        samples_written=status.samples_written, output_uri=status.output_uri,
        manifest_uri=status.manifest_uri, error=status.error, created=status.created,
        finished=status.finished)
