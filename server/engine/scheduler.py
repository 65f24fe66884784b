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
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from memserve.engine.batch import Batch
from memserve.engine.detokenize import IncrementalText
from memserve.engine.kv_cache import new_cache
from memserve.engine.sampling import Choice, SamplingParams, choose
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
    UnsupportedArchitecture,
)
from memserve.memory.hooks import MemoryContext, MemoryHooks, TraceRecord
from memserve.memory.kind import RowMemory

log = logging.getLogger(__name__)


class FinishReason(StrEnum):
    LENGTH = "length"
    EOS = "eos"
    STOP_SEQUENCE = "stop_sequence"
    CONTEXT_LENGTH = "context_length"


class EngineObserver(Protocol):
    """What the metrics layer hears from the engine thread (memserve.metrics.EngineMetrics)."""

    def step(self, batch_size: int, queue_depth: int, running: int) -> None:
        """After each engine step: the rows it decoded, the queue and the running batch."""

    def prefill(self, prompt_tokens: int) -> None:
        """Prompt tokens prefilled (padding not counted)."""

    def token(self, first: bool, seconds: float) -> None:
        """A token streamed: the time since submission (the first) or since the row's last token."""


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
        names = ("max_batch_size", "max_queue_size", "default_max_new_tokens", "max_context_tokens",
                 "max_prefill_tokens")  # fmt: skip
        for name in names:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = every usable CPU), got {self.threads}")
        if not 1 <= self.default_max_new_tokens <= self.max_new_tokens_limit:
            raise ValueError(
                f"default_max_new_tokens ({self.default_max_new_tokens}) must be in "
                f"[1, max_new_tokens_limit={self.max_new_tokens_limit}]"
            )


class RequestHandle:
    """Lets the caller cancel a submitted request; the engine frees its slot at the next step."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        """The request's seed: the one it asked for, or one drawn for it."""
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _Row:
    """One request inside the engine."""

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
        self.submitted = time.monotonic()
        self.last_token: float | None = None
        # Tokens the repetition penalty looks at: the prompt and the output so far.
        self.seen: torch.Tensor | None = None
        if request.sampling.repetition_penalty != 1.0:
            self.seen = torch.tensor(sorted(set(request.prompt_ids)), dtype=torch.long, device=device)


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
        self.hooks = hooks if hooks is not None else _hooks_or_none(model)
        window = getattr(model.config, "max_position_embeddings", None) or config.max_context_tokens
        self.max_context_tokens = min(config.max_context_tokens, window)
        self.config = config
        self.device = next(model.parameters()).device
        self._eos_ids = _eos_token_ids(model, tokenizer)
        self._pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self._eos_ids, default=0)
        )
        self._waiting: deque[_Row] = deque()
        self._lock = threading.Condition()
        self._batch: Batch[_Row] = Batch(self.device)
        self._dead: BaseException | None = None
        self.on_death = on_death
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.observer = observer

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
        row = _Row(request, sink, self.tokenizer, self.device)
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
            use_compute_threads(self.config.threads or None)  # memserve/threads.py: why
            with torch.inference_mode():
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

    def _admit(self) -> list[_Row]:
        """Takes waiting rows for one prefill: while batch slots and the prefill budget last.

        The budget counts padded tokens (rows × longest prompt); the first row always goes.
        """
        free = self.config.max_batch_size - len(self._batch.rows)
        admitted: list[_Row] = []
        width = 0
        while self._waiting and len(admitted) < free:
            width = max(width, len(self._waiting[0].request.prompt_ids))
            if admitted and width * (len(admitted) + 1) > self.config.max_prefill_tokens:
                break
            admitted.append(self._waiting.popleft())
        return admitted

    def _step(self, admitted: list[_Row]) -> None:
        admitted = self._drop_dead(admitted)
        self._batch.keep(self._drop_dead(self._batch.rows))
        if admitted:
            self._prefill(admitted)
        decoded = len(self._batch.rows)
        if decoded:
            self._decode_step()
        if self.observer is not None:
            self.observer.step(decoded, len(self._waiting), len(self._batch.rows))

    def _drop_dead(self, rows: list[_Row]) -> list[_Row]:
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

    def _prefill(self, rows: list[_Row]) -> None:
        """Runs the prompts of newly admitted rows, samples their first token, joins them to the batch."""
        lengths = [len(r.request.prompt_ids) for r in rows]
        if self.observer is not None:
            self.observer.prefill(sum(lengths))
        width = max(lengths)
        ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - lengths[i] :] = torch.tensor(row.request.prompt_ids)
            mask[i, width - lengths[i] :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = new_cache()
        logits, healthy, trace = self._forward(rows, ids, mask, positions, cache, mask)
        if logits is None:  # the rows that did not fail try again at the next step
            with self._lock:
                self._waiting.extendleft(reversed(healthy))
            return
        survivors = self._sample_and_emit(rows, logits, trace)
        if survivors:
            keep = torch.tensor([rows.index(r) for r in survivors], device=self.device)
            last = torch.tensor([r.generated[-1] for r in survivors], device=self.device)
            self._batch.join(survivors, cache, mask, torch.tensor(lengths, device=self.device), last, keep)

    def _decode_step(self) -> None:
        batch = self._batch
        mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=1)
        kv_length = batch.kv_length
        logits, healthy, trace = self._forward(
            batch.rows, batch.last_tokens[:, None], mask, batch.positions[:, None], batch.cache, None
        )
        if logits is None:  # undo what the failed forward appended; the others retry next step
            batch.crop(kv_length)
            batch.keep(healthy)
            return
        batch.mask = mask
        batch.positions = batch.positions + 1
        survivors = self._sample_and_emit(batch.rows, logits, trace)
        batch.keep(survivors)
        if survivors:
            batch.last_tokens = torch.tensor([r.generated[-1] for r in survivors], device=self.device)

    def _forward(
        self,
        rows: list[_Row],
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        new_positions: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, list[_Row], dict[int, list[TraceRecord]]]:
        """One forward over `rows`: (last-position logits (B, V) in fp32, rows, trace) on success.

        `new_positions` (B, T) marks the real input positions (None: all are real). On
        failure, fails the requests to blame and returns (None, the others, {}): the
        requests using a memory that raised, or all of them for any other error.
        """
        try:
            context = self._memory_context(rows, new_positions)
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
            # Identity, not name: two memories may share a name. If none matches, all fail.
            failed = [r for r in rows if any(_blames(exc.memory, m) for m in r.request.memories)] or rows
            log.warning("%s; failing %d request(s)", exc, len(failed))
        except Exception as exc:
            log.exception("forward pass failed; failing %d request(s)", len(rows))
            error = MemserveError(f"the forward pass failed: {exc!r}")
            failed = rows
        for row in failed:
            row.sink(FailedEvent(error))
        return None, [r for r in rows if r not in failed], {}

    def _memory_context(self, rows: list[_Row], new_positions: torch.Tensor | None) -> MemoryContext | None:
        """Groups the batch rows by the memories they use; None when no row uses one."""
        groups: dict[int, tuple[RowMemory, list[int]]] = {}
        for index, row in enumerate(rows):
            for memory in row.request.memories:
                groups.setdefault(id(memory), (memory, []))[1].append(index)
        if not groups:
            return None
        traced = frozenset(i for i, row in enumerate(rows) if row.request.trace)
        context = MemoryContext(mask=new_positions, traced=traced)
        # Kinds that share a site apply in a fixed order (documents, then adapters), whatever
        # order a request lists its memories in (README: "One request, several memories").
        ordered = sorted(groups.values(), key=lambda group: group[0].apply_order)
        for memory, indices in ordered:
            try:
                memory.add_ops(context, torch.tensor(indices, device=self.device))
            except Exception as exc:
                raise MemoryHookError(memory, "while preparing its ops", exc) from exc
        return context

    def _sample_and_emit(
        self, rows: list[_Row], logits: torch.Tensor, trace: dict[int, list[TraceRecord]]
    ) -> list[_Row]:
        """Samples one token per row, streams it, and returns the rows that go on.

        A row whose sampling fails fails alone; its neighbours go on.
        """
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
            if self._emit(row, choice, tuple(trace.get(i, ()))):
                survivors.append(row)
        return survivors

    def _emit(self, row: _Row, choice: Choice, trace: tuple[TraceRecord, ...]) -> bool:
        """Streams one chosen token; returns whether the request goes on."""
        token = choice.token
        if row.seen is not None:
            row.seen = torch.cat([row.seen, row.seen.new_tensor([token])])
        reason = self._append(row, token)
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

    def _append(self, row: _Row, token: int) -> FinishReason | None:
        row.generated.append(token)
        stopping = row.request.stopping
        if token in self._eos_ids and not stopping.ignore_eos:
            return FinishReason.EOS
        if len(row.generated) >= stopping.max_new_tokens:
            return FinishReason.LENGTH
        if len(row.request.prompt_ids) + len(row.generated) >= self.max_context_tokens:
            return FinishReason.CONTEXT_LENGTH
        return None

    def _fail_all(self, error: MemserveError, admitted: Sequence[_Row] | None = None) -> None:
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


def _blames(culprit: object, memory: object) -> bool:
    """Whether a failure of `culprit` concerns `memory`: itself, or a group op it joined."""
    return culprit is memory or any(member is memory for member in getattr(culprit, "members", ()))


def _hooks_or_none(model: PreTrainedModel) -> MemoryHooks | None:
    try:
        return MemoryHooks(model)
    except UnsupportedArchitecture as exc:
        log.warning("%s: serving without memories", exc)
        return None


def _eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
