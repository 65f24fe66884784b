"""The server's view of the store: resolve a request's references to ready-to-run memories.

Two maps, kept correct by the store's change events:
- **heads**: (tenant, name) → current version. Dropped for a name when it
  changes, and all at once after the event subscription (re)connects, since
  events sent while it was down are lost. While Redis is down the last known
  heads keep serving.
- **the cache**: (tenant, name, version) → loaded memory on the model's device,
  LRU, bounded in bytes. A version never changes and its number is never
  reused, so an entry normally only goes away (deletion, eviction). Only if
  Redis lost data (no persistence, a failover to a lagging replica) could a
  number come back with other contents: a publish event for a cached version
  drops it, and after a resync each entry's sha256 is checked against Redis
  once, at its next use.

Loads run in worker threads (fetch, sha256 check, deserialise, copy to the
device); concurrent requests for the same memory wait for one load.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from memserve.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from memserve.memory.kind import LoadedMemory, LoadTarget, MemoryRefSpec
from memserve.memory.registry import get_kind
from memserve.memory_store.redis_store import Change, RedisStore
from memserve.metrics import MEMORY_CACHE_BYTES, MEMORY_CACHE_HITS, MEMORY_CACHE_MISSES, MEMORY_LOAD_SECONDS

log = logging.getLogger(__name__)

MAX_MEMORIES_PER_REQUEST = 16

CacheKey = tuple[str, str, int]


@dataclass(frozen=True)
class ResolvedMemory:
    ref: MemoryRefSpec
    kind: str
    loaded: LoadedMemory


@dataclass
class CachedMemory:
    kind: str
    loaded: LoadedMemory
    nbytes: int
    sha256: str
    # The resync epoch in which this entry was last known to match Redis.
    epoch: int


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    load_seconds: float = 0.0
    evictions: int = 0


class MemoryCache:
    """Loaded memories by (tenant, name, version): LRU, bounded in device bytes. Thread-safe."""

    def __init__(self, store: RedisStore, target: LoadTarget, fingerprint: str, capacity_bytes: int) -> None:
        self.store = store
        self.target = target
        self.fingerprint = fingerprint
        self.capacity_bytes = capacity_bytes
        self.stats = CacheStats()
        self._entries: OrderedDict[CacheKey, CachedMemory] = OrderedDict()
        self._bytes = 0
        self._heads: dict[tuple[str, str], int] = {}
        # Bumped by each event for a name: a head read from Redis before an event
        # is not stored after it.
        self._generations: dict[tuple[str, str], int] = {}
        self._epoch = 0
        self._lock = threading.Lock()
        self._loading: dict[CacheKey, threading.Lock] = {}

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    # --- events ---------------------------------------------------------------
    def on_change(self, change: Change) -> None:
        with self._lock:
            name = (change.tenant, change.name)
            self._heads.pop(name, None)
            self._generations[name] = self._generations.get(name, 0) + 1
            if change.op == "delete":
                for key in [k for k in self._entries if k[:2] == name and change.version in (0, k[2])]:
                    self._drop(key)
            elif (*name, change.version) in self._entries:  # a number reused after Redis lost data
                self._drop((*name, change.version))

    def on_resync(self) -> None:
        with self._lock:
            self._heads.clear()
            self._epoch += 1

    # --- lookup ---------------------------------------------------------------
    def resolve(self, tenant: str, refs: list[MemoryRefSpec]) -> list[ResolvedMemory]:
        """Loads (or finds) every referenced memory; blocking: call it off the event loop."""
        if len(refs) > MAX_MEMORIES_PER_REQUEST:
            raise ResourceExhausted(
                f"a request may use at most {MAX_MEMORIES_PER_REQUEST} memories; it named {len(refs)}"
            )
        return [self._resolve_one(tenant, ref) for ref in refs]

    def _resolve_one(self, tenant: str, ref: MemoryRefSpec) -> ResolvedMemory:
        version = ref.version or self._head(tenant, ref.name)
        cached = self.get(tenant, ref.name, version)
        kind = cached.kind
        if ref.kind is not None and ref.kind != kind:
            raise InvalidArgument(
                f"memory {ref.name!r} is a {kind} memory, but the request names it as a {ref.kind} memory"
            )
        if get_kind(kind).needs_key and ref.key is None:
            raise InvalidArgument(f"memory {ref.name!r} is a {kind} memory: the reference must say which key")
        return ResolvedMemory(ref, kind, cached.loaded)

    def _head(self, tenant: str, name: str) -> int:
        with self._lock:
            head = self._heads.get((tenant, name))
            generation = (self._generations.get((tenant, name), 0), self._epoch)
        if head is not None:
            return head
        head = self.store.current_version(name, tenant=tenant)  # UNAVAILABLE when Redis is down
        with self._lock:
            if (self._generations.get((tenant, name), 0), self._epoch) == generation:
                self._heads[(tenant, name)] = head
        return head

    def get(self, tenant: str, name: str, version: int) -> CachedMemory:
        key = (tenant, name, version)
        with self._lock:
            cached = self._hit(key)
        if cached is not None and self._still_valid(key, cached):
            return cached
        with self._lock:
            load_lock = self._loading.setdefault(key, threading.Lock())
        try:
            with load_lock:  # one load per key; the others wait for it and find it cached
                with self._lock:
                    cached = self._hit(key)
                if cached is None:
                    cached = self._load(tenant, name, version)
        finally:
            with self._lock:
                self._loading.pop(key, None)
        return cached

    def _hit(self, key: CacheKey) -> CachedMemory | None:
        cached = self._entries.get(key)
        if cached is not None:
            self._entries.move_to_end(key)
            self.stats.hits += 1
            MEMORY_CACHE_HITS.inc()
        return cached

    def _still_valid(self, key: CacheKey, cached: CachedMemory) -> bool:
        """After a resync, checks an entry against Redis once; while Redis is down, trusts it."""
        epoch = self._epoch
        if cached.epoch == epoch:
            return True
        try:
            meta = self.store.meta(key[1], key[2], tenant=key[0])
        except Unavailable:
            return True
        except NotFound:
            with self._lock:
                if self._entries.get(key) is cached:
                    self._drop(key)
            raise
        if meta.sha256 == cached.sha256:
            cached.epoch = epoch
            return True
        with self._lock:
            if self._entries.get(key) is cached:
                self._drop(key)
        return False

    def _load(self, tenant: str, name: str, version: int) -> CachedMemory:
        started = time.perf_counter()
        with self._lock:
            self.stats.misses += 1
            MEMORY_CACHE_MISSES.inc()
            generation = (self._generations.get((tenant, name), 0), self._epoch)
        artifact = self.store.load(name, version, tenant=tenant)
        meta = artifact.meta
        meta.check_base_model(self.fingerprint)
        kind = get_kind(meta.kind)
        loaded = kind.load(artifact, self.target)
        cached = CachedMemory(meta.kind, loaded, loaded.nbytes, meta.sha256, generation[1])
        elapsed = time.perf_counter() - started
        with self._lock:
            self.stats.loads += 1
            self.stats.load_seconds += elapsed
            MEMORY_LOAD_SECONDS.observe(elapsed)
            # A change to this name while it loaded (a delete, say) may concern it: this
            # request uses what it loaded, but it is not kept.
            if (self._generations.get((tenant, name), 0), self._epoch) == generation:
                self._insert((tenant, name, version), cached)
        log.info(
            "loaded %s memory %r version %d (%.1f MB) in %.3f s",
            meta.kind,
            name,
            version,
            cached.nbytes / 1e6,
            elapsed,
        )
        return cached

    def _insert(self, key: CacheKey, loaded: CachedMemory) -> None:
        if loaded.nbytes > self.capacity_bytes:
            log.warning(
                "memory %r (%d bytes) is larger than the whole cache (%d bytes): used, not kept",
                key[1],
                loaded.nbytes,
                self.capacity_bytes,
            )
            return
        self._entries[key] = loaded
        self._bytes += loaded.nbytes
        MEMORY_CACHE_BYTES.set(self._bytes)
        while self._bytes > self.capacity_bytes:
            oldest = next(iter(self._entries))
            self._drop(oldest)
            self.stats.evictions += 1

    def _drop(self, key: CacheKey) -> None:
        self._bytes -= self._entries.pop(key).nbytes
        MEMORY_CACHE_BYTES.set(self._bytes)
