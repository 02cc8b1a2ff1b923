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


class Overloaded(GenfleetError):
    """Queue full or over quota (RESOURCE_EXHAUSTED); retry with backoff."""


class ModelNotReady(GenfleetError):
    """No replica ready yet, or shutting down (UNAVAILABLE)."""


class Cancelled(GenfleetError):
    """The caller cancelled the work (or its deadline passed) while it ran."""


class CheckpointError(GenfleetError):
    """A checkpoint in the store is unreadable or inconsistent."""


class DeadlineExceeded(GenfleetError):
    """The caller's deadline passed; the work on the replica was cancelled."""


class Unauthenticated(GenfleetError):
    """Missing or bad credentials (UNAUTHENTICATED)."""
