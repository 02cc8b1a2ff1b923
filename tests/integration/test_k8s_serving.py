"""Integration: what a KubeRay RayService and the gateway Deployment do, on the local Ray
cluster. The dev overlay's serveConfigV2 is applied declaratively (the call KubeRay makes
through the dashboard: the controller's ``apply_config``), Ray runs our builder from
``import_path`` + ``args``, and ``genfleet gateway`` runs as a separate process with the pod's
flags: TLS and a token on the gRPC port, grpc.health.v1 in plaintext on the probe port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core.store import ModelStore
from services.gateway.client import GenfleetClient
from services.gateway.grpc_server import LIVENESS
from services.serving import kube
from tests.helpers import tiny_store

pytestmark = pytest.mark.integration
APP = "genfleet-k8s"  # beside the other modules' "genfleet" on the shared test cluster
TOKEN = "k8s-test-token"


@pytest.fixture(scope="module")
def deployed(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[ModelStore]:
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    store = tiny_store(tmp_path_factory.mktemp("k8s-serve") / "store", ["gan", "vae"])
    doc = yaml.safe_load(yaml.safe_load(kube.render(kube.K8S_DIR / "overlays" / "dev").text)
                         ["spec"]["serveConfigV2"])
    # test-only changes: no HTTP proxy on 0.0.0.0:8000, a test store, two models, own name
    doc["proxy_location"] = "Disabled"
    doc.pop("http_options")
    (application,) = doc["applications"]
    application["name"] = APP
    application["args"]["store"] = str(store.root)
    config = application["args"]["config"]
    config["app_name"] = APP
    config["models"] = {k: v for k, v in config["models"].items() if k in ("gan", "vae")}
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(doc), _blocking=True)
    yield store
    serve.delete(APP)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    out = tmp_path_factory.mktemp("tls")
    paths = {"ca": out / "ca.pem", "crt": out / "tls.crt", "key": out / "tls.key"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(paths["crt"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    return paths


class GatewayProcess:
    """``genfleet gateway`` in a child process; the ports it bound are read from its output."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)
        self.lines: list[str] = []
        self.ports: dict[str, int] = {}
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(120):
            self.proc.kill()
            raise AssertionError("gateway did not start:\n" + "".join(self.lines))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("genfleet gateway on "):
                self.ports["grpc"] = int(line.split()[3].rsplit(":", 1)[1])
            elif "grpc.health.v1 (plaintext)" in line:
                self.ports["health"] = int(line.split()[-1].rsplit(":", 1)[1])
                self._ready.set()
        self._ready.set()


@pytest.fixture(scope="module")
def gateway(deployed: ModelStore, certs: dict[str, Path]) -> Iterator[GatewayProcess]:
    import ray

    exe = str(Path(sys.executable).parent / "genfleet")
    argv = [exe, "gateway", f"--address={ray.get_runtime_context().gcs_address}",
            f"--app={APP}", "--host=127.0.0.1", "--port=0", "--http-port=0", "--health-port=0",
            "--metrics-port=-1", f"--tls-cert={certs['crt']}", f"--tls-key={certs['key']}",
            "--grace=5"]
    process = GatewayProcess(argv, {**os.environ, "GENFLEET_TOKEN": TOKEN})
    yield process
    if process.proc.poll() is None:
        process.proc.kill()
        process.proc.wait(30)


def _probe(port: int, service: str) -> Any:
    """What kubelet's gRPC probe does: plaintext, no credentials."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_probes_and_a_tls_token_client_reach_the_declaratively_deployed_app(
        gateway: GatewayProcess, deployed: ModelStore, certs: dict[str, Path]) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    assert _probe(gateway.ports["health"], LIVENESS) == serving
    deadline = time.monotonic() + 60  # readiness: SERVING once a model deployment answers
    while _probe(gateway.ports["health"], "") != serving:
        assert time.monotonic() < deadline, "".join(gateway.lines)
        time.sleep(0.5)
    target = f"localhost:{gateway.ports['grpc']}"
    with GenfleetClient(target, token=TOKEN, tls_ca=certs["ca"], timeout=60) as client:
        assert sorted(m.name for m in client.list_models()) == ["gan", "vae"]
        result = client.generate("gan", 4, seed=3)
        assert result.samples is not None and result.samples.shape[0] == 4
        assert result.version == deployed.resolve("gan")[1]  # pinned by the builder
    with GenfleetClient(target, token="wrong", tls_ca=certs["ca"], timeout=10) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.list_models()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # the gRPC port itself speaks only TLS
    with (grpc.insecure_channel(f"127.0.0.1:{gateway.ports['grpc']}") as channel,
          pytest.raises(grpc.RpcError)):
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)


def test_sigterm_stops_the_gateway_cleanly(gateway: GatewayProcess) -> None:
    """What Kubernetes does on scale-down or rollout: SIGTERM, then the grace period."""
    gateway.proc.send_signal(signal.SIGTERM)
    assert gateway.proc.wait(60) == 0, "".join(gateway.lines)
    assert any("shutting down" in line for line in gateway.lines)
