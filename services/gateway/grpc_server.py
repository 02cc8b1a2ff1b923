"""The gRPC gateway: a grpc.aio server in front of a ``Backend`` (the Serve application's
replicas, or replica engines in this process). It translates protobuf, enforces
deadlines, authenticates, answers the standard health and reflection services, and shuts
down gracefully.

The servicer only translates: decode the request (``codec``), call the backend, encode the
result; any error goes through the one status table (``status``). ``Admission`` bounds what
the process holds: RPCs in flight and their request bytes (RESOURCE_EXHAUSTED at once,
with a retry delay, beyond either).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.metadata
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import service_pb2_grpc as v2_grpc

from services.core import api
from services.core.errors import InvalidArgument, ModelNotReady, Overloaded
from services.gateway import codec, oip
from services.gateway.backend import Backend, BatchBackend
from services.gateway.metrics import GatewayMetrics, MetricsInterceptor
from services.gateway.oip_grpc import PROTOCOL as V2_PROTOCOL
from services.gateway.oip_grpc import SERVICE as V2_SERVICE
from services.gateway.oip_grpc import InferenceServicer
from services.gateway.pb.genfleet.v1 import batch_pb2 as bpb
from services.gateway.pb.genfleet.v1 import batch_pb2_grpc as bpb_grpc
from services.gateway.pb.genfleet.v1 import generation_pb2 as pb
from services.gateway.pb.genfleet.v1 import generation_pb2_grpc as pb_grpc
from services.gateway.status import abort

log = logging.getLogger("genfleet.gateway")
SERVICE = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
BATCH_SERVICE = bpb.DESCRIPTOR.services_by_name["BatchService"].full_name
T = TypeVar("T")
V2_HEALTH = ("ServerLive", "ServerReady", "ModelReady")


@dataclass
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port
    token: str | None = None  # require "authorization: Bearer <token>"
    tls_cert: Path | None = None  # server certificate chain (PEM)
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: mutual TLS, clients must present a cert
    max_message_bytes: int = 64 * 1024 * 1024
    max_concurrent_rpcs: int = 1024  # RPCs in flight; beyond: RESOURCE_EXHAUSTED at once
    max_request_bytes_in_flight: int = 512 * 1024 * 1024  # request bytes held by those RPCs
    stream_parallel: int = 4  # chunks in flight at once (they share dynamic batches)
    health_interval_s: float = 2.0
    metrics_port: int | None = None  # serve Prometheus /metrics here (0: any free port)
    # grpc.health.v1 alone on this port, plaintext, no auth: Kubernetes gRPC probes speak
    # neither TLS nor tokens (0: any free port)
    health_port: int | None = None
    # Open Inference Protocol v2 over HTTP/REST here, with the same host, TLS and token
    # (0: any free port; None: off). v2 over gRPC is always on the main port.
    http_port: int | None = None

    def validate(self) -> None:
        """Refuse a configuration that cannot be what its operator meant (one clear line).

        Raises:
            InvalidArgument: an empty token, TLS files that do not form a set, unreadable
                files, a certificate and key that do not match, or a non-positive limit.
        """
        if self.token is not None and not self.token.strip():
            raise InvalidArgument("--token", "is empty; give a token, or leave the flag and "
                                             "$GENFLEET_TOKEN out to serve without auth")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidArgument("--tls-cert/--tls-key", "give both (the certificate chain and "
                                                          "its private key) or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise InvalidArgument("--tls-client-ca", "needs --tls-cert and --tls-key: mutual "
                                                     "TLS is TLS with client certificates")
        for flag, path in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key),
                           ("--tls-client-ca", self.tls_client_ca)):
            if path is not None:
                try:
                    path.read_bytes()
                except OSError as exc:
                    raise InvalidArgument(flag, f"cannot read {path}: {exc.strerror}") from None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if self.tls_cert is not None and self.tls_key is not None:
            try:
                context.load_cert_chain(self.tls_cert, self.tls_key)
            except ssl.SSLError as exc:
                raise InvalidArgument("--tls-cert/--tls-key", f"{self.tls_cert} and "
                                      f"{self.tls_key} are not a PEM certificate chain and its "
                                      f"private key ({exc.reason or exc})") from None
        if self.tls_client_ca is not None:
            try:
                context.load_verify_locations(self.tls_client_ca)
            except ssl.SSLError as exc:
                raise InvalidArgument("--tls-client-ca", f"{self.tls_client_ca} holds no PEM CA "
                                      f"certificate ({exc.reason or exc})") from None
        for name in ("max_message_bytes", "max_concurrent_rpcs", "max_request_bytes_in_flight",
                     "stream_parallel"):
            if getattr(self, name) < 1:
                raise InvalidArgument(name, f"must be >= 1, got {getattr(self, name)}")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


def _version() -> str:
    try:
        return importlib.metadata.version("genfleet")
    except importlib.metadata.PackageNotFoundError:  # a source tree that is not installed
        return "0+unknown"


# health service name that is SERVING while the process serves, whatever the models' state:
# a liveness probe asks for it (restarting the gateway does not bring a model back)
LIVENESS = "liveness"


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.time() + remaining


def _cut_inside() -> ModelNotReady:
    """For a CancelledError from below that did not cancel the call (a library that answers
    a cut connection so): grpc sends no status for a handler that raises CancelledError, so
    the caller would wait out its deadline; it gets a retryable status instead."""
    request_id = uuid.uuid4().hex[:12]
    log.error("request %s: cut inside the gateway (a stray CancelledError)", request_id,
              exc_info=True)
    return ModelNotReady(f"the call was cut inside the gateway (request id {request_id}); "
                         f"retry")


class Calls:
    """The calls in flight on this gateway. ``run`` answers any error through the one
    status table; ``lose(reason)`` (what the gateway depends on is gone, e.g. the Ray
    head died) ends every call in flight at once with UNAVAILABLE naming the reason, and
    every later one too, instead of leaving them to their deadlines."""

    def __init__(self) -> None:
        self.lost: str | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def guard(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run ``call`` as a call in flight: ``lose`` ends it with ModelNotReady."""
        task = asyncio.current_task()
        try:
            if self.lost is not None:
                raise ModelNotReady(self.lost)
            if task is not None:
                self._tasks.add(task)
            return await call()
        except asyncio.CancelledError:
            if self.lost is not None:
                raise ModelNotReady(self.lost) from None
            if task is None or task.cancelling():
                raise  # the caller went away (or its deadline passed): grpc ends the call
            raise _cut_inside() from None
        finally:
            self._tasks.discard(task)

    async def run(self, context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[T]]
                  ) -> T:
        try:
            return await self.guard(call)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await abort(context, exc)
            raise AssertionError("unreachable") from exc  # abort raises

    def lose(self, reason: str) -> None:
        self.lost = reason
        for task in list(self._tasks):
            task.cancel()


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    """pb <-> domain for GenerationService. No torch, no model logic."""

    def __init__(self, backend: Backend, config: GatewayConfig, calls: Calls) -> None:
        self._calls = calls
        self._backend = backend
        self._config = config
        self._limit = config.max_message_bytes  # responses are predicted against it

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        async def call() -> pb.ListModelsResponse:
            infos = await self._backend.list_models()
            return pb.ListModelsResponse(models=[codec.model_info_to_pb(i) for i in infos])
        return await self._calls.run(context, call)

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        async def call() -> pb.GenerateResponse:
            req = codec.generate_request_from_pb(request, _deadline(context), self._limit)
            return codec.generate_response_to_pb(await self._backend.generate(req))
        return await self._calls.run(context, call)

    async def GenerateStream(self, request: pb.GenerateRequest,
                             context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[pb.GenerateResponse]:
        pending: list[asyncio.Task[api.GenerateResult]] = []
        try:
            req = codec.generate_request_from_pb(request, _deadline(context), self._limit)
            req, chunk = await self._backend.open_stream(req, request.chunk_size or None)

            def part(lo: int) -> api.GenerateRequest:
                n = min(chunk, req.num_samples - lo)
                return api.GenerateRequest(
                    model=req.model, num_samples=n, seed=req.seed,
                    labels=req.labels[lo:lo + n] if req.labels else (), options=req.options,
                    output=req.output, start_index=req.start_index + lo, deadline=req.deadline,
                    max_response_bytes=req.max_response_bytes)

            # chunks are planned as they are sent: a few in flight (they share dynamic
            # batches), delivered in index order; memory does not grow with num_samples
            next_lo = 0
            while next_lo < req.num_samples or pending:
                while next_lo < req.num_samples and len(pending) < self._config.stream_parallel:
                    pending.append(asyncio.create_task(self._backend.generate(part(next_lo))))
                    next_lo += chunk
                result = await pending.pop(0)
                yield codec.generate_response_to_pb(result)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise
            await abort(context, _cut_inside())
        except Exception as exc:
            await abort(context, exc)
        finally:
            for task in pending:
                task.cancel()

    async def Score(self, request: pb.ScoreRequest,
                    context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        async def call() -> pb.ScoreResponse:
            req = codec.score_request_from_pb(request, _deadline(context), self._limit)
            return codec.score_response_to_pb(await self._backend.score(req))
        return await self._calls.run(context, call)

    async def Encode(self, request: pb.EncodeRequest,
                     context: grpc.aio.ServicerContext) -> pb.EncodeResponse:
        async def call() -> pb.EncodeResponse:
            req = codec.encode_request_from_pb(request, _deadline(context), self._limit)
            return codec.encode_response_to_pb(await self._backend.encode(req))
        return await self._calls.run(context, call)

    async def Decode(self, request: pb.DecodeRequest,
                     context: grpc.aio.ServicerContext) -> pb.DecodeResponse:
        async def call() -> pb.DecodeResponse:
            req = codec.decode_request_from_pb(request, _deadline(context), self._limit)
            return codec.decode_response_to_pb(await self._backend.decode(req))
        return await self._calls.run(context, call)


class BatchServicer(bpb_grpc.BatchServiceServicer):
    """pb <-> domain for BatchService; the jobs run in the batch backend, not in the call."""

    def __init__(self, batches: BatchBackend, calls: Calls) -> None:
        self._calls = calls
        self._batches = batches

    async def SubmitBatch(self, request: bpb.SubmitBatchRequest,
                          context: grpc.aio.ServicerContext) -> bpb.BatchJob:
        async def call() -> bpb.BatchJob:
            req = codec.batch_request_from_pb(request)
            return codec.batch_status_to_pb(await self._batches.submit(req))
        return await self._calls.run(context, call)

    async def GetBatch(self, request: bpb.GetBatchRequest,
                       context: grpc.aio.ServicerContext) -> bpb.BatchJob:
        async def call() -> bpb.BatchJob:
            return codec.batch_status_to_pb(await self._batches.get(request.id))
        return await self._calls.run(context, call)

    async def CancelBatch(self, request: bpb.CancelBatchRequest,
                          context: grpc.aio.ServicerContext) -> bpb.BatchJob:
        async def call() -> bpb.BatchJob:
            return codec.batch_status_to_pb(await self._batches.cancel(request.id))
        return await self._calls.run(context, call)

    async def ListBatches(self, request: bpb.ListBatchesRequest,
                          context: grpc.aio.ServicerContext) -> bpb.ListBatchesResponse:
        async def call() -> bpb.ListBatchesResponse:
            jobs = await self._batches.list()
            return bpb.ListBatchesResponse(jobs=[codec.batch_status_to_pb(j) for j in jobs])
        return await self._calls.run(context, call)


class TokenAuth(grpc.aio.ServerInterceptor):
    """Require ``authorization: Bearer <token>`` (constant-time compare); health (gRPC's,
    and v2's liveness and readiness) is exempt so that probes need no secret."""

    EXEMPT = ("/grpc.health.v1.Health/", *(f"/{V2_SERVICE}/{m}" for m in V2_HEALTH))

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or invalid 'authorization: Bearer <token>' metadata")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)

        async def deny_stream(request: Any, context: grpc.aio.ServicerContext
                              ) -> AsyncIterator[None]:
            await deny(request, context)
            yield None  # pragma: no cover - abort raised

        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny_stream)

        async def deny_bidi(requests: Any, context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[None]:
            await deny(None, context)
            yield None  # pragma: no cover - abort raised

        self._deny_bidi = grpc.stream_stream_rpc_method_handler(deny_bidi)

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method or ""
        handler = await continuation(handler_call_details)  # only looks the method up
        if method.startswith(self.EXEMPT) or handler is None:
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        given_bytes = given.encode() if isinstance(given, str) else bytes(given)
        if hmac.compare_digest(given_bytes, self._expected):
            return handler
        if handler.request_streaming:
            return self._deny_bidi
        return self._deny_stream if handler.response_streaming else self._deny_unary


class Admission(grpc.aio.ServerInterceptor):
    """Bounds the RPCs of ``services`` in flight and the request bytes they hold. A call
    beyond either bound is answered RESOURCE_EXHAUSTED at once, with a retry delay, before
    any work. Health and reflection are not counted, so probes answer under load."""

    RETRY_AFTER_S = 0.05

    def __init__(self, services: tuple[str, ...], max_rpcs: int, max_bytes: int,
                 exempt: tuple[str, ...] = ()) -> None:
        self._services = services
        self._exempt = exempt  # methods (paths) never refused: v2 liveness and readiness
        self.max_rpcs = max_rpcs
        self.max_bytes = max_bytes
        self.rpcs = 0  # the event loop is the only writer: no lock
        self.bytes = 0

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or not method.startswith(self._services) or method in self._exempt:
            return handler
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._unary(handler.unary_unary))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._stream(handler.unary_stream))
        return handler

    def admit(self, size: int) -> int:
        """Count one call of ``size`` request bytes (every protocol shares the bounds);
        ``release(size)`` when it ends.

        Raises:
            Overloaded: beyond either bound (with the retry delay).
        """
        if self.rpcs >= self.max_rpcs or self.bytes + size > self.max_bytes:
            what = (f"{self.rpcs} calls in flight (max {self.max_rpcs})"
                    if self.rpcs >= self.max_rpcs else
                    f"{self.bytes + size} request bytes in flight (max {self.max_bytes})")
            raise Overloaded(f"the gateway is at capacity: {what}; retry with backoff",
                             retry_after_s=self.RETRY_AFTER_S)
        self.rpcs += 1
        self.bytes += size
        return size

    def release(self, size: int) -> None:
        self.rpcs -= 1
        self.bytes -= size

    def resize(self, old: int, new: int) -> int:
        """A call admitted with ``old`` bytes holds ``new`` (a body whose length was not
        known when it was admitted); returns ``new``.

        Raises:
            Overloaded: the bytes in flight would pass the bound (``old`` stays counted).
        """
        if self.bytes - old + new > self.max_bytes:
            raise Overloaded(f"the gateway is at capacity: {self.bytes - old + new} request "
                             f"bytes in flight (max {self.max_bytes}); retry with backoff",
                             retry_after_s=self.RETRY_AFTER_S)
        self.bytes += new - old
        return new

    async def _admit(self, request: Any, context: grpc.aio.ServicerContext) -> int:
        try:
            return self.admit(int(request.ByteSize()))
        except Overloaded as exc:
            await abort(context, exc)
            raise AssertionError("unreachable") from exc  # abort raises

    def _release(self, size: int) -> None:
        self.release(size)

    def _unary(self, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            size = await self._admit(request, context)
            try:
                return await behavior(request, context)
            finally:
                self._release(size)

        return wrapped

    def _stream(self, behavior: Callable[..., AsyncIterator[Any]]
                ) -> Callable[..., AsyncIterator[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[Any]:
            size = await self._admit(request, context)
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                self._release(size)

        return wrapped


class Gateway:
    """A running gateway: start, serve, and stop gracefully."""

    def __init__(self, backend: Backend, config: GatewayConfig | None = None,
                 batches: BatchBackend | None = None) -> None:
        self.backend = backend
        self.config = config or GatewayConfig()
        self.batches = batches  # None: BatchService is not offered (UNIMPLEMENTED)
        self.port: int | None = None
        self.health = health.aio.HealthServicer()
        self.metrics = GatewayMetrics([SERVICE, BATCH_SERVICE, V2_SERVICE],
                                      {V2_SERVICE: V2_PROTOCOL})
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self.health_port: int | None = None
        self._health_task: asyncio.Task[None] | None = None
        self.calls = Calls()
        self.admission = Admission(tuple(f"/{s}/" for s in (SERVICE, BATCH_SERVICE, V2_SERVICE)),
                                   self.config.max_concurrent_rpcs,
                                   self.config.max_request_bytes_in_flight,
                                   exempt=tuple(f"/{V2_SERVICE}/{m}" for m in V2_HEALTH))
        # readiness as grpc.health.v1 reports it (kept by the health loop): v2 answers it too
        self.serving = False
        self.ready_models: dict[str, bool] = {}
        self.v2 = oip.Service(backend, self._ready, _version())
        self.rest: Any = None  # oip_rest.RestServer while the REST endpoint runs
        self.http_port: int | None = None

    def _ready(self, name: str | None) -> bool:
        return self.serving if name is None else self.serving and self.ready_models.get(name, False)

    async def start(self) -> int:
        """Validate the configuration, bind and start; returns the bound port.

        Raises:
            InvalidArgument: a misconfiguration (``GatewayConfig.validate``).
        """
        c = self.config
        c.validate()
        # metrics first: it also counts the calls that authentication rejects
        interceptors: list[grpc.aio.ServerInterceptor] = [MetricsInterceptor(self.metrics)]
        if c.token:
            interceptors.append(TokenAuth(c.token))
        interceptors.append(self.admission)
        server = grpc.aio.server(
            interceptors=interceptors,
            # a backstop behind Admission (which answers with a retry delay): gRPC core
            # refuses calls beyond it before their bytes are read
            maximum_concurrent_rpcs=2 * c.max_concurrent_rpcs + 64,
            options=[
                ("grpc.max_receive_message_length", c.max_message_bytes),
                ("grpc.max_send_message_length", c.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ])
        pb_grpc.add_GenerationServiceServicer_to_server(
            GenerationServicer(self.backend, c, self.calls), server)
        v2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(
            self.v2, self.calls, c.max_message_bytes, self.admission, self.metrics,
            c.stream_parallel), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        services = [SERVICE, V2_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME]
        if self.batches is not None:
            bpb_grpc.add_BatchServiceServicer_to_server(BatchServicer(self.batches, self.calls), server)
            services.append(BATCH_SERVICE)
        reflection.enable_server_reflection(services, server)
        address = f"{c.host}:{c.port}"
        if c.tls_cert is not None and c.tls_key is not None:
            ca = c.tls_client_ca.read_bytes() if c.tls_client_ca else None
            creds = grpc.ssl_server_credentials(
                [(c.tls_key.read_bytes(), c.tls_cert.read_bytes())], root_certificates=ca,
                require_client_auth=ca is not None)
        else:
            creds = None
        try:
            self.port = (server.add_secure_port(address, creds) if creds is not None
                         else server.add_insecure_port(address))
        except RuntimeError as exc:  # grpc: "Failed to bind"
            raise InvalidArgument("--port", f"cannot listen on {address} ({exc}); is another "
                                            f"server using it?") from None
        await server.start()
        self._server = server
        if c.health_port is not None:
            self._health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            self.health_port = self._health_server.add_insecure_port(f"{c.host}:{c.health_port}")
            await self._health_server.start()
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        if c.metrics_port is not None:
            self.metrics_port = self.metrics.serve(c.host, c.metrics_port)
        if c.http_port is not None:
            from services.gateway.oip_rest import RestServer

            self.rest = RestServer(self.v2, c, self.calls, self.admission, self.metrics)
            try:
                self.http_port = await self.rest.start()
            except InvalidArgument:
                await self.stop(0)  # what started so far: its ports are released
                raise
        await self._refresh_health()
        self._health_task = asyncio.create_task(self._health_loop())
        log.info("gateway listening on %s:%d", c.host, self.port)
        return self.port

    async def _refresh_health(self) -> None:
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        try:
            names = await self.backend.model_names()
            self.metrics.models = frozenset(names)
        except Exception:
            names = []
        states = {n: await self.backend.healthy(n) for n in names}
        overall = bool(states) and any(states.values())
        if self.calls.lost is None:
            self.ready_models, self.serving = states, overall
        await self.health.set(health.OVERALL_HEALTH, serving if overall else not_serving)
        await self.health.set(SERVICE, serving if overall else not_serving)
        for name, ok in states.items():
            await self.health.set(name, serving if ok else not_serving)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            with contextlib.suppress(Exception):
                await self._refresh_health()

    async def lose(self, reason: str) -> None:
        """What the gateway serves from is gone (``reason``): NOT_SERVING at once, and every
        call in flight or arriving answered UNAVAILABLE with the reason."""
        if self._health_task is not None:
            self._health_task.cancel()
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        self.serving = False
        await self.health.set(health.OVERALL_HEALTH, not_serving)
        await self.health.set(SERVICE, not_serving)
        self.calls.lose(reason)

    async def stop(self, grace: float = 10.0) -> None:
        """Report NOT_SERVING, stop accepting calls, let in-flight calls finish."""
        if self._health_task is not None:
            self._health_task.cancel()
        await self.health.enter_graceful_shutdown()
        self.serving = False
        if self.rest is not None:
            await self.rest.stop(grace)
        if self._server is not None:
            await self._server.stop(grace)
        if self._health_server is not None:
            await self._health_server.stop(0)
        self.metrics.close()

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
