"""What the gateway calls: ``Backend``, the request logic every backend shares.

Two implementations: ``services.serving.serve_backend.ServeBackend`` (the Serve
application's replicas, over Ray) and ``services.serving.inprocess.InProcessBackend``
(replica engines in this process, no Ray). This module imports neither Ray nor torch."""

from __future__ import annotations

import asyncio

from services.core import api, validation
from services.core.errors import ModelNotFound
from services.core.store import parse_ref


class Backend:
    """Resolution of ``name[@version]``, validation (``services.core.validation``, before
    any work or coalescing) and the typed calls; subclasses provide ``model_names``,
    ``info``, ``healthy`` and ``_call``."""

    async def model_names(self, refresh: bool = False) -> list[str]:
        raise NotImplementedError

    async def info(self, name: str, *, refresh: bool = False) -> api.ModelInfo:
        raise NotImplementedError

    async def healthy(self, name: str | None = None) -> bool:
        raise NotImplementedError

    # one typed hook per replica method: the request is resolved and validated already
    async def _generate(self, name: str, request: api.GenerateRequest) -> api.GenerateResult:
        raise NotImplementedError

    async def _score(self, name: str, request: api.ScoreRequest) -> api.ScoreResult:
        raise NotImplementedError

    async def _encode(self, name: str, request: api.EncodeRequest) -> api.EncodeResult:
        raise NotImplementedError

    async def _decode(self, name: str, request: api.DecodeRequest) -> api.DecodeResult:
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
        return await self._generate(info.name, validation.check_generate(request, info))

    async def score(self, request: api.ScoreRequest) -> api.ScoreResult:
        info = await self.resolve(request.model)
        return await self._score(info.name, validation.check_score(request, info))

    async def encode(self, request: api.EncodeRequest) -> api.EncodeResult:
        info = await self.resolve(request.model)
        return await self._encode(info.name, validation.check_encode(request, info))

    async def decode(self, request: api.DecodeRequest) -> api.DecodeResult:
        info = await self.resolve(request.model)
        return await self._decode(info.name, validation.check_decode(request, info))
