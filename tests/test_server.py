"""The gRPC server end to end, on a tiny Llama saved as a local model folder."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from memserve.api.app import SERVICE_NAMES, RunningServer, ServerConfig, start_server
from memserve.clients import AsyncClient, Client
from memserve.clients.cli import main as cli_main
from memserve.engine.scheduler import EngineConfig
from memserve.memory.runtime import StoreConfig
from memserve.models import ModelConfig
from memserve.v1 import generation_pb2 as pb
from memserve.v1 import memory_pb2, memory_pb2_grpc, memory_ref_pb2

LONG = {"max_new_tokens": 2000, "ignore_eos": True}


class ServerThread:
    """A server running on its own event loop in a background thread, as the tests' peer."""

    def __init__(self, config: ServerConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running: RunningServer = self.call(start_server(config), timeout=120)

    def call(self, coroutine, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self, grace: float = 1.0) -> None:
        self.call(self.running.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def tiny_server_config(model_dir, store: StoreConfig | None = None, **engine: int) -> ServerConfig:
    """A server on the tiny Llama; without `store`, it serves without memories."""
    return ServerConfig(
        port=0,
        metrics_port=None,
        store=store,
        model=ModelConfig(model=str(model_dir), device="cpu"),
        engine=EngineConfig(max_new_tokens_limit=2000, **engine),
    )


@pytest.fixture(scope="module")
def server(tiny_llama_dir) -> Iterator[RunningServer]:
    peer = ServerThread(tiny_server_config(tiny_llama_dir, max_batch_size=2, max_queue_size=4))
    yield peer.running
    peer.close()


@pytest.fixture
def address(server: RunningServer) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture
def client(address: str) -> Iterator[Client]:
    with Client(address) as c:
        yield c


def _wait_idle(server: RunningServer, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (server.engine.running or server.engine.queue_depth) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.engine.running == 0 and server.engine.queue_depth == 0


def test_generate_returns_text_usage_and_seed(client):
    completion = client.generate("The quick brown fox", max_new_tokens=6, ignore_eos=True, logprobs=True)
    assert completion.finish_reason == "length"
    assert completion.generated_tokens == 6 == len(completion.tokens)
    assert completion.prompt_tokens > 0
    assert all(t.logprob is not None and t.logprob <= 0 for t in completion.tokens)


def test_stream_adds_up_to_the_unary_answer(client):
    unary = client.generate("Once upon a time", max_new_tokens=12, ignore_eos=True)
    chunks = list(client.generate_stream("Once upon a time", max_new_tokens=12, ignore_eos=True))
    assert "".join(c.text for c in chunks) == unary.text
    assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])
    assert [t.id for c in chunks for t in c.tokens] == [t.id for t in unary.tokens]


def test_a_seeded_sample_is_reproducible(client):
    first = client.generate("There was", temperature=0.9, seed=11, max_new_tokens=10, ignore_eos=True)
    again = client.generate("There was", temperature=0.9, seed=11, max_new_tokens=10, ignore_eos=True)
    assert first.text == again.text and first.seed == again.seed == 11


def test_the_async_client_generates_concurrently(address):
    async def main() -> list[str]:
        async with AsyncClient(address) as client:
            results = await asyncio.gather(
                *(client.generate(p, max_new_tokens=5, ignore_eos=True) for p in ("a", "bb", "ccc"))
            )
            streamed = [c.text async for c in client.generate_stream("a", max_new_tokens=5, ignore_eos=True)]
        assert "".join(streamed) == results[0].text
        return [r.text for r in results]

    assert len(asyncio.run(main())) == 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prompt": ""}, "prompt is empty"),
        ({"max_new_tokens": 0}, r"max_new_tokens must be in \[1, 2000\], got 0"),
        ({"max_new_tokens": -5}, "max_new_tokens must be in"),
        ({"max_new_tokens": 2001}, "max_new_tokens must be in"),
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ({"top_logprobs": 21}, "top_logprobs must be at most 20"),
        ({"stop": [""]}, "each stop sequence must have 1 to 256"),
        ({"stop": ["x"] * 17}, "at most 16 stop_sequences"),
        ({"prompt": "word " * 600}, "shorten the prompt"),
    ],
)
def test_bad_input_is_invalid_argument_with_the_fix(client, options, message):
    prompt = options.pop("prompt", "hello")
    with pytest.raises(grpc.RpcError) as info:
        client.generate(prompt, **options)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(message, info.value.details())
    assert client.generate("still up?", max_new_tokens=1).generated_tokens == 1


def test_health_watch_streams_the_serving_status(address):
    with grpc.insecure_channel(address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        first = next(watch)
        watch.cancel()
    assert first.status == health_pb2.HealthCheckResponse.SERVING


def test_a_prompt_far_longer_than_the_context_is_refused_before_tokenising(client):
    with pytest.raises(grpc.RpcError) as info:
        client.generate("x" * 40_000)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "40000 characters" in info.value.details()


def test_chat_on_a_model_without_a_chat_template_says_so(client):
    with pytest.raises(grpc.RpcError) as info:
        client.generate("Hi", chat=True)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "no chat template" in info.value.details()


def test_unknown_fields_are_refused(address):
    raw = pb.GenerateRequest(prompt="hi").SerializeToString() + bytes([0xF8, 0x06, 0x01])  # field 111 = 1
    with grpc.insecure_channel(address) as channel:
        generate = channel.unary_unary(
            "/memserve.v1.GenerationService/Generate", response_deserializer=pb.GenerateResponse.FromString
        )
        with pytest.raises(grpc.RpcError) as info:
            generate(raw)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "numbers [111]" in info.value.details()


def test_a_server_without_a_store_refuses_memory_references(address):
    request = pb.GenerateRequest(prompt="hi")
    request.memories.add(document=memory_ref_pb2.DocumentRef(bank="b", document_id="d"))
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_stub(channel).Generate(request)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "without a memory store" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            memory_pb2_grpc.MemoryServiceStub(channel).ListMemories(memory_pb2.ListMemoriesRequest())
        assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED


def pb_stub(channel: grpc.Channel):
    from memserve.v1 import generation_pb2_grpc

    return generation_pb2_grpc.GenerationServiceStub(channel)


def test_health_says_serving_and_reflection_lists_the_services(address):
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", *SERVICE_NAMES):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(reflection.ServerReflectionInfo(iter([request])))
        listed = {s.name for s in response.list_services_response.service}
    assert set(SERVICE_NAMES) <= listed and "grpc.health.v1.Health" in listed


def test_a_full_queue_answers_resource_exhausted(server, client):
    # Two slots and four queue places: of ten long requests, at least four are refused.
    futures = [client._stub.Generate.future(_long_request(), timeout=30) for _ in range(10)]
    codes = []
    for future in futures:
        try:
            future.result(timeout=0.5)
            codes.append(grpc.StatusCode.OK)
        except grpc.FutureTimeoutError:
            codes.append(None)  # still running or queued
        except grpc.RpcError as exc:
            codes.append(exc.code())
    for future in futures:
        future.cancel()
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 4
    _wait_idle(server)


def _long_request() -> pb.GenerateRequest:
    request = pb.GenerateRequest(prompt="The quick brown fox")
    request.stopping.max_new_tokens = LONG["max_new_tokens"]
    request.stopping.ignore_eos = True
    return request


def test_a_client_that_goes_away_frees_its_slot(server, client):
    stream = client.generate_stream("The quick", **LONG)
    next(stream)
    stream.close()  # cancels the RPC
    _wait_idle(server)


def test_a_deadline_stops_generation_and_frees_the_slot(server, address):
    with Client(address, timeout=0.3) as short, pytest.raises(grpc.RpcError) as info:
        short.generate("The quick", **LONG)
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_idle(server)


def test_cli_generate_prints_the_completion(address, client, capsys):
    assert cli_main(["generate", "--server", address, "--max-new-tokens", "4", "hello"]) == 0
    assert capsys.readouterr().out == client.generate("hello", max_new_tokens=4).text + "\n"
    assert cli_main(["generate", "--server", address, "--stream", "--max-new-tokens", "4", "hello"]) == 0
    assert cli_main(["generate", "--server", address, "--top-p", "2", "hello"]) == 1
    assert "INVALID_ARGUMENT: sampling.top_p must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        cli_main(["generate", "--server", address, "--seed", "-1", "hello"])
    assert exited.value.code == 2 and "--seed: must be >= 0" in capsys.readouterr().err
    assert cli_main(["generate", "--server", address, "-v", "--stream", "--max-new-tokens", "3", "hi"]) == 0
    assert "generated tokens; seed" in capsys.readouterr().err


def test_info_describes_the_model_and_limits(address, capsys):
    assert cli_main(["info", "--server", address]) == 0
    out = capsys.readouterr().out
    fields = {label: value.strip() for label, value in (line.split(":", 1) for line in out.splitlines())}
    assert fields["architecture"] == "LlamaForCausalLM" and fields["max new tokens limit"] == "2000"


def test_shutdown_lets_in_flight_requests_finish_and_refuses_new_ones(tiny_llama_dir):
    peer = ServerThread(tiny_server_config(tiny_llama_dir))
    address = f"127.0.0.1:{peer.running.port}"
    with Client(address, timeout=60) as client:
        in_flight = client._stub.Generate.future(_long_request())
        while not peer.running.engine.running:
            time.sleep(0.01)
        peer.close(grace=30)
        # It runs to its natural end: the tiny model's 512-token context.
        assert in_flight.result().finish_reason == pb.FINISH_REASON_CONTEXT_LENGTH
        with pytest.raises(grpc.RpcError) as info:
            client.generate("too late", max_new_tokens=1)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE


def test_requests_outlasting_the_grace_period_end_cancelled_with_the_reason(tiny_llama_dir):
    peer = ServerThread(tiny_server_config(tiny_llama_dir))
    with Client(f"127.0.0.1:{peer.running.port}", timeout=60) as client:
        in_flight = client._stub.Generate.future(_long_request())
        while not peer.running.engine.running:
            time.sleep(0.01)
        peer.close(grace=0.0)
        with pytest.raises(grpc.RpcError) as info:
            in_flight.result()
    assert info.value.code() is grpc.StatusCode.CANCELLED
    assert "shut down before the request finished" in info.value.details()
