"""Errors a user can cause, one class per status of the DESIGN.md §4 table.

Model code raises these; the gateway maps each class to one gRPC status code.
Anything that is not a ``GenfleetError`` is an internal error.
"""

from __future__ import annotations


class GenfleetError(Exception):
    """Base class of every error genfleet reports to a user."""


class InvalidArgument(GenfleetError, ValueError):
    """A field, size or option is out of range (INVALID_ARGUMENT).

    The message names the field and the allowed range.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class DataError(GenfleetError, ValueError):
    """A data file is missing, malformed or truncated; the message names the file."""

    def __init__(self, path: object, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = str(path)


class ModelNotFound(GenfleetError, LookupError):
    """Unknown model name or version (NOT_FOUND)."""


class UnsupportedOperation(GenfleetError, NotImplementedError):
    """The model's family lacks the requested capability (UNIMPLEMENTED)."""


class Retryable(GenfleetError):
    """An error a client may retry after ``retry_after_s`` seconds: the gateway sends the
    delay as the ``grpc-retry-pushback-ms`` trailer, which marks the status retryable."""

    retry_after_s: float = 0.5

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s


class Overloaded(Retryable):
    """Queue full or over quota (RESOURCE_EXHAUSTED); retry with backoff."""

    retry_after_s = 0.1


class ModelNotReady(Retryable):
    """No replica ready yet, or shutting down (UNAVAILABLE)."""

    retry_after_s = 1.0


class Cancelled(GenfleetError):
    """The caller cancelled the work (or its deadline passed) while it ran."""


class CheckpointError(GenfleetError):
    """A checkpoint in the store is unreadable or inconsistent."""


class DeadlineExceeded(GenfleetError):
    """The caller's deadline passed; the work on the replica was cancelled."""


class Unauthenticated(GenfleetError):
    """Missing or bad credentials (UNAUTHENTICATED)."""


class Internal(GenfleetError):
    """An unexpected failure of one request (INTERNAL). The message carries a request id
    that names the log line with the traceback; the traceback never goes on the wire."""
