"""The server's cache of loaded memories: bounded in bytes, LRU, kept right by change events."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

import tests.kinds  # noqa: F401  (registers the test-bias kind)
from memserve.errors import NotFound
from memserve.memory.cache import MemoryCache
from memserve.memory.kind import LoadTarget, MemoryRefSpec
from memserve.memory_store.artifact import MemoryMeta
from memserve.memory_store.redis_store import Change, RedisStore

HIDDEN = 64
TARGET = LoadTarget(torch.device("cpu"), torch.float32, None, num_layers=3, hidden_size=HIDDEN)
ROW_BYTES = HIDDEN * 4


@pytest.fixture
def store(standalone_url: str) -> Iterator[RedisStore]:
    store = RedisStore.from_url(standalone_url)
    yield store
    store.client.close()


def publish(store: RedisStore, name: str, rows: int = 0, seed: int = 0) -> int:
    meta = MemoryMeta(kind="test-bias", name=name, base_model="fp", hyperparameters={"layer": 0})
    delta = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed))
    return store.publish(meta, {"delta": delta, "padding": torch.zeros(rows, HIDDEN)}).version


def ref(name: str, version: int = 0) -> MemoryRefSpec:
    return MemoryRefSpec(name=name, kind=None, version=version)


def test_lru_stays_within_its_byte_budget(store):
    for name in ("a", "b", "c"):
        publish(store, name, rows=99)  # 100 rows of 64 floats each = 25,600 bytes
    cache = MemoryCache(store, TARGET, "fp", capacity_bytes=2 * 100 * ROW_BYTES)
    cache.resolve("default", [ref("a"), ref("b")])
    cache.resolve("default", [ref("a")])  # a is now the most recently used
    cache.resolve("default", [ref("c")])  # evicts b
    assert cache.bytes <= cache.capacity_bytes and len(cache) == 2
    loads = cache.stats.loads
    cache.resolve("default", [ref("a"), ref("c")])
    assert cache.stats.loads == loads  # both hits
    cache.resolve("default", [ref("b")])
    assert cache.stats.loads == loads + 1 and cache.stats.evictions == 2


def test_a_memory_larger_than_the_cache_is_used_but_not_kept(store):
    publish(store, "huge", rows=1000)
    cache = MemoryCache(store, TARGET, "fp", capacity_bytes=ROW_BYTES)
    [resolved] = cache.resolve("default", [ref("huge")])
    assert resolved.loaded.nbytes > ROW_BYTES and len(cache) == 0


def test_concurrent_requests_share_one_load(store):
    publish(store, "a", rows=20000)
    cache = MemoryCache(store, TARGET, "fp", capacity_bytes=1 << 30)
    barrier = threading.Barrier(8)

    def resolve() -> None:
        barrier.wait()
        cache.resolve("default", [ref("a")])

    threads = [threading.Thread(target=resolve) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cache.stats.loads == 1 and cache.stats.hits == 7


def test_events_move_heads_and_drop_deleted_versions(store):
    cache = MemoryCache(store, TARGET, "fp", capacity_bytes=1 << 30)
    publish(store, "a", seed=1)
    assert cache.resolve("default", [ref("a")])[0].loaded.version == 1
    publish(store, "a", seed=2)
    assert cache.resolve("default", [ref("a")])[0].loaded.version == 1  # no event delivered yet
    cache.on_change(Change("default", "a", 2, "publish"))
    assert cache.resolve("default", [ref("a")])[0].loaded.version == 2
    store.delete("a", 2)
    cache.on_change(Change("default", "a", 2, "delete"))
    assert [k[2] for k in cache._entries] == [1]
    assert cache.resolve("default", [ref("a")])[0].loaded.version == 1
    store.delete("a")
    cache.on_change(Change("default", "a", 0, "delete"))
    assert len(cache) == 0
    with pytest.raises(NotFound):
        cache.resolve("default", [ref("a")])


def test_a_resync_forgets_every_head(store):
    cache = MemoryCache(store, TARGET, "fp", capacity_bytes=1 << 30)
    publish(store, "a", seed=1)
    cache.resolve("default", [ref("a")])
    publish(store, "a", seed=2)  # its event was lost while the subscription was down
    cache.on_resync()
    assert cache.resolve("default", [ref("a")])[0].loaded.version == 2


def test_a_version_number_reused_after_redis_lost_data_is_reloaded(store):
    cache = MemoryCache(store, TARGET, "fp", capacity_bytes=1 << 30)
    publish(store, "a", seed=1)
    before = cache.resolve("default", [ref("a", 1)])[0].loaded.delta.clone()
    store.client.flushall()  # Redis restarted without its data...
    publish(store, "a", seed=2)  # ...and version 1 came back with other contents
    cache.on_resync()  # the subscription reconnected
    after = cache.resolve("default", [ref("a", 1)])[0].loaded.delta
    assert not torch.equal(before, after)
    assert torch.equal(after, torch.randn(HIDDEN, generator=torch.Generator().manual_seed(2)))
    # A publish event for a version the cache holds also drops it.
    store.client.flushall()
    publish(store, "a", seed=3)
    cache.on_change(Change("default", "a", 1, "publish"))
    assert len(cache) == 0


def test_a_cached_memory_is_served_while_redis_is_down(store, tmp_path):
    from memserve.memory_store.redis_server import RedisServer

    with RedisServer(tmp_path / "redis") as server:
        own = RedisStore.from_url(server.url)
        publish(own, "a")
        cache = MemoryCache(own, TARGET, "fp", capacity_bytes=1 << 30)
        cache.resolve("default", [ref("a")])
        server.kill()
        assert cache.resolve("default", [ref("a")])[0].loaded.version == 1  # the head it knew
        cache.on_resync()  # even an entry due for a check is served: Redis cannot say otherwise
        assert cache.resolve("default", [ref("a", 1)])[0].loaded.version == 1
        own.client.close()
