"""The bad-input table: over two hundred distinct malformed requests, written by hand, each with
the status it must get. None may be INTERNAL or UNKNOWN, none may log a traceback, and the server
answers its health check after them all (tiny model, real Redis, no workers).

Where the fuzz run (tests/test_fuzz.py) shows that no mutation breaks the server, this table pins
what each mistake is answered: a field's range, an unknown name, a wrong kind, a malformed upload.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memserve.v1 import evaluation_pb2, generation_pb2, jobs_pb2, memory_pb2
from tests.test_fuzz import METHODS, exported_chunks, fuzzed  # noqa: F401  (the server fixture)
from tests.test_server_store import publish_bias

NAN, INF = math.nan, math.inf
INVALID, NOT_FOUND = "INVALID_ARGUMENT", "NOT_FOUND"
REQUEST_TYPES = {
    "Generate": generation_pb2.GenerateRequest,
    "GenerateStream": generation_pb2.GenerateRequest,
    "GetModelInfo": generation_pb2.GetModelInfoRequest,
    "RegisterFacts": memory_pb2.RegisterFactsRequest,
    "RegisterDocuments": memory_pb2.RegisterDocumentsRequest,
    "RegisterAdapter": memory_pb2.RegisterAdapterRequest,
    "GetMemory": memory_pb2.GetMemoryRequest,
    "ListMemories": memory_pb2.ListMemoriesRequest,
    "DeleteMemory": memory_pb2.DeleteMemoryRequest,
    "ExportMemory": memory_pb2.ExportMemoryRequest,
    "GetJob": jobs_pb2.GetJobRequest,
    "WatchJob": jobs_pb2.WatchJobRequest,
    "CancelJob": jobs_pb2.CancelJobRequest,
    "ListJobs": jobs_pb2.ListJobsRequest,
    "SubmitJob": jobs_pb2.SubmitJobRequest,
    "Evaluate": evaluation_pb2.EvaluateRequest,
}


@dataclass(frozen=True)
class Bad:
    rpc: str
    what: str
    request: dict[str, Any] = field(default_factory=dict)
    status: str = INVALID
    metadata: tuple[tuple[str, str], ...] = ()
    raw: bytes | None = None
    """Bytes sent as they are, in place of `request`."""

    @property
    def id(self) -> str:
        return f"{self.rpc}: {self.what}"


def cases() -> Iterator[Bad]:
    yield from generate_cases("Generate")
    yield from generate_cases("GenerateStream")
    yield Bad("GetModelInfo", "bytes that are not a message", raw=b"\xff\xff\xff")
    yield Bad("GetModelInfo", "an unknown field", raw=b"\x08\x01")
    yield from fact_cases()
    yield from document_cases()
    yield from adapter_cases()
    yield from memory_cases()
    yield from job_cases()
    yield from evaluation_cases()


def generate_cases(rpc: str) -> Iterator[Bad]:
    one = {"maxNewTokens": 1}

    def ask(
        what: str, status: str = INVALID, metadata: tuple[tuple[str, str], ...] = (), **fields: Any
    ) -> Bad:
        return Bad(rpc, what, {"prompt": "Hi", "stopping": one, **fields}, status, metadata)

    def using(what: str, *refs: dict[str, Any], status: str = INVALID) -> Bad:
        return ask(what, status, memories=list(refs))

    yield Bad(rpc, "no prompt and no messages", {"stopping": one})
    yield Bad(
        rpc, "both a prompt and messages", {"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}]}
    )
    yield Bad(rpc, "a message of an unknown role", {"messages": [{"role": "wizard", "content": "Hi"}]})
    yield Bad(rpc, "a message without a role", {"messages": [{"content": "Hi"}]})
    yield ask("max_new_tokens negative", stopping={"maxNewTokens": -1})
    yield ask("max_new_tokens over the server's limit", stopping={"maxNewTokens": 1_000_000})
    yield ask("temperature negative", sampling={"temperature": -1})
    yield ask("temperature NaN", sampling={"temperature": NAN})
    yield ask("temperature infinite", sampling={"temperature": INF})
    yield ask("top_p zero", sampling={"topP": 0})
    yield ask("top_p negative", sampling={"topP": -0.1})
    yield ask("top_p above one", sampling={"topP": 1.5})
    yield ask("top_p NaN", sampling={"topP": NAN})
    yield ask("repetition_penalty zero", sampling={"repetitionPenalty": 0})
    yield ask("repetition_penalty negative", sampling={"repetitionPenalty": -1})
    yield ask("repetition_penalty NaN", sampling={"repetitionPenalty": NAN})
    yield ask("repetition_penalty infinite", sampling={"repetitionPenalty": INF})
    yield ask("an empty stop sequence", stopping={"maxNewTokens": 1, "stopSequences": [""]})
    yield ask("too many stop sequences", stopping={"maxNewTokens": 1, "stopSequences": ["x"] * 200})
    yield ask("a stop sequence too long", stopping={"maxNewTokens": 1, "stopSequences": ["x" * 20_000]})
    yield ask("too many top logprobs", response={"logprobs": True, "topLogprobs": 1000})
    yield ask("a request id with a newline", requestId="abc\nINFO forged")
    yield ask("a request id with a NUL", requestId="abc\x00")
    yield ask("a request id too long", requestId="r" * 5000)
    yield Bad(rpc, "a prompt longer than the context", {"prompt": "hello " * 5000, "stopping": one})
    yield using("a memory without a name", {"name": ""})
    yield using("a memory name with a slash", {"name": "a/b"})
    yield using("a memory name too long", {"name": "m" * 300})
    # A message quoting it whole would pass gRPC's 16 KiB metadata limit: a transport error.
    yield using("a memory name of 70,000 characters", {"name": "m" * 70_000})
    yield using("a memory that does not exist", {"name": "no-such-memory"}, status=NOT_FOUND)
    yield using("a version that does not exist", {"name": "bias", "version": 999}, status=NOT_FOUND)
    yield using("a scale of NaN", {"name": "bias", "scale": NAN})
    yield using("an infinite scale", {"name": "bias", "scale": INF})
    yield using("a huge scale", {"name": "bias", "scale": 1e30})
    yield ask("too many memories", "RESOURCE_EXHAUSTED", memories=[{"name": f"m{i}"} for i in range(200)])
    yield using("a reference naming nothing", {"scale": 1})
    yield using("a document reference without a bank", {"document": {"documentId": "d"}})
    yield using("a document reference without a key", {"document": {"bank": "bank"}})
    yield using("an empty docrep", {"document": {"bank": "bias", "docrep": {"values": []}}})
    yield using("a docrep with NaN", {"document": {"bank": "bias", "docrep": {"values": [NAN]}}})
    yield using("an empty mix", {"document": {"bank": "bias", "mix": {}}})
    yield using(
        "a mix with a negative weight",
        {"document": {"bank": "bias", "mix": {"documents": [{"documentId": "d", "weight": -1}]}}},
    )
    yield using(
        "a mix with a NaN weight",
        {"document": {"bank": "bias", "mix": {"documents": [{"documentId": "d", "weight": NAN}]}}},
    )
    yield using("a document bank that does not exist", {"document": {"bank": "nope", "documentId": "d"}},
                status=NOT_FOUND)  # fmt: skip
    yield using("a local set without a name", {"local": {}})
    yield using("a local set name with spaces", {"local": {"set": "a b"}})
    yield using("an adapter without a name", {"adapter": {}})
    yield using("a test memory used as a document bank", {"document": {"bank": "bias", "documentId": "d"}})
    yield using("a test memory used as a fact set", {"local": {"set": "bias"}})
    yield using("a test memory used as an adapter", {"adapter": {"name": "bias"}})
    yield ask("a tenant with a space", metadata=(("memserve-tenant", "a b"),))
    yield ask("a tenant too long", metadata=(("memserve-tenant", "t" * 300),))
    yield ask("a tenant with a slash", metadata=(("memserve-tenant", "a/b"),))


FACT = {"id": "f", "prompt": "The sky is", "target": " green"}


def fact_cases() -> Iterator[Bad]:
    def facts(what: str, *items: dict[str, Any], status: str = INVALID, name: str = "facts") -> Bad:
        return Bad("RegisterFacts", what, {"set": name, "facts": list(items)}, status)

    def config(what: str, **settings: Any) -> Bad:
        return Bad("RegisterFacts", what, {"set": "facts", "facts": [FACT], "config": settings})

    yield facts("no set name", FACT, name="")
    yield facts("a set name with a slash", FACT, name="a/b")
    yield facts("a set name too long", FACT, name="s" * 300)
    yield facts("a set name of dots", FACT, name="..")
    yield facts("no facts")
    yield facts(
        "two facts of one prompt, without ids", {**FACT, "id": ""}, {**FACT, "id": "", "target": " red"}
    )
    yield facts("two facts with one id", FACT, FACT)
    yield facts("a fact without a prompt", {**FACT, "prompt": ""})
    yield facts("a fact without a target", {**FACT, "target": ""})
    yield facts("a prompt too long", {**FACT, "prompt": "word " * 20_000})
    yield facts("a target too long", {**FACT, "target": " word" * 5_000})
    yield facts("a fact id with a newline", {**FACT, "id": "a\nb"})
    yield facts("a subject not in the prompt", {**FACT, "subject": "Mars"})
    yield facts("too many rewordings", {**FACT, "positivePrompts": ["The sky is"] * 5000})
    yield facts("an empty rewording", {**FACT, "positivePrompts": [""]})
    yield facts("an empty neighbour prompt", {**FACT, "negativePrompts": [""]})
    yield config("a layer past the model", layers=[1000])
    yield config("an unknown site", sites=["nowhere"])
    yield config("an alpha of NaN", alphas=[NAN])
    yield config("a negative alpha", alphas=[-1])
    yield config("an infinite alpha", alphas=[INF])
    yield config("a hardness of NaN", hardness=NAN)
    yield config("a negative hardness", hardness=-1)
    yield config("an unknown distance", distance="manhattan-ish")
    yield config("an unknown combination", combination="blend")
    yield config("a holdout above one", holdout=1.5)
    yield config("a negative holdout", holdout=-0.1)
    yield config("a holdout of NaN", holdout=NAN)
    yield config("a million generated prompts", generatedPrompts=1_000_000)
    yield config("a million extra keys", extraKeys=1_000_000)
    yield config("an unknown method", method="rome-ish")
    yield config("a subject layer past the model", subjectLayer=1000)
    yield config("a negative subject layer", subjectLayer=-100)
    yield config("ten million value steps", valueSteps=10_000_000)
    yield config("a value learning rate of NaN", valueLr=NAN)
    yield config("a negative value learning rate", valueLr=-1)
    yield config("a KL weight of NaN", klWeight=NAN)
    yield config("an infinite value decay", valueDecay=INF)
    yield config("a subject hardness of NaN", subjectHardness=NAN)
    yield config("a boundary margin of NaN", boundaryMargin=NAN)
    yield config("a million answer candidates", answerTopK=1_000_000)
    yield config("an answer margin of NaN", answerMargin=NAN)
    yield config("a negative answer hardness", answerHardness=-1)
    yield config("unknown relation rows", relationRows="some")
    yield config("an unknown answer scope", answerScope="everything")
    yield config("too many alphas", alphas=[0.5] * 100)


DOC = {"id": "d", "text": "A town by a river."}


def document_cases() -> Iterator[Bad]:
    def docs(what: str, *items: dict[str, Any], name: str = "bank") -> Bad:
        return Bad("RegisterDocuments", what, {"bank": name, "documents": list(items)})

    def config(what: str, **settings: Any) -> Bad:
        return Bad("RegisterDocuments", what, {"bank": "bank", "documents": [DOC], "config": settings})

    yield docs("no bank name", DOC, name="")
    yield docs("a bank name with a space", DOC, name="my bank")
    yield docs("a bank name too long", DOC, name="b" * 300)
    yield docs("no documents")
    yield docs("a document without an id", {**DOC, "id": ""})
    yield docs("two documents with one id", DOC, DOC)
    yield docs("a document without text", {**DOC, "text": ""})
    yield docs("a docrep with NaN", {**DOC, "docrep": {"values": [NAN]}})
    yield docs("a docrep with infinity", {**DOC, "docrep": {"values": [INF]}})
    yield docs(
        "docreps of two sizes",
        {**DOC, "docrep": {"values": [1.0]}},
        {"id": "e", "text": "x", "docrep": {"values": [1.0, 2.0]}},
    )
    yield docs("a document id with a newline", {**DOC, "id": "d\n"})
    yield config("a memory dimension of zero", memoryDim=0)
    yield config("a memory dimension of a million", memoryDim=1_000_000)
    yield config("a key dimension of a million", keyDim=1_000_000)
    yield config("an unknown key activation", keyActivation="wiggle")
    yield config("an unknown key module", keyModule="transformer-xl")
    yield config("a key depth of a hundred", keyDepth=100)
    yield config("a layer past the model", layer=1000)
    yield config("a layer far below zero", layer=-100)
    yield config("an unknown token activation", tokenActivation="wiggle")
    yield config("unknown negatives", negatives="everyone")
    yield config("an unknown loss", loss="hinge-ish")
    yield config("a tau of NaN", tau=NAN)
    yield config("a negative tau", tau=-1)
    yield config("an alpha of NaN", alpha=NAN)
    yield config("zero epochs", epochs=0)
    yield config("a million epochs", epochs=1_000_000)
    yield config("a learning rate of NaN", learningRate=NAN)
    yield config("a negative learning rate", learningRate=-1)
    yield config("an infinite learning rate", learningRate=INF)
    yield config("a batch of zero", batchSize=0)
    yield config("a batch of a million", batchSize=1_000_000)
    yield config("windows of zero words", windowWords=0)
    yield config("a stride of zero", windowStride=0)
    yield config("a max length of zero", maxLength=0)
    yield config("an unknown preset", preset="turbo")
    yield config("a tau margin of NaN", tauMargin=NAN)
    yield config("a target cross-entropy of NaN", targetCe=NAN)
    yield config("an unknown schedule", schedule="lunar")
    yield config("a negative share above one", negativeShare=2)
    yield config("a negative share of NaN", negativeShare=NAN)
    yield config("a key init of NaN", keyInit=NAN)
    yield config("ten million background windows", backgroundWindows=10_000_000)
    yield config("a negative locality weight", localityWeight=-1)
    yield config("a locality weight of NaN", localityWeight=NAN)


def adapter_cases() -> Iterator[Bad]:
    def adapter(what: str, name: str = "adapter", **fields: Any) -> Bad:
        return Bad("RegisterAdapter", what, {"name": name, "documents": [DOC], **fields})

    def config(what: str, **settings: Any) -> Bad:
        return adapter(what, config=settings)

    yield adapter("no name", name="")
    yield adapter("a name with a slash", name="x/y")
    yield Bad("RegisterAdapter", "no documents", {"name": "adapter"})
    yield adapter("a template without a question", templates=[{"answer": "Here"}])
    yield adapter("a template without an answer", templates=[{"question": "Where?"}])
    yield config("a layer past the model", layer=1000)
    yield config("a hidden size of zero", hiddenSize=0)
    yield config("a hidden size of a million", hiddenSize=1_000_000)
    yield config("zero epochs", epochs=0)
    yield config("a million epochs", epochs=1_000_000)
    yield config("a learning rate of NaN", learningRate=NAN)
    yield config("a negative learning rate", learningRate=-1)
    yield config("a weight decay of NaN", weightDecay=NAN)
    yield config("a warmup ratio above one", warmupRatio=2)
    yield config("a negative gradient norm", maxGradNorm=-1)
    yield config("a batch of zero", batchSize=0)
    yield config("a max length of zero", maxLength=0)


def memory_cases() -> Iterator[Bad]:
    for rpc in ("GetMemory", "DeleteMemory", "ExportMemory"):
        yield Bad(rpc, "no name", {})
        yield Bad(rpc, "a name with a slash", {"name": "a/b"})
        yield Bad(rpc, "a name too long", {"name": "n" * 300})
        yield Bad(rpc, "a name with a newline", {"name": "bias\n"})
        yield Bad(rpc, "a memory that does not exist", {"name": "no-such-memory"}, NOT_FOUND)
        yield Bad(rpc, "a version that does not exist", {"name": "bias", "version": 999}, NOT_FOUND)
        yield Bad(rpc, "another tenant's memory", {"name": "bias"}, NOT_FOUND, (("memserve-tenant", "bob"),))
    yield Bad("ListMemories", "a name prefix with a slash", {"namePrefix": "a/b"})
    yield Bad("ListMemories", "a page token with a slash", {"pageToken": "a/b"})
    yield Bad("ListMemories", "a tenant with a space", {}, INVALID, (("memserve-tenant", "a b"),))
    # PutMemory: chunk lists made from a real export in the test (see `upload`)
    for what in UPLOADS:
        yield Bad("PutMemory", what)


def job_cases() -> Iterator[Bad]:
    for rpc in ("GetJob", "WatchJob", "CancelJob"):
        yield Bad(rpc, "no job id", {})
        yield Bad(rpc, "a job id that is not hex", {"jobId": "not-a-job-id-xyz!"})
        yield Bad(rpc, "a job id too long", {"jobId": "a" * 19})
        yield Bad(rpc, "a job id in capitals", {"jobId": "ABCDEF0123456789AB"})
        yield Bad(rpc, "a job that does not exist", {"jobId": "0" * 18}, NOT_FOUND)
    yield Bad("ListJobs", "an unknown state", {"state": 99})
    yield Bad("ListJobs", "a negative state", {"state": -1})
    yield Bad("ListJobs", "a page token of letters", {"pageToken": "abc"})
    yield Bad("ListJobs", "a page token of Arabic digits", {"pageToken": "١٢٣"})
    yield Bad("ListJobs", "a page token of thirty digits", {"pageToken": "1" * 30})

    def submit(what: str, spec: Any = None, kind: str = "local", name: str = "facts") -> Bad:
        request: dict[str, Any] = {"kind": kind, "memoryName": name}
        if spec is not None:
            request["spec"] = spec
        return Bad("SubmitJob", what, request)

    yield submit("no kind", {"facts": [FACT]}, kind="")
    yield submit("a kind this server lacks", {"facts": [FACT]}, kind="no-such-kind")
    yield submit("no memory name", {"facts": [FACT]}, name="")
    yield submit("a memory name with a slash", {"facts": [FACT]}, name="a/b")
    yield submit("no spec")
    yield submit("facts as a string", {"facts": "The sky is green"})
    yield submit("facts as numbers", {"facts": [1, 2]})
    yield submit("a fact's prompt as a number", {"facts": [{**FACT, "prompt": 3}]})
    yield submit("a fact's id as a list", {"facts": [{**FACT, "id": ["f"]}]})
    yield submit("a fact's target as null", {"facts": [{**FACT, "target": None}]})
    yield submit("an unknown spec key", {"facts": [FACT], "turbo": True})
    yield submit("an unknown spec key of 70,000 characters", {"facts": [FACT], "k" * 70_000: True})
    yield submit("a config that is a list", {"facts": [FACT], "config": [1]})
    yield submit("a layer as a string", {"facts": [FACT], "config": {"layers": ["one"]}})
    yield submit("a layer as a float", {"facts": [FACT], "config": {"layers": [1.5]}})
    yield submit("a hardness as a bool", {"facts": [FACT], "config": {"hardness": True}})
    yield submit("a spec nested a hundred deep", nested(100))
    yield submit("documents as a dict", {"documents": {"d": "text"}}, kind="document", name="bank")
    yield submit(
        "a docrep of strings", {"documents": [{**DOC, "docrep": ["a"]}]}, kind="document", name="bank"
    )
    yield submit(
        "epochs as a string", {"documents": [DOC], "config": {"epochs": "ten"}}, kind="document", name="bank"
    )
    yield submit(
        "templates as a string", {"documents": [DOC], "templates": "x"}, kind="adapter", name="adapter"
    )
    yield submit(
        "a template as a list",
        {"documents": [DOC], "templates": [["q", "a"]]},
        kind="adapter",
        name="adapter",
    )
    yield submit("an adapter's hidden size negative", {"documents": [DOC], "config": {"hidden_size": -4}},
                 kind="adapter", name="adapter")  # fmt: skip


def nested(depth: int) -> dict[str, Any]:
    spec: dict[str, Any] = {"x": 1}
    for _ in range(depth):
        spec = {"x": spec}
    return {"facts": [FACT], "config": spec}


def evaluation_cases() -> Iterator[Bad]:
    def evaluate(
        what: str, status: str = INVALID, kind: str = "local", name: str = "bias", **options: Any
    ) -> Bad:
        return Bad("Evaluate", what, {"kind": kind, "memoryName": name, "options": options}, status)

    yield evaluate("no kind", kind="")
    yield evaluate("a kind this server lacks", kind="no-such-kind")
    yield evaluate("no memory name", name="")
    yield evaluate("a memory name with a slash", name="a/b")
    yield evaluate("a memory that does not exist", NOT_FOUND, name="no-such-memory")
    yield evaluate("a test memory evaluated as facts")
    yield evaluate("a test memory evaluated as a bank", kind="document")
    yield evaluate("an unknown option", turbo=True)
    yield evaluate("prompts as a string", prompts="x")
    yield evaluate("negative continuation tokens", continuation_tokens=-1)
    yield evaluate("windows as a string", kind="document", windows="many")


# PutMemory's uploads: what each does to a real export's chunks.
UPLOADS = {
    "no chunks": lambda chunks: [],
    "only empty chunks": lambda chunks: [memory_pb2.MemoryChunk(name="up")] * 3,
    "random bytes": lambda chunks: [memory_pb2.MemoryChunk(name="up", data=bytes(range(256)) * 40)],
    "the first half of an export": lambda chunks: halve(chunks),
    "an export with a byte changed": lambda chunks: flipped(chunks),
    "an export with bytes after it": lambda chunks: [*chunks, memory_pb2.MemoryChunk(data=b"trailing")],
    "a name with a slash": lambda chunks: renamed(chunks, "a/b"),
    "a name too long": lambda chunks: renamed(chunks, "n" * 300),
}


def joined(chunks: list[memory_pb2.MemoryChunk]) -> bytes:
    return b"".join(chunk.data for chunk in chunks)


def halve(chunks: list[memory_pb2.MemoryChunk]) -> list[memory_pb2.MemoryChunk]:
    data = joined(chunks)
    return [memory_pb2.MemoryChunk(name="up", data=data[: len(data) // 2])]


def flipped(chunks: list[memory_pb2.MemoryChunk]) -> list[memory_pb2.MemoryChunk]:
    data = bytearray(joined(chunks))
    data[len(data) - 9] ^= 0xFF  # in the tensor data, past the header
    return [memory_pb2.MemoryChunk(name="up", data=bytes(data))]


def renamed(chunks: list[memory_pb2.MemoryChunk], name: str) -> list[memory_pb2.MemoryChunk]:
    return [memory_pb2.MemoryChunk(name=name, data=joined(chunks))]


CASES = list(cases())


def message(rpc: str, request: dict[str, Any]) -> Any:
    """The request as a message: NaN and infinities as protobuf's JSON writes them; the free JSON
    of a spec or options set as it is (a Struct holds any JSON)."""
    free = {k: request[k] for k in ("spec", "options") if k in request}
    fields = {k: v for k, v in request.items() if k not in free}
    built = json_format.ParseDict(json_floats(fields), REQUEST_TYPES[rpc]())
    for name, value in free.items():
        getattr(built, name).update(value)
    return built


def json_floats(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: json_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_floats(v) for v in value]
    return value


def send(channel: grpc.Channel, case: Bad, chunks: list[memory_pb2.MemoryChunk]) -> grpc.RpcError | None:
    path = next(p for p in METHODS if p.endswith("/" + case.rpc))
    method = METHODS[path]
    metadata = case.metadata or None
    try:
        if case.rpc == "PutMemory":
            upload = [c.SerializeToString() for c in UPLOADS[case.what](chunks)]
            channel.stream_unary(path)(iter(upload), timeout=30, metadata=metadata)
            return None
        payload = case.raw
        if payload is None:
            payload = message(case.rpc, case.request).SerializeToString()
        if method.server_streaming:
            for _ in channel.unary_stream(path)(payload, timeout=30, metadata=metadata):
                pass
        else:
            channel.unary_unary(path)(payload, timeout=30, metadata=metadata)
    except grpc.RpcError as exc:
        return exc
    return None


def test_the_table_is_large_and_distinct():
    ids = [case.id for case in CASES]
    assert len(set(ids)) == len(ids), Counter(ids).most_common(3)
    assert len(CASES) >= 200, len(CASES)
    assert {case.rpc for case in CASES} == {p.rsplit("/", 1)[1] for p in METHODS}  # every RPC


@pytest.fixture(scope="module")
def export(fuzzed) -> list[memory_pb2.MemoryChunk]:  # noqa: F811
    publish_bias(fuzzed.running, "bias")  # no case may delete it: each is refused
    with grpc.insecure_channel(f"127.0.0.1:{fuzzed.running.port}") as channel:
        return exported_chunks(channel)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_a_bad_request_gets_its_status(fuzzed, export, case, caplog):  # noqa: F811
    address = f"127.0.0.1:{fuzzed.running.port}"
    with caplog.at_level(logging.WARNING, logger="memserve"), grpc.insecure_channel(address) as channel:
        error = send(channel, case, export)
    assert error is not None, f"{case.id}: accepted"
    assert error.code().name == case.status, f"{case.id}: {error.code().name} {error.details()}"
    assert error.details(), case.id  # a message that says what was wrong
    tracebacks = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not tracebacks, tracebacks[0].getMessage()


def test_the_server_is_healthy_after_the_table(fuzzed):  # noqa: F811
    with grpc.insecure_channel(f"127.0.0.1:{fuzzed.running.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
