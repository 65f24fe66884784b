"""Many prompts through the engine at once, for evaluations and benchmarks (no RPC in between)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from memserve.engine.requests import (
    Event,
    FailedEvent,
    FinishedEvent,
    GenerationRequest,
    StoppingParams,
    TokenEvent,
)
from memserve.engine.scheduler import Engine
from memserve.memory.kind import RowMemory


def generate_all(
    engine: Engine, prompts: Sequence[list[int]], memories: tuple[RowMemory, ...], max_new_tokens: int
) -> list[list[int]]:
    """Greedy continuations of `prompts` through the engine (all submitted at once, batched)."""
    return generate_each(engine, [(prompt, memories) for prompt in prompts], max_new_tokens)


def generate_each(
    engine: Engine, requests: Sequence[tuple[list[int], tuple[RowMemory, ...]]], max_new_tokens: int
) -> list[list[int]]:
    """Greedy continuations of (prompt, its memories) pairs, all submitted at once and batched."""
    results: list[list[int]] = [[] for _ in requests]
    errors: list[BaseException] = []
    done = threading.Semaphore(0)

    def sink_for(index: int) -> Callable[[Event], None]:
        def sink(event: Event) -> None:
            if isinstance(event, TokenEvent):
                results[index].append(event.token_id)
            elif isinstance(event, FailedEvent):
                errors.append(event.error)
                done.release()
            elif isinstance(event, FinishedEvent):
                done.release()

        return sink

    stopping = StoppingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    pending = list(enumerate(requests))
    in_flight = 0
    while pending or in_flight:
        # Fill the queue up to its bound, then wait for one request to finish.
        while pending and in_flight < engine.config.max_queue_size:
            index, (prompt, memories) = pending.pop(0)
            engine.submit(
                GenerationRequest(tuple(prompt), stopping=stopping, memories=memories), sink_for(index)
            )
            in_flight += 1
        done.acquire()
        in_flight -= 1
        if errors:
            raise errors[0]
    return results
