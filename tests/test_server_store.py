"""Generation through the memory store, and the memory and job RPCs, on a real Redis."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import torch

import tests.kinds  # noqa: F401  (registers the test-bias kind)
from memserve.app import RunningServer
from memserve.memory_store.artifact import MemoryMeta
from memserve.memory_store.redis_store import RedisStore
from memserve.store_runtime import StoreConfig
from memserve.v1 import generation_pb2 as pb
from memserve.v1 import generation_pb2_grpc
from memserve.worker import WorkerConfig
from tests.conftest import wait_until
from tests.test_server import ServerThread, tiny_server_config

FAST_WORKER = WorkerConfig(heartbeat_interval=0.2, claim_idle=1.0, report_interval=0.0)


def store_config(url: str, workers: int = 1) -> StoreConfig:
    return StoreConfig(redis_url=url, workers=workers, worker=FAST_WORKER, cache_bytes=64 << 20)


@pytest.fixture
def peer(tiny_llama_dir, standalone_url) -> Iterator[ServerThread]:
    server = ServerThread(tiny_server_config(tiny_llama_dir, store=store_config(standalone_url)))
    yield server
    server.close()


def publish_bias(running: RunningServer, name: str, *, seed: int = 0, value: float = 4.0, layer: int = 1,
                 base_model: str | None = None) -> MemoryMeta:  # fmt: skip
    store: RedisStore = running.runtime.store
    fingerprint = base_model or running.runtime.cache.fingerprint
    hidden = 64
    delta = torch.randn(hidden, generator=torch.Generator().manual_seed(seed)) * value
    meta = MemoryMeta(kind="test-bias", name=name, base_model=fingerprint, hyperparameters={"layer": layer})
    return store.publish(meta, {"delta": delta, "padding": torch.zeros(0, hidden)})


def generate(address: str, memories: list[dict] | None = None, prompt: str = "Once upon a time") -> pb.GenerateResponse:
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        request = pb.GenerateRequest(prompt=prompt)
        request.stopping.max_new_tokens = 8
        request.stopping.ignore_eos = True
        for memory in memories or ():
            request.memories.add(**memory)
        return stub.Generate(request, timeout=60)


def test_generation_uses_a_stored_memory(peer):
    address = f"127.0.0.1:{peer.running.port}"
    plain = generate(address)
    publish_bias(peer.running, "shift")
    shifted = generate(address, [{"name": "shift"}])
    assert shifted.text != plain.text
    assert [(m.name, m.kind, m.version) for m in shifted.memories] == [("shift", "test-bias", 1)]
    assert generate(address, [{"name": "shift", "scale": 0.0}]).text == plain.text
