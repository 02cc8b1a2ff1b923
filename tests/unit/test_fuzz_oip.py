"""Property-based fuzzing of the Open Inference Protocol v2 endpoints (gRPC ModelInfer,
ModelStreamInfer and metadata; REST infer with JSON and binary bodies) through a real
gateway over the in-process backend: arbitrary tensors (every datatype name and hostile
ones, negative, huge and overflowing shapes, raw bytes of any length, typed contents of
the wrong kind), parameters of every type, unknown outputs, hostile names and versions —
never get INTERNAL/UNKNOWN (REST: 500), and the gateway still serves afterwards."""

from __future__ import annotations

import collections
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as v2
from tritonclient.grpc import service_pb2_grpc as v2_grpc

from services.gateway.grpc_server import GatewayConfig
from services.gateway.oip_grpc import parameter_to_pb
from services.serving.inprocess import InProcessBackend
from tests import fuzz
from tests.helpers import GatewayThread, tiny_store

ENDPOINTS = [*fuzz.FAMILIES, "flow.score", "vae.encode", "vae.decode", "gan.decode",
             "diffusion.score", "ebm.score", "autoregressive.score", "gan.score", "vae.bogus"]
INPUTS = ["NUM_SAMPLES", "SEED", "LABELS", "DATA", "LATENTS"]
DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64", "BYTES", "BF16"]
PARAMETERS = [*fuzz.OPTION_NAMES, "start_index", "timeout", "priority", "sequence_id",
              "binary_data_output", "shared_memory_region"]
NAMES = st.one_of(st.sampled_from(ENDPOINTS), fuzz.HOSTILE_TEXT)
SHAPE = st.lists(st.one_of(st.integers(-3, 70), st.sampled_from([2**31, 2**62, 2**63 - 1])),
                 max_size=9)
CONTENTS = ["bool_contents", "int_contents", "int64_contents", "uint_contents",
            "uint64_contents", "fp32_contents", "fp64_contents", "bytes_contents"]


@st.composite
def parameter(draw: st.DrawFn) -> Any:
    return draw(st.one_of(st.booleans(), fuzz.INT64, fuzz.UINT64, fuzz.NUMBERS,
                          st.text(max_size=20), st.sampled_from(fuzz.CHOICES)))


@st.composite
def plausible_raw(draw: st.DrawFn, datatype: str, shape: list[int]) -> bytes:
    """Bytes of the right length for ``shape`` when it is small, else anything."""
    sizes = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "UINT32": 4,
             "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8}
    count = int(np.prod(shape)) if shape and all(0 <= d < 5000 for d in shape) else -1
    if datatype in sizes and 0 <= count * sizes[datatype] <= 65536 and draw(st.booleans()):
        if datatype.startswith("FP") and draw(st.booleans()):
            values = draw(st.lists(st.floats(0, 1, width=32), min_size=count, max_size=count))
            return np.asarray(values, f"<f{sizes[datatype]}").tobytes()
        return draw(st.binary(min_size=count * sizes[datatype], max_size=count * sizes[datatype]))
    return draw(st.binary(max_size=200))


@st.composite
def infer_requests(draw: st.DrawFn) -> v2.ModelInferRequest:
    raw = draw(st.booleans())
    inputs, raws = [], []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.one_of(st.sampled_from(INPUTS), fuzz.HOSTILE_TEXT))
        datatype = draw(st.one_of(st.sampled_from(DATATYPES), fuzz.HOSTILE_TEXT))
        shape = draw(st.one_of(SHAPE, st.sampled_from([[1], [3], [2, 1, 8, 8], [1, 64], [2, 3]])))
        tensor = v2.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
        if draw(st.integers(0, 9)) == 0:
            tensor.parameters[draw(st.sampled_from(["binary_data_size", "shared_memory_region",
                                                    "x"]))].CopyFrom(parameter_to_pb(draw(parameter())))
        if raw:
            raws.append(draw(plausible_raw(datatype, shape)))
        else:
            field = draw(st.sampled_from(CONTENTS))
            n = draw(st.integers(0, 12))
            values = {"bool_contents": st.booleans(), "int_contents": fuzz.INT32,
                      "int64_contents": fuzz.INT64, "uint_contents": st.integers(0, 2**32 - 1),
                      "uint64_contents": fuzz.UINT64, "fp32_contents": st.floats(width=32),
                      "fp64_contents": fuzz.NUMBERS, "bytes_contents": st.binary(max_size=20)}
            getattr(tensor.contents, field).extend(draw(st.lists(values[field], min_size=n,
                                                                 max_size=n)))
        inputs.append(tensor)
    if raw and draw(st.integers(0, 9)) == 0:
        raws.append(b"extra")  # more raw entries than inputs
    request = v2.ModelInferRequest(model_name=draw(NAMES),
                                   model_version=draw(st.sampled_from(["", "", "1", "2", "x",
                                                                       "-1", "9" * 30])),
                                   id=draw(st.text(max_size=10)), inputs=inputs,
                                   raw_input_contents=raws)
    for key in draw(st.lists(st.one_of(st.sampled_from(PARAMETERS), st.text(max_size=10)),
                             max_size=4)):
        request.parameters[key].CopyFrom(parameter_to_pb(draw(parameter())))
    for name in draw(st.lists(st.sampled_from(["SAMPLES", "PNG", "SEEDS", "LATENTS", "LOG_PROB",
                                               "TEXT", "?"]), max_size=3)):
        request.outputs.add(name=name)
    return request


JSON_VALUE = st.recursive(st.one_of(st.none(), st.booleans(), fuzz.INT64, st.floats(),
                                    st.text(max_size=8)),
                          lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                  st.dictionaries(st.text(max_size=6), inner,
                                                                  max_size=3)),
                          max_leaves=12)


@st.composite
def rest_bodies(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:
    """(path, body, headers): a v2 JSON request with hostile parts, sometimes binary."""
    def tensor() -> Any:
        shape = draw(st.one_of(SHAPE, JSON_VALUE))
        item: dict[str, Any] = {"name": draw(st.one_of(st.sampled_from(INPUTS), JSON_VALUE)),
                                "datatype": draw(st.one_of(st.sampled_from(DATATYPES), JSON_VALUE)),
                                "shape": shape}
        if draw(st.booleans()):
            item["data"] = draw(st.one_of(JSON_VALUE, st.lists(st.integers(-5, 300), max_size=70),
                                          st.lists(st.floats(0, 1), max_size=70)))
        else:
            item["parameters"] = {"binary_data_size": draw(st.one_of(st.integers(-2, 80),
                                                                     JSON_VALUE))}
        return item

    body: Any = {"inputs": [tensor() for _ in range(draw(st.integers(0, 3)))]}
    if draw(st.booleans()):
        body["parameters"] = {k: draw(JSON_VALUE) for k in draw(st.lists(
            st.sampled_from(PARAMETERS), max_size=3))}
    if draw(st.booleans()):
        body["outputs"] = draw(st.one_of(JSON_VALUE, st.lists(st.fixed_dictionaries(
            {"name": st.sampled_from(["SAMPLES", "PNG", "?"]),
             "parameters": st.fixed_dictionaries({"binary_data": st.booleans()})}), max_size=2)))
    if draw(st.integers(0, 9)) == 0:
        body = draw(JSON_VALUE)
    text = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    binary = draw(st.binary(max_size=100)) if draw(st.booleans()) else b""
    if binary or draw(st.integers(0, 9)) == 0:
        headers["Inference-Header-Content-Length"] = draw(st.one_of(
            st.just(str(len(text))), st.text(st.characters(min_codepoint=32, max_codepoint=126),
                                             max_size=5), st.integers(-1, 500).map(str)))
    version = draw(st.sampled_from(["", "", "/versions/1", "/versions/x", "/versions/99"]))
    name = draw(NAMES)
    safe = urllib.request.quote(name, safe="") or "x"
    return f"/v2/models/{safe}{version}/infer", text + binary, headers


@pytest.fixture(scope="module")
def v2_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("fuzz-v2")
    tiny_store(root / "store", steps=2)
    thread = GatewayThread(
        lambda: InProcessBackend(root / "store", fuzz.FAMILIES, device="cpu", limits=fuzz.LIMITS),
        GatewayConfig(host="127.0.0.1", port=0, http_port=0, health_interval_s=0.5,
                      max_message_bytes=4 * 1024 * 1024))
    channel = grpc.insecure_channel(thread.target)
    state = {"thread": thread, "stub": v2_grpc.GRPCInferenceServiceStub(channel),
             "codes": collections.Counter(), "rss0": fuzz.rss_mib()}
    yield state
    channel.close()
    thread.stop()


def _check(state: dict[str, Any], call: Any, request: Any) -> None:
    try:
        call(request, timeout=20)
        state["codes"]["OK"] += 1
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
        state["codes"][code.name] += 1
        assert code not in fuzz.FORBIDDEN, f"{code.name}: {exc.details()} for {request!r:.2000}"  # type: ignore[attr-defined]


@fuzz.fuzz_settings(600)
@given(request=infer_requests())
def test_fuzz_v2_model_infer(v2_state: dict[str, Any], request: v2.ModelInferRequest) -> None:
    _check(v2_state, v2_state["stub"].ModelInfer, request)


@fuzz.fuzz_settings(60)
@given(requests=st.lists(infer_requests(), min_size=1, max_size=5))
def test_fuzz_v2_stream_infer(v2_state: dict[str, Any], requests: list[v2.ModelInferRequest]
                              ) -> None:
    replies = list(v2_state["stub"].ModelStreamInfer(iter(requests), timeout=30))
    assert len(replies) == len(requests)
    for reply in replies:
        assert not reply.error_message.startswith(("INTERNAL", "UNKNOWN")), reply.error_message


@fuzz.fuzz_settings(150)
@given(name=NAMES, version=st.sampled_from(["", "1", "x", "-1", "9" * 30]))
def test_fuzz_v2_metadata_and_readiness(v2_state: dict[str, Any], name: str, version: str) -> None:
    stub = v2_state["stub"]
    _check(v2_state, stub.ModelMetadata, v2.ModelMetadataRequest(name=name, version=version))
    _check(v2_state, stub.ModelReady, v2.ModelReadyRequest(name=name, version=version))


@fuzz.fuzz_settings(500)
@given(case=rest_bodies())
def test_fuzz_v2_rest_infer(v2_state: dict[str, Any], case: tuple[str, bytes, dict[str, str]]
                            ) -> None:
    path, body, headers = case
    port = v2_state["thread"].gateway.http_port
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
    v2_state["codes"][f"http {status}"] += 1
    assert status < 500 or status in (503, 504), (status, payload[:500], path, body[:500])
    if status != 200:
        assert isinstance(json.loads(payload).get("error"), str)


def test_after_the_v2_fuzz_the_gateway_serves(v2_state: dict[str, Any]) -> None:
    codes = v2_state["codes"]
    print(f"v2 fuzz: {dict(codes)}; RSS {v2_state['rss0']:.0f} -> {fuzz.rss_mib():.0f} MiB")
    if sum(codes.values()) < 1000:
        pytest.skip("run with the fuzz tests above (it checks what they left behind)")
    assert codes["INVALID_ARGUMENT"] > 100 and codes["http 400"] > 100, codes
    assert codes["OK"] + codes["http 200"] > 10, codes  # the fuzz reached the models too
    stub = v2_state["stub"]
    assert stub.ServerReady(v2.ServerReadyRequest(), timeout=10).ready
    request = v2.ModelInferRequest(model_name="gan")
    request.inputs.add(name="NUM_SAMPLES", datatype="INT64", shape=[1]).contents.int64_contents.append(2)
    assert list(stub.ModelInfer(request, timeout=30).outputs[0].shape) == [2, 1, 8, 8]
    admission = v2_state["thread"].gateway.admission
    assert admission.rpcs == 0 and admission.bytes == 0
    assert fuzz.rss_mib() - v2_state["rss0"] < fuzz.RSS_GROWTH_BOUND_MIB
