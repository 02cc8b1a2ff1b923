"""A real Prometheus server, configured with the shipped deploy/prometheus files, scrapes a
running `genfleet up` (gateway endpoint + Ray's service-discovery file). After a known,
paced load, PromQL answers must match it: request counts exactly, request rate within
scrape jitter, p99 latency within the histogram bucket the client-side p99 falls in, samples
generated exactly. Every rule evaluates without error and every dashboard query returns
data."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest
import yaml

from services.core import metrics
from services.gateway.client import GenfleetClient
from tests.helpers import genfleet_up, tiny_store
from tests.unit.test_observability import (
    PROMETHEUS,
    RAY_SERVE,
    dashboard_queries,
    metric_names,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LOAD_S = 20.0
RATES = {"gan": 8.0, "vae": 4.0}  # Generate calls per second, paced (open loop)
SAMPLES = {"gan": 2, "vae": 1}  # per call
UNKNOWN_CALLS = 5  # Generate for a model that is not served: NOT_FOUND, model="other"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_for(what: str, check: Any, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def genfleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`genfleet up` serving gan and vae from a store of tiny models; its up.json."""
    base = tmp_path_factory.mktemp("prom-genfleet")
    tiny_store(base / "store", ["gan", "vae"], steps=2)
    with genfleet_up(base, "--models", "gan", "vae", "--num-cpus", "4", "--port", "0",
                     "--metrics-port", "0", "--ray-metrics-port", "-1", timeout_s=180) as state:
        yield state


@pytest.fixture(scope="module")
def prometheus(genfleet: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[str]:
    """Prometheus on 127.0.0.1 with deploy/prometheus/prometheus.yml, its targets pointed
    at this genfleet; scrapes and evaluates rules every second."""
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("GENFLEET_REQUIRE_TOOLS"):
            pytest.fail("prometheus is not installed (CI installs Debian's prometheus package)")
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    base = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS / f) for f in config["rule_files"]]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    gateway = urllib.parse.urlparse(genfleet["metrics"]["gateway"])
    jobs["genfleet-gateway"]["static_configs"] = [{"targets": [gateway.netloc]}]
    jobs["ray"]["file_sd_configs"][0].update(files=[genfleet["metrics"]["service discovery"]],
                                             refresh_interval="1s")
    (base / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{_free_port()}"
    log = (base / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [binary, f"--config.file={base / 'prometheus.yml'}", f"--storage.tsdb.path={base / 'data'}",
         f"--web.listen-address={url.removeprefix('http://')}"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        def ready() -> bool:
            assert proc.poll() is None, (base / "prometheus.log").read_text()
            try:
                return urllib.request.urlopen(f"{url}/-/ready", timeout=2).status == 200
            except OSError:
                return False

        _wait_for("prometheus ready", ready, 60)
        _wait_for("both jobs scraped", lambda: {r["metric"]["job"] for r in _query(url, "up == 1")}
                  >= {"genfleet-gateway", "ray"}, 60)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _api(url: str, path: str, **params: Any) -> Any:
    query = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{url}/api/v1/{path}?{query}", timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def _query(url: str, promql: str, at: float | None = None) -> list[dict[str, Any]]:
    params: dict[str, Any] = {"query": promql}
    if at is not None:
        params["time"] = f"{at:.3f}"
    result: list[dict[str, Any]] = _api(url, "query", **params)["result"]
    return result


def _by(url: str, promql: str, label: str, at: float | None = None) -> dict[str, float]:
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in _query(url, promql, at)}


@pytest.fixture(scope="module")
def load(genfleet: dict[str, Any], prometheus: str) -> dict[str, Any]:
    """The paced load; client-side latencies per model, and when it ran."""
    latencies: dict[str, list[float]] = {m: [] for m in RATES}
    lock = threading.Lock()
    with GenfleetClient(genfleet["target"], retries=0, timeout=60) as client:
        def call(model: str, i: int) -> None:
            started = time.perf_counter()
            client.generate(model, SAMPLES[model], seed=i)
            with lock:
                latencies[model].append(time.perf_counter() - started)

        schedule = sorted((i / rate, model) for model, rate in RATES.items()
                          for i in range(int(LOAD_S * rate)))
        started = time.time()
        with ThreadPoolExecutor(16) as pool:
            futures = []
            for offset, model in schedule:
                delay = started + offset - time.time()
                if delay > 0:
                    time.sleep(delay)
                futures.append(pool.submit(call, model, len(futures)))
            for _ in range(UNKNOWN_CALLS):
                with pytest.raises(grpc.RpcError) as info:
                    client.generate("not-served", 1)
                assert info.value.code() == grpc.StatusCode.NOT_FOUND
            for f in futures:
                f.result()
        ended = time.time()
    return {"latencies": latencies, "started": started, "ended": ended}


def test_request_counts_match_the_load_exactly(prometheus: str, load: dict[str, Any]) -> None:
    expected = {m: float(int(LOAD_S * r)) for m, r in RATES.items()}
    promql = 'sum by (model) (genfleet_gateway_requests_total{method="Generate",code="OK"})'
    counts = _wait_for("final counts scraped",
                       lambda: (c := _by(prometheus, promql, "model")) == expected and c, 30)
    assert counts == expected
    errors = _by(prometheus, 'sum by (model, code) (genfleet_gateway_requests_total'
                             '{method="Generate",code!="OK"})', "model")
    assert errors == {"other": UNKNOWN_CALLS}


def test_request_rate_matches_the_paced_load(prometheus: str, load: dict[str, Any]) -> None:
    at = load["started"] + 0.75 * LOAD_S  # a 10 s window well inside the load
    rates = _by(prometheus, 'sum by (model) (rate(genfleet_gateway_requests_total'
                            '{method="Generate"}[10s]))', "model", at)
    for model, rate in RATES.items():
        assert rates[model] == pytest.approx(rate, rel=0.25), rates


def _bucket_bounds(value: float) -> tuple[float, float]:
    """The (lower, upper] latency bucket that holds ``value``."""
    edges = (0.0, *metrics.LATENCY_BUCKETS, math.inf)
    for lo, hi in itertools.pairwise(edges):
        if lo < value <= hi:
            return lo, hi
    return 0.0, edges[1]


def test_p99_latency_lies_in_the_client_measured_bucket(prometheus: str,
                                                        load: dict[str, Any]) -> None:
    promql = ('histogram_quantile(0.99, sum by (le, model) '
              '(genfleet_gateway_request_duration_seconds_bucket{method="Generate"}))')
    p99 = _by(prometheus, promql, "model")
    overhead_s = 0.02  # the client's time outside the gateway's measurement (loopback gRPC)
    for model in RATES:
        client = np.asarray(load["latencies"][model])
        # gateway latency <= client latency <= gateway latency + overhead, call by call
        lower, _ = _bucket_bounds(max(1e-6, float(np.quantile(client, 0.99, method="lower"))
                                      - overhead_s))
        _, upper = _bucket_bounds(float(np.quantile(client, 0.99, method="higher")))
        assert lower <= p99[model] <= upper, (model, p99[model], lower, upper)
    recorded = _by(prometheus, 'model_method:genfleet_gateway_request_duration_seconds:p99_5m'
                               '{method="Generate"}', "model")
    assert set(RATES) <= set(recorded) and all(0 < v < 300 for v in recorded.values()), recorded


def test_replica_metrics_count_every_sample_and_request(prometheus: str,
                                                        load: dict[str, Any]) -> None:
    samples = {m: float(int(LOAD_S * r) * SAMPLES[m]) for m, r in RATES.items()}
    requests = {m: float(int(LOAD_S * r)) for m, r in RATES.items()}
    got = _wait_for("replica samples exported and scraped",  # Ray reports every few seconds
                    lambda: (s := _by(prometheus, "sum by (model) (ray_genfleet_serve_samples_total)",
                                      "model")) == samples and s, 60)
    assert got == samples
    queued = _by(prometheus, "sum by (model) (ray_genfleet_serve_queue_duration_seconds_count)",
                 "model")
    assert queued == requests  # one queue-time observation per request
    batches = _by(prometheus, "sum by (model) (ray_genfleet_serve_compute_duration_seconds_count)",
                  "model")
    assert all(1 <= batches[m] <= requests[m] for m in RATES), batches


def test_batch_job_metrics_reach_prometheus(genfleet: dict[str, Any], prometheus: str,
                                            load: dict[str, Any]) -> None:
    """A BatchService job on the same genfleet: its Ray Data actors' samples are counted."""
    from services.gateway.pb.genfleet.v1 import batch_pb2 as bpb

    with GenfleetClient(genfleet["target"], retries=0) as client:
        job = client.submit_batch("gan", 200, "prometheus-test", shard_size=50, seed=1)
        done = client.wait_batch(job.id, timeout=120)
    assert done.state == bpb.BATCH_STATE_SUCCEEDED, done.error
    promql = "sum by (model) (ray_genfleet_batch_written_samples_total)"
    written = _wait_for("batch samples exported and scraped",
                        lambda: _by(prometheus, promql, "model").get("gan") == 200, 60)
    assert written
    shards = _by(prometheus, "sum by (model) (ray_genfleet_batch_written_shards_total)", "model")
    assert shards == {"gan": 4}


def test_rules_evaluate_and_dashboard_queries_return_data(prometheus: str,
                                                          load: dict[str, Any]) -> None:
    time.sleep(3)  # a few more rule evaluations after the load
    groups = _api(prometheus, "rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) >= 15
    assert all(r["health"] == "ok" for r in rules), [r for r in rules if r["health"] != "ok"]
    firing = [a for a in _api(prometheus, "alerts")["alerts"] if a["state"] == "firing"]
    assert firing == []  # a healthy cluster under light load pages nobody
    names = set(_api(prometheus, "label/__name__/values"))
    assert names >= RAY_SERVE  # the Ray Serve metrics the rules rely on
    training = {s.exposed for s in metrics.TRAIN}  # exported only while a Ray Train job runs
    for expr in dashboard_queries():
        used = metric_names(expr)
        if used & training:
            continue  # tests/integration/test_train.py scrapes those from Ray
        if used == {metrics.BATCH_ERRORS.exposed}:
            continue  # no shard failed: Ray exports a counter once it counted something
        assert used <= names, (expr, used - names)
        query = expr.replace('"$model"', '".*"').replace("$__rate_interval", "1m")
        assert _query(prometheus, query), f"no data for dashboard query {expr}"
