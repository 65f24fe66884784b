"""Typed Python clients for a memserve server: `Client` (blocking) and `AsyncClient` (asyncio).

    from memserve.clients import Client
    with Client() as client:                       # localhost:50051 or $MEMSERVE_SERVER
        print(client.generate("The capital of France is", max_new_tokens=8).text)
        for chunk in client.generate_stream("Once upon a time", temperature=0.8, seed=1):
            print(chunk.text, end="", flush=True)
        print(client.generate("Once upon a time", memories=["story@2"]).memories)
        for memory in client.list_memories(kind="adapter"):
            print(memory.name, memory.version)
        for job in client.watch_job(job_id):
            print(job.state, job.step, job.total)
        job = client.register_documents("stories", [("fox", "The quick brown fox ..."),
                                                    {"id": "sea", "title": "The sea", "text": "..."}],
                                        config={"epochs": 30})
        client.generate("The", memories=[document_ref("stories", "fox"),
                                         mix_ref("stories", {"fox": 0.7, "sea": 0.3}, scale=0.5)])

Every call carries the tenant (`tenant=` or $MEMSERVE_TENANT) as `memserve-tenant` metadata.
Errors arrive as `grpc.RpcError` with the server's status code and message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.struct_pb2 import Struct

from memserve.v1 import generation_pb2 as pb
from memserve.v1 import (
    generation_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    memory_pb2,
    memory_pb2_grpc,
    memory_ref_pb2,
)

DEFAULT_SERVER = "localhost:50051"
TENANT_METADATA = "memserve-tenant"
# The server streams exports in 1 MiB chunks; uploads use the same size.
UPLOAD_CHUNK_BYTES = 1 << 20
MAX_VERSION = (1 << 32) - 1  # versions are uint32 on the wire

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_JOB_STATES = frozenset({"succeeded", "failed", "cancelled"})

MemorySpec = str | tuple[str, int] | memory_ref_pb2.MemoryRef
"""A memory a request uses: "name", "name@version", (name, version) or a full MemoryRef."""

DocumentSpec = Mapping[str, Any] | tuple[str, str]
"""A document to register: {"id", "text", "title"?, "docrep"?: list of floats} or (id, text)."""

# Memory names and document ids alike (the server's rule).
DOCUMENT_FIELDS = frozenset({"id", "text", "title", "docrep"})
DOCUMENT_CONFIG_FIELDS = tuple(f.name for f in memory_pb2.DocumentTrainingConfig.DESCRIPTOR.fields)
"""The options of `register_documents(config=...)`, those of DocumentTrainingConfig."""

FactSpec = Mapping[str, Any]
"""A fact to register: {"prompt", "target", "id"?, "positive_prompts"?, "negative_prompts"?}."""
FACT_FIELDS = frozenset({"id", "prompt", "target", "positive_prompts", "negative_prompts"})
LOCAL_CONFIG_FIELDS = tuple(f.name for f in memory_pb2.LocalTrainingConfig.DESCRIPTOR.fields)
"""The options of `register_facts(config=...)`, those of LocalTrainingConfig."""

TemplateSpec = Mapping[str, str] | tuple[str, str]
"""A question/answer template to train an adapter on: {"question", "answer"} or (question, answer)."""
ADAPTER_CONFIG_FIELDS = tuple(f.name for f in memory_pb2.AdapterTrainingConfig.DESCRIPTOR.fields)
"""The options of `register_adapter(config=...)`, those of AdapterTrainingConfig."""


def default_server() -> str:
    return os.environ.get("MEMSERVE_SERVER", DEFAULT_SERVER)


def default_tenant() -> str | None:
    """$MEMSERVE_TENANT, or None (the server's default tenant)."""
    return os.environ.get("MEMSERVE_TENANT") or None


def parse_memory_version(text: str) -> tuple[str, int]:
    """Splits "name@version" into (name, version); a bare name gives version 0, the current one."""
    name, at, version = text.partition("@")  # memory names cannot contain '@'
    if not name:
        raise ValueError(f"{text!r} names no memory: write NAME or NAME@VERSION")
    if not at:
        return name, 0
    if not version.isdigit() or not 1 <= int(version) <= MAX_VERSION:
        raise ValueError(
            f"{text!r} has no valid version after '@': write NAME@VERSION with VERSION a positive "
            "integer, or NAME alone for the current version"
        )
    return name, int(version)


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
    id: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, str, float]] = field(default_factory=list)
    trace: list[TraceInfo] = field(default_factory=list)
    """Set when the request asked for `memory_trace`."""


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: list[TokenInfo]
    finish_reason: str
    """length | eos | stop_sequence | context_length"""
    prompt_tokens: int
    generated_tokens: int
    seed: int
    memories: list[tuple[str, str, int]] = field(default_factory=list)
    """(name, kind, version) of each memory used, in the order of the request."""


@dataclass(frozen=True)
class Chunk:
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
    memories: list[tuple[str, str, int]] = field(default_factory=list)
    """Set on the first chunk only: (name, kind, version) of each memory used."""


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
        return self.state in FINAL_JOB_STATES

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (datetimes as ISO 8601 strings)."""
        return _json_ready(self.__dict__)


def _json_ready(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in values.items()}


def memory_ref(memory: MemorySpec) -> memory_ref_pb2.MemoryRef:
    """A by-name reference from "name", "name@version" or (name, version); a MemoryRef passes as is."""
    if isinstance(memory, memory_ref_pb2.MemoryRef):
        return memory
    name, version = parse_memory_version(memory) if isinstance(memory, str) else memory
    return memory_ref_pb2.MemoryRef(name=name, version=version)


def _ref_options(ref: memory_ref_pb2.MemoryRef, scale: float | None, version: int | None) -> None:
    if scale is not None:
        ref.scale = scale
    if version:
        if not 0 < version <= MAX_VERSION:
            raise ValueError(f"version must be a positive integer (0 or None = current), got {version}")
        ref.version = version


def document_ref(
    bank: str, document_id: str, *, scale: float | None = None, version: int | None = None
) -> memory_ref_pb2.MemoryRef:
    """A document of a bank, by id (it brings its own DocRep). For `memories=`.

    `scale` multiplies the memory's contribution (None = 1); `version` pins one (None or 0 = current).
    """
    ref = memory_ref_pb2.MemoryRef(document=memory_ref_pb2.DocumentRef(bank=bank, document_id=document_id))
    _ref_options(ref, scale, version)
    return ref


def docrep_ref(
    bank: str, values: Iterable[float], *, scale: float | None = None, version: int | None = None
) -> memory_ref_pb2.MemoryRef:
    """An explicit DocRep of a bank (as many values as the bank's key_dim). For `memories=`."""
    docrep = memory_ref_pb2.DocRep(values=[float(v) for v in values])
    if not docrep.values:
        raise ValueError("a DocRep needs at least one value")
    ref = memory_ref_pb2.MemoryRef(document=memory_ref_pb2.DocumentRef(bank=bank, docrep=docrep))
    _ref_options(ref, scale, version)
    return ref


def mix_ref(
    bank: str,
    weights: Mapping[str, float] | Iterable[tuple[str, float]],
    *,
    scale: float | None = None,
    version: int | None = None,
) -> memory_ref_pb2.MemoryRef:
    """A weighted mix of documents of one bank, {document_id: weight}: their DocReps averaged with
    these weights (>= 0, normalised by the server). For `memories=`."""
    pairs = list(weights.items() if isinstance(weights, Mapping) else weights)
    if not pairs:
        raise ValueError("a mix needs at least one document")
    for document_id, weight in pairs:
        if not weight >= 0:  # NaN fails too
            raise ValueError(f"the weight of {document_id!r} in a mix must be >= 0, got {weight}")
    mix = memory_ref_pb2.DocumentMix(
        documents=[memory_ref_pb2.WeightedDocument(document_id=d, weight=float(w)) for d, w in pairs]
    )
    ref = memory_ref_pb2.MemoryRef(document=memory_ref_pb2.DocumentRef(bank=bank, mix=mix))
    _ref_options(ref, scale, version)
    return ref


def local_ref(
    memory_set: str, *, scale: float | None = None, version: int | None = None
) -> memory_ref_pb2.MemoryRef:
    """A reference to a local memory set."""
    ref = memory_ref_pb2.MemoryRef(local=memory_ref_pb2.LocalMemoryRef(set=memory_set))
    _ref_options(ref, scale, version)
    return ref


def adapter_ref(
    name: str, *, scale: float | None = None, version: int | None = None
) -> memory_ref_pb2.MemoryRef:
    """A reference to an adapter memory."""
    ref = memory_ref_pb2.MemoryRef(adapter=memory_ref_pb2.AdapterRef(name=name))
    _ref_options(ref, scale, version)
    return ref


def build_documents_request(
    bank: str, documents: Iterable[DocumentSpec], config: Mapping[str, Any] | None = None
) -> memory_pb2.RegisterDocumentsRequest:
    """A RegisterDocumentsRequest; ValueError for a malformed document or an unknown config option.

    `config` holds DocumentTrainingConfig fields (DOCUMENT_CONFIG_FIELDS); a missing or None
    option is left to the server's default.
    """
    request = memory_pb2.RegisterDocumentsRequest(bank=bank)
    for index, document in enumerate(documents):
        request.documents.append(_document(document, index))
    _set_config(request.config, config, "document")
    return request


def _set_config(message: Any, config: Mapping[str, Any] | None, what: str) -> None:
    """Copies `config` into a training-config message; None values are left to the server."""
    config = dict(config or {})
    known = [f.name for f in message.DESCRIPTOR.fields]
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise ValueError(f"unknown {what} training options: {', '.join(unknown)} (known: {', '.join(known)})")
    for name, value in config.items():
        if value is None:
            continue
        try:
            if isinstance(value, list | tuple):
                getattr(message, name).extend(value)
            else:
                setattr(message, name, value)
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"config option {name}={value!r} is not valid: {exc}") from None


def build_facts_request(
    memory_set: str, facts: Iterable[FactSpec], config: Mapping[str, Any] | None = None
) -> memory_pb2.RegisterFactsRequest:
    """A RegisterFactsRequest; ValueError for a malformed fact or an unknown config option."""
    request = memory_pb2.RegisterFactsRequest(set=memory_set)
    for index, fact in enumerate(facts):
        where = f"facts[{index}]"
        if not isinstance(fact, Mapping):
            raise ValueError(f"{where} must be a dict with prompt and target")
        unknown = sorted(set(fact) - FACT_FIELDS)
        if unknown:
            raise ValueError(
                f"{where} has unknown fields: {', '.join(unknown)} (known: {', '.join(sorted(FACT_FIELDS))})"
            )
        missing = [key for key in ("prompt", "target") if not fact.get(key)]
        if missing:
            raise ValueError(f"{where} has no {' and no '.join(missing)}")
        for key in ("positive_prompts", "negative_prompts"):
            if isinstance(fact.get(key), str):
                raise ValueError(f"{where}.{key} must be a list of prompts, not one string")
        request.facts.append(
            memory_pb2.Fact(
                id=str(fact.get("id") or ""),
                prompt=str(fact["prompt"]),
                target=str(fact["target"]),
                positive_prompts=[str(p) for p in fact.get("positive_prompts") or ()],
                negative_prompts=[str(p) for p in fact.get("negative_prompts") or ()],
            )
        )
    _set_config(request.config, config, "local")
    return request


def build_adapter_request(
    name: str,
    documents: Iterable[DocumentSpec] = (),
    templates: Iterable[TemplateSpec] = (),
    config: Mapping[str, Any] | None = None,
) -> memory_pb2.RegisterAdapterRequest:
    """A RegisterAdapterRequest; ValueError for a malformed document or template or an unknown option."""
    request = memory_pb2.RegisterAdapterRequest(name=name)
    for index, document in enumerate(documents):
        request.documents.append(_document(document, index))
    for index, template in enumerate(templates):
        where = f"templates[{index}]"
        if isinstance(template, tuple) and len(template) == 2:
            template = {"question": template[0], "answer": template[1]}
        if not isinstance(template, Mapping) or set(template) - {"question", "answer"}:
            raise ValueError(f"{where} must be {{'question', 'answer'}} or a (question, answer) tuple")
        if not template.get("question") or not template.get("answer"):
            raise ValueError(f"{where} needs a question and an answer")
        request.templates.append(
            memory_pb2.QATemplate(question=str(template["question"]), answer=str(template["answer"]))
        )
    if not request.documents and not request.templates:
        raise ValueError("an adapter needs documents, templates, or both to train on")
    _set_config(request.config, config, "adapter")
    return request


def _document(document: DocumentSpec, index: int) -> memory_pb2.Document:
    where = f"documents[{index}]"
    if isinstance(document, tuple):
        if len(document) != 2:
            raise ValueError(f"{where} must be (id, text), got a tuple of {len(document)}")
        document = {"id": document[0], "text": document[1]}
    if not isinstance(document, Mapping):
        raise ValueError(f"{where} must be a dict with id and text, or an (id, text) tuple")
    unknown = sorted(set(document) - DOCUMENT_FIELDS)
    if unknown:
        raise ValueError(f"{where} has unknown fields: {', '.join(unknown)} (known: id, text, title, docrep)")
    missing = [key for key in ("id", "text") if key not in document]
    if missing:
        raise ValueError(f"{where} has no {' and no '.join(missing)}")
    result = memory_pb2.Document(
        id=str(document["id"]), title=str(document.get("title") or ""), text=str(document["text"])
    )
    docrep = document.get("docrep")
    if docrep is not None:
        result.docrep.values.extend(float(v) for v in docrep)
    return result


def build_request(
    prompt: str,
    *,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    include_stop_sequence: bool = False,
    ignore_eos: bool = False,
    logprobs: bool = False,
    top_logprobs: int = 0,
    memory_trace: bool = False,
    request_id: str = "",
    chat: bool = False,
    memories: Sequence[MemorySpec] = (),
) -> pb.GenerateRequest:
    """Builds a GenerateRequest; None leaves a value to the server's default.

    `chat=True` sends the prompt as a user message through the model's chat template.
    `memories` are memory names, "name@version" pins, (name, version) pairs or MemoryRefs
    (`document_ref`, `docrep_ref` and `mix_ref` build those of document banks).
    """
    request = pb.GenerateRequest(prompt=prompt, request_id=request_id, chat=chat)
    request.sampling.temperature = temperature
    request.sampling.top_k = top_k
    for name, value in (("top_p", top_p), ("repetition_penalty", repetition_penalty), ("seed", seed)):
        if value is not None:
            setattr(request.sampling, name, value)
    if max_new_tokens is not None:
        request.stopping.max_new_tokens = max_new_tokens
    request.stopping.stop_sequences.extend(stop)
    request.stopping.include_stop_sequence = include_stop_sequence
    request.stopping.ignore_eos = ignore_eos
    request.response.logprobs = logprobs
    request.response.top_logprobs = top_logprobs
    request.response.memory_trace = memory_trace
    request.memories.extend(memory_ref(m) for m in memories)
    return request


def _finish_reason(value: int) -> str | None:
    if value == pb.FINISH_REASON_UNSPECIFIED:
        return None
    return pb.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


def _tokens(tokens: Any) -> list[TokenInfo]:
    return [
        TokenInfo(
            id=t.id,
            text=t.text,
            logprob=t.logprob if t.HasField("logprob") else None,
            top_logprobs=[(a.token_id, a.text, a.logprob) for a in t.top_logprobs],
            trace=[TraceInfo(r.memory, r.kind, r.layer, r.entry, r.value) for r in t.trace],
        )
        for t in tokens
    ]


def _used_memories(memories: Any) -> list[tuple[str, str, int]]:
    return [(m.name, m.kind, m.version) for m in memories]


def _completion(response: pb.GenerateResponse) -> Completion:
    return Completion(
        text=response.text,
        tokens=_tokens(response.tokens),
        finish_reason=_finish_reason(response.finish_reason) or "",
        prompt_tokens=response.usage.prompt_tokens,
        generated_tokens=response.usage.generated_tokens,
        seed=response.seed,
        memories=_used_memories(response.memories),
    )


def _chunk(response: pb.GenerateStreamResponse, first: bool) -> Chunk:
    return Chunk(
        text=response.text,
        tokens=_tokens(response.tokens),
        finish_reason=_finish_reason(response.finish_reason),
        seed=response.seed if first else None,
        prompt_tokens=response.usage.prompt_tokens,
        generated_tokens=response.usage.generated_tokens,
        memories=_used_memories(response.memories),
    )


def _datetime(message: Any, name: str) -> datetime | None:
    return getattr(message, name).ToDatetime(tzinfo=UTC) if message.HasField(name) else None


def _memory_info(info: memory_pb2.MemoryInfo) -> MemoryInfo:
    return MemoryInfo(
        name=info.name,
        kind=info.kind,
        version=info.version,
        tenant=info.tenant,
        base_model=info.base_model,
        sha256=info.sha256,
        size_bytes=info.size_bytes,
        hyperparameters=MessageToDict(info.hyperparameters),
        metrics=MessageToDict(info.metrics),
        created_at=_datetime(info, "created_at"),
        source_job=info.source_job,
        versions=list(info.versions),
        details=MessageToDict(info.details),
    )


def _job_state_name(state: int) -> str:
    return jobs_pb2.JobState.Name(state).removeprefix("JOB_STATE_").lower()


def _job_state_pb(state: str) -> int:
    if not state:
        return jobs_pb2.JOB_STATE_UNSPECIFIED
    if state not in JOB_STATES:
        raise ValueError(f"unknown job state {state!r}: use one of {', '.join(JOB_STATES)}")
    return jobs_pb2.JobState.Value(f"JOB_STATE_{state.upper()}")


def _job_info(job: jobs_pb2.Job) -> JobInfo:
    return JobInfo(
        id=job.id,
        kind=job.kind,
        memory_name=job.memory_name,
        state=_job_state_name(job.state),
        step=job.progress.step,
        total=job.progress.total,
        loss=job.progress.loss if job.progress.HasField("loss") else None,
        eta_seconds=job.progress.eta_seconds,
        message=job.progress.message,
        error=job.error,
        result_version=job.result_version,
        created_at=_datetime(job, "created_at"),
        started_at=_datetime(job, "started_at"),
        finished_at=_datetime(job, "finished_at"),
        worker=job.worker,
    )


def _submit_request(kind: str, memory_name: str, spec: dict[str, Any]) -> jobs_pb2.SubmitJobRequest:
    struct = Struct()
    struct.update(spec)
    return jobs_pb2.SubmitJobRequest(kind=kind, memory_name=memory_name, spec=struct)


def _byte_chunks(data: bytes, name: str) -> Iterator[memory_pb2.MemoryChunk]:
    # At least one chunk goes, even for no data, so the server can say what is missing.
    for offset in range(0, max(len(data), 1), UPLOAD_CHUNK_BYTES):
        piece = data[offset : offset + UPLOAD_CHUNK_BYTES]
        yield memory_pb2.MemoryChunk(name="" if offset else name, data=piece)


def _file_chunks(file: BinaryIO, name: str) -> Iterator[memory_pb2.MemoryChunk]:
    first = True
    while (data := file.read(UPLOAD_CHUNK_BYTES)) or first:
        yield memory_pb2.MemoryChunk(name=name if first else "", data=data)
        first = False


async def _file_chunks_async(file: BinaryIO, name: str) -> AsyncIterator[memory_pb2.MemoryChunk]:
    first = True
    while (data := await asyncio.to_thread(file.read, UPLOAD_CHUNK_BYTES)) or first:
        yield memory_pb2.MemoryChunk(name=name if first else "", data=data)
        first = False


@contextlib.contextmanager
def _replacing(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Writes to a temporary file next to `path` that replaces it only once complete."""
    target = Path(path)
    partial = target.with_name(target.name + ".part")
    try:
        with open(partial, "wb") as file:
            yield file
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)  # a failed export leaves no half-written file


def _metadata(tenant: str | None, token: str | None) -> tuple[tuple[str, str], ...] | None:
    pairs = ((TENANT_METADATA, tenant),) if tenant else ()
    pairs += (("authorization", f"Bearer {token}"),) if token else ()
    return pairs or None


def default_token() -> str | None:
    """$MEMSERVE_TOKEN, or None: the bearer token a server with auth wants for mutating RPCs."""
    return os.environ.get("MEMSERVE_TOKEN") or None


class Client:
    """Blocking client. Keyword arguments of `generate` are those of `build_request`.

    `tenant` (default $MEMSERVE_TENANT, else the server's default tenant) scopes every call;
    `token` (default $MEMSERVE_TOKEN) is sent as a bearer token, which a server started with
    $MEMSERVE_AUTH_TOKEN wants for the RPCs that change memories and jobs.
    """

    def __init__(
        self, address: str | None = None, timeout: float | None = None, tenant: str | None = None,
        token: str | None = None,
    ) -> None:  # fmt: skip
        self.address = address or default_server()
        self.timeout = timeout
        self.tenant = default_tenant() if tenant is None else tenant
        self.token = default_token() if token is None else token
        self._channel = grpc.insecure_channel(self.address)
        self._stub = generation_pb2_grpc.GenerationServiceStub(self._channel)
        self._memories = memory_pb2_grpc.MemoryServiceStub(self._channel)
        self._jobs = jobs_pb2_grpc.JobServiceStub(self._channel)

    @property
    def _options(self) -> dict[str, Any]:
        """Per-call options, read at each call so that changing `timeout` or `tenant` takes effect."""
        return {"timeout": self.timeout, "metadata": _metadata(self.tenant, self.token)}

    # --- generation ---

    def generate(self, prompt: str, **options: Any) -> Completion:
        return _completion(self._stub.Generate(build_request(prompt, **options), **self._options))

    def generate_stream(self, prompt: str, **options: Any) -> Iterator[Chunk]:
        call = self._stub.GenerateStream(build_request(prompt, **options), **self._options)
        try:
            for index, response in enumerate(call):
                yield _chunk(response, index == 0)
        finally:
            call.cancel()  # a consumer that stops early frees the server's slot

    def model_info(self) -> pb.ModelInfo:
        return self._stub.GetModelInfo(pb.GetModelInfoRequest(), **self._options)

    # --- memories ---

    def get_memory(self, name: str, version: int = 0) -> MemoryInfo:
        """One version of a memory (0 = the current one), with the list of its versions."""
        request = memory_pb2.GetMemoryRequest(name=name, version=version)
        return _memory_info(self._memories.GetMemory(request, **self._options))

    def list_memories(self, kind: str = "", prefix: str = "") -> list[MemoryInfo]:
        """The current version of every memory of this tenant (all pages), optionally filtered."""
        memories: list[MemoryInfo] = []
        token = ""
        while True:
            request = memory_pb2.ListMemoriesRequest(kind=kind, name_prefix=prefix, page_token=token)
            page = self._memories.ListMemories(request, **self._options)
            memories.extend(_memory_info(m) for m in page.memories)
            token = page.next_page_token
            if not token:
                return memories

    def delete_memory(self, name: str, version: int = 0) -> int:
        """Deletes one version, or every version with 0; returns how many were deleted."""
        request = memory_pb2.DeleteMemoryRequest(name=name, version=version)
        return self._memories.DeleteMemory(request, **self._options).deleted_versions

    def _export_chunks(self, name: str, version: int) -> Iterator[bytes]:
        call = self._memories.ExportMemory(
            memory_pb2.ExportMemoryRequest(name=name, version=version), **self._options
        )
        try:
            for chunk in call:
                yield chunk.data
        finally:
            call.cancel()

    def export_memory(self, name: str, version: int = 0) -> bytes:
        """One version (0 = current) as a single self-describing export file."""
        return b"".join(self._export_chunks(name, version))

    def export_memory_to(self, name: str, path: str | os.PathLike[str], version: int = 0) -> int:
        """Writes the export file to `path` (replaced only once complete); returns its size in bytes."""
        size = 0
        with _replacing(path) as file:
            for data in self._export_chunks(name, version):
                file.write(data)
                size += len(data)
        return size

    def put_memory(self, data: bytes, name: str = "") -> MemoryInfo:
        """Uploads an export file as a new version of `name` (default: the name inside the file)."""
        return _memory_info(self._memories.PutMemory(_byte_chunks(data, name), **self._options))

    def import_memory(self, path: str | os.PathLike[str], name: str = "") -> MemoryInfo:
        """Uploads the export file at `path`, streamed in chunks, as `put_memory` does."""
        with open(path, "rb") as file:  # opened here: an error inside the request iterator would be lost
            return _memory_info(self._memories.PutMemory(_file_chunks(file, name), **self._options))

    def register_documents(
        self, bank: str, documents: Iterable[DocumentSpec], config: Mapping[str, Any] | None = None
    ) -> JobInfo:
        """Queues the training of document bank `bank` (a new version with these documents added
        to its current ones; an id it has already replaces that document's text).

        `documents`: dicts {"id", "text", "title"?, "docrep"?: list of floats} or (id, text)
        tuples. `config`: DocumentTrainingConfig options (DOCUMENT_CONFIG_FIELDS); an unknown one
        is a ValueError. Follow the returned job with `watch_job`.
        """
        request = build_documents_request(bank, documents, config)
        return _job_info(self._memories.RegisterDocuments(request, **self._options))

    def register_facts(
        self, memory_set: str, facts: Iterable[FactSpec], config: Mapping[str, Any] | None = None
    ) -> JobInfo:
        """Queues the training of local memory set `memory_set` (a new version with these facts
        added to its current ones; a fact id it has already replaces that fact).

        `facts`: dicts {"prompt", "target", "id"?, "positive_prompts"?, "negative_prompts"?}.
        `config`: LocalTrainingConfig options (LOCAL_CONFIG_FIELDS). Follow the job with `watch_job`.
        """
        request = build_facts_request(memory_set, facts, config)
        return _job_info(self._memories.RegisterFacts(request, **self._options))

    def register_adapter(
        self,
        name: str,
        documents: Iterable[DocumentSpec] = (),
        templates: Iterable[TemplateSpec] = (),
        config: Mapping[str, Any] | None = None,
    ) -> JobInfo:
        """Queues the training of adapter `name` (a new version, trained afresh) on documents,
        question/answer templates, or both, with the causal-LM loss.

        `documents` as for `register_documents`; `templates`: dicts {"question", "answer"} or
        (question, answer) tuples. `config`: AdapterTrainingConfig options (ADAPTER_CONFIG_FIELDS).
        """
        request = build_adapter_request(name, documents, templates, config)
        return _job_info(self._memories.RegisterAdapter(request, **self._options))

    # --- jobs ---

    def get_job(self, job_id: str) -> JobInfo:
        return _job_info(self._jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), **self._options))

    def list_jobs(self, state: str = "", kind: str = "") -> list[JobInfo]:
        """This tenant's jobs (all pages), newest first; `state` is one of JOB_STATES or "" for all."""
        jobs: list[JobInfo] = []
        token = ""
        while True:
            request = jobs_pb2.ListJobsRequest(state=_job_state_pb(state), kind=kind, page_token=token)
            page = self._jobs.ListJobs(request, **self._options)
            jobs.extend(_job_info(j) for j in page.jobs)
            token = page.next_page_token
            if not token:
                return jobs

    def cancel_job(self, job_id: str) -> JobInfo:
        """Asks the job to stop; a running job stays "running" until its worker notices."""
        return _job_info(self._jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id=job_id), **self._options))

    def watch_job(self, job_id: str) -> Iterator[JobInfo]:
        """The job each time it changes, ending after its final state."""
        call = self._jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id), **self._options)
        try:
            for job in call:
                yield _job_info(job)
        finally:
            call.cancel()

    def submit_job(self, kind: str, memory_name: str, spec: dict[str, Any]) -> JobInfo:
        """Queues a training job of any registered kind; the kind validates `spec`."""
        return _job_info(self._jobs.SubmitJob(_submit_request(kind, memory_name, spec), **self._options))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client, same methods as `Client`, awaited."""

    def __init__(
        self, address: str | None = None, timeout: float | None = None, tenant: str | None = None,
        token: str | None = None,
    ) -> None:  # fmt: skip
        self.address = address or default_server()
        self.timeout = timeout
        self.tenant = default_tenant() if tenant is None else tenant
        self.token = default_token() if token is None else token
        self._channel = grpc.aio.insecure_channel(self.address)
        self._stub = generation_pb2_grpc.GenerationServiceStub(self._channel)
        self._memories = memory_pb2_grpc.MemoryServiceStub(self._channel)
        self._jobs = jobs_pb2_grpc.JobServiceStub(self._channel)

    @property
    def _options(self) -> dict[str, Any]:
        """Per-call options, read at each call so that changing `timeout` or `tenant` takes effect."""
        return {"timeout": self.timeout, "metadata": _metadata(self.tenant, self.token)}

    # --- generation ---

    async def generate(self, prompt: str, **options: Any) -> Completion:
        return _completion(await self._stub.Generate(build_request(prompt, **options), **self._options))

    async def generate_stream(self, prompt: str, **options: Any) -> AsyncIterator[Chunk]:
        call = self._stub.GenerateStream(build_request(prompt, **options), **self._options)
        try:
            index = 0
            async for response in call:
                yield _chunk(response, index == 0)
                index += 1
        finally:
            call.cancel()

    async def model_info(self) -> pb.ModelInfo:
        return await self._stub.GetModelInfo(pb.GetModelInfoRequest(), **self._options)

    # --- memories ---

    async def get_memory(self, name: str, version: int = 0) -> MemoryInfo:
        request = memory_pb2.GetMemoryRequest(name=name, version=version)
        return _memory_info(await self._memories.GetMemory(request, **self._options))

    async def list_memories(self, kind: str = "", prefix: str = "") -> list[MemoryInfo]:
        memories: list[MemoryInfo] = []
        token = ""
        while True:
            request = memory_pb2.ListMemoriesRequest(kind=kind, name_prefix=prefix, page_token=token)
            page = await self._memories.ListMemories(request, **self._options)
            memories.extend(_memory_info(m) for m in page.memories)
            token = page.next_page_token
            if not token:
                return memories

    async def delete_memory(self, name: str, version: int = 0) -> int:
        request = memory_pb2.DeleteMemoryRequest(name=name, version=version)
        return (await self._memories.DeleteMemory(request, **self._options)).deleted_versions

    async def _export_chunks(self, name: str, version: int) -> AsyncIterator[bytes]:
        call = self._memories.ExportMemory(
            memory_pb2.ExportMemoryRequest(name=name, version=version), **self._options
        )
        try:
            async for chunk in call:
                yield chunk.data
        finally:
            call.cancel()

    async def export_memory(self, name: str, version: int = 0) -> bytes:
        return b"".join([data async for data in self._export_chunks(name, version)])

    async def export_memory_to(self, name: str, path: str | os.PathLike[str], version: int = 0) -> int:
        size = 0
        with _replacing(path) as file:
            async for data in self._export_chunks(name, version):
                await asyncio.to_thread(file.write, data)
                size += len(data)
        return size

    async def put_memory(self, data: bytes, name: str = "") -> MemoryInfo:
        return _memory_info(await self._memories.PutMemory(_byte_chunks(data, name), **self._options))

    async def import_memory(self, path: str | os.PathLike[str], name: str = "") -> MemoryInfo:
        with open(path, "rb") as file:
            chunks = _file_chunks_async(file, name)
            return _memory_info(await self._memories.PutMemory(chunks, **self._options))

    async def register_documents(
        self, bank: str, documents: Iterable[DocumentSpec], config: Mapping[str, Any] | None = None
    ) -> JobInfo:
        request = build_documents_request(bank, documents, config)
        return _job_info(await self._memories.RegisterDocuments(request, **self._options))

    async def register_facts(
        self, memory_set: str, facts: Iterable[FactSpec], config: Mapping[str, Any] | None = None
    ) -> JobInfo:
        request = build_facts_request(memory_set, facts, config)
        return _job_info(await self._memories.RegisterFacts(request, **self._options))

    async def register_adapter(
        self,
        name: str,
        documents: Iterable[DocumentSpec] = (),
        templates: Iterable[TemplateSpec] = (),
        config: Mapping[str, Any] | None = None,
    ) -> JobInfo:
        request = build_adapter_request(name, documents, templates, config)
        return _job_info(await self._memories.RegisterAdapter(request, **self._options))

    # --- jobs ---

    async def get_job(self, job_id: str) -> JobInfo:
        return _job_info(await self._jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), **self._options))

    async def list_jobs(self, state: str = "", kind: str = "") -> list[JobInfo]:
        jobs: list[JobInfo] = []
        token = ""
        while True:
            request = jobs_pb2.ListJobsRequest(state=_job_state_pb(state), kind=kind, page_token=token)
            page = await self._jobs.ListJobs(request, **self._options)
            jobs.extend(_job_info(j) for j in page.jobs)
            token = page.next_page_token
            if not token:
                return jobs

    async def cancel_job(self, job_id: str) -> JobInfo:
        request = jobs_pb2.CancelJobRequest(job_id=job_id)
        return _job_info(await self._jobs.CancelJob(request, **self._options))

    async def watch_job(self, job_id: str) -> AsyncIterator[JobInfo]:
        call = self._jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id), **self._options)
        try:
            async for job in call:
                yield _job_info(job)
        finally:
            call.cancel()

    async def submit_job(self, kind: str, memory_name: str, spec: dict[str, Any]) -> JobInfo:
        request = _submit_request(kind, memory_name, spec)
        return _job_info(await self._jobs.SubmitJob(request, **self._options))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
