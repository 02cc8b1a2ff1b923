"""The Open Inference Protocol v2 (KServe / Triton "predict v2") mapped onto genfleet's
API, independent of the transport: ``oip_grpc`` (``inference.GRPCInferenceService``) and
``oip_rest`` (``/v2/...`` over HTTP) only translate their wire format to and from the
types here, and every call goes through ``Backend`` like a native one (the same
resolution, validation, coalescing, deadlines and status table).

Endpoints: each served model ``M`` is up to four v2 models, so that ``ModelMetadata``
states the exact inputs and outputs of each name:

=============  ==========================================  ==================================
name           inputs                                      outputs
=============  ==========================================  ==================================
``M``          NUM_SAMPLES, SEED, LABELS (all optional)    SAMPLES, PNG|TEXT, SEEDS, LABELS
``M.score``    DATA, LABELS (optional)                     LOG_PROB, BITS_PER_DIM
``M.encode``   DATA, LABELS (optional)                     LATENTS
``M.decode``   LATENTS, LABELS (optional)                  SAMPLES, PNG|TEXT
=============  ==========================================  ==================================

Request parameters are the model's sampler (or score) options, plus ``start_index``,
``timeout`` (microseconds, Triton's) and ``priority`` (accepted, not used). No torch.
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.core import api
from services.core.errors import (
    InvalidArgument,
    ModelNotFound,
    ModelNotReady,
    UnsupportedOperation,
)
from services.core.options import MAX_OPTIONS
from services.gateway.backend import Backend
from services.gateway.codec import MAX_LABELS, MAX_TENSOR_ELEMENTS, MAX_TENSOR_RANK

SERVER_NAME = "genfleet"
# what this server implements beyond the core protocol (ServerMetadata.extensions)
EXTENSIONS = ("binary_tensor_data", "parameters")
SEPARATOR = "."
# a request (or response) larger than this is converted in a worker thread, so that a
# big JSON body or a long list of typed values does not hold the event loop for long
OFFLOAD_BYTES = 256 * 1024
OPERATIONS = ("score", "encode", "decode")  # the suffixes; no suffix: generate
_CAPABILITY = {"generate": "sample", "score": "log_prob", "encode": "encode", "decode": "decode"}

DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
_V2_NAMES = {np.dtype(d).newbyteorder("=").str: n for n, d in DATATYPES.items()}
BYTES = "BYTES"
_INTEGERS = ("INT64", "INT32", "INT16", "INT8", "UINT64", "UINT32", "UINT16", "UINT8")
# the dtypes the native API takes for data (codec.tensor_to_array): the same here
_DATA_TYPES = ("FP32", "INT64", "UINT8")
# parameters that are not model options
START_INDEX, TIMEOUT, PRIORITY = "start_index", "timeout", "priority"
_TRANSPORT = (PRIORITY, "binary_data_output")  # accepted; the REST layer reads the latter
_REFUSED = ("sequence_id", "sequence_start", "sequence_end")
_SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


# ------------------------------------------------------------------ neutral types
@dataclass
class Tensor:
    """A v2 tensor: ``data`` is a numpy array of ``shape`` (BYTES: dtype object, bytes)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferRequest:
    model: str  # the v2 model name (an endpoint, e.g. "flow.score")
    version: str
    inputs: list[Tensor]
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] | None = None  # names asked for; None: the defaults
    id: str = ""
    deadline: float | None = None  # absolute time.time(), from the transport
    max_response_bytes: int | None = None


@dataclass
class InferResponse:
    model: str
    version: str
    outputs: list[Tensor]
    parameters: dict[str, Any] = field(default_factory=dict)
    id: str = ""


@dataclass(frozen=True)
class TensorMeta:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: any size


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]


# ------------------------------------------------------------------ wire <-> numpy
def _shape(shape: Sequence[int], field_name: str) -> tuple[tuple[int, ...], int]:
    if len(shape) > MAX_TENSOR_RANK:
        raise InvalidArgument(f"{field_name}.shape", f"at most {MAX_TENSOR_RANK} dimensions, "
                                                     f"got {len(shape)}")
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise InvalidArgument(f"{field_name}.shape", f"must be non-negative, got {list(dims)}")
    count = math.prod(dims)  # Python integers: no overflow
    if count > MAX_TENSOR_ELEMENTS or (dims and max(dims) > MAX_TENSOR_ELEMENTS):
        raise InvalidArgument(f"{field_name}.shape", f"at most {MAX_TENSOR_ELEMENTS} elements, "
                                                     f"got {list(dims)}")
    return dims, count


def input_dtype(datatype: str, field_name: str) -> np.dtype:
    """The numpy dtype of an input's datatype (inputs are numeric: no BYTES)."""
    if datatype == BYTES:
        raise InvalidArgument(f"{field_name}.datatype", "no genfleet input takes BYTES; inputs "
                                                        "are numeric tensors")
    dtype = DATATYPES.get(datatype)
    if dtype is None:
        supported = [*DATATYPES, BYTES]
        raise InvalidArgument(f"{field_name}.datatype", f"must be one of {supported}, "
                                                        f"got {datatype[:40]!r}")
    return dtype


def from_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> Tensor:
    """An input tensor from its raw little-endian bytes.

    Raises:
        InvalidArgument: an unknown datatype (or BYTES: no genfleet input takes it), a bad
            shape, or bytes that do not fit it.
    """
    field_name = f"inputs[{name[:40]}]"
    dims, count = _shape(shape, field_name)
    dtype = input_dtype(datatype, field_name)
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidArgument(f"{field_name}.data", f"shape {list(dims)} of {datatype} needs "
                                                    f"{expected} bytes, got {len(raw)}")
    values = np.frombuffer(raw, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))
    return Tensor(name, datatype, dims, values)


def from_values(name: str, datatype: str, shape: Sequence[int], values: Sequence[Any], *,
                typed: bool = False) -> Tensor:
    """An input tensor from a flat sequence of values: REST JSON ``data``, or (``typed``)
    a gRPC contents field, whose element type protobuf has checked already.

    Raises:
        InvalidArgument: the values are not ``shape``'s count of ``datatype`` values.
    """
    field_name = f"inputs[{name[:40]}]"
    dims, count = _shape(shape, field_name)
    dtype = input_dtype(datatype, field_name)
    if len(values) != count:
        raise InvalidArgument(f"{field_name}.data", f"shape {list(dims)} needs {count} values, "
                                                    f"got {len(values)}")
    if not typed:  # JSON: a string or a bool is no number (numpy would convert "1.5")
        kinds: tuple[type, ...] = ((bool,) if dtype.kind == "b" else
                                   (int,) if dtype.kind in "iu" else (int, float))
        for v in values:
            if not isinstance(v, kinds) or (dtype.kind != "b" and isinstance(v, bool)):
                raise InvalidArgument(f"{field_name}.data",
                                      f"{datatype} values must be "
                                      f"{'/'.join(k.__name__ for k in kinds)}, got {type(v).__name__}")
    wide = {"b": np.bool_, "u": np.uint64, "i": np.int64}.get(dtype.kind, np.float64)
    try:
        array: np.ndarray = np.array(values, dtype=wide)
    except (OverflowError, ValueError, TypeError) as exc:
        raise InvalidArgument(f"{field_name}.data", f"a value does not fit {datatype}: {exc}"
                              ) from None
    if dtype.kind in "iu" and array.size:
        limits = np.iinfo(dtype)
        if int(array.min()) < limits.min or int(array.max()) > limits.max:
            raise InvalidArgument(f"{field_name}.data", f"a value does not fit {datatype}")
    return Tensor(name, datatype, dims, array.astype(dtype.newbyteorder("=")).reshape(dims))


def to_raw(tensor: Tensor) -> bytes:
    """The raw little-endian bytes of a tensor (BYTES: 4-byte length-prefixed items)."""
    if tensor.datatype == BYTES:
        return b"".join(struct.pack("<I", len(v)) + v for v in tensor.data.flat)
    return np.ascontiguousarray(tensor.data, dtype=DATATYPES[tensor.datatype]).tobytes()


def tensor_of(name: str, array: np.ndarray) -> Tensor:
    """An output tensor of a numpy array (its v2 datatype follows the dtype)."""
    datatype = _V2_NAMES.get(array.dtype.newbyteorder("=").str)
    if datatype is None:
        array, datatype = array.astype(np.float32), "FP32"
    return Tensor(name, datatype, tuple(array.shape), array)


def bytes_tensor(name: str, items: Sequence[bytes]) -> Tensor:
    array = np.empty(len(items), dtype=object)
    array[:] = list(items)
    return Tensor(name, BYTES, (len(items),), array)


# ------------------------------------------------------------------ names
def split(name: str) -> tuple[str, str]:
    """A v2 model name -> (genfleet model, operation)."""
    base, _, op = name.rpartition(SEPARATOR)
    if base and op in OPERATIONS:
        return base, op
    return name, "generate"


def endpoints(info: api.ModelInfo) -> list[str]:
    """The v2 names a served model answers to."""
    ops = [op for op in ("generate", *OPERATIONS) if _CAPABILITY[op] in info.capabilities]
    return [info.name if op == "generate" else f"{info.name}{SEPARATOR}{op}" for op in ops]


def ref(model: str, version: str) -> str:
    """``name[@version]`` for the backend from a v2 name and version."""
    if not model:
        raise InvalidArgument("model_name", "is required")
    base, _ = split(model)
    if not version:
        return base
    if not version.isdigit() or len(version) > 18:
        raise ModelNotFound(f"{base}: model version must be a positive integer, got "
                            f"{version[:40]!r}")
    return f"{base}@{int(version)}"


def _require(info: api.ModelInfo, model: str, op: str) -> None:
    if _CAPABILITY[op] not in info.capabilities:
        if op == "generate":
            raise UnsupportedOperation(f"{model} cannot sample")
        raise UnsupportedOperation(f"{info.name} ({info.family}) does not support {op}; its v2 "
                                   f"models are {endpoints(info)}")


# ------------------------------------------------------------------ metadata
def _sample_type(info: api.ModelInfo) -> str:
    return "INT64" if info.sample_dtype == "int64" else "FP32"


def _rendered(info: api.ModelInfo) -> TensorMeta:
    return TensorMeta("TEXT" if info.data_kind == "text" else "PNG", BYTES, (-1,))


def metadata(info: api.ModelInfo, model: str) -> ModelMetadata:
    """The inputs and outputs of the v2 model ``model`` (one of ``endpoints(info)``)."""
    _, op = split(model)
    _require(info, model, op)
    samples = TensorMeta("SAMPLES", _sample_type(info), (-1, *info.sample_shape))
    data = TensorMeta("DATA", _sample_type(info), (-1, *info.sample_shape))
    conditional = "conditional" in info.capabilities and bool(info.classes)
    labels = (TensorMeta("LABELS", "INT64", (-1,)),) if conditional else ()
    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]
    if op == "generate":
        inputs = (TensorMeta("NUM_SAMPLES", "INT64", (1,)), TensorMeta("SEED", "UINT64", (1,)),
                  *labels)
        outputs = (samples, _rendered(info), TensorMeta("SEEDS", "UINT64", (-1,)), *labels)
    elif op == "score":
        inputs = (data, *labels)
        outputs = (TensorMeta("LOG_PROB", "FP64", (-1,)), TensorMeta("BITS_PER_DIM", "FP64", (-1,)))
    elif op == "encode":
        inputs = (data, *labels)
        outputs = (TensorMeta("LATENTS", "FP32", (-1, *(info.latent_shape or ()))),)
    else:
        inputs = (TensorMeta("LATENTS", "FP32", (-1, *(info.latent_shape or ()))), *labels)
        outputs = (samples, _rendered(info))
    return ModelMetadata(model, (str(info.version),), f"genfleet_{info.family}", inputs, outputs)


_REQUIRED = ("DATA", "LATENTS")  # every other input has a default


def model_config(meta: ModelMetadata) -> dict[str, Any]:
    """Triton's model configuration for a v2 model (its JSON form), for the tools that
    read it (perf_analyzer, Triton-aware clients): no batch dimension of Triton's own
    (``max_batch_size`` 0: the shapes are whole, their first dimension the batch), and
    which inputs may be left out."""
    def tensor(t: TensorMeta, optional: bool | None = None) -> dict[str, Any]:
        kind = "STRING" if t.datatype == BYTES else t.datatype
        out: dict[str, Any] = {"name": t.name, "data_type": f"TYPE_{kind}", "dims": list(t.shape)}
        if optional is not None:
            out["optional"] = optional
        return out
    return {"name": meta.name, "platform": meta.platform, "max_batch_size": 0,
            "input": [tensor(t, t.name not in _REQUIRED) for t in meta.inputs],
            "output": [tensor(t) for t in meta.outputs]}


# ------------------------------------------------------------------ requests
def _inputs(req: InferRequest, meta: ModelMetadata, required: tuple[str, ...]
            ) -> dict[str, Tensor]:
    allowed = [m.name for m in meta.inputs]
    found: dict[str, Tensor] = {}
    for tensor in req.inputs:
        if tensor.name not in allowed:
            raise InvalidArgument("inputs", f"{meta.name} has no input {tensor.name[:40]!r}; "
                                            f"its inputs are {allowed}")
        if tensor.name in found:
            raise InvalidArgument("inputs", f"{tensor.name!r} is given twice")
        if any(k in tensor.parameters for k in _SHARED_MEMORY):
            raise InvalidArgument(f"inputs[{tensor.name}]", "shared-memory tensors are not "
                                                            "supported; send the data inline")
        found[tensor.name] = tensor
    for name in required:
        if name not in found:
            raise InvalidArgument("inputs", f"{meta.name} needs input {name!r} "
                                            f"({next(m for m in meta.inputs if m.name == name)})")
    return found


def _scalar(tensor: Tensor | None, default: int) -> int:
    if tensor is None:
        return default
    if tensor.datatype not in _INTEGERS or tensor.data.size != 1:
        raise InvalidArgument(f"inputs[{tensor.name}]", f"must be one integer (INT64 or UINT64, "
                                                        f"shape [1]), got {tensor.datatype} "
                                                        f"{list(tensor.shape)}")
    return int(tensor.data.reshape(-1)[0])


def _labels(tensor: Tensor | None) -> tuple[int, ...]:
    if tensor is None:
        return ()
    if tensor.datatype not in _INTEGERS:
        raise InvalidArgument("inputs[LABELS]", f"must be integers (INT64), got {tensor.datatype}")
    if tensor.data.size > MAX_LABELS:
        raise InvalidArgument("inputs[LABELS]", f"at most {MAX_LABELS} labels, got {tensor.data.size}")
    return tuple(int(v) for v in tensor.data.reshape(-1))


def _array(tensor: Tensor) -> np.ndarray:
    if tensor.datatype not in _DATA_TYPES:
        raise InvalidArgument(f"inputs[{tensor.name}]", f"datatype must be one of "
                                                        f"{list(_DATA_TYPES)}, got {tensor.datatype}")
    return tensor.data


def options(parameters: Mapping[str, Any]) -> tuple[dict[str, Any], int, float | None]:
    """Request parameters -> (model options, start_index, timeout in seconds or None).

    Raises:
        InvalidArgument: too many, a refused one (sequences), or a bad reserved value.
    """
    if len(parameters) > MAX_OPTIONS + 3:
        raise InvalidArgument("parameters", f"at most {MAX_OPTIONS} options, got {len(parameters)}")
    out: dict[str, Any] = {}
    start, timeout = 0, None
    for name, value in parameters.items():
        if name in _REFUSED:
            if value:
                raise InvalidArgument(f"parameters.{name}", "genfleet models are stateless: "
                                                            "sequence batching is not supported")
            continue
        if name in _TRANSPORT:
            continue
        if name in (START_INDEX, TIMEOUT):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidArgument(f"parameters.{name}", f"must be a non-negative integer, "
                                                            f"got {value!r}"[:200])
            if name == START_INDEX:
                start = value
            elif value > 0:
                timeout = value / 1e6
            continue
        if isinstance(value, bool | str):
            out[name] = value
        elif isinstance(value, int | float):
            out[name] = float(value)  # as the native API's OptionValue.number
        else:
            raise InvalidArgument(f"parameters.{name}", "must be a bool, number or string")
    return out, start, timeout


def _deadline(req: InferRequest, timeout: float | None) -> float | None:
    if timeout is None:
        return req.deadline
    mine = time.time() + timeout
    return mine if req.deadline is None else min(mine, req.deadline)


@dataclass
class Call:
    """A v2 request as a native one: ``op`` names which ``Backend`` method takes it."""

    op: str
    request: api.GenerateRequest | api.ScoreRequest | api.EncodeRequest | api.DecodeRequest
    outputs: list[str]


def _outputs(req: InferRequest, meta: ModelMetadata, default: list[str]) -> list[str]:
    names = [m.name for m in meta.outputs]
    if req.outputs is None or not req.outputs:
        return default
    seen: list[str] = []
    for name in req.outputs:
        if name not in names:
            raise InvalidArgument("outputs", f"{meta.name} has no output {name[:40]!r}; its "
                                             f"outputs are {names}")
        if name not in seen:
            seen.append(name)
    return seen


def _render(outputs: list[str]) -> api.Output:
    rendered = "PNG" in outputs
    tensor = "SAMPLES" in outputs or not rendered
    return "both" if rendered and tensor else "png" if rendered else "tensor"


def to_call(req: InferRequest, info: api.ModelInfo) -> Call:
    """The native request for ``req`` on the served model ``info``.

    Raises:
        InvalidArgument: unknown or missing inputs or outputs, bad datatypes or parameters.
        UnsupportedOperation: the model lacks the endpoint's capability.
    """
    meta = metadata(info, req.model)
    _, op = split(req.model)
    opts, start, timeout = options(req.parameters)
    deadline = _deadline(req, timeout)
    model = ref(req.model, req.version)
    limit = req.max_response_bytes
    if op == "generate":
        found = _inputs(req, meta, ())
        default = [m.name for m in meta.outputs if m.name != "PNG"]
        outputs = _outputs(req, meta, default)
        return Call(op, api.GenerateRequest(
            model=model, num_samples=_scalar(found.get("NUM_SAMPLES"), 1),
            seed=_scalar(found.get("SEED"), 0), labels=_labels(found.get("LABELS")),
            options=opts, output=_render(outputs), start_index=start, deadline=deadline,
            max_response_bytes=limit), outputs)
    outputs = _outputs(req, meta, [m.name for m in meta.outputs if m.name != "PNG"])
    if op == "decode":
        found = _inputs(req, meta, ("LATENTS",))
        latents = found["LATENTS"]
        if latents.datatype != "FP32":
            raise InvalidArgument("inputs[LATENTS]", f"datatype must be FP32, got {latents.datatype}")
        return Call(op, api.DecodeRequest(
            model=model, latents=latents.data, labels=_labels(found.get("LABELS")), options=opts,
            output=_render(outputs), deadline=deadline, max_response_bytes=limit), outputs)
    found = _inputs(req, meta, ("DATA",))
    kind = api.ScoreRequest if op == "score" else api.EncodeRequest
    return Call(op, kind(model=model, data=_array(found["DATA"]),
                         labels=_labels(found.get("LABELS")), options=opts, deadline=deadline,
                         max_response_bytes=limit), outputs)


# ------------------------------------------------------------------ responses
def _timings(t: api.Timings) -> dict[str, Any]:
    return {"queue_ms": t.queue_ms, "compute_ms": t.compute_ms, "total_ms": t.total_ms}


def to_response(req: InferRequest, call: Call, result: Any) -> InferResponse:
    """The v2 response for ``result`` of ``call`` (outputs in the order asked for)."""
    made: dict[str, Tensor] = {}
    params = _timings(result.timings)
    if isinstance(result, api.Samples):
        if result.samples is not None:
            made["SAMPLES"] = tensor_of("SAMPLES", result.samples)
        if result.png:
            made["PNG"] = bytes_tensor("PNG", result.png)
        if result.text:
            made["TEXT"] = bytes_tensor("TEXT", [t.encode() for t in result.text])
    if isinstance(result, api.GenerateResult):
        made["SEEDS"] = tensor_of("SEEDS", np.asarray(result.seeds, dtype=np.uint64))
        if result.labels:
            made["LABELS"] = tensor_of("LABELS", np.asarray(result.labels, dtype=np.int64))
        params[START_INDEX] = result.start_index
    elif isinstance(result, api.ScoreResult):
        made["LOG_PROB"] = tensor_of("LOG_PROB", np.asarray(result.log_prob, dtype=np.float64))
        made["BITS_PER_DIM"] = tensor_of("BITS_PER_DIM",
                                         np.asarray(result.bits_per_dim, dtype=np.float64))
        params["score_kind"] = result.kind
    elif isinstance(result, api.EncodeResult):
        made["LATENTS"] = tensor_of("LATENTS", result.latents.astype(np.float32, copy=False))
    outputs = [made[name] for name in call.outputs if name in made]
    return InferResponse(req.model, str(result.version), outputs, params, req.id)


# ------------------------------------------------------------------ the service
class Service:
    """The v2 calls, for any transport. ``ready(name)`` is the gateway's readiness (the
    same answer grpc.health.v1 gives; ``None``: the server as a whole)."""

    def __init__(self, backend: Backend, ready: Callable[[str | None], bool],
                 version: str) -> None:
        self._backend = backend
        self._ready = ready
        self.version = version

    def server_ready(self) -> bool:
        return self._ready(None)

    async def _info(self, model: str, version: str) -> api.ModelInfo:
        info = await self._backend.resolve(ref(model, version))
        if model not in endpoints(info):
            raise ModelNotFound(f"no v2 model named {model[:80]!r}; {info.name} serves "
                                f"{endpoints(info)}")
        return info

    async def model_ready(self, model: str, version: str) -> bool:
        """Raises ModelNotFound for a name (or version) that is not served (while the
        server is ready: otherwise no model is)."""
        if not self._ready(None):
            return False
        try:
            info = await self._info(model, version)
        except ModelNotReady:  # known but not served yet (still training): not ready
            return False
        return self._ready(info.name)

    async def model_metadata(self, model: str, version: str) -> ModelMetadata:
        return metadata(await self._info(model, version), model)

    async def model_config(self, model: str, version: str) -> dict[str, Any]:
        return model_config(await self.model_metadata(model, version))

    async def index(self) -> list[tuple[str, str, bool]]:
        """Every v2 model: (name, version, ready)."""
        infos = await self._backend.list_models()
        return [(name, str(info.version), self._ready(info.name))
                for info in infos for name in endpoints(info)]

    async def infer(self, req: InferRequest) -> InferResponse:
        info = await self._info(req.model, req.version)
        call = to_call(req, info)
        method: Callable[[Any], Awaitable[Any]] = getattr(self._backend, call.op)
        return to_response(req, call, await method(call.request))
