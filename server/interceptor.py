"""One place that turns exceptions into gRPC statuses, and rejects unknown request fields.

Servicers raise memserve.errors exceptions; the client gets the exception's
status code and message. Anything else is a bug: it is logged with its
traceback and answered INTERNAL, and the server stays up.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from memserve.convert import check_no_unknown_fields
from memserve.errors import MemserveError

log = logging.getLogger(__name__)

OWN_SERVICES_PREFIX = "/memserve.v1."


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
    if isinstance(exc, MemserveError):
        if exc.code is grpc.StatusCode.INTERNAL:
            log.error("%s failed: %s", method, exc)
        await context.abort(exc.code, str(exc))
    log.exception("%s failed unexpectedly", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc!r}")


def _unary_request(method: str, behaviour: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if not isinstance(request, AsyncIterator):  # client streams are checked per message
                check_no_unknown_fields(request)
            return await behaviour(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, method, exc)

    return handler


def _streaming_response(
    method: str, behaviour: Callable[..., AsyncIterator[Any]]
) -> Callable[..., AsyncIterator[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            if not isinstance(request, AsyncIterator):
                check_no_unknown_fields(request)
            async with contextlib.aclosing(behaviour(request, context)) as responses:
                async for response in responses:
                    yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, method, exc)

    return handler


class ErrorInterceptor(grpc.aio.ServerInterceptor):
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
            return grpc.unary_unary_rpc_method_handler(_unary_request(method, handler.unary_unary), **codec)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _streaming_response(method, handler.unary_stream), **codec
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(_unary_request(method, handler.stream_unary), **codec)
        return grpc.stream_stream_rpc_method_handler(
            _streaming_response(method, handler.stream_stream), **codec
        )
