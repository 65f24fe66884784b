"""One place that turns exceptions into gRPC statuses, and rejects unknown request fields.

Servicers raise memserve.errors exceptions; the client gets the exception's
status code and message. Anything else is a bug: it is logged with its
traceback and answered INTERNAL, and the server stays up.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from memserve.api.convert import check_no_unknown_fields
from memserve.errors import MemserveError, Unauthenticated
from memserve.metrics import REQUEST_DURATION, REQUESTS

log = logging.getLogger(__name__)

OWN_SERVICES_PREFIX = "/memserve.v1."
# What changes the store or the jobs, or holds the server's compute for minutes (an
# evaluation); reading and generating need no token.
MUTATING_RPCS = frozenset(
    {
        "Evaluate",
        "RegisterDocuments",
        "RegisterFacts",
        "RegisterAdapter",
        "PutMemory",
        "DeleteMemory",
        "SubmitJob",
        "CancelJob",
    }
)


def check_token(metadata: Any, token: str, rpc: str) -> None:
    """Unauthenticated unless the call carries `authorization: Bearer <token>` (compared in constant time)."""
    given = ""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            given = value[len("Bearer ") :]
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise Unauthenticated(
            f"{rpc} changes the store: this server wants a bearer token (token= or $MEMSERVE_TOKEN)"
            if not given
            else f"{rpc}: the bearer token is not this server's"
        )


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
    if isinstance(exc, MemserveError):
        if exc.code is grpc.StatusCode.INTERNAL:
            log.error("%s failed: %s", method, exc)
        await context.abort(exc.code, str(exc))
    log.exception("%s failed unexpectedly", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc!r}")


def _code_of(exc: BaseException, context: grpc.aio.ServicerContext) -> str:
    """The status a request ends with, for the metrics."""
    if isinstance(exc, MemserveError):
        return exc.code.name
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    if isinstance(exc, grpc.aio.AbortError):
        code = context.code() if hasattr(context, "code") else None
        return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    return "INTERNAL"


def _record(rpc: str, code: str, started: float) -> None:
    REQUESTS.labels(rpc, code).inc()
    REQUEST_DURATION.labels(rpc).observe(time.perf_counter() - started)


class _Call:
    """One call of our own services, around its servicer: `check` on the way in; on the way out,
    the status recorded in the metrics and, for an exception, the status the client gets.

    A context manager, so that the unary and the streaming handlers share it: a streaming
    handler's `yield` sits inside it."""

    def __init__(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.method = method
        self.rpc = method.rsplit("/", 1)[-1]
        self.context = context
        self.started = time.perf_counter()
        self.code = "OK"

    def check(self, request: Any, token: str | None) -> None:
        """The bearer token (mutating RPCs, on a server that has one) and unknown fields (a
        client stream's messages are checked one by one, as they come)."""
        if token is not None and self.rpc in MUTATING_RPCS:
            check_token(self.context.invocation_metadata(), token, self.rpc)
        if not isinstance(request, AsyncIterator):
            check_no_unknown_fields(request)

    async def __aenter__(self) -> _Call:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        try:
            if isinstance(exc, GeneratorExit):  # the client left a stream before its end
                self.code = "CANCELLED"
            elif isinstance(exc, grpc.aio.AbortError | asyncio.CancelledError):
                self.code = _code_of(exc, self.context)
            elif isinstance(exc, Exception):
                self.code = _code_of(exc, self.context)
                await _abort(self.context, self.method, exc)
        finally:
            _record(self.rpc, self.code, self.started)


def _unary_request(
    method: str, behaviour: Callable[..., Awaitable[Any]], token: str | None
) -> Callable[..., Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with _Call(method, context) as call:
            call.check(request, token)
            return await behaviour(request, context)

    return handler


def _streaming_response(
    method: str, behaviour: Callable[..., AsyncIterator[Any]], token: str | None
) -> Callable[..., AsyncIterator[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with _Call(method, context) as call:
            call.check(request, token)
            async with contextlib.aclosing(behaviour(request, context)) as responses:
                async for response in responses:
                    yield response

    return handler


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Statuses from exceptions, metrics per RPC and, with a `token`, bearer auth on mutating RPCs."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token or None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        # Only our own services: the standard ones (health, reflection) keep their own handlers.
        if handler is None or not method.startswith(OWN_SERVICES_PREFIX):
            return handler
        codec = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _unary_request(method, handler.unary_unary, self.token), **codec
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _streaming_response(method, handler.unary_stream, self.token), **codec
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _unary_request(method, handler.stream_unary, self.token), **codec
            )
        return grpc.stream_stream_rpc_method_handler(
            _streaming_response(method, handler.stream_stream, self.token), **codec
        )
