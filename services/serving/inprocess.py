"""``InProcessBackend``: replica engines in this process, no Ray (tests; a single-process
development mode). Calls run in worker threads, one request per forward pass."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.core import api
from services.core.errors import DeadlineExceeded
from services.serving.backend import Backend
from services.serving.engine import CancelToken, ReplicaEngine


class InProcessBackend(Backend):
    """Replica engines in this process; calls run in worker threads (no batching)."""

    def __init__(self, store_root: str | Path, names: list[str], **engine_kwargs: Any) -> None:
        self.engines = {n: ReplicaEngine(store_root, n, **engine_kwargs) for n in names}

    async def model_names(self, refresh: bool = False) -> list[str]:
        return sorted(self.engines)

    async def info(self, name: str, *, refresh: bool = False) -> api.ModelInfo:
        return self.engines[name].info

    async def healthy(self, name: str | None = None) -> bool:
        return name is None or name in self.engines

    async def _generate(self, name: str, request: api.GenerateRequest) -> api.GenerateResult:
        return await self._call(name, "generate", lambda engine, token: engine.generate_many(
            [(request, token, time.perf_counter())])[0], request.deadline)

    async def _score(self, name: str, request: api.ScoreRequest) -> api.ScoreResult:
        return await self._call(name, "score", lambda engine, token: engine.score(request, token),
                                request.deadline)

    async def _encode(self, name: str, request: api.EncodeRequest) -> api.EncodeResult:
        return await self._call(name, "encode",
                                lambda engine, token: engine.encode(request, token),
                                request.deadline)

    async def _decode(self, name: str, request: api.DecodeRequest) -> api.DecodeResult:
        return await self._call(name, "decode",
                                lambda engine, token: engine.decode(request, token),
                                request.deadline)

    async def _call(self, name: str, what: str, run: Callable[[ReplicaEngine, CancelToken], Any],
                    deadline: float | None) -> Any:
        """``run(engine, token)`` in a worker thread, within ``deadline``."""
        engine = self.engines[name]
        token = CancelToken(deadline)
        timeout = None if deadline is None else max(0.0, deadline - time.time())
        try:
            result = await asyncio.wait_for(asyncio.to_thread(run, engine, token), timeout)
        except TimeoutError:
            token.cancel()  # the worker thread's loop stops at its next iteration
            raise DeadlineExceeded(f"deadline passed while {name}.{what} ran") from None
        except asyncio.CancelledError:
            token.cancel()  # the caller went away
            raise
        return api.unwrap(result)
