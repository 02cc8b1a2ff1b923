"""A request fails alone: in a merged batch, in a coalesced group, when a replica dies;
cancellation and deadlines stop every RPC's iterative loop (DESIGN.md §8)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from ray.exceptions import ActorDiedError

from services.core import api
from services.core.errors import Cancelled, DeadlineExceeded, Internal, Overloaded
from services.gateway.status import status_of
from services.serving.engine import CancelToken, ReplicaEngine
from services.serving.serve_backend import ReplicaDied, ServeBackend
from tests.helpers import tiny_store

FAMILIES = ["autoregressive", "diffusion", "ebm", "flow", "gan", "vae"]


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    tiny_store(root, steps=2)
    return root


@pytest.fixture(scope="module")
def servers(store_root: Path) -> dict[str, ReplicaEngine]:
    return {f: ReplicaEngine(store_root, f, device="cpu") for f in FAMILIES}


def _item(req: api.GenerateRequest) -> tuple[api.GenerateRequest, CancelToken, float]:
    return (req, CancelToken(), time.perf_counter())


def _alone(server: ReplicaEngine, req: api.GenerateRequest) -> Any:
    return server.generate_many([_item(req)])[0]


# ---------------------------------------------------------------- merged batches
@pytest.mark.parametrize("family", FAMILIES)
def test_a_bad_request_in_a_merged_batch_fails_alone(servers: dict[str, ReplicaEngine],
                                                     family: str) -> None:
    server = servers[family]
    good = [api.GenerateRequest(family, 2, seed=s) for s in (1, 2, 3)]
    option = server.info.sampler_options[0].name if server.info.sampler_options else "bogus"
    bad = [api.GenerateRequest(family, 2, seed=9, options={option: float("nan")}),
           api.GenerateRequest(family, 2, seed=9, options={option: float("inf")}),
           api.GenerateRequest(family, 10**9),
           api.GenerateRequest(family, 2, labels=(99, 99))]
    batch = [good[0], bad[0], good[1], bad[1], bad[2], good[2], bad[3]]
    results = server.generate_many([_item(r) for r in batch])
    for req, result in zip(batch, results, strict=True):
        if req in good:
            assert isinstance(result, api.GenerateResult)
            alone = _alone(server, req)
            assert result.samples is not None and alone.samples is not None
            assert result.samples.tobytes() == alone.samples.tobytes()
        else:
            assert isinstance(result, api.ErrorResult) and result.error == "InvalidArgument", result


class _Poison:
    """Makes ``model._sample`` raise ``error`` whenever a batch holds ``seed``'s samples."""

    def __init__(self, server: ReplicaEngine, seed: int, error: BaseException) -> None:
        self.model = server._state[0]  # type: ignore[index]
        self.poison = set(sample_seeds(seed))
        self.error = error
        self.original = self.model._sample

    def __enter__(self) -> _Poison:
        def sample(noise: Any, **kwargs: Any) -> Any:
            if self.poison & {int(g.initial_seed()) for g in noise.generators}:
                raise self.error
            return self.original(noise, **kwargs)
        self.model._sample = sample
        return self

    def __exit__(self, *exc: object) -> None:
        self.model._sample = self.original


def sample_seeds(seed: int) -> list[int]:
    from services.models import sample_seeds as seeds
    return seeds(seed, 2)


@pytest.mark.parametrize("error", [RuntimeError("boom"), MemoryError(),
                                   torch.OutOfMemoryError("CUDA out of memory")],
                         ids=["exception", "memory", "cuda-oom"])
def test_a_request_whose_sampler_fails_fails_alone_others_get_identical_bytes(
        servers: dict[str, ReplicaEngine], error: BaseException) -> None:
    server = servers["diffusion"]
    batch = [api.GenerateRequest("diffusion", 2, seed=s) for s in (1, 666, 2)]
    expected = {r.seed: _alone(server, r) for r in batch if r.seed != 666}
    with _Poison(server, 666, error):
        results = server.generate_many([_item(r) for r in batch])
    assert isinstance(results[1], api.ErrorResult) and results[1].error == "Internal"
    assert "request id" in results[1].message and "Traceback" not in results[1].message
    for req, result in zip(batch, results, strict=True):
        if req.seed != 666:
            assert isinstance(result, api.GenerateResult)
            assert result.samples.tobytes() == expected[req.seed].samples.tobytes()  # type: ignore[union-attr]


# ---------------------------------------------------------------- deadlines, cancellation
def _count_steps(model: Any, attr: str, token: CancelToken, after: int) -> list[int]:
    """Wrap ``model.<attr>`` to count calls and cancel ``token`` after ``after`` of them."""
    calls = [0]
    original = getattr(model, attr)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == after:
            token.cancel()
        return original(*args, **kwargs)

    setattr(model, attr, wrapped)
    return calls


ITERATIVE = [  # (family, rpc, options, the module called once per iteration)
    ("diffusion", "score", {"timesteps": 40}, "_eps"),
    ("diffusion", "encode", {"steps": 50}, "_eps"),
    ("diffusion", "decode", {"steps": 50}, "_eps"),
    ("vae", "score", {"samples": 4096}, "_logits"),
    ("flow", "score", {"samples": 1024}, "log_density"),
    ("autoregressive", "score", {}, "_log_likelihood"),
]


@pytest.mark.parametrize(("family", "rpc", "options", "attr"), ITERATIVE,
                         ids=[f"{f}-{r}" for f, r, _, _ in ITERATIVE])
def test_a_caller_that_goes_away_stops_score_encode_and_decode(
        store_root: Path, family: str, rpc: str, options: dict[str, Any], attr: str) -> None:
    server = ReplicaEngine(store_root, family, device="cpu")
    model = server._state[0]  # type: ignore[index]
    token = CancelToken()
    calls = _count_steps(model, attr, token, after=2)
    shape = server.info.latent_shape if rpc == "decode" else server.info.sample_shape
    data = np.zeros((8, *shape), np.float32 if rpc == "decode" else np.int64)
    request: Any = (api.DecodeRequest(family, data, options=options) if rpc == "decode" else
                    api.ScoreRequest(family, data, options=options) if rpc == "score" else
                    api.EncodeRequest(family, data, options=options))
    with pytest.raises(Cancelled):
        getattr(server, rpc)(request, token)
    assert 2 <= calls[0] <= 3, f"{calls[0]} iterations ran after the caller left"
    # a passed deadline stops the call before its first iteration
    calls[0] = 0
    with pytest.raises(DeadlineExceeded):
        getattr(server, rpc)(request, CancelToken(deadline=time.time() - 1))
    assert calls[0] == 0


# ---------------------------------------------------------------- gateway retries
class _FakeReplicas:
    """Stands in for ServeBackend._call's Ray handle: a poison request kills any replica
    whose batch holds it; everything else answers."""

    def __init__(self) -> None:
        self.deaths = 0
        self.calls: list[tuple[list[int], bool]] = []

    def remote(self, group: list[api.GenerateRequest], isolated: bool = False) -> Any:
        seeds = [r.seed for r in group]
        self.calls.append((seeds, isolated))

        async def answer() -> Any:
            if 666 in seeds:
                self.deaths += 1
                raise ActorDiedError()
            return [f"ok-{s}" for s in seeds]
        return _Response(answer())


class _Response:
    def __init__(self, coro: Any) -> None:
        self._coro = coro

    def __await__(self) -> Any:
        return self._coro.__await__()

    def cancel(self) -> None:
        pass


def _backend(replicas: _FakeReplicas) -> ServeBackend:
    backend = ServeBackend()
    backend._handles["m"] = type("H", (), {"generate_batch": replicas})()  # type: ignore[assignment]
    return backend


def test_a_group_a_replica_died_holding_is_resent_one_by_one_and_the_poison_fails() -> None:
    replicas = _FakeReplicas()
    group = [api.GenerateRequest("m", 1, seed=s) for s in (1, 666, 2)]
    results = asyncio.run(_backend(replicas)._send_group("m", group))
    assert results[0] == "ok-1" and results[2] == "ok-2"
    assert isinstance(results[1], api.ErrorResult) and results[1].error == "Internal"
    assert "not retried again" in results[1].message and "request id" in results[1].message
    with pytest.raises(Internal) as raised:  # the caller gets INTERNAL with that message
        api.unwrap(results[1])
    status = status_of(raised.value)
    assert status.code == grpc.StatusCode.INTERNAL and status.message == results[1].message
    assert status.retry_after_s is None  # not marked retryable: the client does not retry
    assert replicas.deaths == 2, "the poison request killed more than two replicas"
    assert all(isolated for seeds, isolated in replicas.calls[1:]), "retries were merged"


def test_a_single_call_is_retried_once_after_a_death_then_fails_internal() -> None:
    replicas = _FakeReplicas()
    backend = _backend(replicas)
    request = api.GenerateRequest("m", 1, seed=666)
    with pytest.raises(ReplicaDied) as info:
        asyncio.run(backend._call("m", "generate_batch",
                                  lambda h: h.generate_batch.remote([request]), None))
    assert isinstance(info.value, Internal)
    assert replicas.deaths == 2


def test_group_wide_errors_are_not_resent_one_by_one() -> None:
    backend = ServeBackend()

    async def full(*args: Any, **kwargs: Any) -> Any:
        raise Overloaded("queue full")

    backend._call = full  # type: ignore[method-assign]
    with pytest.raises(Overloaded):
        asyncio.run(backend._send_group("m", [api.GenerateRequest("m", 1)]))
