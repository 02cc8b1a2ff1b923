"""The gateway's view of the Serve app: DeploymentHandle calls with deadlines, and Ray's
failures turned into genfleet's errors (DESIGN.md §4, §7).

- The client's deadline is enforced here: when it passes, the handle's response is
  cancelled (the replica's token stops the sampler) and DeadlineExceeded is raised.
- Admission in requests: a model's requests in flight from this gateway (each Generate,
  Score, Encode or Decode call; a coalesced group counts its size) are capped at
  ``replicas x max_ongoing_requests + max_queued_requests`` (the deployment's settings,
  read from a replica; the replicas counted from the app's load reports); beyond it a
  call is refused at once with Overloaded (RESOURCE_EXHAUSTED and a retry delay). Serve's
  own ``BackPressureError`` (the same limits counted in handle calls, which the
  admission keeps from being reached) -> Overloaded too.
- No replica there yet (starting, restarting) -> waited for with backoff while the
  deadline allows, then ModelNotReady (UNAVAILABLE, with a retry delay for the client).
- A replica that died while it held a call: every call is a pure function of its request
  (seeded sampling), so it is retried once, on another replica or the restarted one. A
  call during which a second replica dies is not retried again (a poison request must not
  walk through the fleet): it fails with INTERNAL and a log line naming its request id.
- Generate requests are coalesced per model (``services.serving.coalesce``): a group is
  sent when one of the model's slots (two per replica) is free, or when it holds the
  deployment's ``max_batch_size``: one Ray call per group instead of one per request, and
  no batching window at low load. A group that fails
  (a replica died holding it, or anything unexpected) is sent again one request at a
  time, each in a forward pass of its own, so that only a request that fails alone fails.
- What the request path needs from the app (a model's info, its settings, the replica
  counts) is cached (``Cached``): a value older than ``info_ttl_s`` is still answered at
  once while one refresh runs in the background, so no request waits on a Ray call for it
  and a burst does not send one refresh per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, TypeVar, cast

import grpc
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RequestCancelledError,
)
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

from services.core import api, validation
from services.core.errors import (
    Cancelled,
    DeadlineExceeded,
    Internal,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
)
from services.core.store import parse_ref
from services.serving.backend import Backend
from services.serving.coalesce import Coalescer
from services.serving.lane import LaneAddress, LaneClient
from services.serving.pending import PendingModel, find_board
from services.serving.pending import parse as parse_board

log = logging.getLogger("genfleet.backend")
# no replica to take the call right now (not started, restarting, unreachable for a moment)
_NO_REPLICA = (ActorUnavailableError, DeploymentUnavailableError, ReplicaUnavailableError)
# these fail every request of a coalesced group alike: no point in retrying one by one
_GROUP_WIDE = (Overloaded, DeadlineExceeded, Cancelled, ModelNotReady)
# coalesced groups in flight per replica: one computing, one waiting beside it
PIPELINE_DEPTH = 2
# a lane that failed is skipped this long (the Directory forgets a dead replica within 5 s)
LANE_QUARANTINE_S = 10.0
V = TypeVar("V")


class ReplicaDied(Internal):
    """A replica died while it held this call, and the call may not be retried again."""

    @classmethod
    def twice(cls, name: str, method: str, exc: BaseException) -> ReplicaDied:
        request_id = uuid.uuid4().hex[:12]
        log.error("request %s: a replica of %s died while it ran %s, on the retry too (%s); "
                  "not retried again", request_id, name, method, type(exc).__name__)
        return cls(f"a replica of {name} died while running this request, and again on its "
                   f"retry; it is not retried again (request id {request_id})")


class Cached(Generic[V]):
    """One value per key, loaded by ``load(key)``: single-flight, stale-while-revalidate.

    A key never loaded (or ``fresh=True``) waits for a load (shared by every caller that
    asks meanwhile); a value older than ``ttl_s`` is returned at once and refreshed in the
    background, once. A failed background refresh keeps the old value (and is logged); a
    failed first load raises to every caller that waited for it. A load that takes longer
    than ``timeout_s`` fails (TimeoutError): a hung Ray call must not leave a key that is
    never refreshed again."""

    def __init__(self, load: Callable[[str], Awaitable[V]], ttl_s: float,
                 timeout_s: float = 10.0) -> None:
        self._load = load
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._values: dict[str, tuple[float, V]] = {}
        self._loading: dict[str, asyncio.Future[V]] = {}

    async def get(self, key: str, *, fresh: bool = False) -> V:
        cached = self._values.get(key)
        if cached is not None and not fresh:
            if time.monotonic() - cached[0] >= self.ttl_s and key not in self._loading:
                self._start(key).add_done_callback(_consume)  # refreshed in the background
            return cached[1]
        loading = self._loading.get(key) or self._start(key)
        return await asyncio.shield(loading)

    def peek(self, key: str) -> V | None:
        """The value without waiting: None when there is none yet. A missing or stale
        value is loaded in the background (once)."""
        cached = self._values.get(key)
        stale = cached is None or time.monotonic() - cached[0] >= self.ttl_s
        if stale and key not in self._loading:
            self._start(key).add_done_callback(_consume)
        return None if cached is None else cached[1]

    def _start(self, key: str) -> asyncio.Future[V]:
        async def load() -> V:
            try:
                value = await asyncio.wait_for(self._load(key), self.timeout_s)
                self._values[key] = (time.monotonic(), value)
                return value
            finally:
                self._loading.pop(key, None)

        task = asyncio.get_running_loop().create_task(load())
        self._loading[key] = task
        return task


def _consume(task: asyncio.Future[Any]) -> None:
    """A background refresh's outcome: a failure keeps the old value."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("background refresh failed: %s", task.exception())


class ServeBackend(Backend):
    """Calls the model deployments of the Serve application ``app_name``."""

    def __init__(self, app_name: str = "genfleet", *, retries: int = 5,
                 info_ttl_s: float = 2.0) -> None:
        self.app_name = app_name
        self.retries = retries
        self.info_ttl_s = info_ttl_s
        self._handles: dict[str, DeploymentHandle] = {}
        self._served: Cached[list[str]] = Cached(self._load_names, info_ttl_s)
        self._pending: Cached[dict[str, PendingModel]] = Cached(self._load_pending, info_ttl_s)
        self._board: Any = None
        self._infos: Cached[api.ModelInfo] = Cached(self._load_info, info_ttl_s)
        self._settings: Cached[dict[str, float]] = Cached(self._load_settings, info_ttl_s)
        self._replicas: Cached[dict[str, int]] = Cached(self._load_replicas, info_ttl_s)
        self._lanes: Cached[dict[str, list[LaneAddress]]] = Cached(self._load_lanes, 1.0)
        self._lane_clients: dict[LaneAddress, LaneClient] = {}
        self._closing: set[LaneClient] = set()  # quarantined, closed once idle
        self._failed_lanes: dict[LaneAddress, float] = {}  # -> monotonic time it may return
        self._rotation = 0
        self.inflight: dict[str, int] = {}  # per model: requests admitted, not answered
        self.coalescers: dict[str, Coalescer[api.GenerateRequest, Any]] = {}

    # ---------------------------------------------------------------- models
    async def model_names(self, refresh: bool = False) -> list[str]:
        """The models served, then those still training for the app (``pending``)."""
        served = await self.served_names(refresh)
        return served + [n for n in await self.pending() if n not in served]

    async def served_names(self, refresh: bool = False) -> list[str]:
        """The model deployments of the app, as its Directory lists them (cached: a model
        deployed later is seen within ``info_ttl_s``)."""
        try:
            return await self._served.get(self.app_name, fresh=refresh)
        except TimeoutError:
            raise ModelNotReady(f"the {self.app_name} application does not answer") from None

    async def _load_names(self, app: str) -> list[str]:
        try:
            return list(await serve.get_app_handle(app).list.remote())
        except (RayActorError, *_NO_REPLICA) as exc:
            raise ModelNotReady(f"the {app} application is not ready") from exc
        except (ValueError, RuntimeError) as exc:  # app not deployed
            raise ModelNotReady(f"the {app} application is not running") from exc

    async def pending(self) -> dict[str, PendingModel]:
        """Models that ``genfleet up`` is training for the app (``services.serving.pending``);
        empty when none or when the board cannot be read."""
        try:
            return await self._pending.get(self.app_name)
        except Exception as exc:
            log.debug("pending models not read: %s", exc)
            return {}

    async def _load_pending(self, app: str) -> dict[str, PendingModel]:
        if self._board is None:
            self._board = await asyncio.to_thread(find_board, app)
            if self._board is None:
                return {}
        try:
            return parse_board(await self._board.models.remote())
        except RayActorError:  # its genfleet up has stopped
            self._board = None
            return {}

    async def list_models(self) -> list[api.ModelInfo]:
        """The served models (those still training have no info to give yet)."""
        names = await self.served_names()
        return list(await asyncio.gather(*(self.info(n) for n in names)))

    async def resolve(self, ref: str) -> api.ModelInfo:
        """As ``Backend.resolve``; a model still training -> its ``PendingModel`` error
        (UNAVAILABLE saying so, with an estimate)."""
        name, _ = parse_ref(ref)
        served = await self.served_names()
        if name not in served:
            waiting = (await self.pending()).get(name)
            if waiting is not None:
                raise waiting.error_for_call()
            raise ModelNotFound(f"no model named {name!r} is served (served: {served})")
        return await super().resolve(ref)

    def _handle(self, name: str) -> DeploymentHandle:
        if name not in self._handles:
            self._handles[name] = serve.get_deployment_handle(name, self.app_name)
        return self._handles[name]

    async def info(self, name: str, *, refresh: bool = False) -> api.ModelInfo:
        return await self._infos.get(name, fresh=refresh)

    async def _load_info(self, name: str) -> api.ModelInfo:
        info: api.ModelInfo = await self._call(name, "info", lambda h: h.info.remote(), None)
        return info

    async def settings(self, name: str) -> dict[str, float]:
        """The deployment's batching and admission settings (``batch_settings`` of a
        replica), cached like ``info``."""
        return await self._settings.get(name)

    async def _load_settings(self, name: str) -> dict[str, float]:
        value: dict[str, float] = await self._call(
            name, "batch_settings", lambda h: h.batch_settings.remote(), None)
        return value

    async def batching(self, name: str) -> tuple[int, float]:
        """The deployment's (max_batch_size, batch_wait_timeout_s)."""
        settings = await self.settings(name)
        return int(settings["max_batch_size"]), float(settings["batch_wait_timeout_s"])

    async def replicas(self, name: str) -> int:
        """Replicas of ``name`` that reported their load lately (at least 1), cached."""
        counts = await self._replicas.get(self.app_name)
        return max(1, counts.get(name, 1))

    async def _load_replicas(self, app: str) -> dict[str, int]:
        try:
            loads = await asyncio.wait_for(serve.get_app_handle(app).load.remote(), timeout=5.0)
            return {m: int(row.get("replicas", 0)) for m, row in loads.items()}
        except Exception as exc:  # the directory restarting: no counts (1 each) until it is back
            log.debug("replica counts not read: %s", exc)
            return {}

    @contextlib.asynccontextmanager
    async def admit(self, name: str, requests: int = 1) -> AsyncIterator[None]:
        """Hold ``requests`` of ``name``'s admission while the block runs.

        Raises:
            Overloaded: ``replicas x max_ongoing_requests + max_queued_requests`` requests
                of this model are already in flight from this gateway.
        """
        settings = await self.settings(name)
        queued = int(settings.get("max_queued_requests", -1))
        replicas = await self.replicas(name) if queued >= 0 else 0
        held = self.inflight.get(name, 0)  # read after the awaits: no other call between
        if queued >= 0:
            ongoing = int(settings.get("max_ongoing_requests", 1))
            limit = replicas * ongoing + queued
            if held + requests > limit:
                raise Overloaded(
                    f"{name} holds {held} requests from this gateway, its limit "
                    f"({replicas} replica(s) x max_ongoing_requests {ongoing} + "
                    f"max_queued_requests {queued}); retry with backoff")
        self.inflight[name] = held + requests
        try:
            yield
        finally:
            self.inflight[name] -= requests

    async def healthy(self, name: str | None = None) -> bool:
        """Overall (any model) or one model: a running replica answers ``info``."""
        try:
            served = await self.served_names()
            if name is not None and name not in served:
                return False  # still training, or unknown
            for n in [name] if name else served:
                await asyncio.wait_for(self.info(n), timeout=5.0)
            return True
        except Exception:
            return False

    # ----------------------------------------------------------------- calls
    async def generate(self, request: api.GenerateRequest) -> api.GenerateResult:
        info = await self.resolve(request.model)
        request = validation.check_generate(request, info)  # before it joins a group
        async with self.admit(info.name):
            max_size, _ = await self.batching(info.name)
            if max_size <= 1:  # batching off: every request alone, no coalescing either
                return await self._generate(info.name, request)
            coalescer = self.coalescers.get(info.name)
            if coalescer is None:
                async def send(group: list[api.GenerateRequest], name: str = info.name
                               ) -> list[Any]:
                    return await self._send_group(name, group)
                coalescer = self.coalescers[info.name] = Coalescer(send)
            timeout = None if request.deadline is None else max(0.0,
                                                                request.deadline - time.time())
            slots = PIPELINE_DEPTH * await self.replicas(info.name)
            try:
                async with asyncio.timeout(timeout):  # no task per request, unlike wait_for
                    result = await coalescer.submit(request, max_size, slots)
            except TimeoutError:
                raise DeadlineExceeded(f"deadline passed while {info.name}.generate ran"
                                       ) from None
            generated: api.GenerateResult = api.unwrap(result)
            return generated

    async def _send_group(self, name: str, group: list[api.GenerateRequest]) -> list[Any]:
        """One coalesced group -> one result (or ErrorResult) per request, in order."""
        deadlines = [r.deadline for r in group]
        deadline = None if None in deadlines else max(d for d in deadlines if d)
        try:
            return await self._generate_batch(name, group, False, deadline, deaths_allowed=0)
        except _GROUP_WIDE:
            raise
        except Exception as exc:  # a replica died holding the group, or a bug: one by one
            died = isinstance(exc, ReplicaDied)
            log.warning("%s: a group of %d requests failed (%s); sending each on its own",
                        name, len(group), type(exc).__name__)
            return list(await asyncio.gather(*(self._send_alone(name, r, died) for r in group)))

    async def _send_alone(self, name: str, request: api.GenerateRequest, died: bool) -> Any:
        """``request`` in a forward pass of its own; ``died``: a replica already died while
        it held this request, so a second death fails it."""
        try:
            results = await self._generate_batch(name, [request], True, request.deadline,
                                                 deaths_allowed=0 if died else 1)
            return results[0]
        except Exception as exc:
            return api.ErrorResult.failure(exc, f"{name}.generate")

    async def _generate_batch(self, name: str, requests: list[api.GenerateRequest],
                              isolated: bool, deadline: float | None, *, deaths_allowed: int
                              ) -> list[Any]:
        """``generate_batch`` on a replica of ``name``: over its lane when one is listed
        (the replica with the fewest groups in flight from here), else with a Serve handle.
        A lane that fails is not used again until the Directory lists it afresh; its
        failure counts as a replica death (retried on another replica within
        ``deaths_allowed``)."""
        deaths = 0
        while True:
            lane = await self._pick_lane(name)
            if lane is None:
                results: list[Any] = await self._call(
                    name, "generate_batch",
                    lambda h: h.generate_batch.remote(requests, isolated), deadline,
                    unwrap=False, deaths_allowed=deaths_allowed - deaths)
                return results
            timeout = None if deadline is None else max(0.0, deadline - time.time())
            try:
                return await lane.generate_batch(requests, isolated, timeout)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise DeadlineExceeded(f"deadline passed while {name}.generate ran"
                                           ) from None
                self._lane_failed(lane)
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:  # a new replica, same port
                    continue
                deaths += 1
                if deaths > deaths_allowed:
                    raise ReplicaDied.twice(name, "generate_batch", exc) from exc
                log.warning("%s.generate_batch: the replica's lane failed (%s); retrying once "
                            "elsewhere", name, exc.code().name)

    async def _pick_lane(self, name: str) -> LaneClient | None:
        """The lane of ``name``'s replica with the fewest groups in flight from here; None
        while the lanes are not known (first listing in the background: Serve handles
        meanwhile) or none works."""
        lanes = self._lanes.peek(self.app_name)
        listed = [] if lanes is None else lanes.get(name, [])
        now = time.monotonic()
        good = [a for a in listed if self._failed_lanes.get(a, 0.0) <= now]
        if not good:
            return None
        clients = []
        for address in good:
            client = self._lane_clients.get(address)
            if client is None:
                client = self._lane_clients[address] = LaneClient(address)
            clients.append(client)
        self._rotation += 1
        start = self._rotation % len(clients)
        ordered = clients[start:] + clients[:start]  # ties go round the replicas
        return min(ordered, key=lambda c: c.in_flight)

    def _lane_failed(self, lane: LaneClient) -> None:
        """Quarantine ``lane``; its channel closes once no call is in flight on it (closing
        it now would cut the other groups sent to it, which fail or finish by themselves;
        ``_load_lanes`` closes idle channels of lanes no longer listed)."""
        self._failed_lanes[lane.address] = time.monotonic() + LANE_QUARANTINE_S
        client = self._lane_clients.pop(lane.address, None)
        if client is not None:
            self._closing.add(client)
        self._close_idle()

    def _close_idle(self) -> None:
        for client in [c for c in self._closing if c.in_flight == 0]:
            self._closing.discard(client)
            task = asyncio.get_running_loop().create_task(client.close())
            task.add_done_callback(_consume)

    async def _load_lanes(self, app: str) -> dict[str, list[LaneAddress]]:
        """The Directory's lanes; while it cannot answer (restarting with the app), this
        raises and the last listing stays in use (a lane that fails is quarantined)."""
        listed = await asyncio.wait_for(serve.get_app_handle(app).lanes.remote(), 5.0)
        lanes = {m: [LaneAddress.from_dict(d) for d in rows] for m, rows in listed.items()}
        live = {a for rows in lanes.values() for a in rows}
        for address in [a for a, c in self._lane_clients.items()
                        if a not in live and c.in_flight == 0]:  # replicas gone
            task = asyncio.get_running_loop().create_task(
                self._lane_clients.pop(address).close())
            task.add_done_callback(_consume)
        self._close_idle()
        now = time.monotonic()
        self._failed_lanes = {a: t for a, t in self._failed_lanes.items() if t > now}
        return lanes

    async def _generate(self, name: str, request: api.GenerateRequest) -> api.GenerateResult:
        return await self._call(name, "generate", lambda h: h.generate.remote(request),
                                request.deadline)

    async def _score(self, name: str, request: api.ScoreRequest) -> api.ScoreResult:
        async with self.admit(name):
            return await self._call(name, "score", lambda h: h.score.remote(request),
                                    request.deadline)

    async def _encode(self, name: str, request: api.EncodeRequest) -> api.EncodeResult:
        async with self.admit(name):
            return await self._call(name, "encode", lambda h: h.encode.remote(request),
                                    request.deadline)

    async def _decode(self, name: str, request: api.DecodeRequest) -> api.DecodeResult:
        async with self.admit(name):
            return await self._call(name, "decode", lambda h: h.decode.remote(request),
                                    request.deadline)

    async def _call(self, name: str, method: str,
                    send: Callable[[DeploymentHandle],
                                   DeploymentResponse | DeploymentResponseGenerator],
                    deadline: float | None, *, unwrap: bool = True, deaths_allowed: int = 1
                    ) -> Any:
        """``send(handle)`` (one ``ModelDeployment`` method, named ``method`` in messages) to
        a replica of ``name``; ``deaths_allowed``: replica deaths during this call that are
        retried."""
        deaths = waits = 0
        while True:
            response = cast(DeploymentResponse, send(self._handle(name)))  # unary methods
            timeout = None if deadline is None else max(0.0, deadline - time.time())
            try:
                result = await asyncio.wait_for(response, timeout=timeout)
            except TimeoutError:
                response.cancel()  # the replica's cancel token stops the sampler
                raise DeadlineExceeded(f"deadline passed while {name}.{method} ran") from None
            except asyncio.CancelledError:
                response.cancel()  # the client went away
                raise
            except BackPressureError as exc:
                raise Overloaded(f"{name} is at its queue limit; retry with backoff") from exc
            except RequestCancelledError as exc:
                raise DeadlineExceeded(f"{name}.{method} was cancelled") from exc
            except _NO_REPLICA as exc:
                waits += 1
                pause = min(1.0, 0.1 * 2 ** waits)
                in_time = deadline is None or deadline - time.time() > pause + 0.1
                if waits > self.retries or not in_time:
                    raise ModelNotReady(f"no replica of {name} is available now "
                                        f"({type(exc).__name__}); retry shortly") from exc
                log.warning("%s.%s: no replica available, waiting (%d)", name, method, waits)
                await asyncio.sleep(pause)
                continue
            except RayActorError as exc:  # the replica died while it held this call
                deaths += 1
                if deaths > deaths_allowed:
                    raise ReplicaDied.twice(name, method, exc) from exc
                log.warning("%s.%s: the replica died during the call; retrying it once",
                            name, method)
                await asyncio.sleep(0.2)
                continue
            return api.unwrap(result) if unwrap else result
