"""From a forward's logits to each row's next token, streamed to the row's sink.

Apart from the scheduler, which decides which rows run and when: this decides, per row, which
token comes next (greedy or sampled with the row's own parameters and generator), whether the
request ends with it (EOS, length, context, stop sequence), and which events say so.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memserve.engine.requests import FailedEvent, FinishedEvent, FinishReason, Row, TokenEvent
from memserve.engine.sampling import Choice, choose
from memserve.errors import MemserveError
from memserve.memory.hooks import TraceRecord

log = logging.getLogger(__name__)


class TokenObserver(Protocol):
    def token(self, first: bool, seconds: float) -> None:
        """A token streamed: the time since submission (the first) or since the row's last token."""


class TokenEmitter:
    """Chooses and streams one token per row; a row whose sampling fails fails alone."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: frozenset[int],
        max_context_tokens: int,
        observer: TokenObserver | None,
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_context_tokens = max_context_tokens
        self.observer = observer

    def sample_and_emit(
        self, rows: list[Row], logits: torch.Tensor, trace: dict[int, list[TraceRecord]]
    ) -> list[Row]:
        """Samples one token per row from `logits` (B, V), streams it, and returns the rows
        that go on."""
        greedy = logits.argmax(-1).tolist()
        survivors = []
        for i, row in enumerate(rows):
            req = row.request
            try:
                if req.sampling.greedy and row.seen is None and not (req.logprobs or req.top_logprobs):
                    choice = Choice(greedy[i], None, [])
                else:
                    choice = choose(
                        logits[i], req.sampling, row.generator, row.seen, req.logprobs, req.top_logprobs
                    )
            except Exception as exc:
                log.exception("sampling failed for one request")
                row.sink(FailedEvent(MemserveError(f"sampling the next token failed: {exc!r}")))
                continue
            if self.emit(row, choice, tuple(trace.get(i, ()))):
                survivors.append(row)
        return survivors

    def emit(self, row: Row, choice: Choice, trace: tuple[TraceRecord, ...]) -> bool:
        """Streams one chosen token; returns whether the request goes on."""
        token = choice.token
        reason = row.append(token, self.eos_ids, self.max_context_tokens)
        if self.observer is not None:
            now = time.monotonic()
            self.observer.token(row.last_token is None, now - (row.last_token or row.submitted))
            row.last_token = now
        is_eos = reason is FinishReason.EOS
        row.sink(
            TokenEvent(
                token_id=token,
                token_text="" if is_eos else self.tokenizer.decode([token]),
                text="" if is_eos else row.text.push(token),
                logprob=choice.logprob,
                top_logprobs=[(t, self.tokenizer.decode([t]), lp) for t, lp in choice.top],
                trace=trace,
            )
        )
        if reason is None and not row.text.stopped:
            return True
        tail = row.text.finish()
        # A stop sequence decides, even when it completes on the last allowed token.
        final = FinishReason.STOP_SEQUENCE if row.text.stopped or reason is None else reason
        row.sink(FinishedEvent(final, tail, len(row.request.prompt_ids), len(row.generated)))
        return False


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Every token that ends a generation: the model's generation config's and the tokenizer's."""
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
