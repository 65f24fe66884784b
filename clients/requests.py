"""Requests from typed arguments: the `build` side of the table of calls (`calls.Calls`).

Each function checks what it can before anything is sent: a malformed argument is a ValueError.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Struct

from memserve.clients.convert import job_state_value
from memserve.clients.refs import MemorySpec, memory_ref
from memserve.clients.rpc import Upload
from memserve.clients.transfer import BytesSink, FileSink, FileUpload, _byte_chunks
from memserve.v1 import evaluation_pb2, jobs_pb2, memory_pb2
from memserve.v1 import generation_pb2 as pb

DocumentSpec = Mapping[str, Any] | tuple[str, str]
"""A document to register: {"id", "text", "title"?, "docrep"?: list of floats} or (id, text)."""
DOCUMENT_FIELDS = frozenset({"id", "text", "title", "docrep"})
DOCUMENT_CONFIG_FIELDS = tuple(f.name for f in memory_pb2.DocumentTrainingConfig.DESCRIPTOR.fields)
"""The options of `register_documents(config=...)`, those of DocumentTrainingConfig."""

FactSpec = Mapping[str, Any]
"""A fact to register: {"prompt", "target", "id"?, "subject"?, "positive_prompts"?, "negative_prompts"?}."""
FACT_FIELDS = frozenset({"id", "prompt", "target", "subject", "positive_prompts", "negative_prompts"})
LOCAL_CONFIG_FIELDS = tuple(f.name for f in memory_pb2.LocalTrainingConfig.DESCRIPTOR.fields)
"""The options of `register_facts(config=...)`, those of LocalTrainingConfig."""

TemplateSpec = Mapping[str, str] | tuple[str, str]
"""A question/answer template to train an adapter on: {"question", "answer"} or (question, answer)."""
ADAPTER_CONFIG_FIELDS = tuple(f.name for f in memory_pb2.AdapterTrainingConfig.DESCRIPTOR.fields)
"""The options of `register_adapter(config=...)`, those of AdapterTrainingConfig."""


def build_request(
    prompt: str = "",
    *,
    messages: Sequence[Mapping[str, str]] = (),
    memories: Sequence[MemorySpec] = (),
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int = 0,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    include_stop_sequence: bool = False,
    ignore_eos: bool = False,
    logprobs: bool = False,
    top_logprobs: int = 0,
    memory_trace: bool = False,
    chat: bool = False,
    request_id: str = "",
) -> pb.GenerateRequest:
    """Options (None leaves a value to the server's default):

    messages: a conversation instead of `prompt`, as {"role": "system" | "user" | "assistant",
        "content": text} turns, sent through the model's chat template; the reply is the assistant's.
    memories: names, "name@version" pins, (name, version) pairs or references (`document_ref`,
        `docrep_ref`, `mix_ref`, `local_ref`, `adapter_ref`); applied adapter, documents, local set.
    max_new_tokens: most tokens to generate.  temperature: >= 0; 0 = greedy decoding.
    top_p: nucleus sampling, in (0, 1].  top_k: 0 = no limit.  repetition_penalty: > 0.
    seed: of this request's random generator (None = a random one, returned with the result).
    stop: stop as soon as the output contains one of these strings (at most 16).
    include_stop_sequence: keep the matched stop sequence.  ignore_eos: generate past end-of-sequence.
    logprobs: return each token's log-probability; top_logprobs: and the n likeliest (<= 20).
    memory_trace: return, for each token, which memories acted and how strongly.
    chat: send the prompt as a user message through the model's chat template.
    request_id: echoed in the result and in the server's logs.
    """
    request = pb.GenerateRequest(prompt=prompt, request_id=request_id, chat=chat)
    request.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    request.memories.extend(memory_ref(m) for m in memories)
    sampling = {"top_p": top_p, "repetition_penalty": repetition_penalty, "seed": seed}
    _set_present(request.sampling, temperature=temperature, top_k=top_k, **sampling)
    _set_present(request.stopping, max_new_tokens=max_new_tokens, ignore_eos=ignore_eos)
    request.stopping.stop_sequences.extend(stop)
    request.stopping.include_stop_sequence = include_stop_sequence
    response = {"logprobs": logprobs, "top_logprobs": top_logprobs, "memory_trace": memory_trace}
    _set_present(request.response, **response)
    return request


def _set_present(message: Message, **values: Any) -> None:
    """Sets the fields whose value is not None (an optional field left unset takes its default)."""
    for name, value in values.items():
        if value is not None:
            setattr(message, name, value)


def _set_config(message: Message, config: Mapping[str, Any] | None, what: str) -> None:
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


def _check_fields(where: str, given: Iterable[str], known: Iterable[str]) -> None:
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(
            f"{where} has unknown fields: {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )


def _document(document: DocumentSpec, index: int) -> memory_pb2.Document:
    where = f"documents[{index}]"
    if isinstance(document, tuple):
        if len(document) != 2:
            raise ValueError(f"{where} must be (id, text), got a tuple of {len(document)}")
        document = {"id": document[0], "text": document[1]}
    if not isinstance(document, Mapping):
        raise ValueError(f"{where} must be a dict with id and text, or an (id, text) tuple")
    _check_fields(where, document, DOCUMENT_FIELDS)
    missing = [key for key in ("id", "text") if key not in document]
    if missing:
        raise ValueError(f"{where} has no {' and no '.join(missing)}")
    result = memory_pb2.Document(
        id=str(document["id"]), title=str(document.get("title") or ""), text=str(document["text"])
    )
    if document.get("docrep") is not None:
        result.docrep.values.extend(float(v) for v in document["docrep"])
    return result


def _fact(fact: FactSpec, index: int) -> memory_pb2.Fact:
    where = f"facts[{index}]"
    if not isinstance(fact, Mapping):
        raise ValueError(f"{where} must be a dict with prompt and target")
    _check_fields(where, fact, FACT_FIELDS)
    missing = [key for key in ("prompt", "target") if not fact.get(key)]
    if missing:
        raise ValueError(f"{where} has no {' and no '.join(missing)}")
    for key in ("positive_prompts", "negative_prompts"):
        if isinstance(fact.get(key), str):
            raise ValueError(f"{where}.{key} must be a list of prompts, not one string")
    return memory_pb2.Fact(
        id=str(fact.get("id") or ""),
        prompt=str(fact["prompt"]),
        target=str(fact["target"]),
        subject=str(fact.get("subject") or ""),
        positive_prompts=[str(p) for p in fact.get("positive_prompts") or ()],
        negative_prompts=[str(p) for p in fact.get("negative_prompts") or ()],
    )


def _template(template: TemplateSpec, index: int) -> memory_pb2.QATemplate:
    where = f"templates[{index}]"
    if isinstance(template, tuple) and len(template) == 2:
        template = {"question": template[0], "answer": template[1]}
    if not isinstance(template, Mapping) or set(template) - {"question", "answer"}:
        raise ValueError(f"{where} must be {{'question', 'answer'}} or a (question, answer) tuple")
    if not template.get("question") or not template.get("answer"):
        raise ValueError(f"{where} needs a question and an answer")
    return memory_pb2.QATemplate(question=str(template["question"]), answer=str(template["answer"]))


def build_documents_request(
    bank: str, documents: Iterable[DocumentSpec], config: Mapping[str, Any] | None = None
) -> memory_pb2.RegisterDocumentsRequest:
    """`documents`: dicts {"id", "text", "title"?, "docrep"?: list of floats} or (id, text) tuples.
    `config`: DocumentTrainingConfig options (DOCUMENT_CONFIG_FIELDS); a missing or None option is
    left to the server's default. A malformed document or an unknown option is a ValueError.
    """
    request = memory_pb2.RegisterDocumentsRequest(bank=bank)
    request.documents.extend(_document(document, i) for i, document in enumerate(documents))
    _set_config(request.config, config, "document")
    return request


def build_facts_request(
    memory_set: str, facts: Iterable[FactSpec], config: Mapping[str, Any] | None = None
) -> memory_pb2.RegisterFactsRequest:
    """`facts`: dicts {"prompt", "target", "id"?, "positive_prompts"?, "negative_prompts"?}.
    `config`: LocalTrainingConfig options (LOCAL_CONFIG_FIELDS). A malformed fact or an unknown
    option is a ValueError.
    """
    request = memory_pb2.RegisterFactsRequest(set=memory_set)
    request.facts.extend(_fact(fact, i) for i, fact in enumerate(facts))
    _set_config(request.config, config, "local")
    return request


def build_adapter_request(
    name: str,
    documents: Iterable[DocumentSpec] = (),
    templates: Iterable[TemplateSpec] = (),
    config: Mapping[str, Any] | None = None,
) -> memory_pb2.RegisterAdapterRequest:
    """`documents` as for `register_documents`; `templates`: dicts {"question", "answer"} or
    (question, answer) tuples. `config`: AdapterTrainingConfig options (ADAPTER_CONFIG_FIELDS).
    A malformed document or template or an unknown option is a ValueError.
    """
    request = memory_pb2.RegisterAdapterRequest(name=name)
    request.documents.extend(_document(document, i) for i, document in enumerate(documents))
    request.templates.extend(_template(template, i) for i, template in enumerate(templates))
    if not request.documents and not request.templates:
        raise ValueError("an adapter needs documents, templates, or both to train on")
    _set_config(request.config, config, "adapter")
    return request


# --- the other calls' requests; their docstrings are the methods' ---


def model_info() -> pb.GetModelInfoRequest:
    """The served model and the server's limits."""
    return pb.GetModelInfoRequest()


def get_memory(name: str, version: int = 0) -> memory_pb2.GetMemoryRequest:
    """One version of a memory (0 = the current one), with the list of its versions."""
    return memory_pb2.GetMemoryRequest(name=name, version=version)


def list_memories(kind: str = "", prefix: str = "") -> memory_pb2.ListMemoriesRequest:
    """The current version of every memory of this tenant (all pages), optionally filtered."""
    return memory_pb2.ListMemoriesRequest(kind=kind, name_prefix=prefix)


def delete_memory(name: str, version: int = 0) -> memory_pb2.DeleteMemoryRequest:
    """Deletes one version, or every version with 0; returns how many were deleted."""
    return memory_pb2.DeleteMemoryRequest(name=name, version=version)


def export_memory(name: str, version: int = 0) -> tuple[memory_pb2.ExportMemoryRequest, BytesSink]:
    """One version (0 = current) as a single self-describing export file."""
    return memory_pb2.ExportMemoryRequest(name=name, version=version), BytesSink()


def export_memory_to(
    name: str, path: str | os.PathLike[str], version: int = 0
) -> tuple[memory_pb2.ExportMemoryRequest, FileSink]:
    """Writes the export file to `path` (replaced only once complete); returns its size in bytes."""
    return memory_pb2.ExportMemoryRequest(name=name, version=version), FileSink(path)


def put_memory(data: bytes, name: str = "") -> Upload:
    """Uploads an export file as a new version of `name` (default: the name inside the file)."""
    return nullcontext(_byte_chunks(data, name))


def import_memory(path: str | os.PathLike[str], name: str = "") -> Upload:
    """Uploads the export file at `path`, streamed in chunks, as `put_memory` does."""
    return FileUpload(path, name)


def get_job(job_id: str) -> jobs_pb2.GetJobRequest:
    """A job and its progress."""
    return jobs_pb2.GetJobRequest(job_id=job_id)


def list_jobs(state: str = "", kind: str = "") -> jobs_pb2.ListJobsRequest:
    """This tenant's jobs (all pages), newest first; `state` is one of JOB_STATES or "" for all."""
    return jobs_pb2.ListJobsRequest(state=job_state_value(state), kind=kind)


def cancel_job(job_id: str) -> jobs_pb2.CancelJobRequest:
    """Asks the job to stop; a running job stays "running" until its worker notices."""
    return jobs_pb2.CancelJobRequest(job_id=job_id)


def watch_job(job_id: str) -> jobs_pb2.WatchJobRequest:
    """The job each time it changes, ending after its final state."""
    return jobs_pb2.WatchJobRequest(job_id=job_id)


def submit_job(kind: str, memory_name: str, spec: Mapping[str, Any]) -> jobs_pb2.SubmitJobRequest:
    """Queues a training job of any registered kind; the kind validates `spec`."""
    struct = Struct()
    struct.update(spec)
    return jobs_pb2.SubmitJobRequest(kind=kind, memory_name=memory_name, spec=struct)


def evaluate(
    kind: str, memory_name: str = "", version: int = 0, options: Mapping[str, Any] | None = None
) -> evaluation_pb2.EvaluateRequest:
    """Evaluates memory `memory_name` (of kind `kind`; "" with "adapter": the base model alone) on the
    server's model. Options are the kind's evaluation's (e.g. {"grid": 7} for "document",
    {"claims": [...], "shots": [0, 1, 2]} for "adapter")."""
    struct = Struct()
    struct.update(dict(options or {}))
    return evaluation_pb2.EvaluateRequest(kind=kind, memory_name=memory_name, version=version, options=struct)
