"""The gateway protects itself and its callers: caps reported and enforced before work,
streams planned lazily, responses predicted against the message limit, admission bounds
with a retry delay, a client that retries only what the server marks retryable, and a
configuration that refuses to start when it cannot be what was meant."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.core import api
from services.core.errors import CheckpointError, InvalidArgument
from services.core.store import ModelStore
from services.gateway.client import PUSHBACK, GenfleetClient, retry_delay
from services.gateway.grpc_server import GatewayConfig
from services.gateway.pb.genfleet.v1 import generation_pb2 as pb
from services.gateway.pb.genfleet.v1 import generation_pb2_grpc as pb_grpc
from services.serving.inprocess import InProcessBackend
from tests.helpers import GatewayThread, tiny_store

LIMITS = api.Limits(max_samples_per_request=8, max_samples_per_stream=40,
                    max_examples_per_request=16, max_work_per_request=300)


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    tiny_store(root, ["gan", "diffusion", "vae"], steps=2)
    return root


class HeldBackend(InProcessBackend):
    """InProcessBackend whose Generate waits until ``release`` is set (an RPC held in flight)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.release = threading.Event()
        self.entered = threading.Event()

    async def generate(self, request: api.GenerateRequest) -> api.GenerateResult:
        if request.seed == 4242:
            self.entered.set()
            while not self.release.is_set():
                await asyncio.sleep(0.01)
        return await super().generate(request)


@pytest.fixture(scope="module")
def gateway(store_root: Path) -> Iterator[GatewayThread]:
    config = GatewayConfig(host="127.0.0.1", port=0, max_message_bytes=256 * 1024,
                           max_concurrent_rpcs=2)
    thread = GatewayThread(lambda: HeldBackend(store_root, ["diffusion", "gan", "vae"],
                                               device="cpu", limits=LIMITS), config)
    yield thread
    thread.stop()


@pytest.fixture
def stub(gateway: GatewayThread) -> Iterator[pb_grpc.GenerationServiceStub]:
    with grpc.insecure_channel(gateway.target) as channel:
        yield pb_grpc.GenerationServiceStub(channel)


def _status(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_list_models_reports_every_cap_and_the_options_that_cost(stub: Any) -> None:
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models}
    d = models["diffusion"]
    assert (d.max_samples_per_request, d.max_samples_per_stream, d.max_examples_per_request,
            d.max_work_per_request) == (8, 40, 16, 300)
    costly = {o.name for o in d.sampler_options if o.multiplies_work}
    assert costly == {"steps"}
    assert {o.name for o in d.score_options if o.multiplies_work} == {"timesteps"}
    assert not [o for o in models["gan"].sampler_options if o.multiplies_work]


@pytest.mark.parametrize(("rpc", "request_", "needle"), [
    ("Generate", pb.GenerateRequest(model="diffusion", num_samples=9), "max_samples_per_request"),
    ("Generate", pb.GenerateRequest(model="diffusion", num_samples=8,
                                    options={"steps": pb.OptionValue(number=40)}),
     "max_work_per_request=300"),
    ("Generate", pb.GenerateRequest(model="diffusion", num_samples=1,
                                    options={"steps": pb.OptionValue(number=float("nan"))}),
     "options.steps"),
    ("Score", pb.ScoreRequest(model="vae", data=pb.Tensor(
        dtype=pb.DTYPE_UINT8, shape=[17, 1, 8, 8], data=bytes(17 * 64))),
     "max_examples_per_request"),
    ("Score", pb.ScoreRequest(model="vae", options={"samples": pb.OptionValue(number=4096)},
                              data=pb.Tensor(dtype=pb.DTYPE_UINT8, shape=[1, 1, 8, 8],
                                             data=bytes(64))),
     "max_work_per_request"),
    ("Score", pb.ScoreRequest(model="vae", data=pb.Tensor(
        dtype=pb.DTYPE_FLOAT32, shape=[2**32, 2**32])), "at most"),
    ("Encode", pb.EncodeRequest(model="vae", data=pb.Tensor(
        dtype=pb.DTYPE_FLOAT32, shape=[-1, 1, 8, 8])), "non-negative"),
])
def test_over_a_cap_is_invalid_argument_naming_it(stub: Any, rpc: str, request_: Any,
                                                  needle: str) -> None:
    started = time.perf_counter()
    exc = _status(lambda: getattr(stub, rpc)(request_, timeout=30))
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
    assert needle in exc.details()
    assert time.perf_counter() - started < 5


def test_a_huge_stream_is_refused_at_once_and_a_capped_one_streams_lazily(stub: Any) -> None:
    started = time.perf_counter()
    req = pb.GenerateRequest(model="gan", num_samples=2**31 - 1, chunk_size=1)
    exc = _status(lambda: list(stub.GenerateStream(req, timeout=30)))
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_samples_per_stream" in exc.details()
    assert time.perf_counter() - started < 2
    chunks = list(stub.GenerateStream(pb.GenerateRequest(model="gan", num_samples=40,
                                                         chunk_size=8, seed=3), timeout=60))
    assert [len(c.seeds) for c in chunks] == [8] * 5
    exc = _status(lambda: list(stub.GenerateStream(
        pb.GenerateRequest(model="gan", num_samples=40, chunk_size=9), timeout=30)))
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT and "chunk_size" in exc.details()


def test_a_response_over_the_message_limit_is_refused_before_compute(stub: Any) -> None:
    # 8 diffusion samples as tensor + PNG fit in 256 KiB; the limit is checked, not hit
    stub.Generate(pb.GenerateRequest(model="diffusion", num_samples=8,
                                     output=pb.OUTPUT_FORMAT_BOTH), timeout=60)
    latents = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[16, 1, 8, 8], data=bytes(16 * 64 * 4))
    stub.Decode(pb.DecodeRequest(model="diffusion", latents=latents), timeout=60)


def test_admission_bounds_rpcs_in_flight_with_a_retry_delay(gateway: GatewayThread,
                                                           stub: Any) -> None:
    backend: HeldBackend = gateway.gateway.backend  # type: ignore[assignment]
    held = [stub.Generate.future(pb.GenerateRequest(model="gan", num_samples=1, seed=4242),
                                 timeout=60) for _ in range(2)]
    try:
        assert backend.entered.wait(30)
        deadline = time.monotonic() + 10
        while gateway.gateway.admission.rpcs < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        exc = _status(lambda: stub.Generate(pb.GenerateRequest(model="gan", num_samples=1),
                                            timeout=30))
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "gateway is at capacity" in exc.details()
        assert dict(exc.trailing_metadata())[PUSHBACK] == "50"  # type: ignore[attr-defined]
        assert retry_delay(exc) == 0.05
        # health is not counted: probes answer while the gateway is full
        with GenfleetClient(gateway.target) as client:
            assert client.health() == "SERVING"
    finally:
        backend.release.set()
    for future in held:
        future.result()
    assert gateway.gateway.admission.rpcs == 0 and gateway.gateway.admission.bytes == 0


def test_the_client_retries_only_what_the_server_marks_retryable() -> None:
    class Fake(grpc.RpcError):
        def __init__(self, code: grpc.StatusCode, trailers: tuple[tuple[str, str], ...] = ()):
            self._code, self._trailers = code, trailers

        def code(self) -> grpc.StatusCode:
            return self._code

        def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
            return self._trailers

    assert retry_delay(Fake(grpc.StatusCode.INTERNAL)) is None
    assert retry_delay(Fake(grpc.StatusCode.INVALID_ARGUMENT)) is None
    assert retry_delay(Fake(grpc.StatusCode.RESOURCE_EXHAUSTED)) is None  # e.g. message size
    assert retry_delay(Fake(grpc.StatusCode.RESOURCE_EXHAUSTED, ((PUSHBACK, "100"),))) == 0.1
    assert retry_delay(Fake(grpc.StatusCode.UNAVAILABLE, ((PUSHBACK, "1000"),))) == 1.0
    assert retry_delay(Fake(grpc.StatusCode.UNAVAILABLE, ((PUSHBACK, "-1"),))) is None
    assert retry_delay(Fake(grpc.StatusCode.UNAVAILABLE)) == 0.0  # transport: gateway gone
    assert retry_delay(Fake(grpc.StatusCode.CANCELLED)) == 0.0  # a call that raced a stop

    calls: list[float] = []

    def failing(code: grpc.StatusCode, trailers: tuple[tuple[str, str], ...]) -> Any:
        def call(timeout: float) -> Any:
            calls.append(time.monotonic())
            raise Fake(code, trailers)
        return call

    client = GenfleetClient("127.0.0.1:1", retries=3, backoff_s=0.001)
    with pytest.raises(Fake):
        client._retry(failing(grpc.StatusCode.INTERNAL, ()), 5)
    assert len(calls) == 1
    calls.clear()
    with pytest.raises(Fake):
        client._retry(failing(grpc.StatusCode.RESOURCE_EXHAUSTED, ((PUSHBACK, "200"),)), 5)
    assert len(calls) == 4 and all(b - a >= 0.19 for a, b in itertools.pairwise(calls))
    client.close()


# ------------------------------------------------------------------ misconfiguration
def _certs(tmp_path: Path) -> tuple[Path, Path, Path]:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    paths = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(paths[0]))
    cert.private_key_pem.write_to_path(str(paths[1]))
    ca.cert_pem.write_to_path(str(paths[2]))
    return paths


def test_tls_and_token_settings_that_do_not_form_a_set_refuse_to_start(tmp_path: Path) -> None:
    cert, key, ca = _certs(tmp_path)
    GatewayConfig(tls_cert=cert, tls_key=key, tls_client_ca=ca, token="t").validate()
    bad = [
        (GatewayConfig(tls_cert=cert), "give both"),
        (GatewayConfig(tls_key=key), "give both"),
        (GatewayConfig(tls_client_ca=ca), "needs --tls-cert"),
        (GatewayConfig(tls_cert=cert, tls_key=tmp_path / "missing.pem"), "cannot read"),
        (GatewayConfig(tls_cert=key, tls_key=cert), "not a PEM certificate chain"),
        (GatewayConfig(tls_cert=cert, tls_key=key, tls_client_ca=key), "no PEM CA"),
        (GatewayConfig(token=""), "--token: is empty"),
        (GatewayConfig(token="   "), "--token: is empty"),
        (GatewayConfig(max_concurrent_rpcs=0), "max_concurrent_rpcs"),
    ]
    for config, message in bad:
        with pytest.raises(InvalidArgument, match=message):
            config.validate()


@pytest.mark.parametrize("flags", [["--tls-cert", "x.pem"], ["--token", ""],
                                   ["--tls-client-ca", "ca.pem"]])
def test_the_cli_refuses_a_bad_gateway_config_with_one_line_and_exit_2(tmp_path: Path,
                                                                        flags: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "--store",
                           str(tmp_path / "store"), "up", *flags],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path.cwd())})
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("genfleet: error: --t"), proc.stderr
    assert not (tmp_path / "store").exists(), "it did work before refusing"


# ------------------------------------------------------------------ store rollouts
def test_a_rollout_to_a_broken_version_is_refused_and_replicas_keep_serving(
        store_root: Path, tmp_path: Path) -> None:
    import shutil

    from services.serving import operations
    from services.serving.config import load_config
    from services.serving.engine import ReplicaEngine

    root = tmp_path / "store"
    shutil.copytree(store_root, root)
    store = ModelStore(root)
    meta = store.meta("gan")
    v2 = store.save("gan", family="gan", config=meta.config,
                    state=store.load_state("gan")[1], data=meta.data)
    (v2.path / "model.safetensors").write_bytes(b"truncated")
    config = load_config(models=["gan"])
    config.models["gan"].version = 1
    operations.save_state(config, store)
    with pytest.raises(CheckpointError, match="gan@2 is broken"):
        operations.rollout(store, "gan", 2)
    assert operations.load_state(store).models["gan"].version == 1
    server = ReplicaEngine(root, "gan", 1, device="cpu")
    with pytest.raises(CheckpointError, match="gan@2"):
        server.load(2)
    assert server.version == 1  # the old version is still the one served
    assert ReplicaEngine(root, "gan", device="cpu").version == 1  # latest intact


def test_a_lost_cluster_fails_calls_in_flight_and_new_ones_at_once(store_root: Path) -> None:
    """``Gateway.lose`` (what ``genfleet up`` calls when its Ray head dies): NOT_SERVING, the
    call held in flight and every new call end with UNAVAILABLE naming the cause, long
    before their deadlines."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    thread = GatewayThread(lambda: HeldBackend(store_root, ["gan"], device="cpu"),
                           GatewayConfig(host="127.0.0.1", port=0))
    backend: HeldBackend = thread.gateway.backend  # type: ignore[assignment]
    try:
        with grpc.insecure_channel(thread.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            held = stub.Generate.future(pb.GenerateRequest(model="gan", num_samples=1,
                                                           seed=4242), timeout=60)
            assert backend.entered.wait(10)
            started = time.monotonic()
            thread.run(thread.gateway.lose("the Ray head's GCS exited (test)"))
            with pytest.raises(grpc.RpcError) as info:
                held.result(timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "the Ray head's GCS exited (test)" in (info.value.details() or "")
            assert time.monotonic() - started < 2.0
            new = _status(lambda: stub.Generate(pb.GenerateRequest(model="gan", num_samples=1),
                                                timeout=60))
            assert new.code() == grpc.StatusCode.UNAVAILABLE
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        backend.release.set()
        thread.stop()
