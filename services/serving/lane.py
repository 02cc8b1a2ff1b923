"""The replica lane: coalesced Generate groups from a gateway straight to a replica.

A Ray Serve handle call costs ~10 ms of latency on a busy 2-core machine (router, actor
call, Serve's request wrapper, the user-code thread hop), against ~1.3 ms of compute for
a 1-sample GAN; a direct gRPC call to the replica's event loop costs ~2 ms. So every
``ModelDeployment`` replica also listens on a lane: a grpc.aio server on its own event
loop, one method (``GenerateBatch``: a coalesced group in, one result per request out).
Serve still owns everything else: replicas' life, placement, autoscaling, rollouts
(``reconfigure``), health, and every other call (Score, Encode, Decode, info).

- Discovery: a replica reports its lane (host, port, token) with its load, every second,
  to the app's ``Directory``; gateways read the lanes from there (``ServeBackend``).
- Auth: each replica draws a random token; a call without it is refused with
  UNAUTHENTICATED before its body is read (a server interceptor), so nothing reaches the
  unpickler but what a gateway that read the token from the Directory (over Ray's own
  authenticated channel) sent.
- Body: a pickle of the request dataclasses and of the results (``services.core.api``).
- Cancellation: a caller that goes away cancels the RPC; the handler's task is cancelled
  and so are the requests' tokens (the sampler stops between steps).
- Shutdown: when Serve stops the replica (scale-down, redeploy), ``ModelDeployment``'s
  ``__del__`` takes the lane out of the Directory and drains it (``close``): calls in flight
  finish, new ones are refused with UNAVAILABLE and the gateway sends them elsewhere.
- Host: ``GENFLEET_LANE_HOST`` (the embedded local cluster and the tests set 127.0.0.1),
  else the Ray node's IP; the port is any free one.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import pickle
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

# a replica that vanishes without closing its connections (its node gone, a frozen
# process) is noticed by HTTP/2 pings within ~4 s, not at the call's deadline
_MESSAGES = [("grpc.max_receive_message_length", 256 << 20),
             ("grpc.max_send_message_length", 256 << 20)]
CLIENT_OPTIONS = [*_MESSAGES, ("grpc.keepalive_time_ms", 2000),
                  ("grpc.keepalive_timeout_ms", 2000),
                  ("grpc.keepalive_permit_without_calls", 1),
                  ("grpc.http2.max_pings_without_data", 0)]
SERVER_OPTIONS = [*_MESSAGES, ("grpc.keepalive_permit_without_calls", 1),
                  ("grpc.http2.min_ping_interval_without_data_ms", 1000),
                  ("grpc.http2.max_ping_strikes", 0)]
SERVICE = "genfleet.lane.v1.Lane"
METHOD = f"/{SERVICE}/GenerateBatch"
TOKEN_HEADER = "x-genfleet-lane-token"
HOST_ENV = "GENFLEET_LANE_HOST"


@dataclass(frozen=True)
class LaneAddress:
    """Where one replica's lane listens, and the token it wants."""

    replica: str
    host: str
    port: int
    token: str

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def to_dict(self) -> dict[str, Any]:
        return {"replica": self.replica, "host": self.host, "port": self.port,
                "token": self.token}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LaneAddress:
        return cls(str(raw["replica"]), str(raw["host"]), int(raw["port"]), str(raw["token"]))


class _TokenCheck(grpc.aio.ServerInterceptor):
    """Refuses a call without the lane's token before the handler (and its deserializer)
    runs."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "lane token required")

        self._refuse = grpc.unary_unary_rpc_method_handler(refuse)

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        given = dict(details.invocation_metadata or ()).get(TOKEN_HEADER, "")
        given = given.encode() if isinstance(given, str) else bytes(given)
        if not hmac.compare_digest(given, self._token):
            return self._refuse
        return await continuation(details)


class LaneServer:
    """A replica's lane: ``handle(requests, isolated)`` answers each group."""

    def __init__(self, replica: str,
                 handle: Callable[[list[Any], bool], Awaitable[list[Any]]]) -> None:
        self._replica = replica
        self._handle = handle
        self._token = secrets.token_hex(16)
        self._server: grpc.aio.Server | None = None
        self.address: LaneAddress | None = None

    async def start(self, host: str | None = None) -> LaneAddress:
        host = host or os.environ.get(HOST_ENV) or _node_ip()

        async def call(body: bytes, context: grpc.aio.ServicerContext) -> bytes:
            requests, isolated = pickle.loads(body)
            return pickle.dumps(await self._handle(requests, isolated),
                                protocol=pickle.HIGHEST_PROTOCOL)

        handler = grpc.method_handlers_generic_handler(SERVICE, {
            "GenerateBatch": grpc.unary_unary_rpc_method_handler(call)})
        server = grpc.aio.server(interceptors=[_TokenCheck(self._token)],
                                 options=SERVER_OPTIONS)
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port(f"{host}:0")
        await server.start()
        self._server = server
        self.address = LaneAddress(self._replica, host, port, self._token)
        return self.address

    async def close(self, grace_s: float) -> None:
        """Refuse new calls (UNAVAILABLE), let those in flight finish within ``grace_s``."""
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None


def _node_ip() -> str:
    import ray

    return str(ray.util.get_node_ip_address())


class LaneClient:
    """A gateway's channel to one replica's lane."""

    def __init__(self, address: LaneAddress) -> None:
        self.address = address
        self.in_flight = 0
        self._channel = grpc.aio.insecure_channel(address.target, options=CLIENT_OPTIONS)
        self._call = self._channel.unary_unary(METHOD)
        self._metadata = ((TOKEN_HEADER, address.token),)

    async def generate_batch(self, requests: list[Any], isolated: bool,
                             timeout: float | None) -> list[Any]:
        """The group's results, in order. Raises ``grpc.aio.AioRpcError`` on transport
        failures (UNAVAILABLE: the replica is gone or going; DEADLINE_EXCEEDED)."""
        body = pickle.dumps((requests, isolated), protocol=pickle.HIGHEST_PROTOCOL)
        self.in_flight += 1
        try:
            reply = await self._call(body, timeout=timeout, metadata=self._metadata)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # our caller cancelled this call
            # grpc.aio answers a call that its channel's close cut with CancelledError, not
            # an RpcError: left as it is, it would cancel the gateway call that waits on it,
            # and grpc sends no status for a cancelled handler (the client waits out its
            # deadline)
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                       grpc.aio.Metadata(),
                                       f"the lane to {self.address.target} was closed "
                                       f"during the call") from None
        finally:
            self.in_flight -= 1
        results: list[Any] = pickle.loads(reply)
        return results

    async def close(self) -> None:
        """Close the channel; calls still in flight on it fail (UNAVAILABLE)."""
        await self._channel.close()
