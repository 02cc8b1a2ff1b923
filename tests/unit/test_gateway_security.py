"""Gateway transport and lifecycle: token auth on/off, TLS and mutual TLS, graceful shutdown."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.gateway.client import GenfleetClient
from services.gateway.grpc_server import GatewayConfig
from services.serving.inprocess import InProcessBackend
from tests.helpers import GatewayThread, tiny_store


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    tiny_store(root, families=["gan", "ebm"])
    return root


def _gateway(store_root: Path, **config: object) -> GatewayThread:
    return GatewayThread(lambda: InProcessBackend(store_root, ["ebm", "gan"]),
                         GatewayConfig(host="127.0.0.1", port=0, **config))  # type: ignore[arg-type]


# ------------------------------------------------------------------------- auth
def test_token_auth(store_root: Path) -> None:
    gw = _gateway(store_root, token="s3cret")
    try:
        with GenfleetClient(gw.target, retries=0) as anonymous:
            with pytest.raises(grpc.RpcError) as info:
                anonymous.generate("gan", 1)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
            with pytest.raises(grpc.RpcError) as info:
                list(anonymous.generate_stream("gan", 2))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
            assert anonymous.health() == "SERVING"  # probes need no secret
        with GenfleetClient(gw.target, token="wrong", retries=0) as wrong:
            with pytest.raises(grpc.RpcError) as info:
                wrong.list_models()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        with GenfleetClient(gw.target, token="s3cret", retries=0) as good:
            assert good.generate("gan", 2).samples is not None
            assert len(list(good.generate_stream("gan", 2, chunk_size=1))) == 2
    finally:
        gw.stop()


def test_auth_off_accepts_anonymous_calls(store_root: Path) -> None:
    gw = _gateway(store_root)
    try:
        with GenfleetClient(gw.target, retries=0) as client:
            assert client.generate("gan", 1).samples is not None
    finally:
        gw.stop()


# -------------------------------------------------------------------------- TLS
def test_tls(store_root: Path, pki: dict[str, Path]) -> None:
    gw = _gateway(store_root, tls_cert=pki["cert"], tls_key=pki["key"])
    try:
        with GenfleetClient(gw.target, tls_ca=pki["ca"], retries=0, timeout=10) as client:
            assert client.generate("gan", 1).samples is not None
        with GenfleetClient(gw.target, retries=0, timeout=3) as plaintext:
            with pytest.raises(grpc.RpcError) as info:
                plaintext.generate("gan", 1)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    finally:
        gw.stop()


def test_mutual_tls_requires_a_client_certificate(store_root: Path, pki: dict[str, Path]) -> None:
    gw = _gateway(store_root, tls_cert=pki["cert"], tls_key=pki["key"], tls_client_ca=pki["ca"])
    try:
        with GenfleetClient(gw.target, tls_ca=pki["ca"], tls_cert=pki["client_cert"],
                            tls_key=pki["client_key"], retries=0, timeout=10) as client:
            assert client.generate("gan", 1).samples is not None
        with GenfleetClient(gw.target, tls_ca=pki["ca"], retries=0, timeout=3) as no_cert:
            with pytest.raises(grpc.RpcError) as info:
                no_cert.generate("gan", 1)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    finally:
        gw.stop()


# -------------------------------------------------------------------- shutdown
def test_graceful_shutdown_finishes_in_flight_calls(store_root: Path) -> None:
    gw = _gateway(store_root)
    client = GenfleetClient(gw.target, retries=0, timeout=60)
    t0 = time.perf_counter()
    client.generate("ebm", 128, options={"steps": 100})
    slow = time.perf_counter() - t0
    future = client.stub.Generate.future(client._generate_request(  # an in-flight call
        "ebm", 128, 0, None, {"steps": 100}, "tensor", 0), timeout=60)
    time.sleep(min(0.2, slow / 4))
    stopping = gw.submit(gw.gateway.stop(grace=30))
    time.sleep(0.05)
    assert len(future.result().seeds) == 128  # finished, not cut off
    stopping.result(60)
    with pytest.raises(grpc.RpcError):  # no new calls after shutdown
        client.generate("gan", 1, timeout=2)
    client.close()
    gw.loop.call_soon_threadsafe(gw.loop.stop)


def test_a_gateway_stopped_under_load_costs_a_retrying_client_no_call(store_root: Path
                                                                      ) -> None:
    """Two gateways, clients spread over both; one stops gracefully mid-load. grpc answers
    the calls that race a graceful stop CANCELLED (grpc/grpc#41785) and the rest of them
    UNAVAILABLE: GenfleetClient retries both on the other gateway, so no call fails."""
    import threading
    from collections import Counter

    first, second = _gateway(store_root), _gateway(store_root)
    target = f"ipv4:{first.target},{second.target}"
    codes: Counter[str] = Counter()
    served: Counter[str] = Counter()
    done = threading.Event()
    lock = threading.Lock()

    def load() -> None:
        with GenfleetClient(target, timeout=30) as client:
            seed = 0
            while not done.is_set():
                seed += 1
                try:  # cheap calls, many racing the stop; a Generate now and then
                    if seed % 8:
                        client.list_models()
                    else:
                        client.generate("gan", 1, seed=seed)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name  # type: ignore[attr-defined]
                with lock:
                    codes[code] += 1

    threads = [threading.Thread(target=load) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.5)
        served["before"] = sum(codes.values())
        second.stop(grace=5)
        served["stopped"] = sum(codes.values())
        time.sleep(1.5)
    finally:
        done.set()
        for t in threads:
            t.join(60)
        first.stop()
    assert served["before"] > 20 and sum(codes.values()) > served["stopped"] + 20, served
    assert codes == Counter({"OK": codes["OK"]}), codes


def test_health_goes_not_serving_on_shutdown(store_root: Path) -> None:
    gw = _gateway(store_root)
    servicer = gw.gateway.health
    gw.run(gw.gateway.stop(grace=1))
    from grpc_health.v1 import health_pb2

    async def check() -> int:
        class _Ctx:
            async def abort(self, *a: object) -> None:
                raise RuntimeError(a)
        resp = await servicer.Check(health_pb2.HealthCheckRequest(service=""), _Ctx())
        return int(resp.status)

    assert gw.run(check()) == health_pb2.HealthCheckResponse.NOT_SERVING
    gw.loop.call_soon_threadsafe(gw.loop.stop)



# ---------------------------------------------------------------- probe port
def test_health_port_answers_plaintext_probes_beside_a_tls_token_port(
        store_root: Path, pki: dict[str, Path]) -> None:
    """Kubernetes' gRPC probes speak neither TLS nor tokens: the health port answers them
    (and only Health), while the main port keeps both."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.gateway.grpc_server import LIVENESS
    from services.gateway.pb.genfleet.v1 import generation_pb2 as pb
    from services.gateway.pb.genfleet.v1 import generation_pb2_grpc as pb_grpc

    gw = _gateway(store_root, tls_cert=pki["cert"], tls_key=pki["key"], token="s3cret",
                  health_port=0)
    try:
        port = gw.gateway.health_port
        assert port is not None and port != gw.port
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", LIVENESS, "gan"):
                status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert status.status == health_pb2.HealthCheckResponse.SERVING, service
            with pytest.raises(grpc.RpcError) as info:  # nothing else is served there
                pb_grpc.GenerationServiceStub(channel).ListModels(pb.ListModelsRequest(),
                                                                   timeout=5)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
    finally:
        gw.stop()


class _CutBackend(InProcessBackend):
    """Answers as usual, except that a Generate with seed 13 fails with a CancelledError
    that cancelled nothing (what grpc.aio raises for a call its channel's close cut)."""

    async def generate(self, request: Any) -> Any:
        if request.seed == 13:
            raise asyncio.CancelledError
        return await super().generate(request)


def test_a_call_cut_inside_the_gateway_is_answered_at_once_not_left_to_its_deadline(
        store_root: Path) -> None:
    gw = GatewayThread(lambda: _CutBackend(store_root, ["ebm", "gan"]),
                       GatewayConfig(host="127.0.0.1", port=0))
    try:
        with GenfleetClient(gw.target, retries=0, timeout=30) as client:
            for stream in (False, True):
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as info:
                    if stream:
                        list(client.generate_stream("gan", 4, seed=13, chunk_size=2))
                    else:
                        client.generate("gan", 2, seed=13)
                assert time.monotonic() - started < 5  # not the 30 s deadline
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
                assert "cut inside the gateway" in str(info.value.details())  # type: ignore[attr-defined]
            out = client.generate("gan", 2, seed=14)  # the next call is served
            assert out.samples is not None and len(out.samples) == 2
    finally:
        gw.stop()
