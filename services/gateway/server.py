"""The gRPC gateway: a grpc.aio server in front of a backend (the Serve app, or in-process
model servers). It translates protobuf, enforces deadlines, authenticates, answers the
standard health and reflection services, and shuts down gracefully.

The servicer only translates: decode the request (``codec``), call the backend, encode the
result; any error goes through the one status table (``status``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.core import api
from services.core.errors import InvalidArgument
from services.gateway import codec
from services.gateway.metrics import GatewayMetrics, MetricsInterceptor
from services.gateway.pb.genfleet.v1 import batch_pb2 as bpb
from services.gateway.pb.genfleet.v1 import batch_pb2_grpc as bpb_grpc
from services.gateway.pb.genfleet.v1 import generation_pb2 as pb
from services.gateway.pb.genfleet.v1 import generation_pb2_grpc as pb_grpc
from services.gateway.status import status_of

log = logging.getLogger("genfleet.gateway")
SERVICE = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
BATCH_SERVICE = bpb.DESCRIPTOR.services_by_name["BatchService"].full_name
T = TypeVar("T")


class Backend(Protocol):
    """What the gateway needs from the serving side (raises genfleet errors)."""

    async def model_names(self, refresh: bool = False) -> list[str]: ...
    async def list_models(self) -> list[api.ModelInfo]: ...
    async def resolve(self, ref: str) -> api.ModelInfo: ...
    async def healthy(self, name: str | None = None) -> bool: ...
    async def generate(self, request: api.GenerateRequest) -> api.GenerateResult: ...
    async def score(self, request: api.ScoreRequest) -> api.ScoreResult: ...
    async def encode(self, request: api.EncodeRequest) -> api.EncodeResult: ...
    async def decode(self, request: api.DecodeRequest) -> api.DecodeResult: ...


class BatchBackend(Protocol):
    """Dataset-generation jobs (``cluster.batch.manager.BatchManager``)."""

    async def submit(self, request: api.BatchRequest) -> api.BatchStatus: ...
    async def get(self, job_id: str) -> api.BatchStatus: ...
    async def cancel(self, job_id: str) -> api.BatchStatus: ...
    async def list(self) -> list[api.BatchStatus]: ...


@dataclass
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port
    token: str | None = None  # require "authorization: Bearer <token>"
    tls_cert: Path | None = None  # server certificate chain (PEM)
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: mutual TLS, clients must present a cert
    max_message_bytes: int = 64 * 1024 * 1024
    stream_chunk: int = 16  # GenerateStream samples per message by default
    stream_parallel: int = 4  # chunks in flight at once (they share dynamic batches)
    health_interval_s: float = 2.0
    metrics_port: int | None = None  # serve Prometheus /metrics here (0: any free port)
    # grpc.health.v1 alone on this port, plaintext, no auth: Kubernetes gRPC probes speak
    # neither TLS nor tokens (0: any free port)
    health_port: int | None = None


# health service name that is SERVING while the process serves, whatever the models' state:
# a liveness probe asks for it (restarting the gateway does not bring a model back)
LIVENESS = "liveness"


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.time() + remaining


async def _run(context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[T]]) -> T:
    """``call()``, with any error answered through the one status table."""
    try:
        return await call()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        code, message = status_of(exc)
        await context.abort(code, message)
        raise AssertionError("unreachable") from exc  # abort raises


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    """pb <-> domain for GenerationService. No torch, no model logic."""

    def __init__(self, backend: Backend, config: GatewayConfig) -> None:
        self._backend = backend
        self._config = config

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        async def call() -> pb.ListModelsResponse:
            infos = await self._backend.list_models()
            return pb.ListModelsResponse(models=[codec.model_info_to_pb(i) for i in infos])
        return await _run(context, call)

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        async def call() -> pb.GenerateResponse:
            req = codec.generate_request_from_pb(request, _deadline(context))
            return codec.generate_response_to_pb(await self._backend.generate(req))
        return await _run(context, call)

    async def GenerateStream(self, request: pb.GenerateRequest,
                             context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            req = codec.generate_request_from_pb(request, _deadline(context))
            chunk = request.chunk_size or self._config.stream_chunk
            if chunk < 1:
                raise InvalidArgument("chunk_size", "must be >= 0")
            await self._backend.resolve(req.model)
            parts = [(lo, min(chunk, req.num_samples - lo)) for lo in range(0, req.num_samples, chunk)]
            labels = req.labels

            def part(lo: int, n: int) -> api.GenerateRequest:
                return api.GenerateRequest(
                    model=req.model, num_samples=n, seed=req.seed,
                    labels=labels[lo:lo + n] if labels else (), options=req.options,
                    output=req.output, start_index=req.start_index + lo, deadline=req.deadline)

            # a few chunks in flight (they share dynamic batches), delivered in index order
            pending: list[asyncio.Task[api.GenerateResult]] = []
            next_part = 0
            while next_part < len(parts) or pending:
                while next_part < len(parts) and len(pending) < self._config.stream_parallel:
                    lo, n = parts[next_part]
                    pending.append(asyncio.create_task(self._backend.generate(part(lo, n))))
                    next_part += 1
                result = await pending.pop(0)
                yield codec.generate_response_to_pb(result)
        except asyncio.CancelledError:
            for task in locals().get("pending", []):
                task.cancel()
            raise
        except Exception as exc:
            for task in locals().get("pending", []):
                task.cancel()
            code, message = status_of(exc)
            await context.abort(code, message)

    async def Score(self, request: pb.ScoreRequest,
                    context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        async def call() -> pb.ScoreResponse:
            req = codec.score_request_from_pb(request, _deadline(context))
            return codec.score_response_to_pb(await self._backend.score(req))
        return await _run(context, call)

    async def Encode(self, request: pb.EncodeRequest,
                     context: grpc.aio.ServicerContext) -> pb.EncodeResponse:
        async def call() -> pb.EncodeResponse:
            req = codec.encode_request_from_pb(request, _deadline(context))
            return codec.encode_response_to_pb(await self._backend.encode(req))
        return await _run(context, call)

    async def Decode(self, request: pb.DecodeRequest,
                     context: grpc.aio.ServicerContext) -> pb.DecodeResponse:
        async def call() -> pb.DecodeResponse:
            req = codec.decode_request_from_pb(request, _deadline(context))
            return codec.decode_response_to_pb(await self._backend.decode(req))
        return await _run(context, call)


class BatchServicer(bpb_grpc.BatchServiceServicer):
    """pb <-> domain for BatchService; the jobs run in the batch backend, not in the call."""

    def __init__(self, batches: BatchBackend) -> None:
        self._batches = batches

    async def SubmitBatch(self, request: bpb.SubmitBatchRequest,
                          context: grpc.aio.ServicerContext) -> bpb.BatchJob:
        async def call() -> bpb.BatchJob:
            req = codec.batch_request_from_pb(request)
            return codec.batch_status_to_pb(await self._batches.submit(req))
        return await _run(context, call)

    async def GetBatch(self, request: bpb.GetBatchRequest,
                       context: grpc.aio.ServicerContext) -> bpb.BatchJob:
        async def call() -> bpb.BatchJob:
            return codec.batch_status_to_pb(await self._batches.get(request.id))
        return await _run(context, call)

    async def CancelBatch(self, request: bpb.CancelBatchRequest,
                          context: grpc.aio.ServicerContext) -> bpb.BatchJob:
        async def call() -> bpb.BatchJob:
            return codec.batch_status_to_pb(await self._batches.cancel(request.id))
        return await _run(context, call)

    async def ListBatches(self, request: bpb.ListBatchesRequest,
                          context: grpc.aio.ServicerContext) -> bpb.ListBatchesResponse:
        async def call() -> bpb.ListBatchesResponse:
            jobs = await self._batches.list()
            return bpb.ListBatchesResponse(jobs=[codec.batch_status_to_pb(j) for j in jobs])
        return await _run(context, call)


class TokenAuth(grpc.aio.ServerInterceptor):
    """Require ``authorization: Bearer <token>`` (constant-time compare); health is exempt
    so that Kubernetes probes need no secret."""

    EXEMPT = ("/grpc.health.v1.Health/",)

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

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method or ""
        if method.startswith(self.EXEMPT):
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        given_bytes = given.encode() if isinstance(given, str) else bytes(given)
        if hmac.compare_digest(given_bytes, self._expected):
            return await continuation(handler_call_details)
        return self._deny_stream if method.endswith("Stream") else self._deny_unary


class Gateway:
    """A running gateway: start, serve, and stop gracefully."""

    def __init__(self, backend: Backend, config: GatewayConfig | None = None,
                 batches: BatchBackend | None = None) -> None:
        self.backend = backend
        self.config = config or GatewayConfig()
        self.batches = batches  # None: BatchService is not offered (UNIMPLEMENTED)
        self.port: int | None = None
        self.health = health.aio.HealthServicer()
        self.metrics = GatewayMetrics([SERVICE, BATCH_SERVICE])
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self.health_port: int | None = None
        self._health_task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Bind and start; returns the bound port."""
        c = self.config
        # metrics first: it also counts the calls that authentication rejects
        interceptors: list[grpc.aio.ServerInterceptor] = [MetricsInterceptor(self.metrics)]
        if c.token:
            interceptors.append(TokenAuth(c.token))
        server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", c.max_message_bytes),
            ("grpc.max_send_message_length", c.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ])
        pb_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(self.backend, c), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        services = [SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME]
        if self.batches is not None:
            bpb_grpc.add_BatchServiceServicer_to_server(BatchServicer(self.batches), server)
            services.append(BATCH_SERVICE)
        reflection.enable_server_reflection(services, server)
        address = f"{c.host}:{c.port}"
        if c.tls_cert and c.tls_key:
            ca = c.tls_client_ca.read_bytes() if c.tls_client_ca else None
            creds = grpc.ssl_server_credentials(
                [(c.tls_key.read_bytes(), c.tls_cert.read_bytes())], root_certificates=ca,
                require_client_auth=ca is not None)
            self.port = server.add_secure_port(address, creds)
        else:
            self.port = server.add_insecure_port(address)
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
        await self.health.set(health.OVERALL_HEALTH, serving if overall else not_serving)
        await self.health.set(SERVICE, serving if overall else not_serving)
        for name, ok in states.items():
            await self.health.set(name, serving if ok else not_serving)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            with contextlib.suppress(Exception):
                await self._refresh_health()

    async def stop(self, grace: float = 10.0) -> None:
        """Report NOT_SERVING, stop accepting calls, let in-flight calls finish."""
        if self._health_task is not None:
            self._health_task.cancel()
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        if self._health_server is not None:
            await self._health_server.stop(0)
        self.metrics.close()

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
