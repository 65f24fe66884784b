"""Generation through the memory store, and the memory and job RPCs, on a real Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace

import grpc
import pytest
import torch
from google.protobuf.struct_pb2 import Struct

import tests.kinds  # noqa: F401  (registers the test-bias kind)
from memserve.api.app import RunningServer
from memserve.clients.client import Client
from memserve.errors import FailedPrecondition
from memserve.memory.runtime import StoreConfig
from memserve.memory_store.artifact import MemoryMeta
from memserve.memory_store.redis_server import RedisServer
from memserve.memory_store.redis_store import RedisStore
from memserve.training.worker import WorkerConfig
from memserve.v1 import generation_pb2 as pb
from memserve.v1 import generation_pb2_grpc, jobs_pb2, jobs_pb2_grpc, memory_pb2, memory_pb2_grpc
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


def generate(
    address: str, memories: list[dict] | None = None, prompt: str = "Once upon a time"
) -> pb.GenerateResponse:
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


def status_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value.code(), error.value.details()


def test_bad_references_get_clear_statuses(peer):
    address = f"127.0.0.1:{peer.running.port}"
    code, details = status_of(lambda: generate(address, [{"name": "missing"}]))
    assert code is grpc.StatusCode.NOT_FOUND and "'missing' does not exist" in details
    publish_bias(peer.running, "elsewhere", base_model="another-model")
    code, details = status_of(lambda: generate(address, [{"name": "elsewhere"}]))
    assert code is grpc.StatusCode.FAILED_PRECONDITION and "another base model" in details
    publish_bias(peer.running, "shift")
    code, details = status_of(lambda: generate(address, [{"local": {"set": "shift"}}]))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "is a test-bias memory" in details
    code, details = status_of(lambda: generate(address, [{"name": "shift", "version": 9}]))
    assert code is grpc.StatusCode.NOT_FOUND and "no version 9" in details
    code, details = status_of(lambda: generate(address, [{"name": "bad name"}]))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    code, details = status_of(lambda: generate(address, [{"name": "shift", "scale": float("nan")}]))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "scale" in details
    code, details = status_of(lambda: generate(address, [{"name": "shift"}] * 17))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    # The server is fine afterwards.
    assert generate(address, [{"name": "shift"}]).memories[0].version == 1


def test_a_corrupted_memory_is_refused_and_never_applied(peer):
    address = f"127.0.0.1:{peer.running.port}"
    published = publish_bias(peer.running, "shift")
    store = peer.running.runtime.store
    blob_key = store._blob_key("default", "shift", published.sha256)
    blob = bytearray(store.client.get(blob_key))
    blob[-1] ^= 0x01
    store.client.set(blob_key, bytes(blob))
    code, details = status_of(lambda: generate(address, [{"name": "shift"}]))
    assert code is grpc.StatusCode.DATA_LOSS and "corrupted" in details
    assert len(peer.running.runtime.cache) == 0


def test_a_new_version_is_used_by_both_servers(tiny_llama_dir, standalone_url):
    first = ServerThread(tiny_server_config(tiny_llama_dir, store=store_config(standalone_url, workers=0)))
    second = ServerThread(tiny_server_config(tiny_llama_dir, store=store_config(standalone_url, workers=0)))
    try:
        addresses = [f"127.0.0.1:{s.running.port}" for s in (first, second)]
        publish_bias(first.running, "shift", seed=1)
        before = [generate(a, [{"name": "shift"}]) for a in addresses]
        assert [r.memories[0].version for r in before] == [1, 1]
        assert before[0].text == before[1].text
        publish_bias(first.running, "shift", seed=2)  # version 2, announced on the changes channel
        for address in addresses:
            wait_until(lambda a=address: generate(a, [{"name": "shift"}]).memories[0].version == 2, 10)
        after = [generate(a, [{"name": "shift"}]) for a in addresses]
        assert after[0].text == after[1].text != before[0].text
        # A pinned version still answers.
        assert generate(addresses[1], [{"name": "shift", "version": 1}]).text == before[0].text
    finally:
        first.close()
        second.close()


def test_redis_restarted_mid_run(tiny_llama_dir, tmp_path):
    redis_server = RedisServer(tmp_path / "redis").start()
    peer = ServerThread(tiny_server_config(tiny_llama_dir, store=store_config(redis_server.url, workers=0)))
    try:
        address = f"127.0.0.1:{peer.running.port}"
        publish_bias(peer.running, "cached", seed=1)
        publish_bias(peer.running, "uncached", seed=2)
        with_memory = generate(address, [{"name": "cached"}])
        plain = generate(address)
        redis_server.kill()
        # Memory-free and cached requests go on; one that needs Redis fails fast.
        assert generate(address).text == plain.text
        assert generate(address, [{"name": "cached"}]).text == with_memory.text
        started = time.monotonic()
        code, details = status_of(lambda: generate(address, [{"name": "uncached"}]))
        assert code is grpc.StatusCode.UNAVAILABLE and "unreachable" in details
        assert time.monotonic() - started < 10
        # Same port, same data (append-only file): the server reconnects by itself.
        redis_server.start()
        wait_until(lambda: _succeeds(lambda: generate(address, [{"name": "uncached"}])), 30)
        assert generate(address, [{"name": "cached"}]).text == with_memory.text
        # The change events are back too: a new version is picked up.
        publish_bias(peer.running, "cached", seed=3)
        wait_until(lambda: generate(address, [{"name": "cached"}]).memories[0].version == 2, 10)
    finally:
        peer.close()
        redis_server.stop()


def _succeeds(call) -> bool:
    try:
        call()
        return True
    except grpc.RpcError:
        return False


def test_embedded_default_trains_through_the_in_process_worker(tiny_llama_dir, tmp_path):
    config = StoreConfig(data_dir=tmp_path / "data", worker=FAST_WORKER)  # no URL: embedded Redis
    peer = ServerThread(tiny_server_config(tiny_llama_dir, store=config))
    try:
        address = f"127.0.0.1:{peer.running.port}"
        with grpc.insecure_channel(address) as channel:
            jobs = jobs_pb2_grpc.JobServiceStub(channel)
            spec = Struct()
            spec.update({"steps": 10, "step_seconds": 0.05, "layer": 1, "seed": 5})
            job = jobs.SubmitJob(
                jobs_pb2.SubmitJobRequest(kind="test-bias", memory_name="trained", spec=spec)
            )
            assert job.state == jobs_pb2.JOB_STATE_QUEUED
            states = [update for update in jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id), timeout=60)]
            assert states[-1].state == jobs_pb2.JOB_STATE_SUCCEEDED and states[-1].result_version == 1
            assert states[-1].progress.step == 10 and states[-1].progress.total == 10
            assert any(s.state == jobs_pb2.JOB_STATE_RUNNING for s in states)
            listed = jobs.ListJobs(jobs_pb2.ListJobsRequest()).jobs
            assert [j.id for j in listed] == [job.id]
            code, _ = status_of(lambda: jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.id),
                                                    metadata=[("memserve-tenant", "other")]))  # fmt: skip
            assert code is grpc.StatusCode.NOT_FOUND
            adapter_job = jobs_pb2.SubmitJobRequest(kind="adapter", memory_name="b")
            code, details = status_of(lambda: jobs.SubmitJob(adapter_job))
            assert code is grpc.StatusCode.INVALID_ARGUMENT and "documents, templates" in details
        assert generate(address, [{"name": "trained"}]).memories[0].version == 1
        data_dir = peer.running.runtime.redis_server.data_dir
    finally:
        peer.close()
    assert (data_dir / "appendonly.aof").stat().st_size > 0
    # Persisted: a new server on the same data directory still has the memory.
    peer = ServerThread(tiny_server_config(tiny_llama_dir, store=config))
    try:
        assert generate(f"127.0.0.1:{peer.running.port}", [{"name": "trained"}]).memories[0].version == 1
        with pytest.raises(FailedPrecondition, match="another memserve"):
            RedisServer(data_dir, lock=True).start()
    finally:
        peer.close()


def test_memory_rpcs_round_trip(peer):
    address = f"127.0.0.1:{peer.running.port}"
    publish_bias(peer.running, "shift", seed=1)
    publish_bias(peer.running, "shift", seed=2)
    with grpc.insecure_channel(address) as channel:
        memories = memory_pb2_grpc.MemoryServiceStub(channel)
        info = memories.GetMemory(memory_pb2.GetMemoryRequest(name="shift"))
        assert (info.version, list(info.versions), info.kind) == (2, [1, 2], "test-bias")
        assert info.hyperparameters["layer"] == 1 and len(info.sha256) == 64
        chunks = list(memories.ExportMemory(memory_pb2.ExportMemoryRequest(name="shift", version=1)))
        assert chunks[0].name == "shift"
        exported = b"".join(c.data for c in chunks)
        imported = memories.PutMemory(iter([memory_pb2.MemoryChunk(name="copy", data=exported)]))
        assert (imported.name, imported.version, imported.sha256) == ("copy", 1, _sha(peer, "shift", 1))
        listed = memories.ListMemories(memory_pb2.ListMemoriesRequest())
        assert [(m.name, m.version) for m in listed.memories] == [("copy", 1), ("shift", 2)]
        assert memories.DeleteMemory(memory_pb2.DeleteMemoryRequest(name="shift")).deleted_versions == 2
        code, _ = status_of(lambda: memories.GetMemory(memory_pb2.GetMemoryRequest(name="shift")))
        assert code is grpc.StatusCode.NOT_FOUND
        code, details = status_of(
            lambda: memories.PutMemory(iter([memory_pb2.MemoryChunk(name="x", data=b"junk")]))
        )
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "export file" in details
    assert generate(address, [{"name": "copy"}]).memories[0].version == 1


def _sha(peer: ServerThread, name: str, version: int) -> str:
    return peer.running.runtime.store.meta(name, version).sha256


def test_register_rpcs_check_their_requests(peer):
    with grpc.insecure_channel(f"127.0.0.1:{peer.running.port}") as channel:
        memories = memory_pb2_grpc.MemoryServiceStub(channel)
        code, details = status_of(
            lambda: memories.RegisterDocuments(memory_pb2.RegisterDocumentsRequest(bank="b"))
        )
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "at least one document" in details
        code, details = status_of(lambda: memories.RegisterFacts(memory_pb2.RegisterFactsRequest(set="s")))
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "at least one fact" in details
        code, details = status_of(
            lambda: memories.RegisterAdapter(memory_pb2.RegisterAdapterRequest(name="a"))
        )
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "documents, templates" in details
        bad = memory_pb2.RegisterAdapterRequest(
            name="a",
            templates=[memory_pb2.QATemplate(question="Q")],
            config=memory_pb2.AdapterTrainingConfig(epochs=0),
        )
        code, details = status_of(lambda: memories.RegisterAdapter(bad))
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "question and an answer" in details


def test_documents_register_train_and_serve_through_the_server(tiny_llama_dir, tmp_path):
    config = StoreConfig(data_dir=tmp_path / "data", worker=FAST_WORKER)
    peer = ServerThread(tiny_server_config(tiny_llama_dir, store=config))
    try:
        address = f"127.0.0.1:{peer.running.port}"
        request = memory_pb2.RegisterDocumentsRequest(bank="stories")
        texts = {
            "fox": "The quick brown fox jumps over the lazy dog. " * 5,
            "sea": "Once upon a time there was a small village by the sea. " * 5,
        }
        for doc_id, text in texts.items():
            request.documents.add(id=doc_id, title=doc_id, text=text)
        request.config.epochs = 20
        request.config.key_dim = 2
        request.config.window_words = 16
        request.config.window_stride = 8
        with grpc.insecure_channel(address) as channel:
            job = memory_pb2_grpc.MemoryServiceStub(channel).RegisterDocuments(request)
            jobs = jobs_pb2_grpc.JobServiceStub(channel)
            final = list(jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id), timeout=120))[-1]
            assert final.state == jobs_pb2.JOB_STATE_SUCCEEDED, final.error
            info = memory_pb2_grpc.MemoryServiceStub(channel).GetMemory(
                memory_pb2.GetMemoryRequest(name="stories")
            )
        assert info.kind == "document" and [d["id"] for d in info.details["documents"]] == ["fox", "sea"]
        fox = generate(address, [{"document": {"bank": "stories", "document_id": "fox"}}], prompt="The")
        sea = generate(address, [{"document": {"bank": "stories", "document_id": "sea"}}], prompt="The")
        assert fox.memories[0].kind == "document" and fox.text != sea.text
        mix = {"bank": "stories", "mix": {"documents": [{"document_id": "fox", "weight": 1.0}]}}
        assert generate(address, [{"document": mix}], prompt="The").text == fox.text
        wrong_size = {"bank": "stories", "docrep": {"values": [1, 2, 3]}}
        code, details = status_of(lambda: generate(address, [{"document": wrong_size}]))
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "2 values" in details
        not_a_number = {"bank": "stories", "docrep": {"values": [1, float("nan")]}}
        code, details = status_of(lambda: generate(address, [{"document": not_a_number}]))
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "NaN" in details
        code, details = status_of(
            lambda: generate(address, [{"document": {"bank": "stories", "document_id": "x"}}])
        )
        assert code is grpc.StatusCode.NOT_FOUND
        code, details = status_of(lambda: generate(address, [{"name": "stories"}]))
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "which key" in details
    finally:
        peer.close()


def test_with_a_token_the_mutating_rpcs_want_it_and_the_others_do_not(tiny_llama_dir, standalone_url):
    config = replace(
        tiny_server_config(tiny_llama_dir, store=store_config(standalone_url)), auth_token="s3cret"
    )
    server = ServerThread(config)
    try:
        address = f"127.0.0.1:{server.running.port}"
        templates = [("Q?", "A.")]
        for token, expected in ((None, "send a bearer token"), ("wrong", "not one this server knows")):
            with (
                Client(address, tenant="", token=token or "") as client,
                pytest.raises(grpc.RpcError) as error,
            ):
                client.register_adapter("a", templates=templates, config={"epochs": 1, "hidden_size": 4})
            assert error.value.code() is grpc.StatusCode.UNAUTHENTICATED and expected in error.value.details()
        with Client(address, tenant="", token="") as client:
            assert client.generate("Hello", max_new_tokens=2).text  # reading and generating need no token
            assert client.list_memories() == []
            with pytest.raises(grpc.RpcError) as error:
                client.delete_memory("a")
            assert error.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with Client(address, tenant="", token="s3cret") as client:
            job = client.register_adapter("a", templates=templates, config={"epochs": 1, "hidden_size": 4})
            assert list(client.watch_job(job.id))[-1].state == "succeeded"
    finally:
        server.close()
