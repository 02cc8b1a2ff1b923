"""The example plugin family (tests/plugins, installed by .ci/run) through `genfleet up`
on an empty store: trained on first start, served by Ray Serve behind the gateway, called
over gRPC (Generate, Score, a BatchService dataset job) and OIP v2 REST."""

from __future__ import annotations

import importlib.util
import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from services.core.store import ModelStore
from services.gateway.client import GenfleetClient
from tests.helpers import genfleet_up

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("genfleet_plugin_example") is None,
                                 reason="pip install -e tests/plugins/genfleet-plugin-example "
                                        "(.ci/run does)")]
PLUGIN = "factorized"


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("plugin-up")
    with genfleet_up(base, "--models", PLUGIN, "--num-cpus", "4", "--port", "0",
                     "--metrics-port", "-1", "--ray-metrics-port", "-1",
                     "--train-minutes", "1", timeout_s=400) as state:
        yield {**state, "base": base}


def test_a_plugin_family_trains_serves_and_answers(up: dict[str, Any]) -> None:
    meta = ModelStore(up["base"] / "store").meta(PLUGIN)
    assert meta.family == PLUGIN  # trained by genfleet up on the empty store
    with GenfleetClient(up["target"], retries=2, timeout=60) as client:
        assert client.health(PLUGIN) == "SERVING"
        (info,) = client.list_models()
        assert info.family == PLUGIN
        out = client.generate(PLUGIN, 8, seed=5, labels=list(range(8)))
        assert out.samples is not None and out.samples.shape == (8, 1, 8, 8)
        again = client.generate(PLUGIN, 8, seed=5, labels=list(range(8)))
        assert again.samples is not None and again.samples.tobytes() == out.samples.tobytes()
        assert client.score(PLUGIN, out.samples).kind == "exact"
        job = client.submit_batch(PLUGIN, 64, "plugin-set", format="npz", shard_size=32)
        done = client.wait_batch(job.id, timeout=240)
        assert done.samples_written == 64, done
    body = {"inputs": [{"name": "SEED", "shape": [1], "datatype": "UINT64", "data": [5]}]}
    request = urllib.request.Request(
        f"http://127.0.0.1:{up['http_port']}/v2/models/{PLUGIN}/infer",
        data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        doc = json.loads(response.read())
    assert doc["outputs"][0]["shape"] == [1, 1, 8, 8]
