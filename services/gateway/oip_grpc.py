"""Open Inference Protocol v2 over gRPC: ``inference.GRPCInferenceService`` on the
gateway's port, next to ``genfleet.v1.GenerationService``. The service code is the one
tritonclient ships (the KServe SDK's is wire-identical): this module only translates its
messages to and from ``oip``'s types; ``oip.Service`` does the work.

Served: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer,
ModelStreamInfer (one response per request, in completion order, with the request's id),
RepositoryIndex and ModelConfig (Triton's, for the tools that read it). Triton's other
RPCs (model control, shared memory, statistics, traces) answer UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc import service_pb2 as v2
from tritonclient.grpc import service_pb2_grpc as v2_grpc

from services.core.errors import InvalidArgument, ModelNotFound
from services.gateway import codec, oip
from services.gateway.metrics import GatewayMetrics
from services.gateway.status import abort, status_of

SERVICE = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
PROTOCOL = "v2-grpc"
# typed contents field per datatype (FP16 and BF16 travel only as raw bytes)
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
             "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
             "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
             "FP32": "fp32_contents", "FP64": "fp64_contents"}
MAX_PARAMETERS = 64


def _parameters(params: Any, field: str) -> dict[str, Any]:
    return codec.oneof_values(params, "parameter_choice", field, MAX_PARAMETERS)


def parameter_to_pb(value: Any) -> v2.InferParameter:
    """A Python value as an InferParameter (bool, int64 or uint64, double, string)."""
    if isinstance(value, bool):
        return v2.InferParameter(bool_param=value)
    if isinstance(value, int):
        return (v2.InferParameter(int64_param=value) if value < 2**63
                else v2.InferParameter(uint64_param=value))
    if isinstance(value, float):
        return v2.InferParameter(double_param=value)
    return v2.InferParameter(string_param=str(value))


def request_from_pb(request: v2.ModelInferRequest, deadline: float | None,
                    limit: int | None) -> oip.InferRequest:
    """Raises InvalidArgument for what is malformed on the wire."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument("raw_input_contents", f"has {len(raw)} entries for "
                                                    f"{len(request.inputs)} inputs (one each)")
    inputs: list[oip.Tensor] = []
    for i, tensor in enumerate(request.inputs):
        params = _parameters(tensor.parameters, f"inputs[{tensor.name[:40]}].parameters")
        if raw:
            t = oip.from_raw(tensor.name, tensor.datatype, tensor.shape, raw[i])
        else:
            oip.input_dtype(tensor.datatype, f"inputs[{tensor.name[:40]}]")  # known, numeric
            kind = _CONTENTS.get(tensor.datatype)
            if kind is None:
                raise InvalidArgument(f"inputs[{tensor.name[:40]}]",
                                      f"{tensor.datatype[:40]} data must be sent in "
                                      f"raw_input_contents")
            t = oip.from_values(tensor.name, tensor.datatype, tensor.shape,
                                getattr(tensor.contents, kind), typed=True)
        t.parameters = params
        inputs.append(t)
    outputs = [o.name for o in request.outputs] if request.outputs else None
    return oip.InferRequest(
        model=request.model_name, version=request.model_version, inputs=inputs,
        parameters=_parameters(request.parameters, "parameters"), outputs=outputs,
        id=request.id, deadline=deadline, max_response_bytes=limit)


def response_to_pb(response: oip.InferResponse) -> v2.ModelInferResponse:
    return v2.ModelInferResponse(
        model_name=response.model, model_version=response.version, id=response.id,
        parameters={k: parameter_to_pb(v) for k, v in response.parameters.items()},
        outputs=[v2.ModelInferResponse.InferOutputTensor(
            name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in response.outputs],
        raw_output_contents=[oip.to_raw(t) for t in response.outputs])


def _metadata_to_pb(meta: oip.ModelMetadata) -> v2.ModelMetadataResponse:
    def tensors(ts: tuple[oip.TensorMeta, ...]) -> list[v2.ModelMetadataResponse.TensorMetadata]:
        return [v2.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype,
                                                        shape=list(t.shape)) for t in ts]
    return v2.ModelMetadataResponse(name=meta.name, versions=list(meta.versions),
                                    platform=meta.platform, inputs=tensors(meta.inputs),
                                    outputs=tensors(meta.outputs))


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.time() + remaining


class InferenceServicer(v2_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` in front of ``oip.Service``.

    ``calls``: the gateway's ``Calls`` (``run``: the status table; ``guard``: a lost
    backend ends the call); ``admission``: its bounds, which each stream message passes too.
    """

    def __init__(self, service: oip.Service, calls: Any, limit: int,
                 admission: Any, metrics: GatewayMetrics, parallel: int) -> None:
        self._service = service
        self._calls = calls
        self._run: Callable[..., Any] = calls.run
        self._limit = limit
        self._admission = admission
        self._metrics = metrics
        self._parallel = parallel

    async def ServerLive(self, request: v2.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: v2.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=self._service.server_ready())

    async def ModelReady(self, request: v2.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> v2.ModelReadyResponse:
        try:  # a readiness question is answered, also while the gateway is lost
            ready = await self._service.model_ready(request.name, request.version)
        except ModelNotFound:
            ready = False  # Triton's answer for a model it does not serve
        except Exception as exc:
            await abort(context, exc)
        return v2.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: v2.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> v2.ServerMetadataResponse:
        return v2.ServerMetadataResponse(name=oip.SERVER_NAME, version=self._service.version,
                                         extensions=list(oip.EXTENSIONS))

    async def ModelMetadata(self, request: v2.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> v2.ModelMetadataResponse:
        async def call() -> v2.ModelMetadataResponse:
            return _metadata_to_pb(await self._service.model_metadata(request.name,
                                                                      request.version))
        result: v2.ModelMetadataResponse = await self._run(context, call)
        return result

    async def ModelConfig(self, request: v2.ModelConfigRequest,
                          context: grpc.aio.ServicerContext) -> v2.ModelConfigResponse:
        async def call() -> v2.ModelConfigResponse:
            config = await self._service.model_config(request.name, request.version)
            return v2.ModelConfigResponse(
                config=json_format.ParseDict(config, model_config_pb2.ModelConfig()))
        result: v2.ModelConfigResponse = await self._run(context, call)
        return result

    async def RepositoryIndex(self, request: v2.RepositoryIndexRequest,
                              context: grpc.aio.ServicerContext) -> v2.RepositoryIndexResponse:
        async def call() -> v2.RepositoryIndexResponse:
            models = [v2.RepositoryIndexResponse.ModelIndex(
                name=name, version=version, state="READY" if ready else "UNAVAILABLE")
                for name, version, ready in await self._service.index()
                if ready or not request.ready]
            return v2.RepositoryIndexResponse(models=models)
        result: v2.RepositoryIndexResponse = await self._run(context, call)
        return result

    async def ModelInfer(self, request: v2.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> v2.ModelInferResponse:
        async def call() -> v2.ModelInferResponse:
            args = (request, _deadline(context), self._limit)
            req = (await asyncio.to_thread(request_from_pb, *args)
                   if request.ByteSize() > oip.OFFLOAD_BYTES else request_from_pb(*args))
            return response_to_pb(await self._service.infer(req))
        result: v2.ModelInferResponse = await self._run(context, call)
        return result

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[v2.ModelInferRequest],
                               context: grpc.aio.ServicerContext
                               ) -> AsyncIterator[v2.ModelStreamInferResponse]:
        """Each request is answered on its own (an error ends only that request, as
        ``error_message``), up to ``parallel`` at once, in completion order."""
        # bounded: a client that sends and never reads holds ``parallel`` answers, no more
        # (a full queue holds the slots, which stops reading its requests)
        done: asyncio.Queue[v2.ModelStreamInferResponse | None] = asyncio.Queue(self._parallel)
        slots = asyncio.Semaphore(self._parallel)
        tasks: set[asyncio.Task[None]] = set()

        async def one(request: v2.ModelInferRequest) -> None:
            try:
                with self._metrics.observe("ModelStreamInfer", request.model_name,
                                           PROTOCOL) as seen:
                    try:
                        size = self._admission.admit(request.ByteSize())
                        try:
                            req = request_from_pb(request, _deadline(context), self._limit)
                            result = await self._calls.guard(lambda: self._service.infer(req))
                            reply = v2.ModelStreamInferResponse(
                                infer_response=response_to_pb(result))
                        finally:
                            self._admission.release(size)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        status = status_of(exc)
                        seen.code = status.code.name
                        reply = v2.ModelStreamInferResponse(
                            error_message=f"{status.code.name}: {status.message}",
                            infer_response=v2.ModelInferResponse(
                                model_name=request.model_name, id=request.id))
                await done.put(reply)
            finally:
                slots.release()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    task = asyncio.create_task(one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.gather(*list(tasks), return_exceptions=True)
            finally:
                await done.put(None)

        reader = asyncio.create_task(read())
        try:
            while (reply := await done.get()) is not None:
                yield reply
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
