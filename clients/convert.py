"""Responses to dataclasses: what the server sends, as the values `types` defines."""

from __future__ import annotations

from collections.abc import Iterable, MutableSequence
from datetime import timezone
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp

from memserve.clients import types
from memserve.v1 import evaluation_pb2, jobs_pb2, memory_pb2
from memserve.v1 import generation_pb2 as pb


def finish_reason(value: int) -> str | None:
    """The reason's name: length, eos, stop_sequence or context_length; None when unset."""
    if value == pb.FINISH_REASON_UNSPECIFIED:
        return None
    return pb.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


def token_info(token: pb.Token) -> types.TokenInfo:
    return types.TokenInfo(
        id=token.id,
        text=token.text,
        logprob=token.logprob if token.HasField("logprob") else None,
        top_logprobs=[types.TopLogprob(a.token_id, a.text, a.logprob) for a in token.top_logprobs],
        trace=[types.TraceInfo(t.memory, t.kind, t.layer, t.entry, t.value) for t in token.trace],
    )


def used_memories(memories: Iterable[pb.UsedMemory]) -> list[types.UsedMemory]:
    return [types.UsedMemory(m.name, m.kind, m.version) for m in memories]


def completion(response: pb.GenerateResponse) -> types.Completion:
    return types.Completion(
        text=response.text,
        tokens=[token_info(t) for t in response.tokens],
        finish_reason=finish_reason(response.finish_reason) or "",
        prompt_tokens=response.usage.prompt_tokens,
        generated_tokens=response.usage.generated_tokens,
        seed=response.seed,
        memories=used_memories(response.memories),
        request_id=response.request_id,
    )


def chunk(response: pb.GenerateStreamResponse, first: bool = False) -> types.Chunk:
    """A stream's message; only the first one's seed counts (the later ones leave it 0)."""
    return types.Chunk(
        text=response.text,
        tokens=[token_info(t) for t in response.tokens],
        finish_reason=finish_reason(response.finish_reason),
        seed=response.seed if first else None,
        prompt_tokens=response.usage.prompt_tokens,
        generated_tokens=response.usage.generated_tokens,
        memories=used_memories(response.memories),
        request_id=response.request_id,
    )


def first_chunk(response: pb.GenerateStreamResponse) -> types.Chunk:
    return chunk(response, first=True)


def _python(message: Message) -> dict[str, Any]:
    """Every field of `message` as a Python value: a Struct as a dict, a Timestamp as a UTC datetime,
    a repeated field as a list; an unset optional field (or Timestamp) as None."""
    return {f.name: _value(message, f.name, f.has_presence) for f in message.DESCRIPTOR.fields}


def _value(message: Message, name: str, has_presence: bool) -> Any:
    value = getattr(message, name)
    if isinstance(value, Struct):
        return MessageToDict(value)
    if has_presence and not message.HasField(name):
        return None
    if isinstance(value, Timestamp):
        return value.ToDatetime(tzinfo=timezone.utc)
    return list(value) if isinstance(value, MutableSequence) else value


def model_info(info: pb.ModelInfo) -> types.ModelInfo:
    return types.ModelInfo(**_python(info))


def memory_info(info: memory_pb2.MemoryInfo) -> types.MemoryInfo:
    return types.MemoryInfo(**_python(info))


def job_state(state: int) -> str:
    return jobs_pb2.JobState.Name(state).removeprefix("JOB_STATE_").lower()


def job_state_value(state: str) -> str:
    """The wire name of a state ("" = any state)."""
    if state and state not in types.JOB_STATES:
        raise ValueError(f"unknown job state {state!r}: use one of {', '.join(types.JOB_STATES)}")
    return f"JOB_STATE_{state.upper() or 'UNSPECIFIED'}"


def job_info(job: jobs_pb2.Job) -> types.JobInfo:
    """The job, with its progress's fields among its own."""
    values = _python(job) | _python(job.progress)
    del values["progress"]
    return types.JobInfo(**values | {"state": job_state(job.state)})


def deleted_versions(response: memory_pb2.DeleteMemoryResponse) -> int:
    return response.deleted_versions


def chunk_data(piece: memory_pb2.MemoryChunk) -> bytes:
    return piece.data


def memory_page(page: memory_pb2.ListMemoriesResponse) -> tuple[list[types.MemoryInfo], str]:
    """A page of a listing: its memories and the token of the next page ("" = the last)."""
    return [memory_info(m) for m in page.memories], page.next_page_token


def job_page(page: jobs_pb2.ListJobsResponse) -> tuple[list[types.JobInfo], str]:
    return [job_info(j) for j in page.jobs], page.next_page_token


def evaluation_event(response: evaluation_pb2.EvaluateResponse) -> types.EvaluationEvent:
    if response.HasField("file"):
        return types.ReportFile(response.file.name, response.file.content)
    progress = response.progress
    return types.EvaluationProgress(progress.step, progress.total, progress.message)
