"""The HTTP front: OpenAI's API with memories, health, and the memory and job services as JSON.

It runs in the gRPC server's process and event loop, on the same engine: each route calls the
same servicer methods a gRPC call reaches (through `HttpContext`, which gives them the headers as
gRPC metadata), so validation, tenants, tokens and errors are the same on both protocols.

    POST /v1/completions, /v1/chat/completions      OpenAI's, with `stream` as server-sent events
    GET  /v1/models                                 the served model, then the adapters
    GET  /health, /ready                            liveness and readiness
    /v1/memories…, /v1/jobs…                        the memory and job RPCs (see MANAGEMENT)

Errors come in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with the HTTP
status of the memserve status (400, 401, 404, 429, 503…).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from memserve.api import openai
from memserve.api.auth import BOUND_TENANT, Auth
from memserve.api.generation import GenerationService
from memserve.errors import InvalidArgument, MemserveError, NotFound, ResourceExhausted, Unavailable
from memserve.metrics import REQUEST_DURATION, REQUESTS
from memserve.v1 import generation_pb2 as pb
from memserve.v1 import jobs_pb2, memory_pb2

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 << 20
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# OpenAI's error types, by HTTP status; the gRPC status name goes in `code`.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
}


class HttpContext:
    """What a servicer reads of its gRPC context, made from an HTTP request."""

    def __init__(self, request: Request) -> None:
        self._metadata = tuple((key.lower(), value) for key, value in request.headers.items())

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None


def error_json(exc: MemserveError) -> tuple[int, dict[str, Any]]:
    status = HTTP_STATUS.get(exc.code, 500)
    kind = ERROR_TYPES.get(status, "server_error")
    code = exc.code.name.lower()
    return status, {"error": {"message": exc.message, "type": kind, "param": None, "code": code}}


def _failure(name: str, exc: BaseException) -> MemserveError:
    """The memserve error a route's exception stands for; unexpected ones are logged."""
    if isinstance(exc, MemserveError):
        if exc.code is grpc.StatusCode.INTERNAL:
            log.error("%s failed: %s", name, exc)
        return exc
    log.exception("%s failed unexpectedly", name, exc_info=exc)
    return MemserveError(f"internal error: {exc!r}")


class Draining:
    """Set when the server begins to shut down: new HTTP requests get 503 from then on."""

    def __init__(self) -> None:
        self.on = False


Handler = Callable[[Request], Awaitable[Response]]


ROUTE_RPCS = {"Completions": "Generate", "ChatCompletions": "Generate", "ListModels": "GetModelInfo"}
"""The RPC whose rules (token, scope) an OpenAI route follows."""


def endpoint(name: str, draining: Draining, auth: Auth | None = None) -> Callable[[Handler], Handler]:
    """A route's errors as OpenAI-shaped JSON, its status in the request metrics under `name` (the
    RPC it stands for, or the OpenAI route), and, with `auth`, the token and the tenant it binds
    the request to, by the RPC's rules."""

    def wrap(handler: Handler) -> Handler:
        async def route(request: Request) -> Response:
            started = time.perf_counter()
            code = "OK"
            bound = None
            try:
                if draining.on:
                    raise Unavailable("the server is shutting down: retry on another replica")
                if auth is not None:
                    metadata = HttpContext(request).invocation_metadata()
                    bound = BOUND_TENANT.set(auth.authorize(metadata, ROUTE_RPCS.get(name, name)))
                return await handler(request)
            except Exception as exc:
                error = _failure(name, exc)
                code = error.code.name
                status, body = error_json(error)
                headers = None
                if isinstance(error, ResourceExhausted) and error.retry_after is not None:
                    headers = {"Retry-After": str(math.ceil(error.retry_after))}  # whole seconds
                return JSONResponse(body, status_code=status, headers=headers)
            finally:
                REQUESTS.labels(name, code).inc()
                REQUEST_DURATION.labels(name).observe(time.perf_counter() - started)
                if bound is not None:
                    BOUND_TENANT.reset(bound)

        return route

    return wrap


async def json_body(request: Request) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise InvalidArgument(f"the body is larger than {MAX_BODY_BYTES} bytes")
    raw = bytearray()
    async for part in request.stream():
        raw += part
        if len(raw) > MAX_BODY_BYTES:
            raise InvalidArgument(f"the body is larger than {MAX_BODY_BYTES} bytes")
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"the body is not valid JSON: {exc}") from None


def sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


DONE = b"data: [DONE]\n\n"


async def _started(stream: AsyncIterator[Any]) -> tuple[Any, AsyncIterator[Any]]:
    """The stream's first item, so that a request that fails before its first token (bad input,
    unknown memory, full queue) answers with a status rather than a broken event stream."""
    try:
        first = await anext(stream)
    except BaseException:
        await stream.aclose()  # type: ignore[attr-defined]
        raise
    return first, stream


def event_stream(
    name: str,
    first: Any,
    rest: AsyncIterator[Any],
    to_json: Callable[[Any, bool], list[dict[str, Any]]],
    done: bool,
) -> StreamingResponse:
    """Server-sent events: each message's JSON, then `data: [DONE]` when `done`. An error after the
    first event is sent as an event with OpenAI's error object (the SDK raises it)."""

    async def events() -> AsyncIterator[bytes]:
        async with contextlib.aclosing(rest):  # type: ignore[type-var]
            try:
                for data in to_json(first, True):
                    yield sse(data)
                async for message in rest:
                    for data in to_json(message, False):
                        yield sse(data)
            except Exception as exc:
                yield sse(error_json(_failure(name, exc))[1])
        if done:
            yield DONE

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


@dataclass
class OpenAIRoutes:
    generation: GenerationService
    memories: Any | None
    draining: Draining

    @property
    def model_name(self) -> str:
        return self.generation.loaded.name

    async def completions(self, request: Request, chat: bool) -> Response:
        body = await json_body(request)
        call = openai.call_from_body(body, chat=chat, served_model=self.model_name)
        context = HttpContext(request)
        name = "ChatCompletions" if chat else "Completions"
        if not call.stream:
            response = await self.generation.Generate(call.request, context)  # type: ignore[arg-type]
            return JSONResponse(openai.response_json(call, response))
        stream = self.generation.GenerateStream(call.request, context)  # type: ignore[arg-type]
        first, rest = await _started(stream)

        def to_json(message: pb.GenerateStreamResponse, is_first: bool) -> list[dict[str, Any]]:
            chunks = [openai.chunk_json(call, message, is_first)]
            if message.finish_reason and call.include_usage:
                chunks.append(openai.usage_chunk_json(call, message.usage))
            return chunks

        return event_stream(name, first, rest, to_json, done=True)

    async def models(self, request: Request) -> Response:
        """The served model, then the adapters this tenant may name as `model` (as LoRAX lists
        them); any keyless memory may be named, adapters are the ones listed."""
        created = int(time.time())
        models = [{"id": self.model_name, "object": "model", "created": created, "owned_by": "memserve"}]
        if self.memories is not None:
            listing = memory_pb2.ListMemoriesRequest(kind="adapter", page_size=1000)
            page = await self.memories.ListMemories(listing, HttpContext(request))
            for memory in page.memories:
                models.append(
                    {
                        "id": memory.name,
                        "object": "model",
                        "created": memory.created_at.seconds,
                        "owned_by": memory.tenant,
                        "parent": self.model_name,
                        "root": self.model_name,
                    }
                )
        return JSONResponse({"object": "list", "data": models})


@dataclass(frozen=True)
class Rpc:
    """One gRPC method served as JSON: its route, the request message, where its fields come
    from (path parameters always; then the JSON body, or the query string)."""

    method: str
    path: str
    service: str
    rpc: str
    request_type: type[Message]
    body: bool = False
    stream: bool = False


RegisterDocuments = memory_pb2.RegisterDocumentsRequest
RegisterAdapter = memory_pb2.RegisterAdapterRequest
MANAGEMENT = (
    Rpc("POST", "/v1/memories/documents", "memories", "RegisterDocuments", RegisterDocuments, True),
    Rpc("POST", "/v1/memories/facts", "memories", "RegisterFacts", memory_pb2.RegisterFactsRequest, True),
    Rpc("POST", "/v1/memories/adapters", "memories", "RegisterAdapter", RegisterAdapter, True),
    Rpc("GET", "/v1/memories", "memories", "ListMemories", memory_pb2.ListMemoriesRequest),
    Rpc("GET", "/v1/memories/{name}", "memories", "GetMemory", memory_pb2.GetMemoryRequest),
    Rpc("DELETE", "/v1/memories/{name}", "memories", "DeleteMemory", memory_pb2.DeleteMemoryRequest),
    Rpc("POST", "/v1/jobs", "jobs", "SubmitJob", jobs_pb2.SubmitJobRequest, True),
    Rpc("GET", "/v1/jobs", "jobs", "ListJobs", jobs_pb2.ListJobsRequest),
    Rpc("GET", "/v1/jobs/{job_id}", "jobs", "GetJob", jobs_pb2.GetJobRequest),
    Rpc("POST", "/v1/jobs/{job_id}/cancel", "jobs", "CancelJob", jobs_pb2.CancelJobRequest),
    Rpc("GET", "/v1/jobs/{job_id}/watch", "jobs", "WatchJob", jobs_pb2.WatchJobRequest, stream=True),
)
"""Artifact upload and export (PutMemory, ExportMemory) and evaluations stay on gRPC: they move
megabytes in chunks, or stream reports, which gRPC's client already does well."""


def to_json(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


async def rpc_request(rpc: Rpc, request: Request) -> Message:
    """The RPC's request message from the path, and the body or the query string, in protobuf's
    JSON mapping (field names as in the .proto; unknown fields are refused)."""
    fields: dict[str, Any] = {}
    if rpc.body:
        fields = await json_body(request)
        if not isinstance(fields, dict):
            raise InvalidArgument(f"the body must be a JSON object, got {openai.json_type(fields)}")
    else:
        fields = dict(request.query_params)
    fields.update(request.path_params)
    message = rpc.request_type()
    try:
        json_format.ParseDict(fields, message)
    except json_format.ParseError as exc:
        raise InvalidArgument(f"{rpc.rpc}: {exc}") from None
    return message


def management_route(rpc: Rpc, servicer: Any, auth: Auth | None, draining: Draining) -> Route:
    behaviour = getattr(servicer, rpc.rpc)

    @endpoint(rpc.rpc, draining, auth)
    async def route(request: Request) -> Response:
        context = HttpContext(request)
        message = await rpc_request(rpc, request)
        if not rpc.stream:
            return JSONResponse(to_json(await behaviour(message, context)))
        first, rest = await _started(behaviour(message, context))
        return event_stream(rpc.rpc, first, rest, lambda m, _: [to_json(m)], done=False)

    return Route(rpc.path, route, methods=[rpc.method])


def build_app(
    generation: GenerationService,
    services: dict[str, Any],
    auth: Auth | None,
    ready: Callable[[], bool],
    draining: Draining,
) -> Starlette:
    """The ASGI app. `services` holds the memory and job servicers ("memories", "jobs"), absent
    on a server without a store; `ready` says whether the engine can serve."""
    openai_routes = OpenAIRoutes(generation, services.get("memories"), draining)

    @endpoint("Completions", draining, auth)
    async def completions(request: Request) -> Response:
        return await openai_routes.completions(request, chat=False)

    @endpoint("ChatCompletions", draining, auth)
    async def chat_completions(request: Request) -> Response:
        return await openai_routes.completions(request, chat=True)

    @endpoint("ListModels", draining, auth)
    async def models(request: Request) -> Response:
        return await openai_routes.models(request)

    async def health(request: Request) -> Response:
        alive = generation.engine.alive
        status = {"status": "ok" if alive else "engine stopped"}
        return JSONResponse(status, status_code=200 if alive else 503)

    async def readiness(request: Request) -> Response:
        if draining.on:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if not ready():
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ready", "model": generation.loaded.name})

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", readiness, methods=["GET"]),
    ]
    for rpc in MANAGEMENT:
        servicer = services.get(rpc.service)
        if servicer is not None:
            routes.append(management_route(rpc, servicer, auth, draining))
        else:
            routes.append(Route(rpc.path, _no_store(rpc.rpc, draining), methods=[rpc.method]))
    app = Starlette(routes=routes)
    app.add_exception_handler(404, _not_found)
    app.add_exception_handler(405, _not_allowed)
    return app


def _no_store(name: str, draining: Draining) -> Handler:
    @endpoint(name, draining)
    async def route(request: Request) -> Response:
        raise NotFound(f"{name}: this server runs without a memory store")

    return route


async def _not_found(request: Request, exc: Exception) -> Response:
    error = NotFound(f"no route {request.method} {request.url.path}: see docs/http.md for the routes")
    _, body = error_json(error)
    return JSONResponse(body, status_code=404)


async def _not_allowed(request: Request, exc: Exception) -> Response:
    error = InvalidArgument(f"{request.url.path} does not take {request.method}")
    return JSONResponse(error_json(error)[1], status_code=405)


async def wait_started(server: Any, task: asyncio.Task[Any]) -> None:
    """Waits until uvicorn listens (or its task ends, which raises its error)."""
    while not server.started:
        if task.done():
            task.result()
            raise OSError("the HTTP server stopped before it started")
        await asyncio.sleep(0.01)
