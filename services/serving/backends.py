"""Backends the gateway calls, without Ray: the shared request logic (``BaseBackend``)
and ``LocalBackend``, which runs model servers in this process (tests; a single-process
development mode). ``services.serving.backend.ServeBackend`` is the Ray Serve one."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from services.core import api, validation
from services.core.errors import DeadlineExceeded, ModelNotFound
from services.core.store import parse_ref
from services.serving.server import CancelToken, ModelServer


class BaseBackend:
    """Resolution of ``name[@version]``, validation (``services.core.validation``, before
    any work or coalescing) and the typed calls; subclasses provide ``model_names``,
    ``info``, ``healthy`` and ``_call``."""

    async def model_names(self, refresh: bool = False) -> list[str]:
        raise NotImplementedError

    async def info(self, name: str, *, refresh: bool = False) -> api.ModelInfo:
        raise NotImplementedError

    async def healthy(self, name: str | None = None) -> bool:
        raise NotImplementedError

    async def _call(self, name: str, method: str, request: Any, deadline: float | None) -> Any:
        raise NotImplementedError

    async def list_models(self) -> list[api.ModelInfo]:
        names = await self.model_names()
        return list(await asyncio.gather(*(self.info(n) for n in names)))

    async def resolve(self, ref: str) -> api.ModelInfo:
        """``name`` or ``name@version`` -> the served model's info.

        Raises:
            ModelNotFound: the name is not served, or it serves another version.
        """
        name, version = parse_ref(ref)
        names = await self.model_names()
        if name not in names:
            raise ModelNotFound(f"no model named {name!r} is served (served: {names})")
        info = await self.info(name)
        if version is not None and info.version != version:
            info = await self.info(name, refresh=True)  # a rollout may have just finished
            if info.version != version:
                raise ModelNotFound(f"{name} serves version {info.version}; "
                                    f"version {version} is not being served")
        return info

    async def open_stream(self, request: api.GenerateRequest, chunk: int | None
                          ) -> tuple[api.GenerateRequest, int]:
        """Validate a GenerateStream as a whole (its total against ``max_samples_per_stream``)
        before its first chunk; returns the checked request and the chunk size."""
        info = await self.resolve(request.model)
        chunk = chunk or min(info.limits.max_samples_per_request, 16)
        return validation.check_generate(request, info, chunk=chunk), chunk

    async def generate(self, request: api.GenerateRequest) -> api.GenerateResult:
        info = await self.resolve(request.model)
        request = validation.check_generate(request, info)
        result: api.GenerateResult = await self._call(info.name, "generate", request,
                                                      request.deadline)
        return result

    async def score(self, request: api.ScoreRequest) -> api.ScoreResult:
        info = await self.resolve(request.model)
        request = validation.check_score(request, info)
        result: api.ScoreResult = await self._call(info.name, "score", request, request.deadline)
        return result

    async def encode(self, request: api.EncodeRequest) -> api.EncodeResult:
        info = await self.resolve(request.model)
        request = validation.check_encode(request, info)
        result: api.EncodeResult = await self._call(info.name, "encode", request, request.deadline)
        return result

    async def decode(self, request: api.DecodeRequest) -> api.DecodeResult:
        info = await self.resolve(request.model)
        request = validation.check_decode(request, info)
        result: api.DecodeResult = await self._call(info.name, "decode", request, request.deadline)
        return result


class LocalBackend(BaseBackend):
    """Model servers in this process; calls run in worker threads (no batching)."""

    def __init__(self, store_root: str | Path, names: list[str], **server_kwargs: Any) -> None:
        self.servers = {n: ModelServer(store_root, n, **server_kwargs) for n in names}

    async def model_names(self, refresh: bool = False) -> list[str]:
        return sorted(self.servers)

    async def info(self, name: str, *, refresh: bool = False) -> api.ModelInfo:
        return self.servers[name].info

    async def healthy(self, name: str | None = None) -> bool:
        return name is None or name in self.servers

    async def _call(self, name: str, method: str, request: Any, deadline: float | None) -> Any:
        server = self.servers[name]
        token = CancelToken(deadline)
        if method == "generate":
            def run() -> Any:
                return server.generate_many([(request, token, time.perf_counter())])[0]
        else:
            def run() -> Any:
                return getattr(server, method)(request, token)
        timeout = None if deadline is None else max(0.0, deadline - time.time())
        try:
            result = await asyncio.wait_for(asyncio.to_thread(run), timeout)
        except TimeoutError:
            token.cancel()  # the worker thread's loop stops at its next iteration
            raise DeadlineExceeded(f"deadline passed while {name}.{method} ran") from None
        except asyncio.CancelledError:
            token.cancel()  # the caller went away
            raise
        return api.unwrap(result)
