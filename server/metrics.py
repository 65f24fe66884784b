"""Prometheus metrics of the server and the workers (names `memserve_*`, units in the names).

Each process serves its own /metrics on its own port (`--metrics-port`). The memory kinds report
through their observers (document selection, local triggers, adapter tokens), the engine through
`EngineMetrics`, the gRPC layer through the interceptor, the cache and the workers in place.

Labels stay bounded: requests carry no per-request label, and per-memory labels (bank, set,
adapter) name the first `max_memory_labels` memories seen by this process; later ones share the
label `other`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from memserve.errors import MemserveError

log = logging.getLogger(__name__)

DEFAULT_MAX_MEMORY_LABELS = 20
OTHER = "other"

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_LATENCY = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2, 5)
_FRACTIONS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)

REQUESTS = Counter("memserve_requests_total", "gRPC requests by method and final status", ["rpc", "code"])
REQUEST_DURATION = Histogram(
    "memserve_request_duration_seconds", "gRPC request time, to the last message", ["rpc"], buckets=_LATENCY
)
TIME_TO_FIRST_TOKEN = Histogram(
    "memserve_time_to_first_token_seconds", "From submission to the first generated token", buckets=_LATENCY
)
INTER_TOKEN_LATENCY = Histogram(
    "memserve_inter_token_latency_seconds", "Between two tokens of one request", buckets=_TOKEN_LATENCY
)
PROMPT_TOKENS = Counter("memserve_prompt_tokens_total", "Prompt tokens prefilled")
GENERATED_TOKENS = Counter("memserve_generated_tokens_total", "Tokens generated")
BATCH_SIZE = Histogram(
    "memserve_batch_size", "Requests in each decode step", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
QUEUE_DEPTH = Gauge("memserve_queue_depth", "Requests waiting for a batch slot")
RUNNING_REQUESTS = Gauge("memserve_running_requests", "Requests in the running batch")

DOCUMENT_SELECTED_ENTRIES = Histogram(
    "memserve_document_selected_entries",
    "Entries of a document bank selected (|selection| > 0.1) per token, per forward",
    ["bank"],
    buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
)
DOCUMENT_SELECTION_MASS = Histogram(
    "memserve_document_selection_mass",
    "Mean |selection| of a bank's entries per token, per forward",
    ["bank"],
    buckets=_FRACTIONS,
)
LOCAL_POSITIONS_CHECKED = Counter(
    "memserve_local_positions_checked_total", "Positions a local memory set checked", ["set"]
)
LOCAL_TRIGGERS = Counter(
    "memserve_local_triggers_total",
    "Positions whose strongest trigger is >= 0.5",
    ["set"],
)
LOCAL_TRIGGER_VALUE = Histogram(
    "memserve_local_trigger_value",
    "Strongest trigger per position (>= 0.01)",
    ["set"],
    buckets=_FRACTIONS,
)
ADAPTER_TOKENS = Counter("memserve_adapter_tokens_total", "Positions an adapter acted on", ["adapter"])

MEMORY_CACHE_HITS = Counter("memserve_memory_cache_hits_total", "Memory references served from the cache")
MEMORY_CACHE_MISSES = Counter("memserve_memory_cache_misses_total", "Memory references loaded from the store")
MEMORY_CACHE_BYTES = Gauge("memserve_memory_cache_bytes", "Device bytes of the cached memories")
MEMORY_LOAD_SECONDS = Histogram(
    "memserve_memory_load_seconds",
    "Loading one memory version to the device",
    buckets=_LATENCY,
)

JOBS = Counter("memserve_jobs_total", "Training jobs that ended, by kind and final state", ["kind", "state"])
JOB_DURATION = Histogram(
    "memserve_job_duration_seconds",
    "Training job time, by kind",
    ["kind"],
    buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1200, 3600, 7200),
)


def precreate_job_series(kinds: Iterable[str]) -> None:
    """Creates every (kind, final state) series at 0, so that a first failure is an increase
    (a series born at 1 has no increase, and an alert on increase() would miss it)."""
    for kind in kinds:
        for state in ("succeeded", "failed", "cancelled"):
            JOBS.labels(kind, state)
        JOB_DURATION.labels(kind)


class BoundedLabels:
    """Label values for memory names: the first `limit` names seen keep theirs, later ones `other`."""

    def __init__(self, limit: int = DEFAULT_MAX_MEMORY_LABELS) -> None:
        if limit < 0:
            raise ValueError(f"the per-memory label limit must be >= 0, got {limit}")
        self.limit = limit
        self._names: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, name: str) -> str:
        if name in self._names:
            return name
        with self._lock:
            if len(self._names) < self.limit:
                self._names.add(name)
                return name
        return OTHER


class EngineMetrics:
    """What the engine reports: step, prefill and token timings."""

    def step(self, batch_size: int, queue_depth: int, running: int) -> None:
        # The queue and the running batch are read at scrape time (app.py sets their functions).
        if batch_size:
            BATCH_SIZE.observe(batch_size)

    def prefill(self, prompt_tokens: int) -> None:
        PROMPT_TOKENS.inc(prompt_tokens)

    def token(self, first: bool, seconds: float) -> None:
        GENERATED_TOKENS.inc()
        (TIME_TO_FIRST_TOKEN if first else INTER_TOKEN_LATENCY).observe(seconds)


class MemoryMetrics:
    """Hears the memory kinds' per-forward statistics (a `LoadTarget.observe`), by their type.

    Per-memory labels name the first `max_memory_labels` memories it hears of; later ones `other`."""

    def __init__(self, max_memory_labels: int = DEFAULT_MAX_MEMORY_LABELS) -> None:
        self.labels = BoundedLabels(max_memory_labels)
        from memserve.kinds.adapter.module import AdapterStats
        from memserve.kinds.document.module import SelectionStats
        from memserve.kinds.local.module import TriggerStats

        self._by_type: dict[type, Callable[[Any], None]] = {
            SelectionStats: self.selection,
            TriggerStats: self.triggers,
            AdapterStats: self.adapter,
        }

    def __call__(self, stats: object) -> None:
        record = self._by_type.get(type(stats))
        if record is not None:  # a plugin kind's statistics: not exported
            record(stats)

    def selection(self, stats: Any) -> None:
        bank = self.labels(stats.bank)
        DOCUMENT_SELECTED_ENTRIES.labels(bank).observe(stats.selected_entries)
        DOCUMENT_SELECTION_MASS.labels(bank).observe(stats.selection_mass)

    def triggers(self, stats: Any) -> None:
        name = self.labels(stats.set)
        LOCAL_POSITIONS_CHECKED.labels(name).inc(stats.positions_checked)
        LOCAL_TRIGGERS.labels(name).inc(stats.positions_triggered)
        histogram = LOCAL_TRIGGER_VALUE.labels(name)
        for value in stats.values.tolist():
            histogram.observe(value)

    def adapter(self, stats: Any) -> None:
        ADAPTER_TOKENS.labels(self.labels(stats.adapter)).inc(stats.tokens)


class JobQueueCollector(Collector):
    """memserve_job_queue_depth and memserve_workers_alive, read from Redis at each scrape."""

    def __init__(self, depth: Callable[[], int], workers: Callable[[], Iterable[str]]) -> None:
        self._depth, self._workers = depth, workers

    def collect(self) -> Iterable[Any]:
        try:
            depth, alive = self._depth(), len(list(self._workers()))
        except MemserveError as exc:  # Redis unreachable: no sample (an absent series, not a wrong one)
            log.warning("metrics: the job queue cannot be read: %s", exc)
            return
        yield GaugeMetricFamily(
            "memserve_job_queue_depth", "Training jobs queued, not yet taken", value=depth
        )
        yield GaugeMetricFamily("memserve_workers_alive", "Trainer workers heartbeating", value=alive)


def register_job_queue(depth: Callable[[], int], workers: Callable[[], Iterable[str]]) -> JobQueueCollector:
    """Exports the job queue's depth and live workers; `unregister` it when the queue goes away."""
    collector = JobQueueCollector(depth, workers)
    REGISTRY.register(collector)
    return collector


def unregister(collector: Collector) -> None:
    REGISTRY.unregister(collector)
