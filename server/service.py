"""The gRPC servicers: thin edges that convert, call the engine, and convert back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from memserve.convert import (
    FINISH_REASONS,
    JOB_STATES_FROM_PB,
    generation_request_from_pb,
    job_to_pb,
    memory_info_to_pb,
    memory_refs_from_pb,
    token_to_pb,
    usage_to_pb,
)
from memserve.engine import Engine, Event, FailedEvent, FinishedEvent, GenerationRequest, TokenEvent
from memserve.errors import InvalidArgument, NotFound, ResourceExhausted
from memserve.kinds import get_kind, registered_kinds
from memserve.memory_store.artifact import (
    export_bytes,
    import_bytes,
)
from memserve.memory_store.jobs import Job
from memserve.models import LoadedModel
from memserve.names import DEFAULT_TENANT, check_name, check_tenant
from memserve.store_runtime import StoreRuntime
from memserve.v1 import generation_pb2 as pb
from memserve.v1 import generation_pb2_grpc, jobs_pb2, jobs_pb2_grpc, memory_pb2, memory_pb2_grpc

TENANT_METADATA = "memserve-tenant"

log = logging.getLogger(__name__)


async def run_on_engine(
    engine: Engine, request: GenerationRequest, request_id: str
) -> AsyncIterator[tuple[Event, int]]:
    """Submits to the engine and yields (event, seed) until the request finishes.

    Leaving early (client cancel, deadline, error) cancels the request, which
    frees its batch slot at the engine's next step.
    """
    started = time.perf_counter()
    first_token: float | None = None
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def sink(event: Event) -> None:  # called from the engine thread
        with contextlib.suppress(RuntimeError):  # raised once the loop is closed: nobody listens
            loop.call_soon_threadsafe(events.put_nowait, event)

    handle = engine.submit(request, sink)
    try:
        while True:
            event = await events.get()
            if isinstance(event, FailedEvent):
                raise event.error
            if first_token is None:
                first_token = time.perf_counter() - started
            if isinstance(event, FinishedEvent):
                log.info(
                    "request %s: %d prompt + %d generated tokens, %s; first token %.3f s, total %.3f s",
                    request_id or "-", event.prompt_tokens, event.generated_tokens, event.reason.value,
                    first_token, time.perf_counter() - started,
                )  # fmt: skip
            yield event, handle.seed
            if isinstance(event, FinishedEvent):
                return
    finally:
        handle.cancel()


class GenerationService(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, engine: Engine, loaded: LoadedModel, runtime: StoreRuntime | None) -> None:
        self.engine = engine
        self.loaded = loaded
        self.runtime = runtime

    async def _request(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> tuple[GenerationRequest, list[pb.UsedMemory]]:
        refs = memory_refs_from_pb(request.memories)
        # Tokenising a long prompt takes a while: off the event loop, so other streams flow.
        generation = await asyncio.to_thread(
            generation_request_from_pb,
            request,
            self.loaded.tokenizer,
            self.engine.config,
            self.engine.max_context_tokens,
            context.time_remaining(),
        )
        if not refs:
            return generation, []
        if self.runtime is None:
            raise InvalidArgument(
                "this server runs without a memory store: send the request without memories"
            )
        # Loading an uncached memory reads Redis and copies to the device: off the loop too.
        resolved = await self.runtime.run(self.runtime.cache.resolve, tenant_of(context), refs)
        memories = tuple(r.loaded.bind(r.ref) for r in resolved)
        used = [pb.UsedMemory(name=r.ref.name, kind=r.kind, version=r.loaded.version) for r in resolved]
        return replace(generation, memories=memories), used

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        response = pb.GenerateResponse(request_id=request.request_id)
        first = True
        async with contextlib.aclosing(self.GenerateStream(request, context)) as messages:
            async for message in messages:
                response.text += message.text
                response.tokens.extend(message.tokens)
                if first:  # the first message carries the seed and the memories
                    response.seed = message.seed
                    response.memories.extend(message.memories)
                    first = False
                if message.finish_reason:
                    response.finish_reason = message.finish_reason
                    response.usage.CopyFrom(message.usage)
        return response

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        converted, used = await self._request(request, context)
        generation = run_on_engine(self.engine, converted, request.request_id)
        async with contextlib.aclosing(generation) as events:
            first = True
            async for event, seed in events:
                message = pb.GenerateStreamResponse(request_id=request.request_id, seed=seed if first else 0)
                if first:
                    message.memories.extend(used)
                first = False
                if isinstance(event, TokenEvent):
                    message.text = event.text
                    message.tokens.append(token_to_pb(event))
                elif isinstance(event, FinishedEvent):
                    message.text = event.text
                    message.finish_reason = FINISH_REASONS[event.reason]
                    message.usage.CopyFrom(usage_to_pb(event))
                yield message

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        config = self.loaded.model.config
        return pb.ModelInfo(
            model=self.loaded.name,
            architecture=(config.architectures or [type(self.loaded.model).__name__])[0],
            fingerprint=self.loaded.fingerprint,
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
            max_context_tokens=self.engine.max_context_tokens,
            default_max_new_tokens=self.engine.config.default_max_new_tokens,
            max_new_tokens_limit=self.engine.config.max_new_tokens_limit,
            dtype=self.loaded.dtype,
            device=str(self.loaded.device),
            max_batch_size=self.engine.config.max_batch_size,
            max_queue_size=self.engine.config.max_queue_size,
            memory_kinds=registered_kinds() if self.runtime is not None else [],
        )


def tenant_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's tenant: the `memserve-tenant` metadata, else the default tenant."""
    for key, value in context.invocation_metadata() or ():
        if key == TENANT_METADATA:
            return check_tenant(value if isinstance(value, str) else value.decode())
    return DEFAULT_TENANT


EXPORT_CHUNK_BYTES = 1 << 20


def _as_dict(message: Any) -> dict[str, Any]:
    """A request as the JSON-able spec a kind validates (proto field names, ints as ints)."""
    return MessageToDict(message, preserving_proto_field_name=True)


MAX_CONCURRENT_UPLOADS = 2


class MemoryService(memory_pb2_grpc.MemoryServiceServicer):
    def __init__(self, runtime: StoreRuntime) -> None:
        self.runtime = runtime
        # An upload is held in memory while it is checked: a few at a time.
        self._uploads = asyncio.Semaphore(MAX_CONCURRENT_UPLOADS)

    async def _submit(self, context: Any, kind_name: str, memory_name: str, spec: dict[str, Any]) -> Any:
        check_name(memory_name)
        kind = get_kind(kind_name)  # INVALID_ARGUMENT for a kind this server does not know
        spec = kind.validate_spec(spec)
        job = await self.runtime.run(
            self.runtime.queue.submit, kind_name, memory_name, spec, tenant=tenant_of(context)
        )
        return job_to_pb(job)

    async def RegisterDocuments(self, request: memory_pb2.RegisterDocumentsRequest, context: Any) -> Any:
        return await self._submit(context, "document", request.bank, _as_dict(request))

    async def RegisterFacts(self, request: memory_pb2.RegisterFactsRequest, context: Any) -> Any:
        return await self._submit(context, "local", request.set, _as_dict(request))

    async def RegisterAdapter(self, request: memory_pb2.RegisterAdapterRequest, context: Any) -> Any:
        return await self._submit(context, "adapter", request.name, _as_dict(request))

    async def PutMemory(self, request_iterator: AsyncIterator[memory_pb2.MemoryChunk], context: Any) -> Any:
        """Imports an export file as a new version (of the name in the first chunk, else the file's)."""
        tenant = tenant_of(context)
        name = ""
        data = bytearray()
        if self._uploads.locked():
            raise ResourceExhausted(f"{MAX_CONCURRENT_UPLOADS} uploads are already running: retry shortly")
        async with self._uploads:
            async for chunk in request_iterator:
                name = name or chunk.name
                data += chunk.data
                if len(data) > self.runtime.config.max_upload_bytes:
                    raise ResourceExhausted(
                        f"the upload is larger than the {self.runtime.config.max_upload_bytes} bytes allowed"
                    )
            if not data:
                raise InvalidArgument("PutMemory received no data: send the export file in chunks")
            artifact = await self.runtime.run(import_bytes, bytes(data))
            del data
        get_kind(artifact.meta.kind)  # a kind this server can serve
        meta = replace(artifact.meta, name=check_name(name or artifact.meta.name), tenant=tenant, version=0)
        published = await self.runtime.run(self.runtime.store.publish, meta, artifact.tensors)
        return memory_info_to_pb(published, await self.runtime.run(self._versions, published.name, tenant))

    def _versions(self, name: str, tenant: str) -> list[int]:
        return self.runtime.store.versions(name, tenant=tenant)

    async def GetMemory(self, request: memory_pb2.GetMemoryRequest, context: Any) -> Any:
        tenant = tenant_of(context)
        check_name(request.name)
        meta = await self.runtime.run(self.runtime.store.meta, request.name, request.version, tenant=tenant)
        return memory_info_to_pb(meta, await self.runtime.run(self._versions, request.name, tenant))

    async def ListMemories(self, request: memory_pb2.ListMemoriesRequest, context: Any) -> Any:
        page = await self.runtime.run(
            self.runtime.store.list,
            tenant=tenant_of(context),
            kind=request.kind,
            name_prefix=request.name_prefix,
            page_size=min(request.page_size or 100, 1000),
            page_token=request.page_token,
        )
        return memory_pb2.ListMemoriesResponse(
            memories=[memory_info_to_pb(meta) for meta in page.memories], next_page_token=page.next_token
        )

    async def DeleteMemory(self, request: memory_pb2.DeleteMemoryRequest, context: Any) -> Any:
        check_name(request.name)
        deleted = await self.runtime.run(
            self.runtime.store.delete, request.name, request.version, tenant=tenant_of(context)
        )
        return memory_pb2.DeleteMemoryResponse(deleted_versions=deleted)

    async def ExportMemory(self, request: memory_pb2.ExportMemoryRequest, context: Any) -> AsyncIterator[Any]:
        check_name(request.name)
        store = self.runtime.store
        artifact = await self.runtime.run(
            store.load, request.name, request.version, tenant=tenant_of(context)
        )
        data = await self.runtime.run(export_bytes, artifact)
        for offset in range(0, len(data), EXPORT_CHUNK_BYTES):
            name = artifact.meta.name if offset == 0 else ""
            yield memory_pb2.MemoryChunk(name=name, data=data[offset : offset + EXPORT_CHUNK_BYTES])


class JobService(jobs_pb2_grpc.JobServiceServicer):
    # A watch re-reads the job at least this often, in case an event was lost.
    WATCH_POLL_SECONDS = 2.0

    def __init__(self, runtime: StoreRuntime) -> None:
        self.runtime = runtime

    async def _job(self, job_id: str, context: Any) -> Job:
        job = await self.runtime.run(self.runtime.queue.get, job_id)
        if job.tenant != tenant_of(context):  # another tenant's job does not exist for this caller
            raise NotFound(f"job {job_id!r} does not exist (or has expired)")
        return job

    async def GetJob(self, request: jobs_pb2.GetJobRequest, context: Any) -> Any:
        return job_to_pb(await self._job(request.job_id, context))

    async def WatchJob(self, request: jobs_pb2.WatchJobRequest, context: Any) -> AsyncIterator[Any]:
        last: jobs_pb2.Job | None = None
        with self.runtime.watchers.watching(request.job_id) as changed:
            while True:
                changed.clear()
                job = await self._job(request.job_id, context)
                message = job_to_pb(job)
                if message != last:
                    yield message
                    last = message
                if job.state.final:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), self.WATCH_POLL_SECONDS)

    async def CancelJob(self, request: jobs_pb2.CancelJobRequest, context: Any) -> Any:
        await self._job(request.job_id, context)
        return job_to_pb(await self.runtime.run(self.runtime.queue.cancel, request.job_id))

    async def ListJobs(self, request: jobs_pb2.ListJobsRequest, context: Any) -> Any:
        jobs, token = await self.runtime.run(
            self.runtime.queue.list,
            state=JOB_STATES_FROM_PB.get(request.state),
            kind=request.kind,
            tenant=tenant_of(context),
            page_size=min(request.page_size or 50, 1000),
            page_token=request.page_token,
        )
        return jobs_pb2.ListJobsResponse(jobs=[job_to_pb(j) for j in jobs], next_page_token=token)

    async def SubmitJob(self, request: jobs_pb2.SubmitJobRequest, context: Any) -> Any:
        check_name(request.memory_name)
        kind = get_kind(request.kind)
        spec = kind.validate_spec(MessageToDict(request.spec))
        job = await self.runtime.run(
            self.runtime.queue.submit, request.kind, request.memory_name, spec, tenant=tenant_of(context)
        )
        return job_to_pb(job)
