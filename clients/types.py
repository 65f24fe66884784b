"""What the clients return: plain frozen dataclasses (and named tuples), never protobuf messages."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_JOB_STATES = frozenset({"succeeded", "failed", "cancelled"})


class UsedMemory(NamedTuple):
    """A memory a request used, as the server resolved it (compares equal to a plain tuple)."""

    name: str
    kind: str
    version: int
    """The version that answered (the current one unless the request pinned one)."""


class TopLogprob(NamedTuple):
    """One of the most likely alternatives at a step."""

    id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class TraceInfo:
    """One memory's effect on the position that produced a token."""

    memory: str
    kind: str
    layer: int
    entry: str
    """The document (bank) or entry (local memory set) that acted."""
    value: float
    """Selection mass (document) or trigger value in [0, 1] (local)."""


@dataclass(frozen=True)
class TokenInfo:
    """One generated token."""

    id: int
    text: str
    logprob: float | None = None
    """Set when the request asked for `logprobs`."""
    top_logprobs: list[TopLogprob] = field(default_factory=list)
    trace: list[TraceInfo] = field(default_factory=list)
    """Set when the request asked for `memory_trace`."""


@dataclass(frozen=True)
class Completion:
    """The answer of `generate`."""

    text: str
    tokens: list[TokenInfo]
    finish_reason: str
    """length | eos | stop_sequence | context_length"""
    prompt_tokens: int
    generated_tokens: int
    seed: int
    """The seed used (the requested one or one drawn at random): pass it again to reproduce."""
    memories: list[UsedMemory] = field(default_factory=list)
    """(name, kind, version) of each memory used, in the order of the request."""
    request_id: str = ""


@dataclass(frozen=True)
class Chunk:
    """One message of `generate_stream`: the text and tokens added since the previous one."""

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
    memories: list[UsedMemory] = field(default_factory=list)
    """Set on the first chunk only: (name, kind, version) of each memory used."""
    request_id: str = ""


@dataclass(frozen=True)
class ModelInfo:
    """The served model and the server's limits."""

    model: str
    """The served model: "SmolLM2-135M-Instruct" for the default, else its Hugging Face id or path."""
    architecture: str
    """The architecture class, e.g. "LlamaForCausalLM"."""
    fingerprint: str
    """sha256 over the model's config and weights; memories trained for another are refused."""
    num_layers: int
    hidden_size: int
    vocab_size: int
    max_context_tokens: int
    """Most tokens (prompt + output) a request may hold."""
    default_max_new_tokens: int
    max_new_tokens_limit: int
    dtype: str
    device: str
    max_batch_size: int
    """Requests decoded together at most."""
    max_queue_size: int
    """Requests that may wait for a slot before RESOURCE_EXHAUSTED."""
    memory_kinds: list[str]
    """Memory kinds this server can apply."""
    weights: str = ""
    """How the weights are held: "dense weights", or "packed weights: …" (`serve --weights`)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        return asdict(self)


@dataclass(frozen=True)
class MemoryInfo:
    """One version of a stored memory."""

    name: str
    kind: str
    version: int
    tenant: str
    base_model: str
    """Fingerprint of the base model the memory was trained for."""
    sha256: str
    size_bytes: int
    hyperparameters: dict[str, Any]
    metrics: dict[str, Any]
    created_at: datetime | None
    """UTC."""
    source_job: str
    versions: list[int]
    """Versions that exist, oldest first (a listing gives only this one)."""
    details: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (datetimes as ISO 8601 strings)."""
        return _json_ready(self.__dict__)


@dataclass(frozen=True)
class JobInfo:
    """A training job and its progress."""

    id: str
    kind: str
    memory_name: str
    state: str
    """queued | running | succeeded | failed | cancelled"""
    step: int
    total: int
    loss: float | None
    """The latest training loss; None for trainers without one (local memories)."""
    eta_seconds: float
    message: str
    error: str
    """Why the job failed (state failed)."""
    result_version: int
    """The version the job published (state succeeded)."""
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    worker: str

    @property
    def final(self) -> bool:
        """Whether the job has ended (succeeded, failed or cancelled)."""
        return self.state in FINAL_JOB_STATES

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (datetimes as ISO 8601 strings)."""
        return _json_ready(self.__dict__)


def _json_ready(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in values.items()}


@dataclass(frozen=True)
class EvaluationProgress:
    """How far a server-side evaluation has come."""

    step: int
    total: int
    message: str


@dataclass(frozen=True)
class ReportFile:
    """One file of an evaluation's report (report.md, metrics.json, a plot)."""

    name: str
    content: bytes


EvaluationEvent = EvaluationProgress | ReportFile
"""What `evaluate` streams: progress while it runs, then the report's files."""
