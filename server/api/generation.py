"""GenerationService: generate (unary and streaming) and describe the model."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc

from memserve.api.context import tenant_of
from memserve.api.convert import (
    FINISH_REASONS,
    generation_request_from_pb,
    memory_refs_from_pb,
    token_to_pb,
    usage_to_pb,
)
from memserve.engine.requests import Event, FailedEvent, FinishedEvent, GenerationRequest, TokenEvent
from memserve.engine.scheduler import Engine
from memserve.errors import InvalidArgument
from memserve.memory.registry import registered_kinds
from memserve.memory.runtime import StoreRuntime
from memserve.models import LoadedModel
from memserve.v1 import generation_pb2 as pb
from memserve.v1 import generation_pb2_grpc

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
                    request_id or "-",
                    event.prompt_tokens,
                    event.generated_tokens,
                    event.reason.value,
                    first_token,
                    time.perf_counter() - started,
                )
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
            weights=self.loaded.weights,
        )
