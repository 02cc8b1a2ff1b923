"""Hypothesis strategies for hostile request messages of every RPC of GenerationService
and BatchService, and the one property they are checked against: the server answers each
with a status it means (never INTERNAL or UNKNOWN) and stays healthy.

Used by tests/unit/test_fuzz.py (in-process backend) and tests/integration/test_fuzz_ray.py
(a real Ray cluster behind `genfleet up`'s gateway)."""

from __future__ import annotations

import collections
import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.core import api
from services.gateway.pb.genfleet.v1 import batch_pb2 as bpb
from services.gateway.pb.genfleet.v1 import batch_pb2_grpc as bpb_grpc
from services.gateway.pb.genfleet.v1 import generation_pb2 as pb
from services.gateway.pb.genfleet.v1 import generation_pb2_grpc as pb_grpc

FAMILIES = ["autoregressive", "diffusion", "ebm", "flow", "gan", "vae"]
OPTION_NAMES = ["steps", "guidance", "sampler", "timesteps", "temperature", "top_k", "output",
                "truncation", "samples", "bound", "step_size", "noise_scale", "init_only"]
CHOICES = ["ddim", "dpmsolver++", "mean", "mode", "sample", "elbo", "iwae"]
FORBIDDEN = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)

INT32 = st.integers(-2**31, 2**31 - 1)
INT64 = st.integers(-2**63, 2**63 - 1)
UINT64 = st.integers(0, 2**64 - 1)
SMALL = st.integers(-2, 12)
HOSTILE_TEXT = st.one_of(st.text(max_size=40), st.sampled_from(
    ["", " ", "\x00", "../../etc", "gan\n", "ǵàn", "🙂" * 10, "a" * 1000, "gan@", "@1", "gan@@1",
     "gan@-1", "gan@99999999999999999999", "GAN"]))


def models(served: list[str]) -> st.SearchStrategy[str]:
    refs = served + [f"{m}@1" for m in served] + [f"{m}@2" for m in served]
    return st.one_of(st.sampled_from(refs), st.sampled_from(refs), HOSTILE_TEXT)


NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, 2.0, 3.0, 0.5, 1e300, -1e300,
                     2.0**31, 2.0**63, 2.0**64, 5e-324]),
    st.integers(-1000, 1000).map(float))


@st.composite
def option_value(draw: st.DrawFn) -> pb.OptionValue:
    kind = draw(st.sampled_from(["number", "number", "text", "flag", "empty"]))
    if kind == "number":
        return pb.OptionValue(number=draw(NUMBERS))
    if kind == "text":
        return pb.OptionValue(text=draw(st.one_of(st.sampled_from(CHOICES), HOSTILE_TEXT)))
    if kind == "flag":
        return pb.OptionValue(flag=draw(st.booleans()))
    return pb.OptionValue()


# each strategy mixes plausible values (so that valid requests run the models too) with
# hostile ones
OPTIONS = st.one_of(st.just({}), st.just({}), st.dictionaries(
    st.one_of(st.sampled_from(OPTION_NAMES), HOSTILE_TEXT), option_value(), max_size=5))
LABELS = st.one_of(st.just([]), st.just([]), st.lists(st.integers(0, 9), max_size=10),
                   st.lists(INT32, max_size=10),
                   st.lists(st.integers(0, 9), min_size=200, max_size=300))
OUTPUTS = st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(-3, 100))
COUNTS = st.one_of(st.integers(1, 8), st.integers(1, 8), st.integers(-1, 10), INT32)


@st.composite
def tensors(draw: st.DrawFn, sample_shapes: list[tuple[int, ...]], plausible: bool = False
            ) -> pb.Tensor:
    """Consistent tensors (right byte count; random bits: NaN, infinities, huge values) of
    plausible shapes, and inconsistent or overflowing ones; ``plausible``: levels or
    [0, 1) floats of the first shape."""
    dtype = draw(st.one_of(st.sampled_from([1, 2, 3]), st.sampled_from([1, 2, 3]),
                           st.integers(-2, 6)))
    itemsize = {1: 4, 2: 8, 3: 1}.get(dtype, 1)
    mode = "levels" if plausible else draw(
        st.sampled_from(["plausible", "levels", "levels", "random", "overflow"]))
    if mode in ("plausible", "levels"):
        b = draw(st.integers(0, 6))
        shape = [b, *draw(st.sampled_from(sample_shapes))]
        count = math.prod(shape)
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        if mode == "levels":  # mostly in range: valid integer levels or token ids
            values = rng.integers(0, 17 if plausible else 21, count)
            data = (values.astype(np.uint8) if dtype == 3 else values.astype("<i8")
                    if dtype == 2 else rng.random(count, dtype=np.float32)).tobytes()
            data = data[:count * itemsize].ljust(count * itemsize, b"\0")
        else:  # random bits: NaN, infinities, subnormal and huge values for floats
            data = rng.bytes(count * itemsize)
        return pb.Tensor(dtype=dtype, shape=shape, data=data)  # type: ignore[arg-type]
    if mode == "overflow":
        shape = draw(st.lists(st.one_of(INT64, st.sampled_from([2**32, 2**62, -1, 0])),
                              min_size=0, max_size=10))
        return pb.Tensor(dtype=dtype, shape=shape, data=draw(st.binary(max_size=64)))  # type: ignore[arg-type]
    shape = draw(st.lists(SMALL, max_size=5))
    return pb.Tensor(dtype=dtype, shape=shape, data=draw(st.binary(max_size=600)))  # type: ignore[arg-type]


PLAIN_OPTIONS = st.one_of(st.just({}), st.dictionaries(
    st.sampled_from(OPTION_NAMES), st.builds(pb.OptionValue, number=st.integers(0, 3).map(float)),
    max_size=2))


def generate_requests(served: list[str]) -> st.SearchStrategy[pb.GenerateRequest]:
    """Half plausible (mostly valid, so the models run), half hostile."""
    plausible = st.builds(pb.GenerateRequest, model=st.sampled_from(served),
                          num_samples=st.integers(1, 8), seed=UINT64,
                          labels=st.just([]), options=PLAIN_OPTIONS,
                          output=st.sampled_from([0, 1, 2, 3]), start_index=st.integers(0, 9),
                          chunk_size=st.integers(0, 8))
    return st.one_of(plausible, _hostile_generate(served))


def _hostile_generate(served: list[str]) -> st.SearchStrategy[pb.GenerateRequest]:
    return st.builds(pb.GenerateRequest, model=models(served),
                     num_samples=COUNTS, seed=UINT64,
                     labels=LABELS, options=OPTIONS, output=OUTPUTS,
                     start_index=st.one_of(st.just(0), st.integers(0, 100), UINT64),
                     chunk_size=st.one_of(st.just(0), st.integers(-1, 10), INT32))


def tensor_requests(kind: Any, field: str, served: list[str], shapes: list[tuple[int, ...]],
                    **extra: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Score / Encode / Decode requests (``field``: the tensor), half plausible."""
    plausible = st.builds(kind, model=st.sampled_from(served), options=PLAIN_OPTIONS,
                          **{field: tensors(shapes[:1], plausible=True)})
    hostile = st.builds(kind, model=models(served), labels=LABELS, options=OPTIONS,
                        **{field: tensors(shapes)}, **extra)
    return plausible | hostile


def submit_requests(served: list[str]) -> st.SearchStrategy[bpb.SubmitBatchRequest]:
    return st.builds(
        bpb.SubmitBatchRequest, model=models(served),
        num_samples=st.one_of(st.integers(-2, 16), INT64),
        output=st.one_of(st.sampled_from(["fuzz", "fuzz/a", "a", ""]), HOSTILE_TEXT),
        format=st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(-3, 50)),
        shard_size=st.one_of(st.integers(-1, 8), INT64), seed=UINT64,
        labels=st.one_of(st.sampled_from(["", "balanced", "0,3,7", "0,99", "x"]), HOSTILE_TEXT),
        options=OPTIONS, workers=st.one_of(st.integers(-1, 2), INT32),
        gpus_per_worker=NUMBERS,
        encoding=st.one_of(st.sampled_from(["", "tensor", "png", "both"]), HOSTILE_TEXT))


LOOKUPS = st.one_of(st.builds(bpb.GetBatchRequest, id=HOSTILE_TEXT),
                    st.builds(bpb.CancelBatchRequest, id=HOSTILE_TEXT),
                    st.just(bpb.ListBatchesRequest()), st.just(pb.ListModelsRequest()))


def requests(rpc: str, served: list[str], shapes: list[tuple[int, ...]]
             ) -> st.SearchStrategy[Any]:
    """The strategy for ``rpc`` (a key of ``Caller.send``)."""
    if rpc in ("Generate", "GenerateStream"):
        return generate_requests(served)
    if rpc == "Score":
        return tensor_requests(pb.ScoreRequest, "data", served, shapes)
    if rpc == "Encode":
        return tensor_requests(pb.EncodeRequest, "data", served, shapes)
    if rpc == "Decode":
        return tensor_requests(pb.DecodeRequest, "latents", served, shapes, output=OUTPUTS)
    if rpc == "SubmitBatch":
        return submit_requests(served)
    assert rpc == "Lookup", rpc
    return LOOKUPS


class Caller:
    """Sends requests over one channel; counts the status codes seen; fails on a
    forbidden one with the request that caused it."""

    def __init__(self, channel: grpc.Channel, timeout_s: float = 20.0) -> None:
        self.stub = pb_grpc.GenerationServiceStub(channel)
        self.batch = bpb_grpc.BatchServiceStub(channel)
        self.timeout_s = timeout_s
        self.codes: collections.Counter[str] = collections.Counter()

    def send(self, rpc: str, request: Any) -> None:
        """``request`` to ``rpc`` (Lookup: the RPC its message type names)."""
        lookups = {bpb.GetBatchRequest: self.batch.GetBatch,
                   bpb.CancelBatchRequest: self.batch.CancelBatch,
                   bpb.ListBatchesRequest: self.batch.ListBatches,
                   pb.ListModelsRequest: self.stub.ListModels}
        if rpc == "Lookup":
            self.call(lookups[type(request)], request)
        elif rpc == "SubmitBatch":
            self.call(self.batch.SubmitBatch, request)
        else:
            self.call(getattr(self.stub, rpc), request, stream=rpc == "GenerateStream")

    def call(self, method: Callable[..., Any], request: Any, *, stream: bool = False) -> None:
        try:
            if stream:
                for _ in method(request, timeout=self.timeout_s):
                    pass
            else:
                method(request, timeout=self.timeout_s)
            self.codes["OK"] += 1
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            self.codes[code.name] += 1
            assert code not in FORBIDDEN, f"{code.name}: {exc.details()} for {request!r:.2000}"  # type: ignore[attr-defined]


# ------------------------------------------------------------------ test harness
SHAPES = [(1, 8, 8), (64,), (4,), (3,), (1, 8, 7), (3, 32, 32)]
# small caps keep each valid request's compute to milliseconds on two cores
LIMITS = api.Limits(max_samples_per_request=8, max_samples_per_stream=24,
                    max_examples_per_request=8, max_work_per_request=200)
RSS_GROWTH_BOUND_MIB = 150


def fuzz_settings(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture,
                                           HealthCheck.filter_too_much])


def rss_mib(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def fuzz_test(rpc: str, examples: int, fixture: str = "state") -> Any:
    """A hypothesis test sending ``examples`` requests to ``rpc`` through the gateway of
    the module fixture ``fixture`` (a dict holding a ``fuzz.Caller`` as "caller")."""
    @fuzz_settings(examples)
    @given(request=requests(rpc, FAMILIES, SHAPES))
    def test(request: Any, **fixtures: dict[str, Any]) -> None:
        fixtures[fixture]["caller"].send(rpc, request)

    # pytest passes fixtures by the names in the signature
    test.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(fixture, inspect.Parameter.POSITIONAL_OR_KEYWORD)])
    return test
