"""ExportMemory streams from Redis a chunk at a time: clients that open exports and never read them
cost the server little memory, open exports are capped per tenant and overall, the streamed file
imports back, and a memory deleted during its export ends the stream with DATA_LOSS."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch

import tests.kinds  # noqa: F401  (the test-bias kind)
from memserve.clients import Client
from memserve.clients.errors import MemserveError
from memserve.memory_store.artifact import MemoryMeta, import_bytes
from memserve.memory_store.redis_server import free_port
from memserve.memory_store.redis_store import RedisStore
from memserve.v1 import memory_pb2
from tests.conftest import wait_until
from tests.test_server import ServerThread, tiny_server_config
from tests.test_server_store import store_config

REPO = Path(__file__).resolve().parent.parent
BIG_MIB = 44
HIDDEN = 64


@pytest.fixture(scope="module")
def exporter(tiny_llama_dir, redis_standalone) -> Iterator[ServerThread]:
    from tests.conftest import flush

    flush([redis_standalone])
    config = tiny_server_config(tiny_llama_dir, store=store_config(str(redis_standalone.url), workers=0))
    server = ServerThread(
        replace(config, store=replace(config.store, max_exports=12, max_exports_per_tenant=8))
    )
    yield server
    server.close()


def publish(server: ServerThread, name: str, tenant: str, mib: float) -> MemoryMeta:
    rows = int(mib * (1 << 20) / (HIDDEN * 4))
    meta = MemoryMeta(
        kind="test-bias",
        name=name,
        tenant=tenant,
        base_model=server.running.runtime.cache.fingerprint,
        hyperparameters={"layer": 1},
    )
    tensors = {"delta": torch.randn(HIDDEN), "padding": torch.randn(rows, HIDDEN)}
    return server.running.runtime.store.publish(meta, tensors)


def export(channel: grpc.Channel, name: str, tenant: str) -> grpc.Future:
    call = channel.unary_stream(
        "/memserve.v1.MemoryService/ExportMemory",
        request_serializer=memory_pb2.ExportMemoryRequest.SerializeToString,
        response_deserializer=memory_pb2.MemoryChunk.FromString,
    )
    return call(
        memory_pb2.ExportMemoryRequest(name=name), metadata=(("memserve-tenant", tenant),), timeout=120
    )


def test_a_streamed_export_imports_back_and_puts_as_a_new_version(exporter):
    published = publish(exporter, "small", "alice", 3)
    with grpc.insecure_channel(f"127.0.0.1:{exporter.running.port}") as channel:
        chunks = list(export(channel, "small", "alice"))
        assert chunks[0].name == "small" and all(not c.name for c in chunks[1:])
        assert len(chunks) >= 4  # a header, then 256 KiB pieces
        artifact = import_bytes(b"".join(c.data for c in chunks))
        assert artifact.meta.sha256 == published.sha256 and artifact.meta.name == "small"
        stored = exporter.running.runtime.store.load("small", tenant="alice")
        assert all(torch.equal(artifact.tensors[k], stored.tensors[k]) for k in stored.tensors)
        put = channel.stream_unary(
            "/memserve.v1.MemoryService/PutMemory",
            request_serializer=memory_pb2.MemoryChunk.SerializeToString,
            response_deserializer=memory_pb2.MemoryInfo.FromString,
        )
        again = put(iter(chunks), metadata=(("memserve-tenant", "alice"),), timeout=60)
        assert again.version == published.version + 1


@pytest.fixture
def server_process(tiny_llama_dir, redis_standalone, tmp_path) -> Iterator[tuple[subprocess.Popen, str]]:
    """`memserve serve` in a process of its own, so that its memory is measured alone."""
    port = free_port()
    command = [
        sys.executable, "-m", "memserve.clients.cli", "serve", "--model", str(tiny_llama_dir),
        "--device", "cpu", "--redis-url", str(redis_standalone.url), "--workers", "0",
        "--port", str(port), "--http-port", "0", "--metrics-port", "0", "--plugin", "tests.kinds",
    ]  # fmt: skip
    log = tmp_path / "serve.log"
    process = subprocess.Popen(command, cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    address = f"127.0.0.1:{port}"
    try:
        with Client(address, timeout=60) as client:
            wait_until(lambda: _answers(client) or process.poll() is not None, timeout=60)
        assert process.poll() is None, log.read_text()[-2000:]
        yield process, address
    finally:
        process.terminate()
        process.wait(30)


def _answers(client: Client) -> bool:
    try:
        client.model_info()
        return True
    except MemserveError:
        return False


def rss_of(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_unread_exports_cost_the_server_little_memory(server_process, redis_standalone):
    process, address = server_process
    with Client(address) as client:
        fingerprint = client.model_info().fingerprint
    store = RedisStore.from_url(str(redis_standalone.url))
    for tenant in ("alice", "bob"):
        meta = MemoryMeta(kind="test-bias", name="big", tenant=tenant, base_model=fingerprint,
                          hyperparameters={"layer": 1})  # fmt: skip
        rows = BIG_MIB * (1 << 20) // (HIDDEN * 4)
        store.publish(meta, {"delta": torch.randn(HIDDEN), "padding": torch.randn(rows, HIDDEN)})
    with grpc.insecure_channel(address) as channel:
        list(export(channel, "big", "alice"))  # every path warmed once
        time.sleep(1.0)
        before = rss_of(process.pid)
        held = [export(channel, "big", tenant) for tenant in ("alice", "bob") for _ in range(8)]  # 16 open
        first = [next(stream) for stream in held]  # each has started; none is read further
        time.sleep(3.0)  # the server sends what flow control lets it
        growth = rss_of(process.pid) - before
        for stream in held:
            stream.cancel()
    print(f"16 unread exports of {BIG_MIB} MiB: server RSS {before:.0f} MiB, +{growth:.1f} MiB")
    assert all(chunk.name == "big" for chunk in first)
    assert growth <= 100, f"16 unread exports of {BIG_MIB} MiB grew the server by {growth:.0f} MiB"


def test_open_exports_are_capped_overall(exporter):
    for tenant in ("alice", "bob"):
        publish(exporter, "capped", tenant, 4)
    with grpc.insecure_channel(f"127.0.0.1:{exporter.running.port}") as channel:
        held = [export(channel, "capped", tenant) for tenant in ("alice", "bob") for _ in range(6)]  # 12 open
        for stream in held:
            next(stream)
        with pytest.raises(grpc.RpcError) as caught:
            next(export(channel, "capped", "bob"))  # the 13th: over max_exports
        for stream in held:
            stream.cancel()
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "exports are already running" in caught.value.details()


def test_one_tenant_cannot_hold_every_export_slot(exporter):
    publish(exporter, "mid", "carol", 4)
    with grpc.insecure_channel(f"127.0.0.1:{exporter.running.port}") as channel:
        held = [export(channel, "mid", "carol") for _ in range(8)]
        for stream in held:
            next(stream)
        with pytest.raises(grpc.RpcError) as caught:
            next(export(channel, "mid", "carol"))
        for stream in held:
            stream.cancel()
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tenant 'carol' already has 8 exports running" in caught.value.details()


def test_a_memory_deleted_during_its_export_ends_it_with_data_loss(exporter):
    publish(exporter, "doomed", "dave", 6)
    with grpc.insecure_channel(f"127.0.0.1:{exporter.running.port}") as channel:
        stream = export(channel, "doomed", "dave")
        next(stream)
        exporter.running.runtime.store.delete("doomed", tenant="dave")
        with pytest.raises(grpc.RpcError) as caught:
            list(stream)
    assert caught.value.code() is grpc.StatusCode.DATA_LOSS


def put(channel: grpc.Channel, data: bytes, tenant: str = "erin") -> memory_pb2.MemoryInfo:
    call = channel.stream_unary(
        "/memserve.v1.MemoryService/PutMemory",
        request_serializer=memory_pb2.MemoryChunk.SerializeToString,
        response_deserializer=memory_pb2.MemoryInfo.FromString,
    )
    pieces = [data[i : i + (1 << 20)] for i in range(0, len(data), 1 << 20)]
    return call(iter(memory_pb2.MemoryChunk(data=p) for p in pieces), metadata=(("memserve-tenant", tenant),),
                timeout=60)  # fmt: skip


def export_file(meta: MemoryMeta, tensors: dict[str, torch.Tensor]) -> bytes:
    from memserve.memory_store.artifact import Artifact, encode, export_bytes

    meta, _ = encode(meta, tensors)
    return export_bytes(Artifact(meta, tensors))


def good_meta(exporter: ServerThread, **changes: object) -> MemoryMeta:
    meta = MemoryMeta(kind="test-bias", name="upload", base_model=exporter.running.runtime.cache.fingerprint,
                      hyperparameters={"layer": 1})  # fmt: skip
    return replace(meta, **changes)


GOOD_TENSORS = {"delta": torch.ones(HIDDEN), "padding": torch.zeros(2, HIDDEN)}


@pytest.mark.parametrize(
    ("changes", "tensors", "code", "message"),
    [
        ({"hyperparameters": {}}, GOOD_TENSORS, "INVALID_ARGUMENT", "KeyError('layer')"),
        ({"hyperparameters": {"layer": 99}}, GOOD_TENSORS, "INVALID_ARGUMENT", "outside the model's"),
        ({}, {"padding": torch.zeros(2, HIDDEN)}, "INVALID_ARGUMENT", "KeyError('delta')"),
        ({}, {**GOOD_TENSORS, "delta": torch.full((HIDDEN,), float("nan"))}, "INVALID_ARGUMENT", "NaN"),
        ({"base_model": "0" * 64}, GOOD_TENSORS, "FAILED_PRECONDITION", "another base model"),
        ({"kind": "no-such-kind"}, GOOD_TENSORS, "INVALID_ARGUMENT", "no-such-kind"),
        ({"created_at": 1e300}, GOOD_TENSORS, "INVALID_ARGUMENT", "created_at"),
        ({"details": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}}}, GOOD_TENSORS,
         "INVALID_ARGUMENT", "nested more than 8"),
    ],
)  # fmt: skip
def test_an_upload_that_would_fail_on_use_is_refused_and_nothing_is_stored(exporter, changes, tensors, code,
                                                                            message):  # fmt: skip
    store = exporter.running.runtime.store
    blobs_before = set(store.client.scan_iter(match="memserve:m:{erin/*"))
    with (
        grpc.insecure_channel(f"127.0.0.1:{exporter.running.port}") as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        put(channel, export_file(good_meta(exporter, **changes), tensors))
    assert caught.value.code().name == code, caught.value.details()
    assert message in caught.value.details()
    assert set(store.client.scan_iter(match="memserve:m:{erin/*")) == blobs_before


def test_the_same_upload_twice_makes_one_version(exporter):
    data = export_file(good_meta(exporter, name="twice"), GOOD_TENSORS)
    with grpc.insecure_channel(f"127.0.0.1:{exporter.running.port}") as channel:
        first, again = put(channel, data), put(channel, data)
        assert (first.name, first.version) == ("twice", 1) and again.version == 1
        other = put(
            channel,
            export_file(good_meta(exporter, name="twice"), {**GOOD_TENSORS, "delta": torch.zeros(HIDDEN)}),
        )
        assert other.version == 2
        exporter.running.runtime.store.delete("twice", 1, tenant="erin")
        assert put(channel, data).version == 3  # deleted, then sent again: a new version


def test_blobs_no_version_points_at_are_swept(exporter):
    store = exporter.running.runtime.store
    kept = publish(exporter, "kept", "frank", 0.01)
    orphan = "memserve:m:{frank/gone}:blob:" + "ab" * 32
    store.client.set(orphan, b"left by a publish that failed halfway in an older version")
    assert store.sweep_orphan_blobs() >= 1
    assert not store.client.exists(orphan)
    assert store.client.exists(f"memserve:m:{{frank/kept}}:blob:{kept.sha256}")
    assert store.load("kept", tenant="frank").meta.sha256 == kept.sha256


def test_uploads_are_capped_per_tenant(exporter):
    data = export_file(good_meta(exporter, name="slow"), GOOD_TENSORS)
    release = threading.Event()

    def trickle() -> Iterator[memory_pb2.MemoryChunk]:
        yield memory_pb2.MemoryChunk(data=data[:10])
        release.wait(30)  # holds its slot until the test lets it finish
        yield memory_pb2.MemoryChunk(data=data[10:])

    with grpc.insecure_channel(f"127.0.0.1:{exporter.running.port}") as channel:
        call = channel.stream_unary(
            "/memserve.v1.MemoryService/PutMemory",
            request_serializer=memory_pb2.MemoryChunk.SerializeToString,
            response_deserializer=memory_pb2.MemoryInfo.FromString,
        )
        held = call.future(trickle(), metadata=(("memserve-tenant", "grace"),), timeout=60)
        time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as caught:
            put(channel, data, tenant="grace")
        assert put(channel, data, tenant="henry").version == 1  # another tenant still may
        release.set()
        assert held.result().version == 1
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tenant 'grace' already has 1 uploads running" in caught.value.details()
