"""One place that turns exceptions into gRPC statuses, and rejects unknown request fields.

Servicers raise memserve.errors exceptions; the client gets the exception's
status code and message. Anything else is a bug: it is logged with its
traceback and answered INTERNAL, and the server stays up.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from memserve.api.auth import BOUND_TENANT, Auth
from memserve.api.convert import check_no_unknown_fields
from memserve.errors import InvalidArgument, MemserveError, clipped
from memserve.metrics import REQUEST_DURATION, REQUESTS

log = logging.getLogger(__name__)

OWN_SERVICES_PREFIX = "/memserve.v1."


class Undecodable:
    """What a request's bytes became when they are not a message of the RPC's type: the handler
    answers INVALID_ARGUMENT (and counts it), where gRPC itself would answer UNKNOWN uncounted."""

    def __init__(self, type_name: str, error: Exception) -> None:
        self.message = f"the request is not a valid {type_name} message ({type(error).__name__})"


def _tolerant(deserialize: Callable[[bytes], Any] | None, type_name: str) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError, and the runtime's other refusals (bad UTF-8)
            return Undecodable(type_name, exc)

    return parse


def _check_message(message: Any) -> None:
    if isinstance(message, Undecodable):
        raise InvalidArgument(message.message)
    check_no_unknown_fields(message)


async def _checked(messages: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A client stream's messages, each checked as it comes."""
    async for message in messages:
        _check_message(message)
        yield message


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
    if isinstance(exc, MemserveError):
        if exc.code is grpc.StatusCode.INTERNAL:
            log.error("%s failed: %s", method, exc)
        await context.abort(exc.code, exc.message)
    log.exception("%s failed unexpectedly", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, clipped(f"internal error: {exc!r}"))


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
        self._bound: contextvars.Token[str | None] | None = None

    def check(self, request: Any, auth: Auth | None) -> None:
        """The tenant, its request rate, the bearer token and the tenant it binds the call to (on
        a server with tokens), and unknown fields (a client stream's messages are checked one by
        one, as they come)."""
        if auth is not None:
            bound = auth.authorize(self.context.invocation_metadata(), self.rpc)
            if bound is not None:
                self._bound = BOUND_TENANT.set(bound)
        if not isinstance(request, AsyncIterator):
            _check_message(request)

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
            if self._bound is not None:
                # A stream the client left is closed from another task's context, where the
                # variable was never set; that context ends with the call anyway.
                with contextlib.suppress(ValueError):
                    BOUND_TENANT.reset(self._bound)


def _unary_request(
    method: str, behaviour: Callable[..., Awaitable[Any]], auth: Auth | None
) -> Callable[..., Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with _Call(method, context) as call:
            call.check(request, auth)
            if isinstance(request, AsyncIterator):
                request = _checked(request)
            return await behaviour(request, context)

    return handler


def _streaming_response(
    method: str, behaviour: Callable[..., AsyncIterator[Any]], auth: Auth | None
) -> Callable[..., AsyncIterator[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with _Call(method, context) as call:
            call.check(request, auth)
            if isinstance(request, AsyncIterator):
                request = _checked(request)
            async with contextlib.aclosing(behaviour(request, context)) as responses:
                async for response in responses:
                    yield response

    return handler


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Statuses from exceptions, metrics per RPC, tenants and their request rates and, with tokens
    in `auth`, who may call what."""

    def __init__(self, auth: Auth | None = None) -> None:
        self.auth = auth if auth is not None else Auth()

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
        type_name = method.rsplit("/", 1)[-1] + "'s request"
        codec = {
            "request_deserializer": _tolerant(handler.request_deserializer, type_name),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _unary_request(method, handler.unary_unary, self.auth), **codec
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _streaming_response(method, handler.unary_stream, self.auth), **codec
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _unary_request(method, handler.stream_unary, self.auth), **codec
            )
        return grpc.stream_stream_rpc_method_handler(
            _streaming_response(method, handler.stream_stream, self.auth), **codec
        )
