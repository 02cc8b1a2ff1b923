"""The one table from genfleet's errors to gRPC status codes (DESIGN.md §4), and the one
function every RPC aborts through.

Anything not in the table is INTERNAL: the traceback goes to the log with a request id,
the client gets only that id. A ``Retryable`` error (queue full, no replica yet) carries
its retry delay in the ``grpc-retry-pushback-ms`` trailer (the name gRPC's retry design
uses); a client retries only statuses that carry it, or UNAVAILABLE from the transport.
"""

from __future__ import annotations

import logging
import uuid
from typing import NamedTuple

import grpc

from services.core.errors import (
    Cancelled,
    CheckpointError,
    DataError,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    Retryable,
    Unauthenticated,
    UnsupportedOperation,
)

log = logging.getLogger("genfleet.gateway")
PUSHBACK = "grpc-retry-pushback-ms"
MAX_MESSAGE = 1000  # characters of a status message: a hostile input is never echoed whole

STATUS: dict[type[Exception], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    DataError: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    UnsupportedOperation: grpc.StatusCode.UNIMPLEMENTED,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Cancelled: grpc.StatusCode.CANCELLED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    Internal: grpc.StatusCode.INTERNAL,  # its message already names a logged request id
}


class Status(NamedTuple):
    code: grpc.StatusCode
    message: str
    retry_after_s: float | None  # set: the client may retry after this delay

    def trailers(self) -> tuple[tuple[str, str], ...]:
        if self.retry_after_s is None:
            return ()
        return ((PUSHBACK, str(max(0, round(1000 * self.retry_after_s)))),)


def status_of(exc: BaseException) -> Status:
    """The status code, client-facing message and retry delay for ``exc``."""
    if not isinstance(exc, CheckpointError):  # its message holds server paths: logged only
        for klass in type(exc).__mro__:
            code = STATUS.get(klass)
            if code is not None:
                message = str(exc)
                if len(message) > MAX_MESSAGE:
                    message = f"{message[:MAX_MESSAGE]}... (cut)"
                retry = exc.retry_after_s if isinstance(exc, Retryable) else None
                return Status(code, message, retry)
    request_id = uuid.uuid4().hex[:12]
    log.error("internal error, request id %s", request_id, exc_info=exc)
    kind = "checkpoint error" if isinstance(exc, CheckpointError) else "internal error"
    return Status(grpc.StatusCode.INTERNAL,
                  f"{kind}; request id {request_id} (see the gateway log)", None)


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """End the RPC with the status of ``exc`` (raises, as ``context.abort`` does)."""
    status = status_of(exc)
    await context.abort(status.code, status.message, trailing_metadata=status.trailers())


# the same table for HTTP (the Open Inference Protocol's REST endpoint): a status code
# per gRPC code; CANCELLED is the client closing its request (nginx's 499)
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status(status: Status) -> int:
    return HTTP_STATUS.get(status.code, 500)
