"""Open Inference Protocol v2 over HTTP/REST (aiohttp, on the gateway's event loop):
the JSON tensor format and Triton's binary tensor data extension, translated to and from
``oip``'s types; ``oip.Service`` does the work.

Routes: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``,
``/v2/models/{m}[/versions/{v}]``, ``/v2/models/{m}[/versions/{v}]/ready``,
``/v2/models/{m}[/versions/{v}]/config`` (Triton's model configuration),
``POST /v2/models/{m}[/versions/{v}]/infer`` and ``POST /v2/repository/index``.
Errors are ``{"error": "<message>"}`` with the HTTP status of the gateway's status table
(``status.HTTP_STATUS``); a retryable one carries ``Retry-After``. The same token (``Bearer``;
liveness and readiness are exempt, as gRPC health is), TLS, admission bounds, deadlines
(the ``timeout`` parameter) and metrics (``protocol="v2-rest"``) as the gRPC services.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import math
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from aiohttp import web

from services.core.errors import InvalidArgument, Unauthenticated
from services.gateway import oip
from services.gateway.metrics import GatewayMetrics
from services.gateway.status import http_status, status_of

PROTOCOL = "v2-rest"
HEADER_LENGTH = "Inference-Header-Content-Length"  # Triton's binary tensor data extension
JSON_TYPE = "application/json"
MAX_DEPTH = 16  # nesting of a JSON "data" array
_EXEMPT = ("/v2/health/live", "/v2/health/ready")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _flatten(data: Any, field: str, depth: int = 0) -> list[Any]:
    """A JSON ``data`` value (nested or flat lists, or one scalar) as a flat list."""
    if not isinstance(data, list):
        return [data]
    if depth > MAX_DEPTH:
        raise InvalidArgument(field, f"nested deeper than {MAX_DEPTH} levels")
    if not any(isinstance(v, list) for v in data):
        return data
    out: list[Any] = []
    for item in data:
        out.extend(_flatten(item, field, depth + 1))
    return out


def _object(value: Any, field: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(field, "must be a JSON object")
    return value


def request_from_json(model: str, version: str, header: Any, binary: bytes,
                      limit: int | None) -> oip.InferRequest:
    """A v2 request from its JSON header and the binary data that follows it.

    Raises:
        InvalidArgument: naming what is malformed.
    """
    body = _object(header, "request")
    inputs_json = body.get("inputs")
    if not isinstance(inputs_json, list):
        raise InvalidArgument("inputs", "must be a list of tensors")
    inputs: list[oip.Tensor] = []
    at = 0
    for i, item in enumerate(inputs_json):
        item = _object(item, f"inputs[{i}]")
        name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise InvalidArgument(f"inputs[{i}]", "needs a string name and datatype")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool)
                                                  for d in shape):
            raise InvalidArgument(f"inputs[{name[:40]}].shape", "must be a list of integers")
        params = _object(item.get("parameters"), f"inputs[{name[:40]}].parameters")
        size = params.pop("binary_data_size", None)
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= len(binary) - at:
                raise InvalidArgument(f"inputs[{name[:40]}].parameters.binary_data_size",
                                      f"must be within the {len(binary) - at} binary bytes left")
            tensor = oip.from_raw(name, datatype, shape, binary[at:at + size])
            at += size
        elif "data" in item:
            tensor = oip.from_values(name, datatype, shape,
                                     _flatten(item["data"], f"inputs[{name[:40]}].data"))
        else:
            raise InvalidArgument(f"inputs[{name[:40]}]", "has no data (give \"data\" or "
                                                          "binary_data_size)")
        tensor.parameters = params
        inputs.append(tensor)
    if at != len(binary):
        raise InvalidArgument("binary data", f"{len(binary) - at} bytes follow the JSON header "
                                             f"that no input's binary_data_size claims")
    outputs_json = body.get("outputs")
    outputs: list[str] | None = None
    if outputs_json is not None:
        if not isinstance(outputs_json, list):
            raise InvalidArgument("outputs", "must be a list")
        outputs = []
        for o in outputs_json:
            name = _object(o, "outputs[]").get("name")
            if not isinstance(name, str):
                raise InvalidArgument("outputs", "each needs a string name")
            outputs.append(name)
    rid = body.get("id", "")
    return oip.InferRequest(model=model, version=version, inputs=inputs,
                            parameters=_object(body.get("parameters"), "parameters"),
                            outputs=outputs, id=rid if isinstance(rid, str) else str(rid),
                            max_response_bytes=limit)


def _binary_outputs(header: dict[str, Any]) -> dict[str, bool]:
    """Which outputs go as binary: a request-wide ``binary_data_output`` and each
    requested output's ``binary_data``."""
    default = bool(_object(header.get("parameters"), "parameters").get("binary_data_output",
                                                                        False))
    wanted: dict[str, bool] = {"": default}
    for o in header.get("outputs") or []:
        params = o.get("parameters") or {} if isinstance(o, dict) else {}
        if isinstance(o, dict) and isinstance(params, dict) and "binary_data" in params:
            wanted[str(o.get("name"))] = bool(params["binary_data"])
    return wanted


def response_body(response: oip.InferResponse, binary: dict[str, bool]
                  ) -> tuple[bytes, int | None]:
    """The body and, when binary data follows the JSON, the JSON's length."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for t in response.outputs:
        out: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        if binary.get(t.name, binary[""]):
            raw = oip.to_raw(t)
            out["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif t.datatype == oip.BYTES:
            if t.name == "PNG":  # not text: base64, marked as such
                out["data"] = [base64.b64encode(v).decode() for v in t.data.flat]
                out["parameters"] = {"content_type": "base64"}
            else:
                out["data"] = [v.decode("utf-8", "replace") for v in t.data.flat]
        else:
            out["data"] = np.asarray(t.data).reshape(-1).tolist()
        outputs.append(out)
    doc = {"model_name": response.model, "model_version": response.version,
           "id": response.id, "parameters": response.parameters, "outputs": outputs}
    text = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return text, None
    return text + b"".join(blobs), len(text)


def _metadata_json(meta: oip.ModelMetadata) -> dict[str, Any]:
    def tensors(ts: tuple[oip.TensorMeta, ...]) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts]
    return {"name": meta.name, "versions": list(meta.versions), "platform": meta.platform,
            "inputs": tensors(meta.inputs), "outputs": tensors(meta.outputs)}


def json_response(doc: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> web.Response:
    """``application/json`` exactly (no charset parameter: the KServe SDK compares the
    header to that string before it reads an error message)."""
    return web.Response(body=json.dumps(doc, separators=(",", ":")).encode(), status=status,
                        content_type=JSON_TYPE, headers=headers)


def error_response(exc: BaseException) -> web.Response:
    status = status_of(exc)
    headers = {}
    if status.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(status.retry_after_s)))
    return json_response({"error": status.message}, http_status(status), headers)


class RestServer:
    """The v2 REST endpoint of a gateway (``GatewayConfig.http_port``)."""

    def __init__(self, service: oip.Service, config: Any, calls: Any, admission: Any,
                 metrics: GatewayMetrics) -> None:
        self._service = service
        self._config = config
        self._calls = calls
        self._admission = admission
        self._metrics = metrics
        self._expected = f"Bearer {config.token}".encode() if config.token else None
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self._config.max_message_bytes,
                              middlewares=[self._errors])
        r = app.router
        r.add_get("/v2", self._server_metadata)
        r.add_get("/v2/health/live", self._live)
        r.add_get("/v2/health/ready", self._ready)
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            r.add_get(base, self._model_metadata)
            r.add_get(f"{base}/ready", self._model_ready)
            r.add_get(f"{base}/config", self._model_config)
            r.add_post(f"{base}/infer", self._infer)
        r.add_post("/v2/repository/index", self._index)
        return app

    async def start(self) -> int:
        c = self._config
        context = None
        if c.tls_cert is not None and c.tls_key is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(c.tls_cert, c.tls_key)
            if c.tls_client_ca is not None:
                context.load_verify_locations(c.tls_client_ca)
                context.verify_mode = ssl.CERT_REQUIRED
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False,
                                     shutdown_timeout=10.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, c.host, c.http_port, ssl_context=context)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise InvalidArgument("--http-port", f"cannot listen on {c.host}:{c.http_port} "
                                                 f"({exc.strerror}); choose another port, or -1 "
                                                 f"for no REST endpoint") from None
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self, grace: float) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------ middleware
    def _method(self, request: web.Request) -> str:
        path = request.path
        if path.endswith("/infer"):
            return "ModelInfer"
        if path.endswith("/config"):
            return "ModelConfig"
        if path.endswith("/ready"):
            return "ServerReady" if path.startswith("/v2/health") else "ModelReady"
        if path == "/v2/health/live":
            return "ServerLive"
        if path == "/v2/repository/index":
            return "RepositoryIndex"
        return "ModelMetadata" if path.startswith("/v2/models/") else "ServerMetadata"

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        known = request.match_info.http_exception is None
        model = request.match_info.get("model", "")
        with self._metrics.observe(self._method(request) if known else "unknown", model,
                                   PROTOCOL) as seen:
            try:
                if self._expected is not None and request.path not in _EXEMPT \
                        and not request.path.endswith("/ready"):
                    given = request.headers.get("Authorization", "").encode()
                    if not hmac.compare_digest(given, self._expected):
                        raise Unauthenticated("missing or invalid 'Authorization: Bearer "
                                              "<token>' header")
                return await handler(request)
            except web.HTTPException as exc:  # routing (404, 405) and body size (413)
                seen.code = {404: "NOT_FOUND", 405: "UNIMPLEMENTED",
                             413: "RESOURCE_EXHAUSTED"}.get(exc.status, "INVALID_ARGUMENT")
                message = (f"the request body is over {self._config.max_message_bytes} bytes"
                           if exc.status == 413 else f"{exc.reason}: {request.method} "
                                                     f"{request.path[:200]}")
                return json_response({"error": message}, exc.status)
            except Exception as exc:
                seen.code = status_of(exc).code.name
                return error_response(exc)

    # ------------------------------------------------------------ handlers
    async def _server_metadata(self, request: web.Request) -> web.Response:
        return json_response({"name": oip.SERVER_NAME, "version": self._service.version,
                                  "extensions": list(oip.EXTENSIONS)})

    async def _live(self, request: web.Request) -> web.Response:
        return json_response({"live": True})

    async def _ready(self, request: web.Request) -> web.Response:
        ready = self._service.server_ready()
        return json_response({"ready": ready}, 200 if ready else 503)

    async def _model_ready(self, request: web.Request) -> web.Response:
        model, version = request.match_info["model"], request.match_info.get("version", "")
        ready = await self._service.model_ready(model, version)
        return json_response({"name": model, "ready": ready}, 200 if ready else 503)

    async def _model_metadata(self, request: web.Request) -> web.Response:
        model, version = request.match_info["model"], request.match_info.get("version", "")
        meta = await self._calls.guard(lambda: self._service.model_metadata(model, version))
        return json_response(_metadata_json(meta))

    async def _model_config(self, request: web.Request) -> web.Response:
        model, version = request.match_info["model"], request.match_info.get("version", "")
        config = await self._calls.guard(lambda: self._service.model_config(model, version))
        return json_response(config)

    async def _index(self, request: web.Request) -> web.Response:
        body = await request.read()
        ready_only = False
        if body.strip():
            ready_only = bool(_object(_json(body), "request").get("ready", False))
        models = await self._calls.guard(self._service.index)
        return json_response([{"name": n, "version": v, "state": "READY" if r else "UNAVAILABLE"}
                                  for n, v, r in models if r or not ready_only])

    async def _infer(self, request: web.Request) -> web.Response:
        model, version = request.match_info["model"], request.match_info.get("version", "")
        limit = self._config.max_message_bytes
        if (request.content_length or 0) > limit:  # refused before a byte is read
            raise web.HTTPRequestEntityTooLarge(max_size=limit,
                                                actual_size=request.content_length or 0)
        size = self._admission.admit(request.content_length or 0)
        try:
            body = await request.read()
            if len(body) > size:  # no Content-Length (chunked): count what came
                size = self._admission.resize(size, len(body))
            split = request.headers.get(HEADER_LENGTH)

            def decode() -> tuple[oip.InferRequest, dict[str, bool]]:
                if split is None:
                    header_bytes, binary = body, b""
                else:
                    if not split.isdigit() or int(split) > len(body):
                        raise InvalidArgument(HEADER_LENGTH, f"must be the JSON header's length, "
                                                             f"at most {len(body)}; got "
                                                             f"{split[:40]!r}")
                    header_bytes, binary = body[:int(split)], body[int(split):]
                header = _json(header_bytes)
                return (request_from_json(model, version, header, binary,
                                          self._config.max_message_bytes),
                        _binary_outputs(header))

            req, wanted = (await asyncio.to_thread(decode) if len(body) > oip.OFFLOAD_BYTES
                           else decode())
            response = await self._calls.guard(lambda: self._service.infer(req))
        finally:
            self._admission.release(size)
        if sum(t.data.nbytes for t in response.outputs) > oip.OFFLOAD_BYTES:
            payload, json_length = await asyncio.to_thread(response_body, response, wanted)
        else:
            payload, json_length = response_body(response, wanted)
        if json_length is None:
            return web.Response(body=payload, content_type=JSON_TYPE)
        return web.Response(body=payload, content_type="application/octet-stream",
                            headers={HEADER_LENGTH: str(json_length)})


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidArgument("request", f"is not JSON: {str(exc)[:200]}") from None

