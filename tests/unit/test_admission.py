"""Admission and autoscaling count requests, not coalesced handle calls (issue 15 item 4),
and a replica warms its model before it serves (item 5). No Ray cluster: the gateway's
admission runs with its replica lookups replaced, the policy with a stand-in context."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from services.core import api
from services.core.errors import Overloaded
from services.models import BUILTIN as FAMILIES
from services.serving.autoscaling import desired_replicas, requests_policy
from services.serving.config import REQUESTS_POLICY, load_config
from services.serving.engine import CancelToken, ReplicaEngine
from services.serving.serve_backend import ServeBackend
from tests.helpers import tiny_store


def _backend(replicas: int, ongoing: int, queued: int) -> ServeBackend:
    backend = ServeBackend("test")

    async def settings(name: str) -> dict[str, float]:
        return {"max_batch_size": 32, "batch_wait_timeout_s": 0.005,
                "max_ongoing_requests": ongoing, "max_queued_requests": queued}

    async def count(name: str) -> int:
        return replicas

    backend.settings = settings  # type: ignore[method-assign]
    backend.replicas = count  # type: ignore[method-assign]
    return backend


def test_admission_holds_replicas_times_ongoing_plus_queued_requests() -> None:
    backend = _backend(replicas=2, ongoing=4, queued=3)

    async def run() -> tuple[int, list[str]]:
        release = asyncio.Event()
        outcomes: list[str] = []

        async def one() -> None:
            try:
                async with backend.admit("gan"):
                    outcomes.append("admitted")
                    await release.wait()
            except Overloaded as exc:
                outcomes.append(str(exc))

        tasks = [asyncio.create_task(one()) for _ in range(20)]
        await asyncio.sleep(0.05)
        held = backend.inflight["gan"]
        release.set()
        await asyncio.gather(*tasks)
        return held, outcomes

    held, outcomes = asyncio.run(run())
    assert held == 2 * 4 + 3
    assert outcomes.count("admitted") == 11
    refused = [o for o in outcomes if o != "admitted"]
    assert len(refused) == 9
    assert "2 replica(s) x max_ongoing_requests 4 + max_queued_requests 3" in refused[0]
    assert backend.inflight["gan"] == 0  # every admitted request released its place


def test_unbounded_queue_admits_everything() -> None:
    backend = _backend(replicas=1, ongoing=1, queued=-1)

    async def run() -> int:
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(50):
                await stack.enter_async_context(backend.admit("gan"))
            return backend.inflight["gan"]

    assert asyncio.run(run()) == 50


def test_policy_scales_on_requests_held_not_handle_calls() -> None:
    # one coalesced group of 32 requests: Serve's own count says 1 ongoing call
    assert desired_replicas({"r1": 32.0}, target=16, fallback=1.0, current=1) == 2.0
    assert desired_replicas({"r1": 4.0, "r2": 4.0}, target=16, fallback=2.0, current=2) == 0.5
    assert desired_replicas({}, target=16, fallback=48.0, current=1) == 3.0  # not reported yet
    assert desired_replicas({}, target=16, fallback=3.0, current=0) == 1.0  # cold start
    ctx = SimpleNamespace(aggregated_metrics={"requests": {"a": 30.0, "b": 10.0, "gone": 99.0}},
                          running_replicas=["a", "b"], total_num_requests=2.0,
                          current_num_replicas=2,
                          config=SimpleNamespace(get_target_ongoing_requests=lambda: 10))
    assert requests_policy(ctx) == (4.0, {})  # the stopped replica's report is ignored


def test_deployments_that_can_scale_use_the_requests_policy() -> None:
    config = load_config(models=["gan", "diffusion"])
    assert config.models["gan"].autoscaling()["policy"] == {"policy_function": REQUESTS_POLICY}
    fixed = config.models["diffusion"]
    fixed.autoscaling_config = {"min_replicas": 2, "max_replicas": 2}
    assert "policy" not in fixed.autoscaling()
    user = config.models["gan"].user_config()
    assert user["max_ongoing_requests"] == 32 and user["max_queued_requests"] == 64


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("warm") / "store"
    tiny_store(root, steps=1)
    return root


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_replica_warms_every_default_path_before_it_serves(store_root: Path,
                                                             family: str) -> None:
    cold = ReplicaEngine(store_root, family, device="cpu", warmup=False)
    warm = ReplicaEngine(store_root, family, device="cpu")
    assert cold.warm_s == 0.0 and warm.warm_s > 0.0
    assert not warm.batch_sizes  # the warm-up is not a served batch
    # and it changes nothing a caller sees
    request = api.GenerateRequest(model=family, num_samples=3, seed=11)
    a = cold.generate_many([(request, CancelToken(), 0.0)])[0]
    b = warm.generate_many([(request, CancelToken(), 0.0)])[0]
    assert isinstance(a, api.GenerateResult) and isinstance(b, api.GenerateResult)
    assert a.samples is not None and b.samples is not None
    assert a.samples.tobytes() == b.samples.tobytes()
