"""Mutated messages against every RPC of a running server (tiny model, real Redis): whatever a client
sends, the answer is a status that names the client's mistake (INVALID_ARGUMENT, NOT_FOUND, …),
never INTERNAL or UNKNOWN, nothing is logged with a traceback, and the server stays healthy.

$MEMSERVE_FUZZ_CASES sets the messages per RPC (default 2000)."""

from __future__ import annotations

import logging
import math
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

import tests.kinds  # noqa: F401  (the test-bias kind, for a memory to export and re-import)
from memserve.engine.scheduler import EngineConfig
from memserve.v1 import evaluation_pb2, generation_pb2, jobs_pb2, memory_pb2
from tests.test_server import ServerThread, tiny_server_config
from tests.test_server_store import publish_bias, store_config

CASES = int(os.environ.get("MEMSERVE_FUZZ_CASES", "2000"))
REFUSED = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
SERVICES = [
    module.DESCRIPTOR.services_by_name[name]
    for module, name in (
        (generation_pb2, "GenerationService"),
        (memory_pb2, "MemoryService"),
        (jobs_pb2, "JobService"),
        (evaluation_pb2, "EvaluationService"),
    )
]
METHODS = {
    f"/{service.full_name}/{method.name}": method for service in SERVICES for method in service.methods
}

# Valid requests the mutations start from (besides an empty and a randomly filled one).
SEEDS: dict[str, list[dict[str, Any]]] = {
    "GenerateRequest": [
        {"prompt": "Once upon a time", "stopping": {"maxNewTokens": 2}},
        {"messages": [{"role": "user", "content": "Hi"}], "stopping": {"maxNewTokens": 2},
         "memories": [{"name": "bias"}], "response": {"memoryTrace": True}},
    ],
    "RegisterFactsRequest": [
        {"set": "facts", "facts": [{"id": "f", "prompt": "The sky is", "target": " green"}]}
    ],
    "RegisterDocumentsRequest": [{"bank": "bank", "documents": [{"id": "d", "text": "A town by a river."}]}],
    "GetMemoryRequest": [{"name": "bias"}],
    "ExportMemoryRequest": [{"name": "bias"}],
    "DeleteMemoryRequest": [{"name": "nothing-here"}],
    "ListMemoriesRequest": [{"pageSize": 2}],
    "ListJobsRequest": [{"pageSize": 2}],
    "RegisterAdapterRequest": [{"name": "adapter", "documents": [{"id": "d", "text": "A town by a river."}]}],
    "SubmitJobRequest": [
        {"kind": "local", "memoryName": "facts",
         "spec": {"facts": [{"id": "f", "prompt": "The sky is", "target": " green"}]}},
        {"kind": "document", "memoryName": "bank",
         "spec": {"documents": [{"id": "d", "text": "A town.", "docrep": [0.5]}], "config": {"key_dim": 1}}},
        {"kind": "adapter", "memoryName": "adapter",
         "spec": {"documents": [{"id": "d", "text": "A town."}],
                  "templates": [{"question": "Where?", "answer": "Here"}]}},
    ],
    "EvaluateRequest": [
        {"kind": "local", "memoryName": "facts",
         "options": {"continuation_tokens": 2, "prompts": [{"id": "f", "positive_prompts": ["Sky:"]}]}},
        {"kind": "document", "memoryName": "bank", "options": {"windows": 1}},
    ],
}  # fmt: skip
STRUCT_FIELDS = {"SubmitJobRequest": "spec", "EvaluateRequest": "options"}
"""Where a request carries free JSON: mutated as JSON too (types swapped, NaN, nesting)."""

NASTY_STRINGS = [
    "",
    "\n",
    "a\nINFO forged log line",
    "١٢٣",
    "../../etc/passwd",
    "x" * 5000,
    "\x00",
    "☃" * 300,
]
NASTY_NUMBERS = [0, -1, 1, 2**31 - 1, -(2**31), 2**63 - 1, 1e30, -1e30, math.nan, math.inf, -math.inf, 1e-30]


def random_value(field: FieldDescriptor, rng: random.Random, depth: int) -> Any:
    kind = field.type
    if kind == FieldDescriptor.TYPE_MESSAGE:
        return None if depth > 3 else filled(field.message_type, rng, depth + 1)
    if kind == FieldDescriptor.TYPE_STRING:
        return rng.choice([*NASTY_STRINGS, "bias", "facts", "default"])
    if kind == FieldDescriptor.TYPE_BYTES:
        return rng.randbytes(rng.choice([0, 1, 16, 300]))
    if kind == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if kind == FieldDescriptor.TYPE_ENUM:
        return rng.choice([*(v.number for v in field.enum_type.values), 99, -1])
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return float(rng.choice(NASTY_NUMBERS))
    number = rng.choice([n for n in NASTY_NUMBERS if isinstance(n, int)])
    if kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return abs(number) % 2**32
    if kind in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return abs(number) % 2**64
    if kind in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32):
        return max(-(2**31), min(2**31 - 1, number))
    return number


def filled(descriptor: Descriptor, rng: random.Random, depth: int = 0) -> Message:
    """A message of `descriptor` with random fields set to random, often hostile, values."""
    from google.protobuf import message_factory

    message = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if rng.random() < 0.5:
            continue
        try:
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                continue
            if field.is_repeated:
                for _ in range(rng.choice([1, 2, 3])):
                    value = random_value(field, rng, depth)
                    if value is None:
                        break
                    container = getattr(message, field.name)
                    if field.type == FieldDescriptor.TYPE_MESSAGE:
                        container.add().CopyFrom(value)
                    else:
                        container.append(value)
            else:
                value = random_value(field, rng, depth)
                if value is None:
                    continue
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    getattr(message, field.name).CopyFrom(value)
                else:
                    setattr(message, field.name, value)
        except (TypeError, ValueError):  # a value the Python runtime itself refuses
            continue
    return message


def nasty_json(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(8 if depth < 3 else 5)
    if choice == 0:
        return rng.choice(NASTY_STRINGS)
    if choice == 1:
        return float(rng.choice(NASTY_NUMBERS))
    if choice == 2:
        return None
    if choice == 3:
        return rng.random() < 0.5
    if choice == 4:
        return rng.choice(["", "f", "d", 3])
    if choice == 5:
        return [nasty_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if choice == 6:
        return {
            rng.choice(["id", "text", "prompt", "target", "facts", "documents", "config", "x"]): nasty_json(
                rng, depth + 1
            )
        }
    return "x" * rng.choice([1, 100, 70_000])


def mutated_json(value: Any, rng: random.Random) -> Any:
    """`value` with one node (a key's value, a list item, or the whole) replaced by hostile JSON."""
    if rng.random() < 0.25 or not isinstance(value, dict | list) or not value:
        return nasty_json(rng)
    if isinstance(value, dict):
        key = rng.choice(list(value))
        return {**value, key: mutated_json(value[key], rng)}
    index = rng.randrange(len(value))
    return [*value[:index], mutated_json(value[index], rng), *value[index + 1 :]]


def mutated_bytes(data: bytes, rng: random.Random) -> bytes:
    """`data` with bytes flipped, cut, inserted or duplicated: mostly not a valid message."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.4 and data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif choice < 0.6 and data:
            del data[rng.randrange(len(data)) :]
        elif choice < 0.8:
            at = rng.randrange(len(data) + 1)
            data[at:at] = rng.randbytes(rng.randint(1, 8))
        elif data:
            start = rng.randrange(len(data))
            data += data[start : start + rng.randint(1, 16)]
    return bytes(data)


def requests_for(method: Any, rng: random.Random, count: int, seeds: list[Message]) -> Iterator[bytes]:
    descriptor = method.input_type
    from google.protobuf import message_factory

    cls = message_factory.GetMessageClass(descriptor)
    written = SEEDS.get(descriptor.name, [])
    bases = [cls(), *seeds] + [json_format.ParseDict(s, cls()) for s in written]
    struct = STRUCT_FIELDS.get(descriptor.name)
    for index in range(count):
        if struct and written and index % 3 == 2:
            seed = rng.choice(written)
            message = json_format.ParseDict({k: v for k, v in seed.items() if k != struct}, cls())
            spec = mutated_json(seed[struct], rng)
            if isinstance(spec, dict):
                getattr(message, struct).update(spec)
            yield message.SerializeToString()
        elif index % 2:
            yield filled(descriptor, rng).SerializeToString()
        else:
            yield mutated_bytes(rng.choice(bases).SerializeToString(), rng)


@pytest.fixture(scope="module")
def fuzzed(tiny_llama_dir, redis_standalone) -> Iterator[ServerThread]:
    from tests.conftest import flush

    flush([redis_standalone])
    config = tiny_server_config(tiny_llama_dir, store=store_config(str(redis_standalone.url), workers=0))
    engine = EngineConfig(max_new_tokens_limit=4, default_max_new_tokens=2, max_context_tokens=256)
    server = ServerThread(replace(config, engine=engine))
    publish_bias(server.running, "bias")
    with grpc.insecure_channel(f"127.0.0.1:{server.running.port}") as channel:
        register = channel.unary_unary(
            "/memserve.v1.MemoryService/RegisterFacts",
            request_serializer=memory_pb2.RegisterFactsRequest.SerializeToString,
            response_deserializer=jobs_pb2.Job.FromString,
        )
        job = register(
            json_format.ParseDict(SEEDS["RegisterFactsRequest"][0], memory_pb2.RegisterFactsRequest())
        )
    for request in ("GetJobRequest", "WatchJobRequest", "CancelJobRequest"):  # a queued job (no workers)
        SEEDS[request] = [{"jobId": job.id}]
    yield server
    server.close()


def exported_chunks(channel: grpc.Channel) -> list[memory_pb2.MemoryChunk]:
    export = channel.unary_stream(
        "/memserve.v1.MemoryService/ExportMemory",
        request_serializer=memory_pb2.ExportMemoryRequest.SerializeToString,
        response_deserializer=memory_pb2.MemoryChunk.FromString,
    )
    return list(export(memory_pb2.ExportMemoryRequest(name="bias"), timeout=30))


def call(channel: grpc.Channel, path: str, method: Any, payload: bytes | list[bytes]) -> grpc.StatusCode:
    """Sends raw bytes; returns the status (OK for a stream that answered before we left)."""
    try:
        if method.client_streaming:
            channel.stream_unary(path)(iter(payload), timeout=10)
        elif method.server_streaming:
            stream = channel.unary_stream(path)(payload, timeout=10)
            try:
                next(stream, None)  # one answer is enough: a job's watch would go on for ever
            finally:
                stream.cancel()
        else:
            channel.unary_unary(path)(payload, timeout=10)
    except grpc.RpcError as exc:
        code = exc.code()
        return grpc.StatusCode.OK if code is grpc.StatusCode.CANCELLED else code
    return grpc.StatusCode.OK


@pytest.mark.parametrize("path", sorted(METHODS))
def test_no_message_makes_an_internal_error(fuzzed, path, caplog):
    method = METHODS[path]
    rng = random.Random(path)
    address = f"127.0.0.1:{fuzzed.running.port}"
    outcomes: Counter[str] = Counter()
    refused: list[tuple[grpc.StatusCode, bytes | list[bytes]]] = []
    with caplog.at_level(logging.WARNING, logger="memserve"), grpc.insecure_channel(address) as channel:
        publish_bias(fuzzed.running, "bias")  # a fuzzed DeleteMemory may have deleted it
        seeds = exported_chunks(channel) if method.client_streaming else []
        for payload in requests_for(method, rng, CASES, seeds):
            sent: bytes | list[bytes] = payload
            if method.client_streaming:  # a real upload with one chunk replaced by the mutation
                chunks = [chunk.SerializeToString() for chunk in seeds]
                chunks[rng.randrange(len(chunks))] = payload
                sent = chunks[: rng.randint(1, len(chunks))] if rng.random() < 0.2 else chunks
            code = call(channel, path, method, sent)
            outcomes[code.name] += 1
            if code in REFUSED:
                refused.append((code, sent))
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    print(path, dict(outcomes))  # pytest -s shows what the mutations met
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert not refused, (
        f"{len(refused)} of {CASES} answered {Counter(c.name for c, _ in refused)}: {refused[:3]}"
    )
    tracebacks = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not tracebacks, tracebacks[0].getMessage()
    assert sum(outcomes.values()) == CASES
    assert outcomes["INVALID_ARGUMENT"] > 0, outcomes  # the mutations did reach the checks


def test_fuzzing_covers_every_rpc():
    assert len(METHODS) == 17


def test_a_request_id_cannot_forge_a_log_line(fuzzed):
    request = generation_pb2.GenerateRequest(prompt="Hi", request_id="abc\nINFO forged: all good")
    with grpc.insecure_channel(f"127.0.0.1:{fuzzed.running.port}") as channel:
        generate = channel.unary_unary(
            "/memserve.v1.GenerationService/Generate",
            request_serializer=generation_pb2.GenerateRequest.SerializeToString,
            response_deserializer=generation_pb2.GenerateResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as caught:
            generate(request, timeout=10)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "control character" in caught.value.details()


def test_an_unknown_job_state_is_refused(fuzzed):
    with grpc.insecure_channel(f"127.0.0.1:{fuzzed.running.port}") as channel:
        list_jobs = channel.unary_unary(
            "/memserve.v1.JobService/ListJobs",
            request_serializer=jobs_pb2.ListJobsRequest.SerializeToString,
            response_deserializer=jobs_pb2.ListJobsResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as caught:
            list_jobs(jobs_pb2.ListJobsRequest(state=99), timeout=10)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
