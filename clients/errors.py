"""Typed errors: every failed call raises a `MemserveError` subclass named after its gRPC status.

    try:
        client.get_memory("nope")
    except NotFound as error:
        print(error.status, error.message)      # StatusCode.NOT_FOUND, the server's reason

They stay `grpc.RpcError`s with grpc's `code()` and `details()` methods, so code written against
plain grpc (`except grpc.RpcError as e: e.code()`) keeps working.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import ClassVar

import grpc


class MemserveError(grpc.RpcError):
    """A call the server (or the channel) refused; `status` is its gRPC status code."""

    status: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    by_status: ClassVar[dict[grpc.StatusCode, type[MemserveError]]] = {}

    def __init__(self, message: str, status: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        """The server's explanation (grpc's `details()`)."""
        if status is not None:
            self.status = status

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        MemserveError.by_status.setdefault(cls.status, cls)  # the first class of a status is its own

    def code(self) -> grpc.StatusCode:
        """The status code, as `grpc.RpcError.code()` gives it."""
        return self.status

    def details(self) -> str:
        """The server's message, as `grpc.RpcError.details()` gives it."""
        return self.message

    def __str__(self) -> str:
        return f"{self.status.name}: {self.message}"


class Cancelled(MemserveError):
    """The call was cancelled (by the client, or by a server shutting down)."""

    status = grpc.StatusCode.CANCELLED


class Unknown(MemserveError):
    status = grpc.StatusCode.UNKNOWN


class InvalidArgument(MemserveError):
    """The request is malformed; the message says how to fix it."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(MemserveError):
    """The call outlasted its `timeout`."""

    status = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(MemserveError):
    """No such memory, version, document or job (for this tenant)."""

    status = grpc.StatusCode.NOT_FOUND


class AlreadyExists(MemserveError):
    status = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(MemserveError):
    status = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(MemserveError):
    """The server is full (its queue, or a size limit); retry later or send less."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(MemserveError):
    """The server cannot do this in its state (no store, a memory for another model, ...)."""

    status = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(MemserveError):
    status = grpc.StatusCode.ABORTED


class OutOfRange(MemserveError):
    status = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(MemserveError):
    status = grpc.StatusCode.UNIMPLEMENTED


class Internal(MemserveError):
    status = grpc.StatusCode.INTERNAL


class Unavailable(MemserveError):
    """No server answers at the address, or it is shutting down."""

    status = grpc.StatusCode.UNAVAILABLE


class DataLoss(MemserveError):
    """A stored memory is corrupt (its checksum does not match)."""

    status = grpc.StatusCode.DATA_LOSS


class Unauthenticated(MemserveError):
    """The server wants a bearer token (token= or $MEMSERVE_TOKEN) for this call."""

    status = grpc.StatusCode.UNAUTHENTICATED


def error_from(error: grpc.RpcError) -> MemserveError:
    """The typed error for a grpc error (itself if it is one already)."""
    if isinstance(error, MemserveError):
        return error
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    return MemserveError.by_status.get(code, MemserveError)(details or "", code)


@contextlib.contextmanager
def typed_errors() -> Iterator[None]:
    """Turns a grpc error raised inside the `with` block into its typed error."""
    try:
        yield
    except MemserveError:
        raise
    except grpc.RpcError as error:
        raise error_from(error) from error
