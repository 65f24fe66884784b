"""Protobuf ⇄ internal types, at the edge: protobuf never reaches the engine.

Every value from a client is checked here; a bad one raises InvalidArgument
with what to fix.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp
from google.protobuf.unknown_fields import UnknownFieldSet
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from memserve.engine.requests import (
    FinishedEvent,
    FinishReason,
    GenerationRequest,
    StoppingParams,
    TokenEvent,
)
from memserve.engine.sampling import SamplingParams
from memserve.engine.scheduler import EngineConfig
from memserve.errors import InvalidArgument, MemserveError
from memserve.memory.kind import MemoryKey, MemoryRefSpec
from memserve.memory_store.artifact import MemoryMeta
from memserve.memory_store.jobs import Job, JobState
from memserve.names import check_name
from memserve.v1 import generation_pb2 as pb
from memserve.v1 import jobs_pb2, memory_pb2, memory_ref_pb2

MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 256
MAX_TOP_LOGPROBS = 20
MAX_REQUEST_ID_CHARS = 128
MAX_CHARS_PER_TOKEN = 64
MAX_CHAT_TURNS = 256
CHAT_ROLES = ("system", "user", "assistant")

FINISH_REASONS = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.CONTEXT_LENGTH: pb.FINISH_REASON_CONTEXT_LENGTH,
}


def struct_to_dict(struct: Struct, where: str) -> dict[str, Any]:
    """A request's free JSON (a job's spec, an evaluation's options) as a dict."""
    try:
        return MessageToDict(struct)
    except ValueError:  # NaN or infinity: JSON has no such numbers, and no check expects them
        raise InvalidArgument(f"{where} holds a number JSON cannot carry (NaN or infinity)") from None


@contextlib.contextmanager
def checking_client_json(where: str) -> Iterator[None]:
    """Around the checks of a client's free JSON: a value of the wrong JSON type deep inside it
    (a string where a list of objects belongs) makes the checks fail in Python's own words; that
    is the client's mistake, answered INVALID_ARGUMENT, never INTERNAL."""
    try:
        yield
    except MemserveError:
        raise
    except (TypeError, AttributeError, KeyError, IndexError, ValueError, OverflowError) as exc:
        raise InvalidArgument(f"{where} is malformed: {exc}") from None


def check_no_unknown_fields(message: Message, path: str = "") -> None:
    """Rejects fields this server does not know (a newer client, or a typo'd schema)."""
    unknown = UnknownFieldSet(message)
    if len(unknown):
        numbers = sorted({field.field_number for field in unknown})
        where = path or message.DESCRIPTOR.name
        raise InvalidArgument(
            f"{where} has fields this server does not know (numbers {numbers}): "
            "upgrade the server or drop those fields"
        )
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None or descriptor.message_type.GetOptions().map_entry:
            continue
        name = f"{path or message.DESCRIPTOR.name}.{descriptor.name}"
        children = value if descriptor.is_repeated else [value]
        for child in children:
            check_no_unknown_fields(child, name)


def generation_request_from_pb(
    request: pb.GenerateRequest,
    tokenizer: PreTrainedTokenizerBase,
    limits: EngineConfig,
    max_context_tokens: int,
    time_remaining: float | None,
) -> GenerationRequest:
    if request.messages:
        if request.prompt or request.chat:
            raise InvalidArgument("send either prompt (with chat, for one user turn) or messages, not both")
        _check_messages(request.messages)
    elif not request.prompt:
        raise InvalidArgument("prompt is empty: send the text the model should continue (or messages)")
    # A token rarely spans more than a few dozen characters: a longer prompt cannot fit,
    # and is refused before paying for its tokenisation.
    max_chars = max_context_tokens * MAX_CHARS_PER_TOKEN
    chars = len(request.prompt) + sum(len(m.content) for m in request.messages)
    if chars > max_chars:
        raise InvalidArgument(
            f"the prompt has {chars} characters, more than the context of "
            f"{max_context_tokens} tokens can hold: shorten the prompt"
        )
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument(f"request_id is longer than {MAX_REQUEST_ID_CHARS} characters")
    if not request.request_id.isprintable():  # it is logged: a line break would forge a log line
        raise InvalidArgument("request_id holds a control character (a line break, a tab, …)")
    if request.response.top_logprobs > MAX_TOP_LOGPROBS:
        raise InvalidArgument(
            f"response.top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {request.response.top_logprobs}"
        )
    prompt_ids = tuple(_prompt_ids(request, tokenizer))
    return GenerationRequest(
        prompt_ids=prompt_ids,
        sampling=sampling_from_pb(request.sampling),
        stopping=stopping_from_pb(request.stopping, limits),
        logprobs=request.response.logprobs,
        top_logprobs=request.response.top_logprobs,
        trace=request.response.memory_trace,
        deadline=None if time_remaining is None else time.monotonic() + time_remaining,
    )


def _check_messages(messages: Any) -> None:
    if len(messages) > MAX_CHAT_TURNS:
        raise InvalidArgument(f"at most {MAX_CHAT_TURNS} messages, got {len(messages)}")
    for i, message in enumerate(messages):
        if message.role not in CHAT_ROLES:
            raise InvalidArgument(
                f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {message.role!r:.40}"
            )
        if not message.content and message.role != "assistant":
            raise InvalidArgument(f"messages[{i}] ({message.role}) has no content")
    if all(m.role == "system" for m in messages):
        raise InvalidArgument("messages hold only system turns: add the user's turn")


def _prompt_ids(request: pb.GenerateRequest, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    if not request.chat and not request.messages:
        return tokenizer(request.prompt, add_special_tokens=True).input_ids
    if not tokenizer.chat_template:
        raise InvalidArgument(
            "this model has no chat template: send a plain prompt, without chat or messages"
        )
    messages = [{"role": m.role, "content": m.content} for m in request.messages] or [
        {"role": "user", "content": request.prompt}
    ]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as exc:  # the template refuses this conversation (say, a system turn)
        raise InvalidArgument(f"the model's chat template refuses these messages: {exc}") from exc
    # The template already holds any special tokens the model expects.
    return tokenizer(text, add_special_tokens=False).input_ids


def sampling_from_pb(sampling: pb.SamplingParams) -> SamplingParams:
    temperature = sampling.temperature
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidArgument(f"sampling.temperature must be >= 0 (0 = greedy), got {temperature}")
    top_p = sampling.top_p if sampling.HasField("top_p") else 1.0
    if not (0.0 < top_p <= 1.0):
        raise InvalidArgument(f"sampling.top_p must be in (0, 1], got {top_p}")
    penalty = sampling.repetition_penalty if sampling.HasField("repetition_penalty") else 1.0
    if not math.isfinite(penalty) or penalty <= 0:
        raise InvalidArgument(f"sampling.repetition_penalty must be > 0 (1 = off), got {penalty}")
    return SamplingParams(
        temperature=temperature,
        top_k=sampling.top_k,
        top_p=top_p,
        repetition_penalty=penalty,
        seed=sampling.seed if sampling.HasField("seed") else None,
    )


def stopping_from_pb(stopping: pb.StoppingCriteria, limits: EngineConfig) -> StoppingParams:
    max_new = (
        stopping.max_new_tokens if stopping.HasField("max_new_tokens") else limits.default_max_new_tokens
    )
    if not 1 <= max_new <= limits.max_new_tokens_limit:
        raise InvalidArgument(
            f"stopping.max_new_tokens must be in [1, {limits.max_new_tokens_limit}], got {max_new}"
        )
    stops = tuple(stopping.stop_sequences)
    if len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidArgument(f"at most {MAX_STOP_SEQUENCES} stop_sequences, got {len(stops)}")
    for stop in stops:
        if not stop or len(stop) > MAX_STOP_SEQUENCE_CHARS:
            raise InvalidArgument(
                f"each stop sequence must have 1 to {MAX_STOP_SEQUENCE_CHARS} characters, got {stop!r:.40}"
            )
    return StoppingParams(
        max_new_tokens=max_new,
        stop_sequences=stops,
        include_stop_sequence=stopping.include_stop_sequence,
        ignore_eos=stopping.ignore_eos,
    )


def token_to_pb(event: TokenEvent) -> pb.Token:
    token = pb.Token(id=event.token_id, text=event.token_text)
    if event.logprob is not None:
        token.logprob = event.logprob
    for token_id, text, logprob in event.top_logprobs:
        token.top_logprobs.add(token_id=token_id, text=text, logprob=logprob)
    for record in event.trace:
        token.trace.add(
            memory=record.memory, kind=record.kind, layer=record.layer, entry=record.entry, value=record.value
        )
    return token


def usage_to_pb(event: FinishedEvent) -> pb.Usage:
    return pb.Usage(prompt_tokens=event.prompt_tokens, generated_tokens=event.generated_tokens)


MAX_SCALE = 100.0
MAX_DOCREP_VALUES = 1024
# DocReps live in [-1, 1]^k; far outside, a key only saturates the selection, and a huge one
# would overflow a half-precision model.
MAX_DOCREP_MAGNITUDE = 1000.0
MAX_MIX_DOCUMENTS = 16


def memory_refs_from_pb(refs: Any) -> list[MemoryRefSpec]:
    """Checks the shape of each reference; the store and the kinds check the rest."""
    return [_memory_ref_from_pb(ref, f"memories[{i}]") for i, ref in enumerate(refs)]


def _memory_ref_from_pb(ref: memory_ref_pb2.MemoryRef, where: str) -> MemoryRefSpec:
    scale = ref.scale if ref.HasField("scale") else 1.0
    if not math.isfinite(scale) or abs(scale) > MAX_SCALE:
        raise InvalidArgument(f"{where}.scale must be finite and within ±{MAX_SCALE:g}, got {scale}")
    target = ref.WhichOneof("target")
    if target is None:
        raise InvalidArgument(f"{where} names no memory: set document, local, adapter or name")
    key = None
    if target == "document":
        name, kind = ref.document.bank, "document"
        key = _document_key(ref.document, where)
    elif target == "local":
        name, kind = ref.local.set, "local"
    elif target == "adapter":
        name, kind = ref.adapter.name, "adapter"
    else:
        name, kind = ref.name, None
    check_name(name, f"{where}: memory name")
    return MemoryRefSpec(name=name, kind=kind, version=ref.version, scale=scale, key=key)


def _document_key(ref: memory_ref_pb2.DocumentRef, where: str) -> MemoryKey:
    which = ref.WhichOneof("key")
    if which == "document_id":
        check_name(ref.document_id, f"{where}.document.document_id")
        return MemoryKey(document_id=ref.document_id)
    if which == "docrep":
        values = tuple(ref.docrep.values)
        if not values or len(values) > MAX_DOCREP_VALUES:
            raise InvalidArgument(f"{where}.document.docrep must have 1 to {MAX_DOCREP_VALUES} values")
        if not all(math.isfinite(v) for v in values):
            raise InvalidArgument(f"{where}.document.docrep has NaN or infinite values")
        if max(abs(v) for v in values) > MAX_DOCREP_MAGNITUDE:
            raise InvalidArgument(f"{where}.document.docrep values must be within ±{MAX_DOCREP_MAGNITUDE:g}")
        return MemoryKey(docrep=values)
    if which == "mix":
        parts = tuple((d.document_id, d.weight) for d in ref.mix.documents)
        if not 1 <= len(parts) <= MAX_MIX_DOCUMENTS:
            raise InvalidArgument(f"{where}.document.mix must name 1 to {MAX_MIX_DOCUMENTS} documents")
        for document_id, weight in parts:
            check_name(document_id, f"{where}.document.mix: document_id")
            if not math.isfinite(weight) or weight < 0:
                raise InvalidArgument(f"{where}.document.mix weights must be finite and >= 0, got {weight}")
        if sum(w for _, w in parts) <= 0:
            raise InvalidArgument(f"{where}.document.mix weights sum to 0: give at least one a weight")
        return MemoryKey(mix=parts)
    raise InvalidArgument(f"{where}.document names no key: set document_id, docrep or mix")


def _timestamp(seconds: float) -> Timestamp | None:
    if not seconds:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _struct(data: dict[str, Any]) -> Struct:
    struct = Struct()
    struct.update(data)
    return struct


def memory_info_to_pb(meta: MemoryMeta, versions: list[int] | None = None) -> memory_pb2.MemoryInfo:
    return memory_pb2.MemoryInfo(
        name=meta.name,
        kind=meta.kind,
        version=meta.version,
        tenant=meta.tenant,
        base_model=meta.base_model,
        sha256=meta.sha256,
        size_bytes=meta.size_bytes,
        hyperparameters=_struct(meta.hyperparameters),
        metrics=_struct(meta.metrics),
        created_at=_timestamp(meta.created_at),
        source_job=meta.source_job,
        versions=versions or [meta.version],
        details=_struct(meta.details),
    )


JOB_STATES = {
    JobState.QUEUED: jobs_pb2.JOB_STATE_QUEUED,
    JobState.RUNNING: jobs_pb2.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: jobs_pb2.JOB_STATE_SUCCEEDED,
    JobState.FAILED: jobs_pb2.JOB_STATE_FAILED,
    JobState.CANCELLED: jobs_pb2.JOB_STATE_CANCELLED,
}
JOB_STATES_FROM_PB = {v: k for k, v in JOB_STATES.items()}


def job_to_pb(job: Job) -> jobs_pb2.Job:
    progress = job.progress
    return jobs_pb2.Job(
        id=job.id,
        kind=job.kind,
        memory_name=job.memory_name,
        state=JOB_STATES[job.state],
        progress=jobs_pb2.JobProgress(
            step=progress.step,
            total=progress.total,
            loss=progress.loss,
            eta_seconds=progress.eta_seconds,
            message=progress.message,
        ),
        error=job.error,
        result_version=job.result_version,
        created_at=_timestamp(job.created_at),
        started_at=_timestamp(job.started_at),
        finished_at=_timestamp(job.finished_at),
        worker=job.worker,
    )
