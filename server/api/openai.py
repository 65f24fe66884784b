"""OpenAI's completions and chat-completions bodies ⇄ memserve's GenerateRequest and responses.

The HTTP front turns each OpenAI body into the same `GenerateRequest` a gRPC client sends, so
both protocols share one validation (convert.py), one memory resolution and one engine. What is
here checks the JSON's types and OpenAI's own parameters; convert.py checks the values.

memserve's additions ride in the body beside OpenAI's fields (the `openai` SDK's `extra_body`):
`memories` (a list of MemoryRef in protobuf's JSON form), `memory_trace`, `request_id`, and
vLLM's `top_k`, `repetition_penalty`, `ignore_eos` and `include_stop_str_in_output`.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from memserve.errors import InvalidArgument
from memserve.names import check_name
from memserve.v1 import generation_pb2 as pb
from memserve.v1 import memory_ref_pb2

MAX_TOP_LOGPROBS = 20
# Chat turns other than these have no place in a plain model's template.
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
FINISH_REASONS = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_CONTEXT_LENGTH: "length",
    pb.FINISH_REASON_EOS: "stop",
    pb.FINISH_REASON_STOP_SEQUENCE: "stop",
}
# OpenAI parameters this server does not implement: accepted at their neutral value only, so a
# request that relies on them is refused rather than silently answered without them.
NEUTRAL = {
    "n": (1,),
    "best_of": (1,),
    "echo": (False,),
    "suffix": ("",),
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logit_bias": ({},),
    "tools": ([],),
    "functions": ([],),
    "response_format": ({"type": "text"},),
}


@dataclass
class Call:
    """One OpenAI request, converted: the GenerateRequest and how to shape the answer."""

    request: pb.GenerateRequest
    chat: bool
    model: str
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def object_id(self) -> str:
        return f"{'chatcmpl' if self.chat else 'cmpl'}-{self.id}"


def _get(body: dict[str, Any], key: str, kinds: type | tuple[type, ...], what: str) -> Any:
    """body[key] if present and not null, checked against `kinds` (a bool is not a number)."""
    value = body.get(key)
    if value is None:
        return None
    numeric = kinds in (int, float) or (isinstance(kinds, tuple) and int in kinds)
    if not isinstance(value, kinds) or (numeric and isinstance(value, bool)):
        raise InvalidArgument(f"{key} must be {what}, got {json_type(value)}")
    return value


def json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array"}
    return "null" if value is None else names.get(type(value), "an object")


def _number(body: dict[str, Any], key: str) -> float | None:
    value = _get(body, key, (int, float), "a number")
    if value is not None and not math.isfinite(value):
        raise InvalidArgument(f"{key} must be finite")
    return value


def _integer(body: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = _get(body, key, int, "an integer")
    if value is not None and not low <= value <= high:
        raise InvalidArgument(f"{key} must be in [{low}, {high}], got {value}")
    return value


def _flag(body: dict[str, Any], key: str) -> bool:
    return bool(_get(body, key, bool, "a boolean"))


def call_from_body(body: Any, *, chat: bool, served_model: str) -> Call:
    """The GenerateRequest for an OpenAI body; InvalidArgument names the first bad field."""
    if not isinstance(body, dict):
        raise InvalidArgument(f"the body must be a JSON object, got {json_type(body)}")
    for key, neutral in NEUTRAL.items():
        if body.get(key) is not None and body[key] not in neutral:
            raise InvalidArgument(f"{key} is not supported by this server: leave it out (or {neutral[0]!r})")
    request = pb.GenerateRequest(request_id=_get(body, "request_id", str, "a string") or "")
    model = _get(body, "model", str, "a string") or served_model
    if model != served_model:
        # As LoRAX does, `model` may name an adapter (or any memory that needs no key): it
        # comes first, before the body's own memories.
        check_name(model, "model (the served model, or an adapter's name)")
        request.memories.append(memory_ref_pb2.MemoryRef(name=model))
    request.memories.extend(memories_from_json(body.get("memories")))
    if chat:
        request.messages.extend(_messages(body.get("messages")))
    else:
        request.prompt = _prompt(body.get("prompt"))
    _sampling(body, request.sampling)
    _stopping(body, request.stopping, chat)
    call = Call(request=request, chat=chat, model=model)
    call.logprobs = _logprobs(body, request.response, chat)
    request.response.memory_trace = _flag(body, "memory_trace")
    call.stream = _flag(body, "stream")
    options = _get(body, "stream_options", dict, "an object") or {}
    if options and not call.stream:
        raise InvalidArgument("stream_options is only for stream: true")
    call.include_usage = _flag(options, "include_usage")
    return call


def memories_from_json(memories: Any) -> list[memory_ref_pb2.MemoryRef]:
    """`memories`: MemoryRef objects in protobuf's JSON form, e.g. {"document": {"bank": "b",
    "document_id": "d"}}, {"local": {"set": "s"}}, {"adapter": {"name": "a"}, "scale": 0.5}."""
    if memories is None:
        return []
    if not isinstance(memories, list):
        raise InvalidArgument(f"memories must be an array of memory references, got {json_type(memories)}")
    refs = []
    for i, memory in enumerate(memories):
        if not isinstance(memory, dict):
            raise InvalidArgument(f"memories[{i}] must be an object, such as {{'local': {{'set': 'facts'}}}}")
        ref = memory_ref_pb2.MemoryRef()
        try:
            json_format.ParseDict(memory, ref)
        except json_format.ParseError as exc:
            raise InvalidArgument(f"memories[{i}]: {exc}") from None
        refs.append(ref)
    return refs


def _prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise InvalidArgument("prompt must be one string: send one request per prompt")
    if not isinstance(prompt, str):
        raise InvalidArgument(f"prompt must be a string (not token ids), got {json_type(prompt)}")
    return prompt


def _messages(messages: Any) -> Iterable[pb.ChatMessage]:
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument("messages must be a non-empty array of {role, content} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidArgument(f"messages[{i}] must be an object with role and content")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise InvalidArgument(
                f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {str(role)!r:.40}"
            )
        yield pb.ChatMessage(role=CHAT_ROLES[role], content=_content(message.get("content"), i))


def _content(content: Any, i: int) -> str:
    """A turn's text: a string, or an array of {"type": "text", "text": ...} parts (joined)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            text = part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None
            if not isinstance(text, str):
                raise InvalidArgument(f"messages[{i}].content: only text parts are supported")
            texts.append(text)
        return "".join(texts)
    raise InvalidArgument(f"messages[{i}].content must be a string or an array of text parts")


def _sampling(body: dict[str, Any], sampling: pb.SamplingParams) -> None:
    # OpenAI's default temperature is 1 (sampling); 0 is greedy, as in memserve.
    temperature = _number(body, "temperature")
    sampling.temperature = 1.0 if temperature is None else temperature
    if (top_p := _number(body, "top_p")) is not None:
        sampling.top_p = top_p
    if (seed := _integer(body, "seed", 0, 2**64 - 1)) is not None:
        sampling.seed = seed
    if (top_k := _integer(body, "top_k", -1, 2**31 - 1)) is not None:
        sampling.top_k = max(top_k, 0)  # vLLM's -1 and memserve's 0 both mean no limit
    if (penalty := _number(body, "repetition_penalty")) is not None:
        sampling.repetition_penalty = penalty


def _stopping(body: dict[str, Any], stopping: pb.StoppingCriteria, chat: bool) -> None:
    most = _integer(body, "max_completion_tokens", 1, 2**31 - 1) if chat else None
    if most is None:
        most = _integer(body, "max_tokens", 1, 2**31 - 1)
    if most is not None:
        stopping.max_new_tokens = most
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise InvalidArgument("stop must be a string or an array of strings")
    stopping.stop_sequences.extend(stops)
    stopping.include_stop_sequence = _flag(body, "include_stop_str_in_output")
    stopping.ignore_eos = _flag(body, "ignore_eos")


def _logprobs(body: dict[str, Any], response: pb.ResponseOptions, chat: bool) -> bool:
    """Completions take `logprobs: n` (the n likeliest too); chat takes `logprobs: true` and
    `top_logprobs: n`."""
    if chat:
        wanted = _flag(body, "logprobs")
        top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
        if top and not wanted:
            raise InvalidArgument("top_logprobs needs logprobs: true")
    else:
        top = _integer(body, "logprobs", 0, MAX_TOP_LOGPROBS)
        wanted = top is not None
    response.logprobs = wanted
    response.top_logprobs = top or 0
    return wanted


# --- answers ---


def usage_json(usage: pb.Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.generated_tokens,
        "total_tokens": usage.prompt_tokens + usage.generated_tokens,
    }


def memories_json(used: Iterable[pb.UsedMemory]) -> list[dict[str, Any]]:
    return [{"name": m.name, "kind": m.kind, "version": m.version} for m in used]


def trace_json(tokens: Iterable[pb.Token]) -> list[dict[str, Any]]:
    """Per generated token, the memories that acted on it (memserve's `memory_trace`)."""
    return [
        {
            "token": token.text,
            "token_id": token.id,
            "memories": [
                {"memory": t.memory, "kind": t.kind, "layer": t.layer, "entry": t.entry, "value": t.value}
                for t in token.trace
            ],
        }
        for token in tokens
    ]


def logprobs_json(tokens: list[pb.Token], chat: bool, offset: int = 0) -> dict[str, Any]:
    """OpenAI's logprobs object: chat's `content` list, or completions' parallel arrays."""
    if chat:
        return {
            "content": [
                {
                    "token": t.text,
                    "logprob": t.logprob,
                    "bytes": list(t.text.encode()),
                    "top_logprobs": [
                        {"token": top.text, "logprob": top.logprob, "bytes": list(top.text.encode())}
                        for top in t.top_logprobs
                    ],
                }
                for t in tokens
            ]
        }
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.text)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{top.text: top.logprob for top in t.top_logprobs} for t in tokens],
        "text_offset": offsets,
    }


def choice_json(call: Call, text: str, tokens: list[pb.Token], finish: int, *, delta: bool) -> dict[str, Any]:
    """One choice: whole (`delta` False) or a streamed piece."""
    choice: dict[str, Any] = {"index": 0}
    if not call.chat:
        choice["text"] = text
    elif delta:
        choice["delta"] = {"content": text} if text else {}
    else:
        choice["message"] = {"role": "assistant", "content": text}
    choice["logprobs"] = logprobs_json(tokens, call.chat) if call.logprobs else None
    choice["finish_reason"] = FINISH_REASONS.get(finish) if finish else None
    if call.request.response.memory_trace:
        choice["memory_trace"] = trace_json(tokens)
    return choice


def envelope(call: Call, *, chunk: bool) -> dict[str, Any]:
    kind = "chat.completion" if call.chat else "text_completion"
    return {
        "id": call.object_id,
        "object": f"{kind}.chunk" if chunk and call.chat else kind,
        "created": call.created,
        "model": call.model,
    }


def response_json(call: Call, response: pb.GenerateResponse) -> dict[str, Any]:
    tokens = list(response.tokens)
    return {
        **envelope(call, chunk=False),
        "choices": [choice_json(call, response.text, tokens, response.finish_reason, delta=False)],
        "usage": usage_json(response.usage),
        "seed": response.seed,
        "memories": memories_json(response.memories),
    }


def chunk_json(call: Call, message: pb.GenerateStreamResponse, first: bool) -> dict[str, Any]:
    """One server-sent event's data for one GenerateStream message."""
    tokens = list(message.tokens)
    choice = choice_json(call, message.text, tokens, message.finish_reason, delta=True)
    if call.chat and first:
        choice["delta"] = {"role": "assistant", **choice["delta"]}
    data = {**envelope(call, chunk=True), "choices": [choice]}
    if first:  # memserve's additions, once
        data["seed"] = message.seed
        data["memories"] = memories_json(message.memories)
    if call.include_usage:
        data["usage"] = None
    return data


def usage_chunk_json(call: Call, usage: pb.Usage) -> dict[str, Any]:
    """The last chunk when `stream_options.include_usage` is set: no choices, the usage."""
    return {**envelope(call, chunk=True), "choices": [], "usage": usage_json(usage)}
