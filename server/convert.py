"""Protobuf ⇄ internal types, at the edge: protobuf never reaches the engine.

Every value from a client is checked here; a bad one raises InvalidArgument
with what to fix.
"""

from __future__ import annotations

import math
import time

from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet
from transformers import PreTrainedTokenizerBase

from memserve.engine import (
    EngineConfig,
    FinishedEvent,
    FinishReason,
    GenerationRequest,
    StoppingParams,
    TokenEvent,
)
from memserve.errors import InvalidArgument, Unimplemented
from memserve.sampling import SamplingParams
from memserve.v1 import generation_pb2 as pb

MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 256
MAX_TOP_LOGPROBS = 20
MAX_REQUEST_ID_CHARS = 128
MAX_CHARS_PER_TOKEN = 64

FINISH_REASONS = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.CONTEXT_LENGTH: pb.FINISH_REASON_CONTEXT_LENGTH,
}


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
    if not request.prompt:
        raise InvalidArgument("prompt is empty: send the text the model should continue")
    # A token rarely spans more than a few dozen characters: a longer prompt cannot fit,
    # and is refused before paying for its tokenisation.
    max_chars = max_context_tokens * MAX_CHARS_PER_TOKEN
    if len(request.prompt) > max_chars:
        raise InvalidArgument(
            f"the prompt has {len(request.prompt)} characters, more than the context of "
            f"{max_context_tokens} tokens can hold: shorten the prompt"
        )
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument(f"request_id is longer than {MAX_REQUEST_ID_CHARS} characters")
    if request.memories:
        raise Unimplemented(
            "memory references are not served yet: the memory store and the memory kinds "
            "land in later releases; send the request without `memories`"
        )
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
        deadline=None if time_remaining is None else time.monotonic() + time_remaining,
    )


def _prompt_ids(request: pb.GenerateRequest, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    if not request.chat:
        return tokenizer(request.prompt, add_special_tokens=True).input_ids
    if not tokenizer.chat_template:
        raise InvalidArgument("this model has no chat template: send the prompt without `chat`")
    messages = [{"role": "user", "content": request.prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
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
    return token


def usage_to_pb(event: FinishedEvent) -> pb.Usage:
    return pb.Usage(prompt_tokens=event.prompt_tokens, generated_tokens=event.generated_tokens)
