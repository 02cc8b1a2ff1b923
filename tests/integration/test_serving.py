"""Integration: a real local Ray cluster, the Serve application with all six families, the
gRPC gateway on 127.0.0.1 and real clients. Reruns the RPC contract of
tests/unit/test_gateway.py and the Open Inference Protocol v2 tests of tests/unit/test_oip.py
through Ray, then checks what only a cluster has: dynamic
batching, backpressure, cancellation, rollout under load, scaling."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from ray import serve

from services.core.store import ModelStore
from services.gateway.client import GenfleetClient
from services.gateway.grpc_server import GatewayConfig
from services.gateway.pb.genfleet.v1 import generation_pb2 as pb
from services.gateway.pb.genfleet.v1 import generation_pb2_grpc as pb_grpc
from services.serving import operations
from services.serving.config import load_config
from services.serving.serve_backend import ServeBackend
from tests.helpers import GatewayThread, scrape_ray_metrics, tiny_store

# the RPC contract, rerun here against the Ray backend (fixtures below override)
from tests.unit.test_gateway import *  # noqa: F403
from tests.unit.test_gateway import FAMILY_NAMES

# and the Open Inference Protocol v2 tests, with the real v2 clients (same fixtures)
from tests.unit.test_oip import *  # noqa: F403

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve-store") / "store"
    tiny_store(root)
    return root


@pytest.fixture(scope="module")
def app(ray_cluster: None, store_root: Path) -> Iterator[ModelStore]:
    store = ModelStore(store_root)
    config = load_config(models=FAMILY_NAMES)
    for m in config.models.values():  # fixed replicas: the tests below scale explicitly
        m.autoscaling_config = {"min_replicas": 1, "max_replicas": 1, "initial_replicas": 1}
        m.batching = {"max_batch_size": 32, "batch_wait_timeout_s": 0.02}
    operations.deploy(config, store)
    yield store
    serve.delete(config.app_name)


@pytest.fixture(scope="module")
def gateway(app: ModelStore) -> Iterator[GatewayThread]:
    thread = GatewayThread(lambda: ServeBackend("genfleet"),
                           GatewayConfig(host="127.0.0.1", port=0, http_port=0,
                                         health_interval_s=0.5))
    yield thread
    thread.stop()


def _replicas(app_name: str, name: str) -> int:
    dep = serve.status().applications[app_name].deployments[name]
    return int(sum(n for state, n in dep.replica_states.items() if str(state).endswith("RUNNING")))


# --------------------------------------------------------------------- batching
def test_concurrent_requests_share_batches_and_stay_identical(gateway: GatewayThread) -> None:
    with GenfleetClient(gateway.target, retries=0) as client:
        alone = [client.generate("gan", 1, seed=s).samples for s in range(16)]
        before = serve.get_deployment_handle("gan", "genfleet").batch_sizes.remote().result()
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(lambda s: client.generate("gan", 1, seed=s).samples,
                                     range(16)))
        after = serve.get_deployment_handle("gan", "genfleet").batch_sizes.remote().result()
    for a, b in zip(alone, together, strict=True):
        assert a is not None and b is not None and a.tobytes() == b.tobytes()
    new_batches = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert max(k for k, v in new_batches.items() if v > 0) > 1, new_batches


def test_v2_calls_share_batches_with_native_ones(gateway: GatewayThread) -> None:
    """OIP v2 calls take the native path: coalesced and batched with native calls, each
    with the bytes it has alone."""
    import tritonclient.grpc as tgrpc

    def v2_generate(client: Any, seed: int) -> bytes:
        inputs = [tgrpc.InferInput("SEED", [1], "UINT64")]
        inputs[0].set_data_from_numpy(np.array([seed], np.uint64))
        return bytes(client.infer("gan", inputs).as_numpy("SAMPLES").tobytes())

    v2 = tgrpc.InferenceServerClient(gateway.target)
    with GenfleetClient(gateway.target, retries=0) as native:
        alone = {s: native.generate("gan", 1, seed=s).samples.tobytes() for s in range(16)}  # type: ignore[union-attr]
        handle = serve.get_deployment_handle("gan", "genfleet")
        before = handle.batch_sizes.remote().result()
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(
                lambda s: v2_generate(v2, s) if s % 2 else
                native.generate("gan", 1, seed=s).samples.tobytes(), range(16)))  # type: ignore[union-attr]
        after = handle.batch_sizes.remote().result()
    v2.close()
    assert together == [alone[s] for s in range(16)]
    new_batches = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert max(k for k, v in new_batches.items() if v > 0) > 1, new_batches


def test_direct_handle_calls_are_batched_too(app: ModelStore) -> None:
    """Callers other than the gateway (one request per call) share ``@serve.batch``."""
    from services.core import api
    from services.models import sample_seeds

    handle = serve.get_deployment_handle("vae", "genfleet")
    before = handle.batch_sizes.remote().result()
    responses = [handle.generate.remote(api.GenerateRequest("vae", 1, seed=s)) for s in range(12)]
    results = [api.unwrap(r.result()) for r in responses]
    after = handle.batch_sizes.remote().result()
    assert [r.seeds for r in results] == [sample_seeds(s, 1) for s in range(12)]
    new_batches = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert max(k for k, v in new_batches.items() if v > 0) > 1, new_batches


def test_same_seed_is_byte_identical_under_concurrent_load(gateway: GatewayThread) -> None:
    with GenfleetClient(gateway.target, retries=0) as client:
        reference = client.generate("diffusion", 3, seed=42, labels=[1, 2, 3]).samples

        def call(i: int) -> bytes:
            if i % 2:  # other traffic mixed in, different options and seeds
                client.generate("diffusion", 2, seed=i, options={"steps": 2})
                return b""
            out = client.generate("diffusion", 3, seed=42, labels=[1, 2, 3]).samples
            assert out is not None
            return out.tobytes()

        with ThreadPoolExecutor(8) as pool:
            results = [r for r in pool.map(call, range(16)) if r]
    assert reference is not None and all(r == reference.tobytes() for r in results)


# ------------------------------------------------------------ cancellation / load
def test_deadline_cancels_the_work_on_the_replica(gateway: GatewayThread) -> None:
    with GenfleetClient(gateway.target, retries=0) as client:
        t0 = time.perf_counter()
        client.generate("ebm", 256, options={"steps": 20})
        per_step = (time.perf_counter() - t0) / 20
        with pytest.raises(grpc.RpcError) as info:
            client.generate("ebm", 256, options={"steps": 1000}, timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        t1 = time.perf_counter()
        client.generate("ebm", 1, options={"steps": 1})  # queued behind the cancelled batch
        waited = time.perf_counter() - t1
    # the 1000-step batch would hold the replica for ~1000 * per_step; it was stopped
    assert waited < 0.5 * 1000 * per_step, (waited, per_step)


def test_encode_deadline_cancels_the_work_on_the_replica(gateway: GatewayThread) -> None:
    x = np.zeros((1024, 1, 8, 8), np.float32)
    with GenfleetClient(gateway.target, retries=0) as client:
        t0 = time.perf_counter()
        client.encode("diffusion", x, options={"steps": 50})
        full = time.perf_counter() - t0
        with pytest.raises(grpc.RpcError) as info:
            client.encode("diffusion", x, options={"steps": 50}, timeout=0.1 * full)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        t1 = time.perf_counter()
        client.encode("diffusion", x[:1], options={"steps": 1})  # behind the cancelled call
        waited = time.perf_counter() - t1
    assert waited < 0.5 * full, (waited, full)


NAN, INF = float("nan"), float("inf")
HOSTILE = {  # the requests that hurt others before: each now fails alone, at once
    "diffusion steps=NaN": ("Generate", pb.GenerateRequest(
        model="diffusion", num_samples=4, options={"steps": pb.OptionValue(number=NAN)})),
    "autoregressive top_k=+inf": ("Generate", pb.GenerateRequest(
        model="autoregressive", num_samples=4, options={"top_k": pb.OptionValue(number=INF)})),
    "flow Score [2^32, 2^32]": ("Score", pb.ScoreRequest(
        model="flow", data=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2**32, 2**32]))),
    "vae Score 20,000 images, samples=4096": ("Score", pb.ScoreRequest(
        model="vae", options={"samples": pb.OptionValue(number=4096)},
        data=pb.Tensor(dtype=pb.DTYPE_UINT8, shape=[20000, 1, 8, 8], data=bytes(20000 * 64)))),
    "gan GenerateStream 2^25, chunk 1": ("GenerateStream", pb.GenerateRequest(
        model="gan", num_samples=2**25, chunk_size=1)),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_request_fails_alone_beside_bystanders(gateway: GatewayThread,
                                                         name: str) -> None:
    rpc, hostile = HOSTILE[name]
    model = hostile.model
    with GenfleetClient(gateway.target, retries=0) as client, \
            grpc.insecure_channel(gateway.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        reference = {s: client.generate(model, 2, seed=s).samples for s in range(8)}

        def attack(_: int) -> str:
            try:
                call = getattr(stub, rpc)
                responses = call(hostile, timeout=30)
                if rpc == "GenerateStream":
                    list(responses)
                return "OK"
            except grpc.RpcError as exc:
                return str(exc.code().name)  # type: ignore[attr-defined]

        def bystander(seed: int) -> bytes:
            out = client.generate(model, 2, seed=seed).samples
            assert out is not None
            return out.tobytes()

        with ThreadPoolExecutor(16) as pool:
            attacks = [pool.submit(attack, i) for i in range(8)]
            bystanders = {s: pool.submit(bystander, s) for s in range(8)}
            codes = [a.result() for a in attacks]
            got = {s: f.result() for s, f in bystanders.items()}
        assert codes == ["INVALID_ARGUMENT"] * 8, codes
        assert all(got[s] == reference[s].tobytes() for s in range(8))  # type: ignore[union-attr]
        assert client.health() == "SERVING"


@contextlib.contextmanager
def _ebm_app(store: ModelStore, app_name: str, ongoing: int, queued: int,
             batching: dict[str, float]) -> Iterator[GenfleetClient]:
    """One EBM replica with these admission limits and batching, behind its own gateway;
    a client without retries."""
    config = load_config(models=["ebm"])
    config.app_name = app_name
    m = config.models["ebm"]
    m.autoscaling_config = {"min_replicas": 1, "max_replicas": 1, "initial_replicas": 1}
    m.max_ongoing_requests, m.max_queued_requests = ongoing, queued
    m.batching = batching
    operations.deploy(config, store)
    thread = GatewayThread(lambda: ServeBackend(app_name),
                           GatewayConfig(host="127.0.0.1", port=0))
    try:
        with GenfleetClient(thread.target, retries=0) as client:
            yield client
    finally:
        thread.stop()
        serve.delete(app_name)


def _codes(client: GenfleetClient, callers: int, samples: int) -> list[str]:
    """``callers`` slow EBM Generates released together -> their status codes."""
    barrier = threading.Barrier(callers)

    def call(_: int) -> str:
        barrier.wait()
        try:
            client.generate("ebm", samples, options={"steps": 200})
            return "OK"
        except grpc.RpcError as exc:
            return str(exc.code().name)  # type: ignore[attr-defined]
    with ThreadPoolExecutor(callers) as pool:
        return list(pool.map(call, range(callers)))


def test_backpressure_is_resource_exhausted(ray_cluster: None, app: ModelStore) -> None:
    with _ebm_app(app, "genfleet-backpressure", 1, 1,
                  {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}) as client:
        codes = _codes(client, 8, 32)
        assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes, codes
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
        assert client.health() == "SERVING"


def test_backpressure_counts_requests_not_coalesced_groups(ray_cluster: None,
                                                          app: ModelStore) -> None:
    """max_ongoing_requests 4 + max_queued_requests 4 on one replica admit 8 requests,
    although all 32 callers below would fit in one coalesced group (one handle call)."""
    with _ebm_app(app, "genfleet-admission", 4, 4,
                  {"max_batch_size": 32, "batch_wait_timeout_s": 0.2}) as client:
        client.generate("ebm", 1)  # settings and replica count known before the burst
        codes = _codes(client, 32, 4)
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
        assert codes.count("OK") >= 8, codes
        assert codes.count("RESOURCE_EXHAUSTED") >= 16, codes


# ----------------------------------------------------------------- operations
class GanLoad:
    """Four clients without retries calling ``gan`` (2 samples, new seeds) until
    ``stop``; the version of every answer and the status of every failure."""

    def __init__(self, target: str) -> None:
        self.versions: list[int] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(target,)) for _ in range(4)]
        for t in self._threads:
            t.start()

    def _run(self, target: str) -> None:
        with GenfleetClient(target, retries=0) as client:
            seed = 0
            while not self._stop.is_set():
                seed += 1
                try:
                    self.versions.append(client.generate("gan", 2, seed=seed).version)
                except grpc.RpcError as exc:
                    self.failures.append(exc.code().name)  # type: ignore[attr-defined]

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def _gan_replica() -> str:
    return str(serve.get_deployment_handle("gan", "genfleet").replica.remote().result())


def test_rollout_under_load_fails_no_request(gateway: GatewayThread, app: ModelStore) -> None:
    tiny_store(app.root, families=["gan"], steps=3)  # version 2 of "gan"
    assert app.versions("gan") == [1, 2]
    replica = _gan_replica()
    load = GanLoad(gateway.target)
    time.sleep(1.0)
    operations.rollout(app, "gan", 2)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not load.versions or load.versions[-1] != 2):
        time.sleep(0.2)
    time.sleep(1.0)
    load.stop()
    assert not load.failures, load.failures
    assert 1 in load.versions and load.versions[-1] == 2
    # in place: the same replica serves the new version; it was not restarted
    assert _gan_replica() == replica
    operations.rollout(app, "gan", 1)  # back, for the other tests


def test_replacing_the_replicas_under_load_fails_no_request(gateway: GatewayThread,
                                                            app: ModelStore) -> None:
    # a change that needs new replicas of every model (an upgrade: new code, constructor
    # arguments): Serve stops the old ones and starts new ones, all at once on these two
    # cores
    before = _gan_replica()
    config = operations.load_state(app)
    for m in config.models.values():
        m.warmup = not m.warmup  # a constructor argument
    load = GanLoad(gateway.target)
    time.sleep(1.0)
    operations.deploy(config, app)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and _gan_replica() == before:
        time.sleep(0.5)
    count = len(load.versions)
    time.sleep(2.0)
    load.stop()
    assert _gan_replica() != before  # new replicas serve
    assert len(load.versions) > count  # and answer
    assert not load.failures, load.failures
    for m in config.models.values():
        m.warmup = not m.warmup
    operations.deploy(config, app)


def test_lanes_carry_generate_groups_with_identical_results(gateway: GatewayThread,
                                                           app: ModelStore) -> None:
    # every answer through the lane (the default) equals the one through Serve's router
    # (lane: false, a constructor argument: the replica is replaced), alone or coalesced
    with GenfleetClient(gateway.target, retries=0) as client:
        config = operations.load_state(app)
        config.models["gan"].lane = False
        operations.deploy(config, app)
        deadline = time.monotonic() + 120
        while serve.get_app_handle("genfleet").lanes.remote().result().get("gan"):
            assert time.monotonic() < deadline, "gan's lane is still listed"
            time.sleep(0.5)
        alone = [client.generate("gan", 2, seed=s).samples for s in range(12)]
        config.models["gan"].lane = True
        operations.deploy(config, app)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            listed = serve.get_app_handle("genfleet").lanes.remote().result()
            if listed.get("gan"):
                break
            time.sleep(0.5)
        assert listed.get("gan"), listed
        # the gateway's lane listing refreshes in the background (stale-while-revalidate,
        # every second): calls go by handle until it has a client for the new lane
        backend: Any = gateway.gateway.backend
        port = listed["gan"][0]["port"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(a.port == port
                                                      for a in list(backend._lane_clients)):
            client.generate("gan", 1, seed=99)
            time.sleep(0.2)
        assert any(a.port == port for a in list(backend._lane_clients))
        with ThreadPoolExecutor(12) as pool:
            together = list(pool.map(lambda s: client.generate("gan", 2, seed=s).samples,
                                     range(12)))
    for a, b in zip(alone, together, strict=True):
        assert a is not None and b is not None and a.tobytes() == b.tobytes()


def test_scale_up_and_down_changes_replicas(app: ModelStore) -> None:
    operations.scale(app, "vae", min_replicas=2, max_replicas=2)
    deadline = time.monotonic() + 120
    while _replicas("genfleet", "vae") != 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _replicas("genfleet", "vae") == 2
    assert _replicas("genfleet", "gan") == 1  # others untouched
    operations.scale(app, "vae", min_replicas=1, max_replicas=1)
    deadline = time.monotonic() + 120
    while _replicas("genfleet", "vae") != 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _replicas("genfleet", "vae") == 1


def test_status_reports_versions_and_replicas(app: ModelStore) -> None:
    rows = {r.name: r for r in operations.status(operations.load_state(app))}
    assert set(rows) == set(FAMILY_NAMES)
    assert rows["flow"].version == 1 and rows["flow"].replicas.get("RUNNING", 0) >= 1


def test_status_reports_queue_depth(gateway: GatewayThread, app: ModelStore) -> None:
    config = operations.load_state(app)
    done = threading.Event()

    def busy() -> None:  # four slow requests: one batch runs, the others wait or join it
        with GenfleetClient(gateway.target, retries=0) as client, ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda s: client.generate("ebm", 64, seed=s, options={"steps": 300}),
                          range(4)))
        done.set()

    thread = threading.Thread(target=busy)
    thread.start()
    seen: list[tuple[int | None, int | None]] = []
    while not done.is_set():
        row = next(r for r in operations.status(config) if r.name == "ebm")
        seen.append((row.queued, row.running))
        time.sleep(0.3)
    thread.join()
    assert any((running or 0) > 0 for _, running in seen), seen
    time.sleep(2.5)  # the next reports come after the work is done
    rows = {r.name: r for r in operations.status(config)}
    assert all(r.queued is not None for r in rows.values()), rows  # every model reports
    assert (rows["ebm"].queued, rows["ebm"].running) == (0, 0)


def _ray_families(text: str) -> dict[str, Any]:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text)}


def _flow_samples(text: str) -> float:
    family = _ray_families(text).get("ray_genfleet_serve_samples")
    return sum(s.value for s in family.samples if s.labels.get("model") == "flow") if family else 0


def test_replicas_export_metrics_through_ray(gateway: GatewayThread) -> None:
    """Ray's exposition parses; every replica metric has its spec's type and labels (plus
    the labels Ray adds); samples and steps count exactly what was generated."""
    from services.core import metrics

    before = _flow_samples(scrape_ray_metrics())
    with GenfleetClient(gateway.target, retries=0) as client:
        client.generate("flow", 7, seed=3)
        client.generate("flow", 5, seed=4)
    deadline = time.monotonic() + 30
    while (text := scrape_ray_metrics()) and _flow_samples(text) < before + 12:
        assert time.monotonic() < deadline, "flow's samples were not exported within 30 s"
        time.sleep(1)
    assert _flow_samples(text) == before + 12
    families = _ray_families(text)
    added = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId",
             "otel_scope_name", "otel_scope_schema_url", "otel_scope_version"}
    for spec in metrics.SERVE:
        name = spec.exposed.removesuffix("_total") if spec.kind == "counter" else spec.exposed
        assert name in families, name
        assert families[name].type == spec.kind
        for sample in families[name].samples:
            assert set(sample.labels) - added - {"le"} == set(spec.labels), sample
    steps = families["ray_genfleet_serve_sampler_steps"]
    assert any(s.labels["model"] == "flow" and s.value >= 2 for s in steps.samples)


def test_generate_returns_numpy_that_matches_in_process(gateway: GatewayThread,
                                                        app: ModelStore) -> None:
    from services.models import load_model, sample_seeds

    model, _ = load_model(app, "flow")
    expected = model.sample(sample_seeds(9, 4)).numpy()
    with GenfleetClient(gateway.target) as client:
        served = client.generate("flow", 4, seed=9).samples
    assert served is not None
    np.testing.assert_array_equal(served, expected)
