"""The Python clients against a real server (tiny Llama, real Redis): typed results, typed errors,
and the same answers from `Client` and `AsyncClient`, whose methods come from one table of calls."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import subprocess
import sys
import typing
from collections.abc import AsyncGenerator, Generator

import grpc
import pytest
from google.protobuf.message import Message

import tests.kinds  # noqa: F401  (registers the test-bias kind in this process, where the server runs)
from memserve.clients import (
    AsyncClient,
    Client,
    Completion,
    InvalidArgument,
    MemoryInfo,
    MemserveError,
    ModelInfo,
    NotFound,
    Unavailable,
    UsedMemory,
)
from memserve.clients.calls import Calls
from memserve.clients.errors import error_from
from memserve.clients.requests import build_request
from memserve.clients.rpc import Call, Shape
from memserve.v1 import generation_pb2 as pb
from tests.test_server import ServerThread
from tests.test_server_store import publish_bias

PROMPT = "Once upon a time"
UNKNOWN_JOB = "0" * 18  # well formed (18 hex digits), never issued
CALLS = sorted(name for name, value in vars(Calls).items() if isinstance(value, Call))


pytestmark = pytest.mark.usefixtures("no_ambient_tenant")


@pytest.fixture(scope="module")
def address(store_server: ServerThread, store_address: str) -> str:
    """The module's server (tiny Llama, real Redis), with one memory published."""
    publish_bias(store_server.running, "client-bias")
    return store_address


def both_async(address: str, scenario: typing.Callable[[AsyncClient], typing.Any]) -> typing.Any:
    """Awaits `scenario(client)` with an `AsyncClient`."""

    async def run() -> typing.Any:
        async with AsyncClient(address) as client:
            return await scenario(client)

    return asyncio.run(run())


def both(address: str, scenario: typing.Callable[[typing.Any], typing.Any]) -> tuple[typing.Any, typing.Any]:
    """`scenario(client)` with a `Client`, then awaited with an `AsyncClient`."""
    with Client(address) as client:
        blocking = scenario(client)
    return blocking, both_async(address, scenario)


# --- the methods made from the table ---


@pytest.mark.parametrize("name", CALLS)
def test_each_call_is_a_real_method_with_the_same_signature_on_both_clients(name):
    blocking, asynchronous = getattr(Client, name), getattr(AsyncClient, name)
    assert inspect.isfunction(blocking) and inspect.isfunction(asynchronous)
    assert blocking.__doc__ and blocking.__doc__ == asynchronous.__doc__
    assert (blocking.__qualname__, asynchronous.__qualname__) == (f"Client.{name}", f"AsyncClient.{name}")
    parameters = inspect.signature(blocking).parameters
    assert list(parameters) == list(inspect.signature(asynchronous).parameters)
    assert next(iter(parameters)) == "self"
    streams = getattr(Calls, name).shape is Shape.STREAM
    assert inspect.iscoroutinefunction(asynchronous) is not streams


def test_generate_takes_every_option_as_a_typed_keyword():
    parameters = inspect.signature(Client.generate).parameters
    options = [p for p in parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert [p.name for p in options] == list(inspect.signature(build_request).parameters)[1:]
    assert {"memories", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop"} <= set(parameters)
    assert parameters["max_new_tokens"].default is None and parameters["temperature"].default == 0.0
    assert parameters["max_new_tokens"].annotation == int | None
    assert inspect.signature(AsyncClient.generate_stream).parameters == parameters
    with Client("127.0.0.1:1") as client, pytest.raises(TypeError, match="max_new_token"):
        client.generate(PROMPT, max_new_token=3)


def test_every_proto_option_of_a_generate_request_has_a_keyword():
    covered = {
        *("temperature", "top_k", "top_p", "repetition_penalty", "seed", "max_new_tokens"),
        *("include_stop_sequence", "ignore_eos", "logprobs", "top_logprobs", "memory_trace"),
    }
    for message in (pb.SamplingParams, pb.StoppingCriteria, pb.ResponseOptions):
        for field in message.DESCRIPTOR.fields:
            assert field.name in covered or field.name == "stop_sequences", field.name
    keywords = set(inspect.signature(Client.generate).parameters)
    assert covered | {"stop", "memories", "chat", "request_id"} <= keywords


@pytest.mark.parametrize("name", CALLS)
def test_no_method_returns_a_protobuf_message(name):
    for client in (Client, AsyncClient):
        returns = typing.get_type_hints(getattr(client, name))["return"]
        for kind in (returns, *typing.get_args(returns)):
            assert not (isinstance(kind, type) and issubclass(kind, Message)), (client, name, kind)
    returns = typing.get_type_hints(Client.generate_stream)["return"]
    assert typing.get_origin(returns) is Generator
    assert typing.get_origin(typing.get_type_hints(AsyncClient.watch_job)["return"]) is AsyncGenerator


# --- results ---


def test_model_info_is_a_dataclass_with_every_field_of_the_message(address):
    blocking, asynchronous = both(address, lambda client: client.model_info())
    assert isinstance(blocking, ModelInfo) and blocking == asynchronous
    assert [f.name for f in dataclasses.fields(ModelInfo)] == [f.name for f in pb.ModelInfo.DESCRIPTOR.fields]
    assert blocking.architecture == "LlamaForCausalLM" and blocking.max_new_tokens_limit == 2000
    assert isinstance(blocking.memory_kinds, list) and "test-bias" in blocking.memory_kinds
    assert blocking.to_dict()["num_layers"] == blocking.num_layers == 3
    assert blocking.weights.startswith("dense weights (no layer")  # a tiny random model


def test_the_two_clients_give_equal_results(address):
    options = {"max_new_tokens": 5, "ignore_eos": True, "seed": 7, "temperature": 0.8, "logprobs": True}
    blocking, asynchronous = both(address, lambda client: client.generate(PROMPT, **options))
    assert isinstance(blocking, Completion) and blocking == asynchronous
    assert blocking.seed == 7 and all(t.logprob is not None for t in blocking.tokens)

    memory = both(address, lambda client: client.get_memory("client-bias"))
    assert isinstance(memory[0], MemoryInfo) and memory[0] == memory[1]
    listed = both(address, lambda client: client.list_memories(prefix="client-"))
    assert listed[0] == listed[1] == [memory[0]]
    exported = both(address, lambda client: client.export_memory("client-bias"))
    assert exported[0] == exported[1] and len(exported[0]) > memory[0].size_bytes > 0


def test_streams_of_both_clients_add_up_to_the_same_chunks(address):
    options = {"max_new_tokens": 4, "ignore_eos": True, "memories": ["client-bias"], "seed": 3}
    with Client(address) as client:
        chunks = list(client.generate_stream(PROMPT, **options))
        whole = client.generate(PROMPT, **options)

    async def collect() -> list:
        async with AsyncClient(address) as client:
            return [chunk async for chunk in client.generate_stream(PROMPT, **options)]

    assert asyncio.run(collect()) == chunks
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[0].memories == whole.memories == [UsedMemory("client-bias", "test-bias", 1)]
    assert whole.memories[0].kind == "test-bias" and whole.memories == [("client-bias", "test-bias", 1)]


# --- errors ---


def test_an_unknown_memory_is_not_found_with_its_code_on_both_clients(address):
    async def unknown(client: AsyncClient) -> None:
        await client.get_memory("no-such-memory")

    with Client(address) as client, pytest.raises(NotFound) as blocking:
        client.get_memory("no-such-memory")
    with pytest.raises(NotFound) as asynchronous:
        both_async(address, unknown)
    for error in (blocking.value, asynchronous.value):
        assert isinstance(error, MemserveError) and isinstance(error, grpc.RpcError)
        assert error.code() is error.status is grpc.StatusCode.NOT_FOUND
        assert "no-such-memory" in error.details() and error.message == error.details()
        assert str(error).startswith("NOT_FOUND: ")
    assert blocking.value.details() == asynchronous.value.details()


def test_streams_folds_and_uploads_raise_typed_errors_too(address, tmp_path):
    with Client(address) as client:
        with pytest.raises(InvalidArgument, match="top_p"):
            list(client.generate_stream(PROMPT, top_p=2.0))
        with pytest.raises(NotFound):
            list(client.watch_job(UNKNOWN_JOB))
        with pytest.raises(NotFound):
            client.export_memory_to("no-such-memory", tmp_path / "out")
        assert not list(tmp_path.iterdir())  # no half-written file
        with pytest.raises(MemserveError) as upload:
            client.put_memory(b"not an export file", name="garbage")
    assert upload.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    async def scenario(client: AsyncClient) -> None:
        with pytest.raises(InvalidArgument, match="top_p"):
            _ = [chunk async for chunk in client.generate_stream(PROMPT, top_p=2.0)]
        with pytest.raises(NotFound):
            _ = [job async for job in client.watch_job(UNKNOWN_JOB)]
        with pytest.raises(NotFound):
            await client.export_memory("no-such-memory")
        with pytest.raises(InvalidArgument):
            await client.put_memory(b"not an export file", name="garbage")

    both_async(address, scenario)


def test_grpc_style_handlers_keep_working(address):
    with Client(address) as client:
        try:
            client.generate("")
        except grpc.RpcError as error:  # code written against plain grpc
            assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "prompt" in error.details()
        else:
            pytest.fail("an empty prompt was accepted")


def test_no_server_is_unavailable():
    with Client("127.0.0.1:1", timeout=10) as client, pytest.raises(Unavailable) as error:
        client.model_info()
    assert error.value.code() is grpc.StatusCode.UNAVAILABLE


def test_every_status_has_its_own_error_class():
    class Raw(grpc.RpcError):
        def __init__(self, code: grpc.StatusCode) -> None:
            self._code = code

        def code(self) -> grpc.StatusCode:
            return self._code

        def details(self) -> str:
            return "why"

    for code in grpc.StatusCode:
        if code is grpc.StatusCode.OK:
            continue
        error = error_from(Raw(code))
        assert type(error) is MemserveError.by_status[code] and type(error) is not MemserveError
        assert error.code() is code and error.details() == "why"
        assert type(error).__name__.lower() == code.name.replace("_", "").lower()


def test_the_client_imports_neither_torch_nor_the_server():
    code = (
        "import sys, memserve.clients, memserve.clients.client\n"
        "allowed = ('memserve.clients', 'memserve.v1', 'memserve.names')\n"
        "print([m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')"
        " or m.startswith('memserve.') and not m.startswith(allowed)])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_token_and_the_tenant_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("MEMSERVE_TOKEN", "secret")
    monkeypatch.setenv("MEMSERVE_TENANT", "team")
    with Client("127.0.0.1:1") as client:
        assert (client.token, client.tenant) == ("secret", "team")
        assert ("authorization", "Bearer secret") in client._options["metadata"]
    with Client("127.0.0.1:1", token="", tenant="") as client:
        assert client._options["metadata"] is None
