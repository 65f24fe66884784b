"""Typed Python clients for a memserve server: `Client` (blocking) and `AsyncClient` (asyncio).

    from memserve.clients import Client
    with Client() as client:                       # localhost:50051 or $MEMSERVE_SERVER
        print(client.generate("The capital of France is", max_new_tokens=8).text)
        for chunk in client.generate_stream("Once upon a time", temperature=0.8, seed=1):
            print(chunk.text, end="", flush=True)

Errors arrive as `grpc.RpcError` with the server's status code and message.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from memserve.v1 import generation_pb2 as pb
from memserve.v1 import generation_pb2_grpc

DEFAULT_SERVER = "localhost:50051"


def default_server() -> str:
    return os.environ.get("MEMSERVE_SERVER", DEFAULT_SERVER)


@dataclass(frozen=True)
class TokenInfo:
    id: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: list[TokenInfo]
    finish_reason: str
    """length | eos | stop_sequence | context_length"""
    prompt_tokens: int
    generated_tokens: int
    seed: int


@dataclass(frozen=True)
class Chunk:
    text: str
    tokens: list[TokenInfo]
    finish_reason: str | None
    """Set on the last chunk only."""
    seed: int | None
    """Set on the first chunk only."""
    prompt_tokens: int = 0
    """Set on the last chunk only."""
    generated_tokens: int = 0
    """Set on the last chunk only."""


def build_request(
    prompt: str,
    *,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    include_stop_sequence: bool = False,
    ignore_eos: bool = False,
    logprobs: bool = False,
    top_logprobs: int = 0,
    request_id: str = "",
    chat: bool = False,
) -> pb.GenerateRequest:
    """Builds a GenerateRequest; None leaves a value to the server's default.

    `chat=True` sends the prompt as a user message through the model's chat template.
    """
    request = pb.GenerateRequest(prompt=prompt, request_id=request_id, chat=chat)
    request.sampling.temperature = temperature
    request.sampling.top_k = top_k
    for name, value in (("top_p", top_p), ("repetition_penalty", repetition_penalty), ("seed", seed)):
        if value is not None:
            setattr(request.sampling, name, value)
    if max_new_tokens is not None:
        request.stopping.max_new_tokens = max_new_tokens
    request.stopping.stop_sequences.extend(stop)
    request.stopping.include_stop_sequence = include_stop_sequence
    request.stopping.ignore_eos = ignore_eos
    request.response.logprobs = logprobs
    request.response.top_logprobs = top_logprobs
    return request


def _finish_reason(value: int) -> str | None:
    if value == pb.FINISH_REASON_UNSPECIFIED:
        return None
    return pb.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


def _tokens(tokens: Any) -> list[TokenInfo]:
    return [
        TokenInfo(
            id=t.id,
            text=t.text,
            logprob=t.logprob if t.HasField("logprob") else None,
            top_logprobs=[(a.token_id, a.text, a.logprob) for a in t.top_logprobs],
        )
        for t in tokens
    ]


def _completion(response: pb.GenerateResponse) -> Completion:
    return Completion(
        text=response.text,
        tokens=_tokens(response.tokens),
        finish_reason=_finish_reason(response.finish_reason) or "",
        prompt_tokens=response.usage.prompt_tokens,
        generated_tokens=response.usage.generated_tokens,
        seed=response.seed,
    )


def _chunk(response: pb.GenerateStreamResponse, first: bool) -> Chunk:
    return Chunk(
        text=response.text,
        tokens=_tokens(response.tokens),
        finish_reason=_finish_reason(response.finish_reason),
        seed=response.seed if first else None,
        prompt_tokens=response.usage.prompt_tokens,
        generated_tokens=response.usage.generated_tokens,
    )


class Client:
    """Blocking client. Keyword arguments of `generate` are those of `build_request`."""

    def __init__(self, address: str | None = None, timeout: float | None = None) -> None:
        self.address = address or default_server()
        self.timeout = timeout
        self._channel = grpc.insecure_channel(self.address)
        self._stub = generation_pb2_grpc.GenerationServiceStub(self._channel)

    def generate(self, prompt: str, **options: Any) -> Completion:
        return _completion(self._stub.Generate(build_request(prompt, **options), timeout=self.timeout))

    def generate_stream(self, prompt: str, **options: Any) -> Iterator[Chunk]:
        call = self._stub.GenerateStream(build_request(prompt, **options), timeout=self.timeout)
        try:
            for index, response in enumerate(call):
                yield _chunk(response, index == 0)
        finally:
            call.cancel()  # a consumer that stops early frees the server's slot

    def model_info(self) -> pb.ModelInfo:
        return self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client, same methods as `Client`, awaited."""

    def __init__(self, address: str | None = None, timeout: float | None = None) -> None:
        self.address = address or default_server()
        self.timeout = timeout
        self._channel = grpc.aio.insecure_channel(self.address)
        self._stub = generation_pb2_grpc.GenerationServiceStub(self._channel)

    async def generate(self, prompt: str, **options: Any) -> Completion:
        return _completion(await self._stub.Generate(build_request(prompt, **options), timeout=self.timeout))

    async def generate_stream(self, prompt: str, **options: Any) -> AsyncIterator[Chunk]:
        call = self._stub.GenerateStream(build_request(prompt, **options), timeout=self.timeout)
        try:
            index = 0
            async for response in call:
                yield _chunk(response, index == 0)
                index += 1
        finally:
            call.cancel()

    async def model_info(self) -> pb.ModelInfo:
        return await self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
