"""A request's life in the engine: what a caller submits, the handle it gets back, the engine's
own state for the request (`Row`), and the events streamed to the caller's sink.

Apart from the scheduler so that the callers (servicers, evaluations, benchmarks) read the
types they use without the batching machinery.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from memserve.engine.detokenize import IncrementalText
from memserve.engine.sampling import SamplingParams
from memserve.errors import MemserveError
from memserve.memory.hooks import TraceRecord
from memserve.memory.kind import RowMemory


class FinishReason(StrEnum):
    LENGTH = "length"
    EOS = "eos"
    STOP_SEQUENCE = "stop_sequence"
    CONTEXT_LENGTH = "context_length"


@dataclass(frozen=True)
class StoppingParams:
    max_new_tokens: int = 64
    stop_sequences: tuple[str, ...] = ()
    include_stop_sequence: bool = False
    ignore_eos: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stopping: StoppingParams = field(default_factory=StoppingParams)
    logprobs: bool = False
    top_logprobs: int = 0
    memories: tuple[RowMemory, ...] = ()
    trace: bool = False
    """Report, with each token, which memories acted on the position that produced it."""
    deadline: float | None = None
    """time.monotonic() after which the request fails with DEADLINE_EXCEEDED."""


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    token_text: str
    text: str
    """Text released by this token (may be empty while held back)."""
    logprob: float | None = None
    top_logprobs: list[tuple[int, str, float]] = field(default_factory=list)
    trace: tuple[TraceRecord, ...] = ()


@dataclass(frozen=True)
class FinishedEvent:
    reason: FinishReason
    text: str
    """The last held-back text, released now."""
    prompt_tokens: int
    generated_tokens: int


@dataclass(frozen=True)
class FailedEvent:
    error: MemserveError


Event = TokenEvent | FinishedEvent | FailedEvent
Sink = Callable[[Event], None]


class RequestHandle:
    """Lets the caller cancel a submitted request; the engine frees its slot at the next step."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        """The request's seed: the one it asked for, or one drawn for it."""
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Row:
    """One request inside the engine: its sink, seeded generator, text and tokens so far."""

    def __init__(
        self, request: GenerationRequest, sink: Sink, tokenizer: PreTrainedTokenizerBase, device: torch.device
    ) -> None:
        self.request = request
        self.sink = sink
        seed = request.sampling.seed if request.sampling.seed is not None else secrets.randbits(63)
        self.handle = RequestHandle(seed)
        self.generator: torch.Generator | None = None
        if not request.sampling.greedy:
            self.generator = torch.Generator(device=device).manual_seed(seed)
        self.text = IncrementalText(
            tokenizer,
            request.prompt_ids,
            request.stopping.stop_sequences,
            request.stopping.include_stop_sequence,
        )
        self.generated: list[int] = []
        # What memories remember of this row's earlier forwards (MemoryContext.row_states).
        self.memory_state: dict[Any, Any] = {}
        self.submitted = time.monotonic()
        self.last_token: float | None = None
        # Tokens the repetition penalty looks at: the prompt and the output so far.
        self.seen: torch.Tensor | None = None
        if request.sampling.repetition_penalty != 1.0:
            self.seen = torch.tensor(sorted(set(request.prompt_ids)), dtype=torch.long, device=device)

    def append(self, token: int, eos_ids: frozenset[int], max_context_tokens: int) -> FinishReason | None:
        """Adds a generated token (to the output, and to what the repetition penalty sees);
        returns why the request ends with it, if it does."""
        self.generated.append(token)
        if self.seen is not None:
            self.seen = torch.cat([self.seen, self.seen.new_tensor([token])])
        stopping = self.request.stopping
        if token in eos_ids and not stopping.ignore_eos:
            return FinishReason.EOS
        if len(self.generated) >= stopping.max_new_tokens:
            return FinishReason.LENGTH
        if len(self.request.prompt_ids) + len(self.generated) >= max_context_tokens:
            return FinishReason.CONTEXT_LENGTH
        return None
