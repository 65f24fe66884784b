"""The exceptions memserve raises, each mapped to one gRPC status (see interceptor.py).

The hierarchy is shallow on purpose: the class says which status a client gets,
the message says what to fix.
"""

from __future__ import annotations

import grpc

# A status message travels in gRPC's trailing metadata, which clients refuse past 16 KiB (the
# call then fails with a transport error instead of the status): messages that quote what a
# client sent are cut to this many characters.
MAX_MESSAGE_CHARS = 2000


class MemserveError(Exception):
    """Base class; maps to INTERNAL unless a subclass says otherwise."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    @property
    def message(self) -> str:
        """What the client is told: the message, cut to MAX_MESSAGE_CHARS."""
        return clipped(str(self))


def clipped(text: str) -> str:
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    return f"{text[: MAX_MESSAGE_CHARS - 40]}… ({len(text) - MAX_MESSAGE_CHARS + 40} more characters)"


class InvalidArgument(MemserveError, ValueError):
    """The request is malformed or a value is out of range."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(MemserveError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(MemserveError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class UnsupportedArchitecture(FailedPrecondition, ValueError):
    """The model's architecture has no known memory hook sites: it serves, without memories."""


class ResourceExhausted(MemserveError):
    """The server is at capacity (queue full, too many memories), or a tenant over a quota."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        """Seconds until a retry can succeed, where the server knows (HTTP's Retry-After)."""


class Unavailable(MemserveError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(MemserveError):
    code = grpc.StatusCode.DATA_LOSS


class DeadlineExceeded(MemserveError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(MemserveError):
    code = grpc.StatusCode.CANCELLED


class Unauthenticated(MemserveError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(MemserveError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unimplemented(MemserveError):
    code = grpc.StatusCode.UNIMPLEMENTED


class MemoryHookError(MemserveError):
    """A memory failed while the model ran (or while preparing to run it).

    Fails the requests that use that memory, never the whole server, and is
    never swallowed: a memory that silently does nothing is worse than an error.
    `memory` is the failing memory object itself, so the engine finds exactly the
    requests that use it.
    """

    def __init__(self, memory: object, where: str, cause: BaseException) -> None:
        name = getattr(memory, "name", repr(memory))
        super().__init__(f"memory {name!r} failed {where}: {cause!r}")
        self.memory = memory
