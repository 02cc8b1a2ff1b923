"""The generic Ray Serve deployment: one per served model, any family.

- ``generate`` goes through ``@serve.batch`` (``max_batch_size`` requests or
  ``batch_wait_timeout_s`` after the first); ``generate_batch`` takes a group the gateway
  already coalesced with the same settings. Both feed one ``MergingRunner``: batches run
  one at a time in a worker thread (the event loop keeps accepting requests) and all that
  queued meanwhile is merged into the next forward pass, up to ``max_batch_size``.
- A caller that goes away (the gateway cancels the response when the client's deadline
  passes) cancels its token; a group whose callers all left stops between sampler steps.
- ``reconfigure`` (the deployment's ``user_config``) loads a checkpoint version beside the
  one being served and swaps it in when ready: no request fails during a rollout. A version
  that fails to load (broken files, checksum mismatch) is not swapped in: the replica keeps
  serving the old one and logs why. It also sets the dynamic-batching size and wait at run
  time.
- The replica loads and warms its model (``ReplicaEngine.warm``) in ``reconfigure``, which
  Serve runs before the replica counts as started: no call waits on a cold model, at
  start or after a rollout (the new version is warmed before it is swapped in).
- Autoscaling counts requests, not handle calls: ``record_autoscaling_stats`` reports the
  requests this replica holds (a coalesced group of 32 counts 32), and
  ``services.serving.autoscaling.requests_policy`` scales on their sum.
- Each replica also listens on a lane (``services.serving.lane``): gateways send their
  coalesced Generate groups there, straight to this event loop, instead of through
  Serve's router (the default; ``lane: false`` turns it off). The lane's address goes to the
  ``Directory`` with the load report; ``__del__`` takes it out and drains it.
- Every second the replica reports its load (requests waiting for a batch, requests in
  the running batch) to the app's ``Directory``, which ``genfleet status`` reads, and to
  Prometheus (``ReplicaMetrics``: queue and compute time, batch sizes, samples, sampler
  steps, queue depth; exported by Ray with a ``ray_`` prefix).
- Errors come back as ``api.ErrorResult`` values, never as Ray exceptions, so the gateway
  can map them to status codes without parsing Ray's wrappers; an unexpected exception is
  logged here with a request id and answered as Internal with that id. Score, Encode and
  Decode run with a cancel token too: a caller that goes away stops their loops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from ray import serve

from services.core import api
from services.core.errors import CheckpointError, GenfleetError, ModelNotReady
from services.serving.coalesce import MergingRunner
from services.serving.engine import CancelToken, ReplicaEngine
from services.serving.lane import LaneServer
from services.serving.metrics import ReplicaMetrics

log = logging.getLogger("genfleet.serving")
T = TypeVar("T")
Item = tuple[api.GenerateRequest, CancelToken, float]


@serve.deployment
class ModelDeployment:
    """Serves one model (``name`` in the store); its version comes from ``user_config``."""

    def __init__(self, name: str, store_root: str, *, device: str = "auto",
                 autocast: str | None = None, threads: int = 1,
                 limits: dict[str, int] | None = None, warmup: bool = True,
                 lane: bool = True) -> None:
        torch.set_num_threads(max(1, threads))  # replicas share the node's cores
        self._name = name
        self._store_root = store_root
        self._kwargs: dict[str, Any] = {"device": device, "autocast": autocast,
                                        "limits": api.Limits(**(limits or {})),
                                        "warmup": warmup}
        self._engine: ReplicaEngine | None = None
        self._max_batch_size = 32
        self._runner: MergingRunner[Item, api.GenerateResult | api.ErrorResult] = MergingRunner(
            self._run_batch, lambda: self._max_batch_size)
        self._ongoing = 0  # generate requests accepted and not answered
        self._other = 0  # score / encode / decode calls accepted and not answered
        self._admission = {"max_ongoing_requests": 32, "max_queued_requests": 64}
        self._reporter: asyncio.Task[None] | None = None
        self._metrics: ReplicaMetrics | None = None
        self._lane_wanted = lane
        self._lane: LaneServer | None = None

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Apply ``user_config``: ``version`` (None: latest), ``max_batch_size``,
        ``batch_wait_timeout_s``, and the admission limits the gateway enforces in requests
        (``max_ongoing_requests``, ``max_queued_requests``; see ``batch_settings``)."""
        version = config.get("version")
        if self._engine is None:
            self._engine = await asyncio.to_thread(
                ReplicaEngine, self._store_root, self._name, version, **self._kwargs)
            self._metrics = ReplicaMetrics(self._name, self._engine.info.family)
            self._engine.observer = self._metrics
        elif version is None or int(version) != self._engine.version:
            # load beside the served version; the swap is one assignment
            try:
                info = await asyncio.to_thread(self._engine.load, version)
            except CheckpointError as exc:  # a broken version is never served
                log.error("%s: rollout to version %s refused, still serving version %d: %s",
                          self._name, version, self._engine.version, exc)
            else:
                log.info("%s now serves version %d", self._name, info.version)
        if self._lane_wanted and self._lane is None:  # advertised once the model is loaded
            replica = serve.get_replica_context().replica_id.unique_id
            self._lane = LaneServer(replica, self.generate_batch)
            await self._lane.start()
        if self._reporter is None:
            self._reporter = asyncio.get_running_loop().create_task(self._report_load())
        for key in self._admission:
            if key in config:
                self._admission[key] = int(config[key])
        batcher: Any = self._batched  # the @serve.batch wrapper carries its setters
        if "max_batch_size" in config:
            self._max_batch_size = max(1, int(config["max_batch_size"]))
            batcher.set_max_batch_size(self._max_batch_size)
        if "batch_wait_timeout_s" in config:
            batcher.set_batch_wait_timeout_s(float(config["batch_wait_timeout_s"]))

    async def replica(self) -> str:
        """This replica's id (Serve's ``replica_id.unique_id``)."""
        return str(serve.get_replica_context().replica_id.unique_id)

    def _ready(self) -> ReplicaEngine:
        if self._engine is None:
            raise ModelNotReady(f"{self._name} has not loaded a checkpoint yet")
        return self._engine

    async def info(self) -> api.ModelInfo | api.ErrorResult:
        try:
            return self._ready().info
        except GenfleetError as exc:
            return api.ErrorResult.of(exc)

    async def batch_sizes(self) -> dict[int, int]:
        """Requests per dynamic batch this replica has run -> how many such batches."""
        return dict(self._engine.batch_sizes) if self._engine else {}

    def load(self) -> dict[str, int]:
        """Generate requests in this replica: waiting for a batch, and in the running one."""
        running = self._runner.running
        return {"queued": max(0, self._ongoing - running), "running": running}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metric: the requests this replica holds, each request
        of a coalesced group counted (``services.serving.autoscaling``)."""
        return {"requests": float(self._ongoing + self._other)}

    async def _report_load(self, period_s: float = 1.0) -> None:
        context = serve.get_replica_context()
        directory = serve.get_app_handle(context.app_name)
        replica = context.replica_id.unique_id
        lane = None if self._lane is None or self._lane.address is None else \
            self._lane.address.to_dict()
        while True:
            load = self.load()
            if self._metrics is not None:
                self._metrics.load(load["queued"], load["running"], self._max_batch_size)
            try:
                await directory.report_load.remote(self._name, replica, load, lane)
            except Exception as exc:  # the directory restarts with the app: try again
                log.debug("load report failed: %s", exc)
            await asyncio.sleep(period_s)

    async def __del__(self) -> None:
        """Serve stops this replica (scale-down, redeploy, shutdown): the lane leaves the
        Directory, then drains (calls in flight finish; new ones get UNAVAILABLE, which a
        gateway sends to another replica)."""
        if self._reporter is not None:
            self._reporter.cancel()
        if self._lane is not None:
            try:
                context = serve.get_replica_context()
                await asyncio.wait_for(serve.get_app_handle(context.app_name).leave.remote(
                    self._name, context.replica_id.unique_id), timeout=2.0)
            except Exception as exc:  # the app is going away as a whole
                log.debug("lane not withdrawn: %s", exc)
            await self._lane.close(grace_s=10.0)

    async def batch_settings(self) -> dict[str, float]:
        """Dynamic batching (``max_batch_size``, ``batch_wait_timeout_s``) and the admission
        limits, in requests, that the gateway applies before it coalesces."""
        batcher: Any = self._batched
        return {"max_batch_size": batcher._get_max_batch_size(),
                "batch_wait_timeout_s": batcher._get_batch_wait_timeout_s(),
                **self._admission}

    async def generate(self, request: api.GenerateRequest
                       ) -> api.GenerateResult | api.ErrorResult:
        token = CancelToken(request.deadline)
        self._ongoing += 1
        try:
            result: api.GenerateResult | api.ErrorResult = await self._batched(
                (request, token, time.perf_counter()))
            return result
        except asyncio.CancelledError:
            token.cancel()  # the sampler loop sees it between steps
            raise
        finally:
            self._ongoing -= 1

    async def generate_batch(self, requests: list[api.GenerateRequest], isolated: bool = False
                             ) -> list[api.GenerateResult | api.ErrorResult]:
        """A group coalesced by the caller; results in the same order. ``isolated``: run
        these requests in a forward pass of their own, merged with no other batch (the
        gateway's retry of a request during which a replica died)."""
        now = time.perf_counter()
        items = [(r, CancelToken(r.deadline), now) for r in requests]
        self._ongoing += len(items)
        try:
            return await self._runner.submit(items, alone=isolated)
        except asyncio.CancelledError:
            for _, token, _ in items:
                token.cancel()
            raise
        finally:
            self._ongoing -= len(items)

    # many batches may wait in the runner at once: they merge there, not here
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, max_concurrent_batches=64)
    async def _batched(self, items: list[Item]) -> list[api.GenerateResult | api.ErrorResult]:
        return await self._runner.submit(items)

    def _run_batch(self, items: list[Item]) -> list[api.GenerateResult | api.ErrorResult]:
        """One forward pass (per sampler-option group) over ``items``; in a worker thread."""
        try:
            return self._ready().generate_many(items)
        except Exception as exc:  # generate_many answers per request; this is a bug
            return [api.ErrorResult.failure(exc, f"{self._name}.generate")] * len(items)

    async def _call(self, method: str, fn: Callable[[Any, CancelToken], T], request: Any
                    ) -> T | api.ErrorResult:
        token = CancelToken(request.deadline)
        self._other += 1
        try:
            return await asyncio.to_thread(fn, request, token)
        except asyncio.CancelledError:
            token.cancel()  # the loop in the worker thread stops at its next iteration
            raise
        except Exception as exc:
            return api.ErrorResult.failure(exc, f"{self._name}.{method}")
        finally:
            self._other -= 1

    async def score(self, request: api.ScoreRequest) -> api.ScoreResult | api.ErrorResult:
        return await self._call("score", lambda r, t: self._ready().score(r, t), request)

    async def encode(self, request: api.EncodeRequest) -> api.EncodeResult | api.ErrorResult:
        return await self._call("encode", lambda r, t: self._ready().encode(r, t), request)

    async def decode(self, request: api.DecodeRequest) -> api.DecodeResult | api.ErrorResult:
        return await self._call("decode", lambda r, t: self._ready().decode(r, t), request)
