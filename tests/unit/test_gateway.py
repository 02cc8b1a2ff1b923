"""Every RPC on every family, every bad-input kind, health, reflection — through a real
grpc.aio gateway on 127.0.0.1 with a real client. Here the gateway's backend runs the
models in-process; tests/integration/test_serving.py reruns these same tests against the
Ray Serve application."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from services.gateway import codec
from services.gateway.client import GenfleetClient
from services.gateway.grpc_server import GatewayConfig
from services.gateway.pb.genfleet.v1 import generation_pb2 as pb
from services.gateway.pb.genfleet.v1 import generation_pb2_grpc as pb_grpc
from services.models import BUILTIN as FAMILIES
from services.serving.inprocess import InProcessBackend
from tests.helpers import GatewayThread, tiny_store

FAMILY_NAMES = sorted(FAMILIES)
SCORING = ["autoregressive", "diffusion", "ebm", "flow", "vae"]
LATENT = {"vae": "both", "flow": "both", "diffusion": "both", "gan": "decode"}


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    tiny_store(root)
    return root


@pytest.fixture(scope="module")
def gateway(store_root: Path) -> Iterator[GatewayThread]:
    thread = GatewayThread(lambda: InProcessBackend(store_root, FAMILY_NAMES),
                           GatewayConfig(host="127.0.0.1", port=0, health_interval_s=0.5))
    yield thread
    thread.stop()


@pytest.fixture
def client(gateway: GatewayThread) -> Iterator[GenfleetClient]:
    with GenfleetClient(gateway.target, timeout=60, retries=0) as c:
        yield c


def _code(exc_info: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return exc_info.value.code()  # type: ignore[attr-defined,no-any-return]


def _images(n: int = 3) -> np.ndarray:
    from services.core.data import load_digits
    return load_digits().as_float()[:n]


# ------------------------------------------------------------------- happy paths
def test_list_models_describes_every_family(client: GenfleetClient) -> None:
    models = {m.name: m for m in client.list_models()}
    assert sorted(models) == FAMILY_NAMES
    diffusion = models["diffusion"]
    assert diffusion.family == "diffusion" and diffusion.version == 1
    assert list(diffusion.sample_shape) == [1, 8, 8] and diffusion.levels == 17
    assert "conditional" in diffusion.capabilities and len(diffusion.classes) == 10
    steps = next(o for o in diffusion.sampler_options if o.name == "steps")
    assert steps.kind == "int" and steps.HasField("max") and steps.default_value.number == 3
    assert models["gan"].score_kind == pb.SCORE_KIND_UNSPECIFIED
    assert models["flow"].score_kind == pb.SCORE_KIND_LOWER_BOUND
    assert models["vae"].metrics["fd_ratio"] == 1.5


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_generate_tensor_and_png(client: GenfleetClient, family: str) -> None:
    out = client.generate(family, 4, seed=7, output="both")
    assert out.samples is not None and out.samples.shape == (4, 1, 8, 8)
    assert out.samples.dtype == np.float32 and 0 <= out.samples.min() <= out.samples.max() <= 1
    assert len(out.png) == 4 and all(p.startswith(b"\x89PNG") for p in out.png)
    assert len(out.seeds) == 4 and out.version == 1 and out.model == family
    again = client.generate(family, 4, seed=7)
    assert again.samples is not None and again.samples.tobytes() == out.samples.tobytes()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_start_index_and_stream_match_one_big_request(client: GenfleetClient, family: str) -> None:
    whole = client.generate(family, 6, seed=3)
    tail = client.generate(family, 2, seed=3, start_index=4)
    assert whole.samples is not None and tail.samples is not None
    assert tail.samples.tobytes() == whole.samples[4:].tobytes()
    chunks = list(client.generate_stream(family, 6, seed=3, chunk_size=4))
    assert [c.samples.shape[0] for c in chunks if c.samples is not None] == [4, 2]
    streamed = np.concatenate([c.samples for c in chunks if c.samples is not None])
    assert streamed.tobytes() == whole.samples.tobytes()


def test_labels_condition_generation(client: GenfleetClient) -> None:
    out = client.generate("gan", 3, seed=1, labels=[1, 2, 3])
    other = client.generate("gan", 3, seed=1, labels=[4, 5, 6])
    assert out.samples is not None and other.samples is not None
    assert out.samples.tobytes() != other.samples.tobytes()


@pytest.mark.parametrize("family", SCORING)
def test_score(client: GenfleetClient, family: str) -> None:
    resp = client.score(family, _images())
    assert len(resp.log_prob) == 3 and resp.version == 1
    if family == "ebm":
        assert resp.kind == "unnormalized" and not resp.bits_per_dim
    else:
        assert len(resp.bits_per_dim) == 3 and all(b > 0 for b in resp.bits_per_dim)
    levels = np.rint(_images() * 16).astype(np.uint8)  # integer levels are accepted too
    same = client.score(family, levels)
    np.testing.assert_allclose(same.log_prob, resp.log_prob, rtol=1e-5)


@pytest.mark.parametrize("family", ["vae", "flow", "diffusion"])
def test_encode_decode(client: GenfleetClient, family: str) -> None:
    x = _images()
    labels = [0, 1, 2]
    z = client.encode(family, x, labels=labels)
    assert z.shape[0] == 3 and z.dtype == np.float32
    out = client.decode(family, z, labels=labels, output="both")
    assert out.samples is not None and out.samples.shape == (3, 1, 8, 8) and len(out.png) == 3
    if family == "flow":  # exact inverse
        np.testing.assert_array_equal(out.samples, np.rint(x * 16) / 16)


def test_gan_decode(client: GenfleetClient) -> None:
    out = client.decode("gan", np.zeros((2, 4), np.float32), labels=[3, 4])
    assert out.samples is not None and out.samples.shape == (2, 1, 8, 8)


def test_model_at_version(client: GenfleetClient) -> None:
    assert client.generate("gan@1", 1).version == 1


# --------------------------------------------------------------------- bad inputs
BAD_GENERATE = {
    "unknown model": (dict(model="nope", num_samples=1), grpc.StatusCode.NOT_FOUND),
    "unknown version": (dict(model="gan@9", num_samples=1), grpc.StatusCode.NOT_FOUND),
    "bad model ref": (dict(model="gan@x", num_samples=1), grpc.StatusCode.INVALID_ARGUMENT),
    "zero samples": (dict(model="gan", num_samples=0), grpc.StatusCode.INVALID_ARGUMENT),
    "negative samples": (dict(model="gan", num_samples=-3), grpc.StatusCode.INVALID_ARGUMENT),
    "too many samples": (dict(model="gan", num_samples=100000), grpc.StatusCode.INVALID_ARGUMENT),
    "label out of range": (dict(model="gan", num_samples=1, labels=[10]),
                           grpc.StatusCode.INVALID_ARGUMENT),
    "labels count": (dict(model="gan", num_samples=2, labels=[1]),
                     grpc.StatusCode.INVALID_ARGUMENT),
    "labels on unconditional": (dict(model="ebm", num_samples=1, labels=[1]),
                                grpc.StatusCode.INVALID_ARGUMENT),
    "unknown option": (dict(model="gan", num_samples=1,
                            options={"bogus": pb.OptionValue(number=1)}),
                       grpc.StatusCode.INVALID_ARGUMENT),
    "option out of range": (dict(model="diffusion", num_samples=1,
                                 options={"steps": pb.OptionValue(number=100000)}),
                            grpc.StatusCode.INVALID_ARGUMENT),
    "option wrong type": (dict(model="diffusion", num_samples=1,
                               options={"sampler": pb.OptionValue(number=1)}),
                          grpc.StatusCode.INVALID_ARGUMENT),
    "option without value": (dict(model="diffusion", num_samples=1,
                                  options={"steps": pb.OptionValue()}),
                             grpc.StatusCode.INVALID_ARGUMENT),
    "missing model": (dict(num_samples=1), grpc.StatusCode.INVALID_ARGUMENT),
}


@pytest.mark.parametrize("case", sorted(BAD_GENERATE))
def test_bad_generate_requests(gateway: GatewayThread, client: GenfleetClient, case: str) -> None:
    fields, code = BAD_GENERATE[case]
    with pytest.raises(grpc.RpcError) as info:
        client.stub.Generate(pb.GenerateRequest(**fields), timeout=30)  # type: ignore[arg-type]
    assert _code(info) == code
    details = info.value.details()  # type: ignore[attr-defined]
    assert "Traceback" not in details and details
    assert client.health() == "SERVING"  # the server stays healthy


def _tensor(array: np.ndarray) -> pb.Tensor:
    return codec.array_to_tensor(array)


BAD_SCORE = {
    "wrong shape": (_tensor(np.zeros((2, 1, 4, 4), np.float32)), grpc.StatusCode.INVALID_ARGUMENT),
    "wrong byte length": (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1, 1, 8, 8], data=b"\0" * 10),
                          grpc.StatusCode.INVALID_ARGUMENT),
    "unknown dtype": (pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1], data=b""),
                      grpc.StatusCode.INVALID_ARGUMENT),
    "values out of range": (_tensor(np.full((1, 1, 8, 8), 3.0, np.float32)),
                            grpc.StatusCode.INVALID_ARGUMENT),
    "levels out of range": (_tensor(np.full((1, 1, 8, 8), 200, np.uint8)),
                            grpc.StatusCode.INVALID_ARGUMENT),
    "empty shape": (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[], data=b""),
                    grpc.StatusCode.INVALID_ARGUMENT),
}


@pytest.mark.parametrize("case", sorted(BAD_SCORE))
def test_bad_score_requests(client: GenfleetClient, case: str) -> None:
    tensor, code = BAD_SCORE[case]
    with pytest.raises(grpc.RpcError) as info:
        client.stub.Score(pb.ScoreRequest(model="flow", data=tensor), timeout=30)
    assert _code(info) == code
    assert client.health() == "SERVING"


def test_unsupported_capabilities_are_unimplemented(client: GenfleetClient) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.score("gan", _images())
    assert _code(info) == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(grpc.RpcError) as info:
        client.encode("ebm", _images())
    assert _code(info) == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(grpc.RpcError) as info:
        client.decode("autoregressive", np.zeros((1, 64), np.float32))
    assert _code(info) == grpc.StatusCode.UNIMPLEMENTED


def test_bad_latents(client: GenfleetClient) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.decode("vae", np.zeros((1, 999), np.float32))
    assert _code(info) == grpc.StatusCode.INVALID_ARGUMENT
    assert "latents" in info.value.details()  # type: ignore[attr-defined]


def test_deadline_exceeded(client: GenfleetClient) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.generate("ebm", 64, options={"steps": 1000}, timeout=0.3)
    assert _code(info) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert client.health() == "SERVING"


# ------------------------------------------------------------- health, reflection
def test_standard_health_overall_and_per_model(gateway: GatewayThread) -> None:
    with grpc.insecure_channel(gateway.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        for service in ("", "genfleet.v1.GenerationService", *FAMILY_NAMES):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert resp.status == serving, service
        with pytest.raises(grpc.RpcError) as info:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert _code(info) == grpc.StatusCode.NOT_FOUND


def test_server_reflection_lists_the_services(gateway: GatewayThread) -> None:
    with grpc.insecure_channel(gateway.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"genfleet.v1.GenerationService", "grpc.health.v1.Health"} <= services
        desc = db.FindFileContainingSymbol("genfleet.v1.GenerationService")
        assert desc.package == "genfleet.v1"


def test_raw_stub_generate(gateway: GatewayThread) -> None:
    with grpc.insecure_channel(gateway.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        resp = stub.Generate(pb.GenerateRequest(model="vae", num_samples=2, seed=5), timeout=30)
        assert list(resp.samples.shape) == [2, 1, 8, 8] and len(resp.seeds) == 2


# ------------------------------------------------------------------- event loops
def test_event_loop_choice_refuses_what_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.core.errors import InvalidArgument
    from services.gateway import event_loop

    assert event_loop.resolve("asyncio") == "asyncio"
    assert event_loop.resolve("auto") in ("uvloop", "asyncio")
    with pytest.raises(InvalidArgument, match="--event-loop"):
        event_loop.resolve("trio")
    monkeypatch.setattr(event_loop, "_uvloop", lambda: None)  # as where it is not installed
    assert event_loop.resolve("auto") == "asyncio"
    with pytest.raises(InvalidArgument, match="uvloop is not installed"):
        event_loop.resolve("uvloop")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_gateway_answers_alike_on_either_event_loop(store_root: Path, loop: str) -> None:
    """`genfleet up` runs the gateway on uvloop where installed, else on asyncio: the same
    bytes, streams, deadlines and health on both."""
    pytest.importorskip(loop)
    thread = GatewayThread(lambda: InProcessBackend(store_root, ["gan", "ebm"]),
                           GatewayConfig(host="127.0.0.1", port=0), loop=loop)
    try:
        assert thread.loop_kind == loop
        assert type(thread.loop).__module__.split(".")[0] == loop
        with GenfleetClient(thread.target, timeout=60, retries=0) as c:
            one = c.generate("gan", 5, seed=3)
            chunks = list(c.generate_stream("gan", 5, seed=3, chunk_size=2))
            assert np.concatenate([ch.samples for ch in chunks]).tobytes() == one.samples.tobytes()
            with pytest.raises(grpc.RpcError) as info:
                c.generate("ebm", 64, options={"steps": 1000}, timeout=0.3)
            assert _code(info) == grpc.StatusCode.DEADLINE_EXCEEDED
            assert c.health() == "SERVING"
    finally:
        thread.stop()
