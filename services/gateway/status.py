"""The one table from genfleet's errors to gRPC status codes (DESIGN.md §4).

Anything not in the table is INTERNAL: the traceback goes to the log with a request id,
the client gets only that id.
"""

from __future__ import annotations

import logging
import uuid

import grpc

from services.core.errors import (
    Cancelled,
    CheckpointError,
    DataError,
    DeadlineExceeded,
    GenfleetError,
    InvalidArgument,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    Unauthenticated,
    UnsupportedOperation,
)

log = logging.getLogger("genfleet.gateway")

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
    CheckpointError: grpc.StatusCode.INTERNAL,
}


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and the client-facing message for ``exc``."""
    for klass in type(exc).__mro__:
        code = STATUS.get(klass)
        if code is not None and code != grpc.StatusCode.INTERNAL:
            return code, str(exc)
    request_id = uuid.uuid4().hex[:12]
    log.error("internal error, request id %s", request_id, exc_info=exc)
    kind = "checkpoint error" if isinstance(exc, GenfleetError) else "internal error"
    return grpc.StatusCode.INTERNAL, f"{kind}; request id {request_id} (see the gateway log)"
