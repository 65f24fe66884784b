"""The server's connection to the memory store: Redis (given or embedded), the cache,
the event listener, and the in-process worker of the embedded default."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from memserve.errors import MemserveError
from memserve.memory.cache import MemoryCache
from memserve.memory.hooks import MemoryHooks
from memserve.memory.kind import LoadTarget, MemoryObserver
from memserve.memory.registry import load_plugins
from memserve.memory_store.jobs import JOBS_CHANNEL, JobQueue
from memserve.memory_store.redis_server import RedisServer, default_data_dir
from memserve.memory_store.redis_store import (
    CHANGES_CHANNEL,
    RedisStore,
    connect,
    listen,
    parse_change,
    redacted,
)
from memserve.models import LoadedModel
from memserve.training.worker import Worker, WorkerConfig

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class StoreConfig:
    redis_url: str | None = None
    """The memory store; None = an embedded Redis persisted under `data_dir`."""
    data_dir: Path | None = None
    """Where the embedded Redis keeps its data; None = $MEMSERVE_DATA_DIR or the user data dir."""
    cache_bytes: int = 1 << 30
    """Device bytes of loaded memories kept ready (LRU)."""
    workers: int | None = None
    """Trainer workers inside the server; None = 1 with the embedded Redis, else 0."""
    plugins: tuple[str, ...] = ()
    """Modules that register extra memory kinds."""
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    max_upload_bytes: int = 256 << 20
    """Largest artifact PutMemory accepts (held in memory while checked; Redis's own limit
    for one value is 512 MB)."""
    max_uploads: int = 2
    """PutMemory calls running at once (each holds its upload in memory while it is checked)."""
    max_uploads_per_tenant: int = 1
    """PutMemory calls one tenant may run at once."""
    max_exports: int = 32
    """ExportMemory streams open at once, all tenants together; more answer RESOURCE_EXHAUSTED.
    Each costs about one chunk (256 KiB) and the connection's buffers, however large the memory."""
    max_exports_per_tenant: int = 8
    """ExportMemory streams one tenant may hold open at once."""
    store_threads: int = 4
    """Threads for blocking store calls: their own, so a slow Redis never holds up tokenising."""


class JobWatchers:
    """Wakes the WatchJob streams of a job when it changes (fed from the events thread)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiters: dict[str, set[asyncio.Event]] = {}

    def notify(self, job_id: bytes | str) -> None:  # any thread
        job = job_id.decode() if isinstance(job_id, bytes) else job_id
        self._loop.call_soon_threadsafe(self._wake, job)

    def _wake(self, job_id: str) -> None:
        for event in self._waiters.get(job_id, ()):
            event.set()

    @contextmanager
    def watching(self, job_id: str) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiters[job_id]
            waiters.discard(event)
            if not waiters:
                del self._waiters[job_id]


class StoreRuntime:
    """The server's memory store: the Redis client, store and job queue, the cache of loaded
    memories, the thread that listens to the store's events, and the in-process workers."""

    def __init__(
        self,
        config: StoreConfig,
        loaded: LoadedModel,
        hooks: MemoryHooks | None,
        loop: asyncio.AbstractEventLoop,
        observe: MemoryObserver | None = None,
    ) -> None:
        self.config = config
        self.redis_server: RedisServer | None = None
        url = config.redis_url
        if url is None:
            data_dir = (config.data_dir or default_data_dir()) / "redis"
            self.redis_server = RedisServer(data_dir, lock=True).start()
            url = self.redis_server.url
        self.url = url
        load_plugins(config.plugins)
        client = connect(self.url)
        self.store = RedisStore(client)
        self.queue = JobQueue(client)
        target = LoadTarget.for_model(loaded, hooks, observe)
        self.cache = MemoryCache(self.store, target, loaded.fingerprint, config.cache_bytes)
        self.watchers = JobWatchers(loop)
        self._stop = threading.Event()
        self._loop = loop
        self.executor = ThreadPoolExecutor(config.store_threads, thread_name_prefix="memserve-store")
        self._events_client = connect(self.url, retries=0)
        self._events = self._listen_to_events()
        workers = config.workers if config.workers is not None else (1 if self.redis_server else 0)
        self._workers = [self._start_worker(i, loaded) for i in range(workers)]
        where = f"embedded Redis in {self.redis_server.data_dir}" if self.redis_server else redacted(self.url)
        log.info("memory store: %s; %d in-process worker(s)", where, workers)
        self.executor.submit(self._sweep_orphans)

    def _sweep_orphans(self) -> None:
        """Once at start, off the start's path: blobs older versions could leave behind."""
        try:
            swept = self.store.sweep_orphan_blobs()
        except MemserveError as exc:  # Redis away: the next start sweeps
            log.warning("could not sweep orphaned memory blobs: %s", exc)
            return
        if swept:
            log.info("deleted %d memory blob(s) that no version pointed at", swept)

    def _listen_to_events(self) -> threading.Thread:
        """Starts the thread that feeds the cache the store's changes and the job watchers the
        jobs' (and resyncs the cache whenever the subscription (re)connects)."""

        def on_change(data: bytes) -> None:
            change = parse_change(data)
            if change is not None:
                self.cache.on_change(change)

        handlers = {CHANGES_CHANNEL: on_change, JOBS_CHANNEL: self.watchers.notify}
        thread = threading.Thread(
            target=listen,
            args=(self._events_client, handlers, self.cache.on_resync, self._stop),
            name="store-events",
            daemon=True,
        )
        thread.start()
        return thread

    def _start_worker(self, index: int, loaded: LoadedModel) -> threading.Thread:
        """Starts an in-process trainer worker on the serving model."""
        # No drain inside a server: at shutdown the job in hand goes back to the queue at once.
        config = replace(self.config.worker, drain_seconds=0.0)
        worker = Worker(self.store, self.queue, lambda: loaded, config=config)
        thread = threading.Thread(target=worker.run, args=(self._stop,), name=f"worker-{index}", daemon=True)
        thread.start()
        return thread

    async def run(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Runs a blocking store call on the store's threads."""
        return await self._loop.run_in_executor(self.executor, functools.partial(function, *args, **kwargs))

    def close(self) -> None:
        self._stop.set()
        for thread in (self._events, *self._workers):
            thread.join(timeout=10)
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.store.client.close()
        self._events_client.close()
        if self.redis_server is not None:
            self.redis_server.stop()
