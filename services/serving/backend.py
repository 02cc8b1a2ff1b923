"""The gateway's view of the Serve app: DeploymentHandle calls with deadlines, and Ray's
failures turned into genfleet's errors (DESIGN.md §4, §7).

- The client's deadline is enforced here: when it passes, the handle's response is
  cancelled (the replica's token stops the sampler) and DeadlineExceeded is raised.
- ``BackPressureError`` (``max_queued_requests`` reached) -> Overloaded.
- A replica that died or is not there yet -> ModelNotReady. Every call is a pure function
  of its request (seeded sampling), so it is retried on another replica while time is left.
- Generate requests are coalesced per model (``services.serving.coalesce``) with the
  deployment's own dynamic-batching settings, read from a replica and cached for
  ``info_ttl_s``: one Ray call per group instead of one per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RequestCancelledError,
)
from ray.serve.handle import DeploymentHandle

from services.core import api
from services.core.errors import DeadlineExceeded, ModelNotReady, Overloaded
from services.serving.backends import BaseBackend
from services.serving.coalesce import Coalescer

log = logging.getLogger("genfleet.backend")
_UNAVAILABLE = (RayActorError, ActorUnavailableError, DeploymentUnavailableError,
                ReplicaUnavailableError)


class ServeBackend(BaseBackend):
    """Calls the model deployments of the Serve application ``app_name``."""

    def __init__(self, app_name: str = "genfleet", *, retries: int = 2,
                 info_ttl_s: float = 2.0) -> None:
        self.app_name = app_name
        self.retries = retries
        self.info_ttl_s = info_ttl_s
        self._handles: dict[str, DeploymentHandle] = {}
        self._names: list[str] | None = None
        self._infos: dict[str, tuple[float, api.ModelInfo]] = {}
        self._batching: dict[str, tuple[float, tuple[int, float]]] = {}
        self.coalescers: dict[str, Coalescer[api.GenerateRequest, Any]] = {}

    # ---------------------------------------------------------------- models
    async def model_names(self, refresh: bool = False) -> list[str]:
        if self._names is None or refresh:
            try:
                directory = serve.get_app_handle(self.app_name)
                self._names = list(await directory.list.remote())
            except _UNAVAILABLE as exc:
                raise ModelNotReady(f"the {self.app_name} application is not ready") from exc
            except (ValueError, RuntimeError) as exc:  # app not deployed
                raise ModelNotReady(f"the {self.app_name} application is not running") from exc
        return self._names

    def _handle(self, name: str) -> DeploymentHandle:
        if name not in self._handles:
            self._handles[name] = serve.get_deployment_handle(name, self.app_name)
        return self._handles[name]

    async def info(self, name: str, *, refresh: bool = False) -> api.ModelInfo:
        cached = self._infos.get(name)
        if cached and not refresh and time.monotonic() - cached[0] < self.info_ttl_s:
            return cached[1]
        result = await self._call(name, "info", None, None)
        self._infos[name] = (time.monotonic(), result)
        return result

    async def batching(self, name: str) -> tuple[int, float]:
        """The deployment's (max_batch_size, batch_wait_timeout_s), cached like ``info``."""
        cached = self._batching.get(name)
        if cached and time.monotonic() - cached[0] < self.info_ttl_s:
            return cached[1]
        settings = await self._call(name, "batch_settings", None, None)
        value = (int(settings["max_batch_size"]), float(settings["batch_wait_timeout_s"]))
        self._batching[name] = (time.monotonic(), value)
        return value

    async def healthy(self, name: str | None = None) -> bool:
        """Overall (any model) or one model: a running replica answers ``info``."""
        try:
            names = [name] if name else await self.model_names()
            for n in names:
                await asyncio.wait_for(self.info(n), timeout=5.0)
            return True
        except Exception:
            return False

    # ----------------------------------------------------------------- calls
    async def generate(self, request: api.GenerateRequest) -> api.GenerateResult:
        info = await self.resolve(request.model)
        max_size, wait_s = await self.batching(info.name)
        if max_size <= 1:  # batching off: every request alone, no coalescing either
            alone: api.GenerateResult = await self._call(info.name, "generate", request,
                                                         request.deadline)
            return alone
        coalescer = self.coalescers.get(info.name)
        if coalescer is None:
            async def send(group: list[api.GenerateRequest], name: str = info.name) -> list[Any]:
                deadlines = [r.deadline for r in group]
                deadline = None if None in deadlines else max(d for d in deadlines if d)
                results: list[Any] = await self._call(name, "generate_batch", group, deadline,
                                                      unwrap=False)
                return results
            coalescer = self.coalescers[info.name] = Coalescer(send)
        timeout = None if request.deadline is None else max(0.0, request.deadline - time.time())
        try:
            result = await asyncio.wait_for(coalescer.submit(request, max_size, wait_s), timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"deadline passed while {info.name}.generate ran") from None
        generated: api.GenerateResult = api.unwrap(result)
        return generated

    async def _call(self, name: str, method: str, request: Any, deadline: float | None, *,
                    unwrap: bool = True) -> Any:
        attempt = 0
        while True:
            handle = self._handle(name)
            response = getattr(handle, method).remote(request) if request is not None \
                else getattr(handle, method).remote()
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
            except _UNAVAILABLE as exc:
                attempt += 1
                time_left = deadline is None or deadline - time.time() > 0.5
                if attempt > self.retries or not time_left:
                    raise ModelNotReady(f"no replica of {name} is available ({type(exc).__name__})"
                                        ) from exc
                log.warning("%s.%s: replica unavailable, retrying (%d)", name, method, attempt)
                await asyncio.sleep(0.2 * attempt)
                continue
            return api.unwrap(result) if unwrap else result
