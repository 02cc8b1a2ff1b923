"""Open Inference Protocol v2 with the real clients, used unmodified: tritonclient.grpc and
tritonclient.http here, the KServe SDK's gRPC and REST clients in a child process
(tests/oip_kserve.py), and plain HTTP for the REST error format. Every family generates,
scores, encodes and decodes the same bytes as the native API; every kind of bad request
gets its status on both transports. The gateway's backend runs the models in-process
here; tests/integration/test_serving.py reruns these tests through Ray."""

from __future__ import annotations

import base64
import json
import queue
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from services.gateway.client import GenfleetClient
from services.gateway.grpc_server import GatewayConfig
from services.gateway.pb.genfleet.v1 import generation_pb2 as pb
from services.models import BUILTIN as FAMILIES
from services.serving.inprocess import InProcessBackend
from tests.helpers import GatewayThread, tiny_store

FAMILIES_V2 = sorted(FAMILIES)
SCORING_V2 = ["autoregressive", "diffusion", "ebm", "flow", "vae"]
ENCODING_V2 = ["diffusion", "flow", "vae"]
DECODING_V2 = ["diffusion", "flow", "gan", "vae"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    tiny_store(root)
    return root


@pytest.fixture(scope="module")
def gateway(store_root: Path) -> Iterator[GatewayThread]:
    thread = GatewayThread(lambda: InProcessBackend(store_root, FAMILIES_V2),
                           GatewayConfig(host="127.0.0.1", port=0, http_port=0,
                                         health_interval_s=0.5))
    yield thread
    thread.stop()


def _http_target(gateway: GatewayThread) -> str:
    assert gateway.gateway.http_port is not None
    return f"127.0.0.1:{gateway.gateway.http_port}"


@pytest.fixture(scope="module")
def v2_grpc(gateway: GatewayThread) -> Iterator[tgrpc.InferenceServerClient]:
    client = tgrpc.InferenceServerClient(gateway.target)
    yield client
    client.close()


@pytest.fixture(scope="module")
def v2_http(gateway: GatewayThread) -> Iterator[thttp.InferenceServerClient]:
    client = thttp.InferenceServerClient(_http_target(gateway), network_timeout=120,
                                         connection_timeout=30)
    yield client
    client.close()


@pytest.fixture(scope="module")
def native(gateway: GatewayThread) -> Iterator[GenfleetClient]:
    with GenfleetClient(gateway.target, timeout=60, retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def infos(native: GenfleetClient) -> dict[str, pb.ModelInfo]:
    return {m.name: m for m in native.list_models()}


CLIENTS = ("grpc", "http")


def _client(which: str, v2_grpc: Any, v2_http: Any) -> tuple[Any, Any]:
    """The client module (for InferInput and friends) and the client."""
    return (tgrpc, v2_grpc) if which == "grpc" else (thttp, v2_http)


def _inputs(module: Any, **tensors: np.ndarray) -> list[Any]:
    dtypes = {np.dtype(np.int64): "INT64", np.dtype(np.uint64): "UINT64",
              np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64"}
    out = []
    for name, array in tensors.items():
        tensor = module.InferInput(name, list(array.shape), dtypes[array.dtype])
        tensor.set_data_from_numpy(array)
        out.append(tensor)
    return out


def _labels(info: pb.ModelInfo, n: int) -> list[int] | None:
    conditional = "conditional" in info.capabilities and len(info.classes) > 0
    return [i % len(info.classes) for i in range(n)] if conditional else None


def _images(n: int = 3) -> np.ndarray:
    from services.core.data import load_digits
    return load_digits().as_float()[:n].astype(np.float32)


# ------------------------------------------------------------ server and metadata
def test_v2_server_liveness_readiness_and_metadata(v2_grpc: Any, v2_http: Any) -> None:
    for client in (v2_grpc, v2_http):
        assert client.is_server_live() and client.is_server_ready()
    meta = v2_grpc.get_server_metadata(as_json=True)
    assert meta["name"] == "genfleet" and "binary_tensor_data" in meta["extensions"]
    assert v2_http.get_server_metadata()["name"] == "genfleet"
    index = {m["name"]: m for m in v2_http.get_model_repository_index()}
    assert {"gan", "flow.score", "vae.encode", "vae.decode", "ebm.score"} <= set(index)
    assert "gan.score" not in index and all(m["state"] == "READY" for m in index.values())
    grpc_index = v2_grpc.get_model_repository_index(as_json=True)["models"]
    assert {m["name"] for m in grpc_index} == set(index)


@pytest.mark.parametrize("family", FAMILIES_V2)
def test_v2_model_metadata_states_each_endpoint(v2_grpc: Any, v2_http: Any,
                                                infos: dict[str, pb.ModelInfo], family: str) -> None:
    info = infos[family]
    shape = [-1, *info.sample_shape]
    meta = v2_http.get_model_metadata(family)
    assert meta == v2_grpc.get_model_metadata(family, as_json=True) | {
        "versions": meta["versions"], "inputs": meta["inputs"], "outputs": meta["outputs"]}
    assert meta["versions"] == [str(info.version)] and meta["platform"] == f"genfleet_{family}"
    inputs = {t["name"]: t for t in meta["inputs"]}
    outputs = {t["name"]: t for t in meta["outputs"]}
    assert inputs["NUM_SAMPLES"]["datatype"] == "INT64" and inputs["SEED"]["datatype"] == "UINT64"
    assert ("LABELS" in inputs) == (_labels(info, 1) is not None)
    assert [int(d) for d in outputs["SAMPLES"]["shape"]] == shape
    assert v2_grpc.is_model_ready(family) and v2_http.is_model_ready(family)
    grpc_meta = v2_grpc.get_model_metadata(family, as_json=True)
    assert [int(d) for d in grpc_meta["outputs"][0]["shape"]] == shape
    for op, capability in (("score", "log_prob"), ("encode", "encode"), ("decode", "decode")):
        name = f"{family}.{op}"
        if capability in info.capabilities:
            m = v2_http.get_model_metadata(name)
            assert m["name"] == name and m["inputs"][0]["name"] in ("DATA", "LATENTS")
        else:  # a name the model does not answer to
            assert not v2_grpc.is_model_ready(name) and not v2_http.is_model_ready(name)
            with pytest.raises(InferenceServerException) as info_exc:
                v2_http.get_model_metadata(name)
            assert info_exc.value.status() == "404"


def test_v2_model_config_for_triton_tools(v2_grpc: Any, v2_http: Any,
                                          infos: dict[str, pb.ModelInfo]) -> None:
    config = v2_http.get_model_config("flow.score")
    assert config == v2_grpc.get_model_config("flow.score", as_json=True)["config"] | {
        "max_batch_size": config["max_batch_size"], "input": config["input"],
        "output": config["output"]}
    assert config["max_batch_size"] == 0 and config["platform"] == "genfleet_flow"
    data = {t["name"]: t for t in config["input"]}
    assert data["DATA"]["data_type"] == "TYPE_FP32" and not data["DATA"].get("optional")
    assert [int(d) for d in data["DATA"]["dims"]] == [-1, *infos["flow"].sample_shape]
    assert data["LABELS"]["optional"] is True
    generate = v2_grpc.get_model_config("gan", as_json=True)["config"]
    assert all(t.get("optional") for t in generate["input"])
    assert {t["name"]: t["data_type"] for t in generate["output"]}["PNG"] == "TYPE_STRING"


# ------------------------------------------------------------ the same bytes as native
@pytest.mark.parametrize("which", CLIENTS)
@pytest.mark.parametrize("family", FAMILIES_V2)
def test_v2_generate_gives_the_native_bytes(which: str, family: str, v2_grpc: Any, v2_http: Any,
                                            native: GenfleetClient,
                                            infos: dict[str, pb.ModelInfo]) -> None:
    module, client = _client(which, v2_grpc, v2_http)
    labels = _labels(infos[family], 3)
    tensors: dict[str, np.ndarray] = {"NUM_SAMPLES": np.array([3], np.int64),
                                      "SEED": np.array([7], np.uint64)}
    if labels is not None:
        tensors["LABELS"] = np.array(labels, np.int64)
    result = client.infer(family, _inputs(module, **tensors), request_id="r-1")
    expected = native.generate(family, 3, seed=7, labels=labels)
    assert expected.samples is not None
    samples = result.as_numpy("SAMPLES")
    assert samples.dtype == expected.samples.dtype and samples.tobytes() == expected.samples.tobytes()
    assert result.as_numpy("SEEDS").tolist() == list(expected.seeds)
    response = result.get_response(as_json=True) if which == "grpc" else result.get_response()
    assert response["id"] == "r-1" and response["model_version"] == str(infos[family].version)
    if infos[family].data_kind == "text":
        assert len(result.as_numpy("TEXT")) == 3


@pytest.mark.parametrize("which", CLIENTS)
def test_v2_options_start_index_and_png(which: str, v2_grpc: Any, v2_http: Any,
                                        native: GenfleetClient) -> None:
    module, client = _client(which, v2_grpc, v2_http)
    tensors = _inputs(module, NUM_SAMPLES=np.array([2], np.int64), SEED=np.array([5], np.uint64),
                      LABELS=np.array([3, 4], np.int64))
    outputs = [module.InferRequestedOutput("SAMPLES"), module.InferRequestedOutput("PNG")]
    result = client.infer("diffusion", tensors, outputs=outputs,
                          parameters={"steps": 2, "start_index": 4})
    expected = native.generate("diffusion", 2, seed=5, labels=[3, 4], options={"steps": 2},
                               output="both", start_index=4)
    assert expected.samples is not None
    assert result.as_numpy("SAMPLES").tobytes() == expected.samples.tobytes()
    assert [bytes(p) for p in result.as_numpy("PNG")] == list(expected.png)
    assert result.as_numpy("SEEDS") is None  # only what was asked for


def test_v2_rest_json_without_binary_data(gateway: GatewayThread, native: GenfleetClient) -> None:
    """curl's view: plain JSON in and out, PNG as base64 marked as such."""
    body = {"id": "j", "inputs": [{"name": "NUM_SAMPLES", "shape": [1], "datatype": "INT64",
                                   "data": [2]},
                                  {"name": "SEED", "shape": [1], "datatype": "UINT64", "data": [9]}],
            "outputs": [{"name": "SAMPLES"}, {"name": "PNG"}, {"name": "SEEDS"}]}
    status, headers, doc = _post(gateway, "/v2/models/vae/infer", body)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    expected = native.generate("vae", 2, seed=9, output="both")
    assert expected.samples is not None
    out = {o["name"]: o for o in doc["outputs"]}
    samples = np.asarray(out["SAMPLES"]["data"], np.float32).reshape(out["SAMPLES"]["shape"])
    assert samples.tobytes() == expected.samples.tobytes()
    assert out["PNG"]["parameters"] == {"content_type": "base64"}
    assert [base64.b64decode(p) for p in out["PNG"]["data"]] == list(expected.png)
    assert out["SEEDS"]["data"] == list(expected.seeds) and doc["id"] == "j"


@pytest.mark.parametrize("which", CLIENTS)
@pytest.mark.parametrize("family", SCORING_V2)
def test_v2_score_gives_the_native_values(which: str, family: str, v2_grpc: Any, v2_http: Any,
                                          native: GenfleetClient) -> None:
    module, client = _client(which, v2_grpc, v2_http)
    x = _images()
    result = client.infer(f"{family}.score", _inputs(module, DATA=x))
    expected = native.score(family, x)
    assert result.as_numpy("LOG_PROB").tolist() == list(expected.log_prob)
    bpd = result.as_numpy("BITS_PER_DIM")
    assert bpd.tolist() == list(expected.bits_per_dim)
    response = result.get_response(as_json=True) if which == "grpc" else result.get_response()
    kind = response["parameters"]["score_kind"]
    assert (kind["string_param"] if which == "grpc" else kind) == expected.kind


@pytest.mark.parametrize("which", CLIENTS)
@pytest.mark.parametrize("family", DECODING_V2)
def test_v2_encode_and_decode_give_the_native_values(which: str, family: str, v2_grpc: Any,
                                                     v2_http: Any, native: GenfleetClient,
                                                     infos: dict[str, pb.ModelInfo]) -> None:
    module, client = _client(which, v2_grpc, v2_http)
    x = _images()
    labels = _labels(infos[family], 3)
    extra = {"LABELS": np.array(labels, np.int64)} if labels else {}
    if family in ENCODING_V2:
        z = client.infer(f"{family}.encode", _inputs(module, DATA=x, **extra)).as_numpy("LATENTS")
        assert z.tobytes() == native.encode(family, x, labels=labels).tobytes()
    else:
        z = np.zeros((3, *infos[family].latent_shape), np.float32)
    decoded = client.infer(f"{family}.decode", _inputs(module, LATENTS=z, **extra))
    expected = native.decode(family, z, labels=labels)
    assert expected.samples is not None
    assert decoded.as_numpy("SAMPLES").tobytes() == expected.samples.tobytes()


def test_v2_stream_answers_each_request_by_id(v2_grpc: Any, native: GenfleetClient) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    v2_grpc.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(4):
            n = 10**6 if i == 2 else 2  # the third is over the cap: its own error only
            v2_grpc.async_stream_infer("gan", _inputs(tgrpc, NUM_SAMPLES=np.array([n], np.int64),
                                                      SEED=np.array([i], np.uint64)),
                                       request_id=f"s{i}")
        got = [answers.get(timeout=60) for _ in range(4)]
    finally:
        v2_grpc.stop_stream()
    ok = {r.get_response().id: r for r, e in got if e is None}
    errors = [e for r, e in got if e is not None]
    assert sorted(ok) == ["s0", "s1", "s3"] and len(errors) == 1
    assert "INVALID_ARGUMENT" in str(errors[0]) and "num_samples" in str(errors[0])
    for i in (0, 1, 3):
        expected = native.generate("gan", 2, seed=i).samples
        assert expected is not None
        assert ok[f"s{i}"].as_numpy("SAMPLES").tobytes() == expected.tobytes()


# ------------------------------------------------------------ every bad request
def _gen(module: Any, **extra: np.ndarray) -> list[Any]:
    return _inputs(module, **({"NUM_SAMPLES": np.array([1], np.int64)} | extra))


BAD: dict[str, tuple[str, Any, dict[str, Any], grpc.StatusCode]] = {
    # case: (model, inputs(module), infer kwargs, status)
    "unknown model": ("nope", lambda m: _gen(m), {}, grpc.StatusCode.NOT_FOUND),
    "operation the model lacks": ("gan.score", lambda m: _inputs(m, DATA=_images()), {},
                                  grpc.StatusCode.NOT_FOUND),
    "version not served": ("gan", lambda m: _gen(m), {"model_version": "99"},
                           grpc.StatusCode.NOT_FOUND),
    "unknown input": ("gan", lambda m: _gen(m, WHAT=np.array([1], np.int64)), {},
                      grpc.StatusCode.INVALID_ARGUMENT),
    "wrong datatype": ("flow.score", lambda m: _inputs(m, DATA=_images().astype(np.float64)), {},
                       grpc.StatusCode.INVALID_ARGUMENT),
    "wrong shape": ("flow.score", lambda m: _inputs(m, DATA=np.zeros((2, 5), np.float32)), {},
                    grpc.StatusCode.INVALID_ARGUMENT),
    "out of range data": ("flow.score", lambda m: _inputs(m, DATA=_images() + 7), {},
                          grpc.StatusCode.INVALID_ARGUMENT),
    "over the sample cap": ("gan", lambda m: _gen(m, NUM_SAMPLES=np.array([10**6], np.int64)),
                            {}, grpc.StatusCode.INVALID_ARGUMENT),
    "unknown option": ("gan", lambda m: _gen(m), {"parameters": {"warp": 9}},
                       grpc.StatusCode.INVALID_ARGUMENT),
    "option out of range": ("diffusion", lambda m: _gen(m), {"parameters": {"steps": 10**7}},
                            grpc.StatusCode.INVALID_ARGUMENT),
    "unknown output": ("gan", lambda m: _gen(m), {"outputs": "NOPE"},
                       grpc.StatusCode.INVALID_ARGUMENT),
    "labels on an unconditional model": ("ebm", lambda m: _gen(m, LABELS=np.array([1], np.int64)),
                                         {}, grpc.StatusCode.INVALID_ARGUMENT),
    "sequence batching": ("gan", lambda m: _gen(m), {"sequence_id": 4},
                          grpc.StatusCode.INVALID_ARGUMENT),
    "a BYTES input": ("gan", lambda m: _bytes_input(m), {}, grpc.StatusCode.INVALID_ARGUMENT),
    "deadline": ("ebm", lambda m: _gen(m, NUM_SAMPLES=np.array([256], np.int64)),
                 {"parameters": {"steps": 1000}, "timeout": 1},
                 grpc.StatusCode.DEADLINE_EXCEEDED),
}
def _bytes_input(module: Any) -> list[Any]:
    tensor = module.InferInput("SEED", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"7"], dtype=np.object_))
    return [tensor]


HTTP = {grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.INVALID_ARGUMENT: 400,
        grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.UNAUTHENTICATED: 401,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 429}


@pytest.mark.parametrize("which", CLIENTS)
@pytest.mark.parametrize("case", sorted(BAD))
def test_v2_bad_request_gets_its_status(which: str, case: str, v2_grpc: Any, v2_http: Any) -> None:
    module, client = _client(which, v2_grpc, v2_http)
    model, inputs, kwargs, code = BAD[case]
    kwargs = dict(kwargs)
    if "outputs" in kwargs:
        kwargs["outputs"] = [module.InferRequestedOutput(kwargs["outputs"])]
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, inputs(module), **kwargs)
    expected = f"StatusCode.{code.name}" if which == "grpc" else str(HTTP[code])
    assert info.value.status() == expected, (info.value.status(), info.value.message())
    assert info.value.message()  # a message that says what is wrong


def _post(gateway: GatewayThread, path: str, body: Any, headers: dict[str, str] | None = None,
          raw: bytes | None = None) -> tuple[int, Any, Any]:
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{_http_target(gateway)}{path}", data=data,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, json.loads(exc.read())


@pytest.mark.parametrize(("raw", "path", "status"), [
    (b"{not json", "/v2/models/gan/infer", 400),
    (b"[1, 2]", "/v2/models/gan/infer", 400),
    (b'{"inputs": [{"name": "NUM_SAMPLES", "shape": [1], "datatype": "INT64", "data": ["2"]}]}',
     "/v2/models/gan/infer", 400),
    (b'{"inputs": [{"name": "NUM_SAMPLES", "shape": [2], "datatype": "INT64", "data": [2]}]}',
     "/v2/models/gan/infer", 400),
    (b'{"inputs": [{"name": "SEED", "shape": [1], "datatype": "UINT64", "data": [-1]}]}',
     "/v2/models/gan/infer", 400),
    (b'{"inputs": [{"name": "SEED", "shape": [1], "datatype": "COMPLEX", "data": [1]}]}',
     "/v2/models/gan/infer", 400),
    (b'{"inputs": [{"name": "DATA", "shape": [1], "datatype": "FP32", "data": ' + b"[" * 5000
     + b"1" + b"]" * 5000 + b"}]}", "/v2/models/flow.score/infer", 400),
    (b'{"inputs": []}', "/v2/models/gan/versions/x/infer", 404),
    (b'{"inputs": []}', "/v2/models/gan/versions/7/infer", 404),
    (b"{}", "/v2/nothing/here", 404),
])
def test_v2_rest_errors_are_v2_error_json(gateway: GatewayThread, raw: bytes, path: str,
                                          status: int) -> None:
    got, headers, doc = _post(gateway, path, None, raw=raw)
    assert got == status and isinstance(doc.get("error"), str) and doc["error"]
    assert headers["Content-Type"].startswith("application/json")


def test_v2_rest_large_json_bodies_are_answered(gateway: GatewayThread,
                                                native: GenfleetClient) -> None:
    """A JSON body past the size the gateway decodes on its event loop (it decodes it in a
    worker thread) gives the same answer as the native API."""
    x = np.tile(_images(8), (125, 1, 1, 1))  # 1,000 examples, ~0.6 MB of JSON
    body = {"inputs": [{"name": "DATA", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.reshape(-1).tolist()}]}
    assert len(json.dumps(body)) > 256 * 1024
    status, _, doc = _post(gateway, "/v2/models/flow.score/infer", body)
    assert status == 200, doc
    out = {o["name"]: o for o in doc["outputs"]}
    assert out["LOG_PROB"]["data"] == list(native.score("flow", x).log_prob)


def test_v2_over_capacity_is_429_with_retry_after(gateway: GatewayThread, v2_grpc: Any) -> None:
    admission = gateway.gateway.admission
    held = admission.max_rpcs - admission.rpcs
    admission.rpcs += held  # the gateway full, as if that many calls were in flight
    try:
        status, headers, doc = _post(gateway, "/v2/models/gan/infer", {"inputs": []})
        assert status == 429 and int(headers["Retry-After"]) >= 1 and "capacity" in doc["error"]
        with pytest.raises(InferenceServerException) as info:
            v2_grpc.infer("gan", _gen(tgrpc))
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert v2_grpc.is_server_live()  # health still answers
    finally:
        admission.rpcs -= held


# ------------------------------------------------------------ security, metrics, KServe
def test_v2_tls_and_token(store_root: Path, pki: dict[str, Path]) -> None:
    gw = GatewayThread(lambda: InProcessBackend(store_root, ["gan"]),
                       GatewayConfig(host="127.0.0.1", port=0, http_port=0, token="s3cret",
                                     tls_cert=pki["cert"], tls_key=pki["key"]))
    auth = {"authorization": "Bearer s3cret"}
    try:
        g = tgrpc.InferenceServerClient(gw.target, ssl=True,
                                        root_certificates=str(pki["ca"]))
        assert g.is_server_live()  # liveness and readiness need no token (probes)
        assert g.infer("gan", _gen(tgrpc), headers=auth).as_numpy("SAMPLES").shape[0] == 1
        with pytest.raises(InferenceServerException) as info:
            g.infer("gan", _gen(tgrpc))
        assert info.value.status() == "StatusCode.UNAUTHENTICATED"
        g.close()
        h = thttp.InferenceServerClient(f"127.0.0.1:{gw.gateway.http_port}", ssl=True,
                                        ssl_options={"ca_certs": str(pki["ca"])},
                                        insecure=False)
        assert h.is_server_ready()
        assert h.infer("gan", _gen(thttp), headers=auth).as_numpy("SAMPLES").shape[0] == 1
        with pytest.raises(InferenceServerException) as info:
            h.infer("gan", _gen(thttp), headers={"authorization": "Bearer wrong"})
        assert info.value.status() == "401"
        h.close()
        plain = thttp.InferenceServerClient(f"127.0.0.1:{gw.gateway.http_port}",
                                            network_timeout=5, connection_timeout=5)
        with pytest.raises(Exception):  # noqa: B017 - a plaintext client gets no answer
            plain.infer("gan", _gen(thttp), headers=auth)
        plain.close()
    finally:
        gw.stop()


def test_v2_metrics_are_labelled_by_protocol(gateway: GatewayThread, v2_grpc: Any,
                                             v2_http: Any) -> None:
    v2_grpc.infer("gan", _gen(tgrpc))
    v2_http.infer("gan", _gen(thttp))
    with pytest.raises(InferenceServerException):
        v2_http.infer("nope", _gen(thttp))
    registry = gateway.gateway.metrics.registry

    def count(**labels: str) -> float:
        return registry.get_sample_value("genfleet_gateway_requests_total", labels) or 0.0

    assert count(method="ModelInfer", model="gan", protocol="v2-grpc", code="OK") >= 1
    assert count(method="ModelInfer", model="gan", protocol="v2-rest", code="OK") >= 1
    assert count(method="ModelInfer", model="other", protocol="v2-rest", code="NOT_FOUND") >= 1


def test_v2_kserve_sdk_clients(gateway: GatewayThread, native: GenfleetClient) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tests.oip_kserve", gateway.target,
         f"http://{_http_target(gateway)}", "vae", "3", "11"],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    expected = native.generate("vae", 3, seed=11).samples
    assert expected is not None
    for key in ("grpc_live", "grpc_ready", "grpc_model_ready", "rest_live", "rest_ready",
                "rest_model_ready"):
        assert got[key] is True, key
    assert got["grpc_samples"] == got["rest_samples"] == expected.astype("<f4").tobytes().hex()
    assert got["grpc_metadata"]["name"] == "vae" and got["grpc_id"] == "kserve-1"
    assert ["SAMPLES", "FP32", [-1, 1, 8, 8]] in got["grpc_metadata"]["outputs"]
    assert got["rest_error"][0] == 400 and "num_samples" in got["rest_error"][1]


def test_v2_mutual_tls_on_both_transports(store_root: Path, pki: dict[str, Path]) -> None:
    gw = GatewayThread(lambda: InProcessBackend(store_root, ["gan"]),
                       GatewayConfig(host="127.0.0.1", port=0, http_port=0, tls_cert=pki["cert"],
                                     tls_key=pki["key"], tls_client_ca=pki["ca"]))
    mine = {"private_key": str(pki["client_key"]), "certificate_chain": str(pki["client_cert"])}
    try:
        g = tgrpc.InferenceServerClient(gw.target, ssl=True, root_certificates=str(pki["ca"]),
                                        **mine)
        assert g.infer("gan", _gen(tgrpc)).as_numpy("SAMPLES").shape[0] == 1
        g.close()
        http = f"127.0.0.1:{gw.gateway.http_port}"
        h = thttp.InferenceServerClient(http, ssl=True, ssl_options={
            "ca_certs": str(pki["ca"]), "certfile": str(pki["client_cert"]),
            "keyfile": str(pki["client_key"])})
        assert h.infer("gan", _gen(thttp)).as_numpy("SAMPLES").shape[0] == 1
        h.close()
        no_cert = thttp.InferenceServerClient(http, ssl=True, network_timeout=5,
                                              connection_timeout=5,
                                              ssl_options={"ca_certs": str(pki["ca"])})
        with pytest.raises(Exception):  # noqa: B017 - the handshake fails: no answer at all
            no_cert.infer("gan", _gen(thttp))
        no_cert.close()
    finally:
        gw.stop()


def test_v2_body_limit_and_readiness_follow_the_gateway(store_root: Path) -> None:
    """A REST body over the message limit is 413 before it is read whole; when what the
    gateway serves from is lost, v2 readiness says so at once and calls are UNAVAILABLE."""
    gw = GatewayThread(lambda: InProcessBackend(store_root, ["gan", "flow"]),
                       GatewayConfig(host="127.0.0.1", port=0, http_port=0,
                                     max_message_bytes=64 * 1024))
    try:
        big = {"inputs": [{"name": "DATA", "shape": [300, 1, 8, 8], "datatype": "FP32",
                           "data": [0.5] * (300 * 64)}]}
        status, headers, doc = _post(gw, "/v2/models/flow.score/infer", big)
        assert status == 413 and "65536" in doc["error"]
        g = tgrpc.InferenceServerClient(gw.target)
        assert g.is_server_ready() and g.is_model_ready("gan") and g.is_model_ready("flow.score")
        gw.run(gw.gateway.lose("the Ray head died"))
        assert not g.is_server_ready() and not g.is_model_ready("gan")
        with pytest.raises(InferenceServerException) as info:
            g.infer("gan", _gen(tgrpc))
        assert info.value.status() == "StatusCode.UNAVAILABLE"
        assert "Ray head" in info.value.message()
        g.close()
        request = urllib.request.Request(f"http://127.0.0.1:{gw.gateway.http_port}/v2/health/ready")
        with pytest.raises(urllib.error.HTTPError) as http_info:
            urllib.request.urlopen(request, timeout=10)
        assert http_info.value.code == 503
        body = {"inputs": [{"name": "NUM_SAMPLES", "shape": [1], "datatype": "INT64", "data": [1]}]}
        status, headers, doc = _post(gw, "/v2/models/gan/infer", body)
        assert status == 503 and "Ray head" in doc["error"] and "Retry-After" in headers
    finally:
        gw.stop()


@pytest.mark.parametrize("flag", ["--port", "--http-port"])
def test_a_port_in_use_is_one_clear_error(store_root: Path, flag: str) -> None:
    import asyncio
    import socket

    from services.core.errors import InvalidArgument
    from services.gateway.grpc_server import Gateway

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    ports = {"port": busy, "http_port": 0} if flag == "--port" else {"port": 0, "http_port": busy}
    gateway = Gateway(InProcessBackend(store_root, ["gan"]),
                      GatewayConfig(host="127.0.0.1", **ports))
    try:
        with pytest.raises(InvalidArgument, match=f"^{flag}: cannot listen on 127.0.0.1:{busy}"):
            asyncio.run(gateway.start())
    finally:
        taken.close()
