"""The engine: one scheduler thread owns the model and decodes every request in one batch.

Continuous batching: a request joins between two decode steps (its prompt is
prefilled in a forward of its own, then its KV cache is merged into the batch),
and leaves as soon as it finishes, is cancelled or passes its deadline.

Rows are left-padded to a common KV length; the attention mask hides the
padding and each row carries its own position ids, so a row's output does not
depend on its neighbours. Each row samples with its own parameters and its own
seeded generator.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from memserve.engine.batch import Batch
from memserve.engine.emit import TokenEmitter, TokenObserver, eos_token_ids
from memserve.engine.kv_cache import new_cache
from memserve.engine.memories import hooks_or_none, memory_context, rows_to_blame, sentence_end_table
from memserve.engine.requests import FailedEvent, GenerationRequest, RequestHandle, Row, Sink
from memserve.engine.threads import use_compute_threads
from memserve.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MemoryHookError,
    MemserveError,
    ResourceExhausted,
    Unavailable,
)
from memserve.memory.hooks import MemoryHooks, TraceRecord
from memserve.packed import packed_weights
from memserve.padding import left_padded_positions, pad_rows

log = logging.getLogger(__name__)


class EngineObserver(TokenObserver, Protocol):
    """What the metrics layer hears from the engine thread (memserve.metrics.EngineMetrics)."""

    def step(self, batch_size: int, queue_depth: int, running: int) -> None:
        """After each engine step: the rows it decoded, the queue and the running batch."""

    def prefill(self, prompt_tokens: int) -> None:
        """Prompt tokens prefilled (padding not counted)."""


# EngineConfig's fields that must be at least 1.
POSITIVE_LIMITS = (
    "max_batch_size",
    "max_queue_size",
    "default_max_new_tokens",
    "max_context_tokens",
    "max_prefill_tokens",
)


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 16
    """Requests decoded together at most; more wait in the queue."""
    max_queue_size: int = 64
    """Requests waiting for a batch slot at most; more get RESOURCE_EXHAUSTED."""
    default_max_new_tokens: int = 128
    max_new_tokens_limit: int = 2048
    max_context_tokens: int = 8192
    """Prompt + output tokens of one request at most (capped by the model's own window)."""
    max_prefill_tokens: int = 4096
    """Padded prompt tokens prefilled in one forward at most (a longer single prompt goes
    alone): bounds the pause that joining requests impose on running ones, and the memory."""
    threads: int = 0
    """Intra-op CPU threads of the engine thread; 0 = $MEMSERVE_THREADS or every usable CPU."""

    def __post_init__(self) -> None:
        for name in POSITIVE_LIMITS:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = every usable CPU), got {self.threads}")
        if not 1 <= self.default_max_new_tokens <= self.max_new_tokens_limit:
            raise ValueError(
                f"default_max_new_tokens ({self.default_max_new_tokens}) must be in "
                f"[1, max_new_tokens_limit={self.max_new_tokens_limit}]"
            )


class Engine:
    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: EngineConfig = EngineConfig(),
        hooks: MemoryHooks | None = None,
        observer: EngineObserver | None = None,
        on_death: Callable[[], None] | None = None,
    ) -> None:
        """`observer` hears steps, prefills and tokens (the metrics layer's); `on_death` is called,
        from the engine thread, if that thread dies (e.g. to mark the server NOT_SERVING)."""
        self.model = model
        self.tokenizer = tokenizer
        self.hooks = hooks if hooks is not None else hooks_or_none(model)
        window = getattr(model.config, "max_position_embeddings", None) or config.max_context_tokens
        self.max_context_tokens = min(config.max_context_tokens, window)
        self.config = config
        self.device = next(model.parameters()).device
        eos_ids = eos_token_ids(model, tokenizer)
        self._pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids, default=0)
        )
        self._emitter = TokenEmitter(tokenizer, eos_ids, self.max_context_tokens, observer)
        self._waiting: deque[Row] = deque()
        self._lock = threading.Condition()
        self._batch: Batch[Row] = Batch(self.device)
        self._dead: BaseException | None = None
        self.on_death = on_death
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.observer = observer
        self._sentence_ends: torch.Tensor | None = None  # made at the first decode step with a memory

    # ---------------------------------------------------------------- public API

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="memserve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stops the engine thread; what is still queued or running fails with CANCELLED."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def alive(self) -> bool:
        """False once the engine thread has died: no request can be served."""
        return self._dead is None

    @property
    def running(self) -> int:
        return len(self._batch.rows)

    def validate(self, request: GenerationRequest) -> None:
        """Raises InvalidArgument when the request cannot be served as asked."""
        if request.memories and self.hooks is None:
            raise FailedPrecondition(
                f"this model ({self.model.config.model_type}) has no memory hook sites: "
                "send the request without memories, or serve a supported architecture"
            )
        if not request.prompt_ids:
            raise InvalidArgument("the prompt is empty after tokenisation: send a non-empty prompt")
        if len(request.prompt_ids) >= self.max_context_tokens:
            raise InvalidArgument(
                f"the prompt has {len(request.prompt_ids)} tokens; the context holds "
                f"{self.max_context_tokens}: shorten the prompt"
            )

    def submit(self, request: GenerationRequest, sink: Sink) -> RequestHandle:
        """Queues a request; events go to `sink` from the engine thread. Raises when full."""
        self.validate(request)
        row = Row(request, sink, self.tokenizer, self.device)
        with self._lock:
            if self._dead is not None:
                raise Unavailable(f"the engine stopped: {self._dead!r}")
            if self._stopping:
                raise Cancelled("the server is shutting down")
            if len(self._waiting) >= self.config.max_queue_size:
                # Requests cancelled while waiting do not hold their place.
                self._waiting = deque(r for r in self._waiting if not r.handle.cancelled)
            if len(self._waiting) >= self.config.max_queue_size:
                raise ResourceExhausted(
                    f"the queue is full ({self.config.max_queue_size} requests waiting): retry later"
                )
            self._waiting.append(row)
            self._lock.notify()
        return row.handle

    # ---------------------------------------------------------------- the loop

    def _loop(self) -> None:
        try:
            use_compute_threads(self.config.threads or None)  # memserve.engine.threads says why
            # Packed layers read their codes on this thread only (memserve.packed says why).
            with torch.inference_mode(), packed_weights():
                self._serve_forever()
        except BaseException as exc:  # the thread is ending: nothing in flight may wait forever
            log.exception("the engine thread died")
            self._dead = exc
            self._fail_all(Unavailable(f"the engine stopped: {exc!r}"))
            if self.on_death is not None:
                self.on_death()
            raise
        self._fail_all(Cancelled("the server shut down before the request finished"))

    def _serve_forever(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._waiting and not self._batch.rows:
                    self._lock.wait()
                if self._stopping:
                    return
                admitted = self._admit()
            try:
                self._step(admitted)
            except Exception as exc:  # a bug: fail what is in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(MemserveError(f"the engine failed: {exc!r}"), admitted)

    def _admit(self) -> list[Row]:
        """Takes waiting rows for one prefill: while batch slots and the prefill budget last.

        The budget counts padded tokens (rows × longest prompt); the first row always goes.
        """
        free = self.config.max_batch_size - len(self._batch.rows)
        admitted: list[Row] = []
        width = 0
        while self._waiting and len(admitted) < free:
            width = max(width, len(self._waiting[0].request.prompt_ids))
            if admitted and width * (len(admitted) + 1) > self.config.max_prefill_tokens:
                break
            admitted.append(self._waiting.popleft())
        return admitted

    def _step(self, admitted: list[Row]) -> None:
        admitted = self._drop_dead(admitted)
        self._batch.keep(self._drop_dead(self._batch.rows))
        if admitted:
            self._prefill(admitted)
        decoded = len(self._batch.rows)
        if decoded:
            self._decode_step()
        if self.observer is not None:
            self.observer.step(decoded, len(self._waiting), len(self._batch.rows))

    def _drop_dead(self, rows: list[Row]) -> list[Row]:
        """Removes cancelled rows and fails those past their deadline."""
        now = time.monotonic()
        alive = []
        for row in rows:
            if row.handle.cancelled:
                continue
            if row.request.deadline is not None and now > row.request.deadline:
                row.sink(FailedEvent(DeadlineExceeded("the deadline passed before generation finished")))
                continue
            alive.append(row)
        return alive

    def _prefill(self, rows: list[Row]) -> None:
        """Runs the prompts of newly admitted rows, samples their first token, joins them to the batch."""
        lengths = [len(r.request.prompt_ids) for r in rows]
        if self.observer is not None:
            self.observer.prefill(sum(lengths))
        prompts = [r.request.prompt_ids for r in rows]
        ids, mask = pad_rows(prompts, self._pad_id, left=True, device=self.device)
        cache = new_cache()
        logits, healthy, trace = self._forward(rows, ids, mask, left_padded_positions(mask), cache, mask)
        if logits is None:  # the rows that did not fail try again at the next step
            with self._lock:
                self._waiting.extendleft(reversed(healthy))
            return
        survivors = self._emitter.sample_and_emit(rows, logits, trace)
        if survivors:
            keep = torch.tensor([rows.index(r) for r in survivors], device=self.device)
            last = torch.tensor([r.generated[-1] for r in survivors], device=self.device)
            self._batch.join(survivors, cache, mask, torch.tensor(lengths, device=self.device), last, keep)

    def _decode_step(self) -> None:
        batch = self._batch
        mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=1)
        kv_length = batch.kv_length
        logits, healthy, trace = self._forward(
            batch.rows,
            batch.last_tokens[:, None],
            mask,
            batch.positions[:, None],
            batch.cache,
            None,
            self._ending_sentences(batch),
        )
        if logits is None:  # undo what the failed forward appended; the others retry next step
            batch.crop(kv_length)
            batch.keep(healthy)
            return
        batch.mask = mask
        batch.positions = batch.positions + 1
        survivors = self._emitter.sample_and_emit(batch.rows, logits, trace)
        batch.keep(survivors)
        if survivors:
            batch.last_tokens = torch.tensor([r.generated[-1] for r in survivors], device=self.device)

    def _ending_sentences(self, batch: Batch[Row]) -> torch.Tensor | None:
        """(B,) bool: the rows whose input token this decode step ends a sentence; None when no
        row uses a memory (the only ones that ask)."""
        if not any(r.request.memories for r in batch.rows):
            return None
        if self._sentence_ends is None:
            size = max(getattr(self.model.config, "vocab_size", 0) or 0, len(self.tokenizer))
            self._sentence_ends = sentence_end_table(self.tokenizer, size, self.device)
        return self._sentence_ends[batch.last_tokens]

    def _forward(
        self,
        rows: list[Row],
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        new_positions: torch.Tensor | None,
        sentence_ends: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, list[Row], dict[int, list[TraceRecord]]]:
        """One forward over `rows`: (last-position logits (B, V) in fp32, rows, trace) on success.

        `new_positions` (B, T) marks the real input positions (None: all are real);
        `sentence_ends` (B,) the rows whose generated input token ends a sentence. On
        failure, fails the requests to blame and returns (None, the others, {}): the
        requests using a memory that raised, or all of them for any other error.
        """
        try:
            context = memory_context(
                [r.request for r in rows],
                self.device,
                new_positions,
                [r.memory_state for r in rows],
                sentence_ends,
            )
            with self.hooks.using(context) if self.hooks else contextlib.nullcontext():
                out = self.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
            if context:
                context.finish()
            return out.logits[:, -1, :].float(), rows, context.trace if context else {}
        except MemoryHookError as exc:
            error: MemserveError = exc
            failed = rows_to_blame(exc, rows)
            log.warning("%s; failing %d request(s)", exc, len(failed))
        except Exception as exc:
            log.exception("forward pass failed; failing %d request(s)", len(rows))
            error = MemserveError(f"the forward pass failed: {exc!r}")
            failed = rows
        for row in failed:
            row.sink(FailedEvent(error))
        return None, [r for r in rows if r not in failed], {}

    def _fail_all(self, error: MemserveError, admitted: Sequence[Row] | None = None) -> None:
        """Fails the running rows and `admitted`; with no `admitted` (shutdown), the queue too."""
        with self._lock:
            if admitted is None:
                rows = [*self._waiting, *self._batch.rows]
                self._waiting.clear()
            else:
                rows = [*admitted, *self._batch.rows]
        self._batch.keep([])
        for row in rows:
            row.sink(FailedEvent(error))
