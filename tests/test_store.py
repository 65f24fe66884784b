"""The Redis memory store and the job queue, on a real redis-server and on a 3-node Redis Cluster."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from memserve.errors import DataLoss, InvalidArgument, NotFound, Unavailable
from memserve.memory_store.artifact import MemoryMeta, encode, export_bytes, import_bytes
from memserve.memory_store.jobs import JobQueue, JobState
from memserve.memory_store.redis_store import (
    CHANGES_CHANNEL,
    Change,
    RedisStore,
    connect,
    listen,
    parse_change,
)
from tests.conftest import wait_until


@pytest.fixture
def store(redis_url: str) -> Iterator[RedisStore]:
    store = RedisStore.from_url(redis_url)
    yield store
    store.client.close()


def meta(name: str = "bank", kind: str = "test-bias", tenant: str = "default", **fields) -> MemoryMeta:
    return MemoryMeta(kind=kind, name=name, tenant=tenant, base_model="model-fingerprint", **fields)


def tensors(value: float = 1.0, size: int = 8) -> dict[str, torch.Tensor]:
    return {"delta": torch.full((size,), value), "ids": torch.arange(3)}


def test_round_trip_keeps_tensors_and_metadata(store):
    published = store.publish(
        meta(hyperparameters={"layer": 3, "grid": [0.5, 1.0], "empty": []}, metrics={"loss": 0.125},
             details={"documents": [{"id": "a", "docrep": [0.1, -0.2]}]}),
        tensors(2.5),
    )  # fmt: skip
    assert published.version == 1 and len(published.sha256) == 64 and published.size_bytes > 0
    artifact = store.load("bank")
    assert artifact.meta == published
    assert artifact.meta.hyperparameters == {"layer": 3, "grid": [0.5, 1.0], "empty": []}
    assert artifact.meta.details["documents"][0]["docrep"] == [0.1, -0.2]
    assert torch.equal(artifact.tensors["delta"], torch.full((8,), 2.5))
    assert artifact.tensors["ids"].dtype == torch.int64
    assert artifact.meta.created_at > 0


def test_versions_are_immutable_and_never_reused(store):
    for value in (1.0, 2.0, 3.0):
        store.publish(meta(), tensors(value))
    assert store.versions("bank") == [1, 2, 3]
    assert store.current_version("bank") == 3
    assert store.load("bank", 1).tensors["delta"][0] == 1.0
    assert store.delete("bank", 3) == 1
    assert store.current_version("bank") == 2  # the newest remaining becomes current
    assert store.delete("bank") == 2
    with pytest.raises(NotFound):
        store.load("bank")
    assert store.list().memories == []
    # A name deleted and published again never gets an old version number back.
    assert store.publish(meta(), tensors(9.0)).version == 4


def test_unknown_memory_and_version_are_not_found(store):
    with pytest.raises(NotFound, match="does not exist"):
        store.meta("missing")
    store.publish(meta(), tensors())
    with pytest.raises(NotFound, match="no version 7"):
        store.load("bank", 7)
    with pytest.raises(NotFound):
        store.delete("bank", 7)


def test_publishing_is_idempotent_per_job(store):
    first = store.publish(meta(), tensors(1.0), job_id="job-1")
    again = store.publish(meta(), tensors(5.0), job_id="job-1")  # a retried job
    assert again.version == first.version == 1
    assert again.sha256 == first.sha256
    assert store.versions("bank") == [1]
    assert store.published_by_job("bank", "job-1") == 1
    assert store.publish(meta(), tensors(2.0), job_id="job-2").version == 2


def test_corrupted_blob_is_refused(store):
    published = store.publish(meta(), tensors())
    store.client.set(store._blob_key("default", "bank", published.sha256), b"\x00" * published.size_bytes)
    with pytest.raises(DataLoss, match="corrupted"):
        store.load("bank")


def test_list_filters_by_kind_and_prefix_and_pages(store):
    for name in ("a-1", "a-2", "a-3", "b-1"):
        store.publish(meta(name), tensors())
    store.publish(meta("a-doc", kind="other"), tensors())
    assert [m.name for m in store.list().memories] == ["a-1", "a-2", "a-3", "a-doc", "b-1"]
    assert [m.name for m in store.list(name_prefix="a-", kind="test-bias").memories] == ["a-1", "a-2", "a-3"]
    first = store.list(page_size=2)
    second = store.list(page_size=2, page_token=first.next_token)
    third = store.list(page_size=2, page_token=second.next_token)
    assert [m.name for m in first.memories + second.memories + third.memories] == [
        "a-1", "a-2", "a-3", "a-doc", "b-1",
    ]  # fmt: skip
    assert third.next_token == ""


def test_tenants_are_isolated(store):
    store.publish(meta(tenant="alpha"), tensors(1.0))
    store.publish(meta(tenant="beta"), tensors(2.0))
    assert store.load("bank", tenant="alpha").tensors["delta"][0] == 1.0
    assert store.load("bank", tenant="beta").tensors["delta"][0] == 2.0
    assert [m.name for m in store.list(tenant="gamma").memories] == []
    store.delete("bank", tenant="alpha")
    assert store.current_version("bank", tenant="beta") == 1


def test_invalid_names_are_refused(store):
    for name in ("", "a b", "../x", "x" * 200, "{tag}"):
        with pytest.raises(InvalidArgument):
            store.publish(meta(name), tensors())
    with pytest.raises(InvalidArgument):
        store.publish(meta(tenant="Upper"), tensors())


def test_export_file_describes_itself_and_detects_corruption(store):
    store.publish(meta(hyperparameters={"layer": 1}), tensors(3.0))
    data = export_bytes(store.load("bank"))
    artifact = import_bytes(data)
    assert artifact.meta.hyperparameters == {"layer": 1}
    assert torch.equal(artifact.tensors["delta"], torch.full((8,), 3.0))
    # Any safetensors reader opens it.
    from safetensors.torch import load

    assert set(load(data)) == {"delta", "ids"}
    tampered = bytearray(data)
    tampered[-1] ^= 0xFF
    with pytest.raises(DataLoss):
        import_bytes(bytes(tampered))
    with pytest.raises(InvalidArgument):
        import_bytes(b"not a safetensors file")


def test_change_events_announce_publish_and_delete(store, redis_url):
    changes: list[Change] = []
    connected = threading.Event()
    stop = threading.Event()
    client = connect(redis_url)

    def on_change(data: bytes) -> None:
        change = parse_change(data)
        assert change is not None
        changes.append(change)

    thread = threading.Thread(target=listen, args=(client, {CHANGES_CHANNEL: on_change}, connected.set, stop))
    thread.start()
    try:
        wait_until(connected.is_set, 10)
        store.publish(meta(), tensors())
        store.delete("bank", 1)
        wait_until(lambda: len(changes) == 2, 10)
    finally:
        stop.set()
        thread.join(5)
        client.close()
    assert changes == [Change("default", "bank", 1, "publish"), Change("default", "bank", 1, "delete")]


def test_jobs_are_queued_listed_and_cancelled(store):
    queue = JobQueue(store.client)
    first = queue.submit("test-bias", "bank", {"steps": 3})
    second = queue.submit("test-bias", "other", {"steps": 1})  # most likely in the same millisecond
    elsewhere = queue.submit("test-bias", "other", {"steps": 1}, tenant="alpha")
    assert first.state is JobState.QUEUED and first.spec == {"steps": 3}
    jobs, token = queue.list()
    assert [j.id for j in jobs] == [second.id, first.id] and token == ""  # newest first
    assert [j.id for j in queue.list(tenant="alpha")[0]] == [elsewhere.id]
    page, token = queue.list(page_size=1)
    assert [j.id for j in page] == [second.id] and token
    queue.submit("test-bias", "later", {})  # does not shift the next page
    assert [j.id for j in queue.list(page_size=1, page_token=token)[0]] == [first.id]
    with pytest.raises(InvalidArgument):
        queue.list(page_token="junk")
    assert queue.depth() == 4
    assert queue.cancel(first.id).state is JobState.CANCELLED
    # A worker that receives the cancelled job skips it.
    entry = queue.next_entry("w1", claim_idle=60, block=0.1)
    assert entry is not None and entry[1] == first.id
    assert not queue.start_attempt(first.id, "w1", max_attempts=3)
    with pytest.raises(InvalidArgument, match="not a job id"):
        queue.get("nope")
    with pytest.raises(NotFound):
        queue.get("0" * 18)


def test_an_unreachable_redis_is_unavailable():
    store = RedisStore.from_url("redis://127.0.0.1:1")
    with pytest.raises(Unavailable, match="unreachable"):
        store.meta("bank")
    with pytest.raises(InvalidArgument, match="not valid"):
        connect("http://localhost")


def test_artifact_needs_a_tensor():
    with pytest.raises(InvalidArgument, match="at least one tensor"):
        encode(meta(), {})


def test_the_listener_resyncs_after_its_connection_is_cut(standalone_url):
    connections: list[float] = []
    stop = threading.Event()
    client = connect(standalone_url, retries=0)
    thread = threading.Thread(target=listen, args=(client, {CHANGES_CHANNEL: lambda data: None},
                                                   lambda: connections.append(1), stop))  # fmt: skip
    thread.start()
    try:
        wait_until(lambda: len(connections) == 1, 10)
        with connect(standalone_url) as admin:
            admin.client_kill_filter(_type="pubsub")  # as Redis does to a slow subscriber
        wait_until(lambda: len(connections) == 2, 10)  # events may have been missed: resync
    finally:
        stop.set()
        thread.join(5)
        client.close()


@pytest.mark.parametrize(
    "bad",
    [
        '{"kind": "k", "name": "n", "base_model": "b", "hyperparameters": "oops"}',
        '{"kind": "k", "name": "n", "base_model": "b", "created_at": "yesterday"}',
        '{"kind": "k", "name": "n", "base_model": "b", "version": true}',
        '{"kind": "k", "name": "n"}',
        "[]",
        "not json",
    ],
)
def test_metadata_is_type_checked(bad):
    with pytest.raises(DataLoss):
        MemoryMeta.from_json(bad)
    with pytest.raises(InvalidArgument):
        MemoryMeta.from_json(bad, error=InvalidArgument)
    from safetensors.torch import save

    with pytest.raises(InvalidArgument):
        import_bytes(save({"x": torch.zeros(1)}, metadata={"memserve.meta": bad}))


def test_orphan_blobs_are_swept_on_every_node(store):
    kept = store.publish(MemoryMeta(kind="test", name="kept", base_model="m"), {"w": torch.ones(2)})
    orphans = [f"memserve:m:{{default/gone-{i}}}:blob:{i:064x}" for i in range(12)]  # spread over slots
    for key in orphans:
        store.client.set(key, b"orphan")
    assert store.sweep_orphan_blobs() == len(orphans)
    assert not any(store.client.exists(key) for key in orphans)
    assert store.load("kept").meta.sha256 == kept.sha256
