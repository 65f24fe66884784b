"""Trainer workers: take jobs from the stream, train with the job's kind, publish once.

A worker runs one job at a time. While it runs, a heartbeat thread keeps the
job's stream entry fresh; if the worker dies, the entry goes idle and another
worker reclaims it (XAUTOCLAIM) and runs the job again. Publishing is
idempotent by job id, so however many attempts a job takes, it publishes one
version, and an attempt that finds the version already published just marks the
job succeeded.

The same class runs as its own process (``memserve worker``) and, with the
embedded default, as a thread inside the server.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import start_http_server
from redis.exceptions import RedisError

from memserve.engine.threads import run_in_compute_thread
from memserve.errors import MemserveError, NotFound
from memserve.memory.kind import JobCancelled, TrainContext
from memserve.memory.registry import get_kind, load_plugins, registered_kinds
from memserve.memory_store.artifact import Artifact, MemoryMeta
from memserve.memory_store.jobs import Job, JobQueue, JobState, Progress
from memserve.memory_store.redis_store import RedisStore, connect, redacted, wait_for_redis
from memserve.metrics import JOB_DURATION, JOBS, precreate_job_series, register_job_queue
from memserve.models import LoadedModel, ModelConfig, load_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    # How often a running worker says it is alive.
    heartbeat_interval: float = 2.0
    # A job whose worker has been silent this long is taken over by another worker.
    claim_idle: float = 15.0
    # Attempts before a job whose workers keep dying is failed.
    max_attempts: int = 3
    # Progress is written at most this often (the last report always is).
    report_interval: float = 0.25
    # Told to stop (SIGTERM), a worker finishes the job in hand for this long, heartbeating,
    # then hands it back to the queue (with its progress) for another worker. In-process
    # workers of a server use 0: the server's shutdown does not wait for training.
    drain_seconds: float = 300.0

    def __post_init__(self) -> None:
        if self.claim_idle <= 2 * self.heartbeat_interval:
            raise ValueError("claim_idle must be more than twice heartbeat_interval, or live jobs get stolen")


class _Context(TrainContext):
    def __init__(self, worker: Worker, job: Job) -> None:
        self.job_id = job.id
        self.tenant = job.tenant
        self.memory_name = job.memory_name
        self._worker = worker
        self._started = time.monotonic()
        self._last_report = 0.0

    @property
    def model(self) -> LoadedModel:
        return self._worker.model()

    def current_artifact(self) -> Artifact | None:
        try:
            return self._worker.store.load(self.memory_name, tenant=self.tenant)
        except NotFound:
            return None

    def report(self, step: int, total: int, loss: float | None = None, message: str = "") -> None:
        if self._worker._lost == self.job_id:
            raise _LostJob(f"job {self.job_id} was taken over by another worker")
        now = time.monotonic()
        if self._worker.draining_past_grace(now):
            raise _HandBack(f"job {self.job_id}: the worker is stopping and its grace period has passed")
        if now - self._last_report < self._worker.config.report_interval and step < total:
            return
        self._last_report = now
        elapsed = now - self._started
        eta = elapsed / step * (total - step) if 0 < step <= total else 0.0
        progress = Progress(step, total, float(loss) if loss is not None else None, eta, message)
        self._worker.last_progress = progress
        try:
            outcome = self._worker.queue.report(self.job_id, self._worker.name, progress)
        except RedisError as exc:  # progress is best effort: a Redis blip must not fail the training
            log.warning("job %s: progress not recorded (%s)", self.job_id, exc)
            return
        if outcome == "cancel":
            raise JobCancelled(f"job {self.job_id} was cancelled")
        if outcome == "lost":
            raise _LostJob(f"job {self.job_id} was taken over by another worker")


class _HandBack(Exception):
    """The worker is stopping and the job in hand cannot finish within its grace period."""


class _LostJob(Exception):
    """This worker was presumed dead and the job moved on: stop quietly, publish nothing."""


class Worker:
    def __init__(
        self,
        store: RedisStore,
        queue: JobQueue,
        model: Callable[[], LoadedModel],
        *,
        config: WorkerConfig | None = None,
        name: str | None = None,
    ) -> None:
        self.store = store
        self.queue = queue
        self.model = model
        self.config = config or WorkerConfig()
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.last_progress: Progress | None = None
        self._running: tuple[str, str] | None = None  # (stream entry, job id)
        self._lost: str | None = None  # a job the heartbeat found taken over
        self._lock = threading.Lock()
        self._stopping_since: float | None = None  # when the worker was told to stop

    def draining_past_grace(self, now: float) -> bool:
        since = self._stopping_since
        return since is not None and now - since >= self.config.drain_seconds

    def run(self, stop: threading.Event) -> None:
        """Takes and runs jobs until `stop` is set; survives Redis outages."""
        log.info("worker %s: waiting for jobs", self.name)
        # The heartbeat outlives `stop`: the job in hand stays this worker's while it drains.
        done = threading.Event()
        beat = threading.Thread(
            target=self._heartbeat, args=(stop, done), name="worker-heartbeat", daemon=True
        )
        beat.start()
        try:
            while not stop.is_set():
                try:
                    entry = self.queue.next_entry(self.name, claim_idle=self.config.claim_idle, block=1.0)
                    if entry is not None:
                        self.run_entry(*entry)
                except MemserveError as exc:  # Redis unreachable: wait, then go on
                    log.warning("worker %s: %s", self.name, exc)
                    stop.wait(1.0)
                except RedisError as exc:
                    log.warning("worker %s: Redis error %s", self.name, exc)
                    stop.wait(1.0)
        finally:
            done.set()
            beat.join(timeout=5)
            self.queue.leave(self.name)
            log.info("worker %s: stopped", self.name)

    def run_entry(self, entry_id: str, job_id: str) -> None:
        if not self.queue.start_attempt(job_id, self.name, self.config.max_attempts):
            self.queue.acknowledge(entry_id)  # final, cancelled, or out of attempts
            return
        with self._lock:
            self._running = (entry_id, job_id)
            self._lost = None
        try:
            job = self.queue.get(job_id)
            log.info(
                "worker %s: job %s (%s → %s), attempt %d",
                self.name,
                job.id,
                job.kind,
                job.memory_name,
                job.attempts,
            )
            self._run(job, entry_id)
        finally:
            with self._lock:
                self._running = None

    def _run(self, job: Job, entry_id: str) -> None:
        started = time.monotonic()
        state = self._run_job(job, entry_id)
        if state is not None:
            JOBS.labels(job.kind, state.value).inc()
            JOB_DURATION.labels(job.kind).observe(time.monotonic() - started)

    def _run_job(self, job: Job, entry_id: str) -> JobState | None:
        """Runs the job to its end; returns the state it ended in (None: another worker has it)."""
        self.last_progress = None
        try:
            version = self._already_published(job)
            if version is None:
                kind = get_kind(job.kind)
                context = _Context(self, job)
                # A thread of its own, ending with the job: its OpenMP team must not outlive it
                # and slow the engine of a server this worker runs in (memserve/threads.py).
                trained = run_in_compute_thread(
                    lambda: kind.train(job.spec, context), name=f"memserve-train-{job.id}"
                )
                meta = MemoryMeta(
                    kind=job.kind,
                    name=job.memory_name,
                    tenant=job.tenant,
                    base_model=self.model().fingerprint,
                    hyperparameters=trained.hyperparameters,
                    metrics=trained.metrics,
                    details=trained.details,
                )
                version = self.store.publish(meta, trained.tensors, job_id=job.id).version
        except _LostJob as exc:  # its entry is the new owner's now: not acknowledged
            log.warning("worker %s: %s", self.name, exc)
            return None
        except _HandBack as exc:
            handed = self.queue.hand_back(job.id, entry_id, self.name, self.last_progress)
            log.info("worker %s: %s; %s", self.name, exc, "handed back" if handed else "already taken over")
            return None
        except JobCancelled:
            self.queue.finish(job.id, entry_id, self.name, JobState.CANCELLED, progress=self.last_progress)
            log.info("worker %s: job %s cancelled", self.name, job.id)
            return JobState.CANCELLED
        except Exception as exc:  # the job fails, with the reason; the worker goes on
            log.error("worker %s: job %s failed:\n%s", self.name, job.id, traceback.format_exc())
            error = str(exc) if isinstance(exc, MemserveError) else f"{type(exc).__name__}: {exc}"
            self.queue.finish(
                job.id, entry_id, self.name, JobState.FAILED, error=error, progress=self.last_progress
            )
            return JobState.FAILED
        done = self.last_progress or Progress(1, 1)
        done = Progress(done.total or 1, done.total or 1, done.loss, 0.0, "published")
        self.queue.finish(
            job.id, entry_id, self.name, JobState.SUCCEEDED, result_version=version, progress=done
        )
        log.info("worker %s: job %s published %s version %d", self.name, job.id, job.memory_name, version)
        return JobState.SUCCEEDED

    def _already_published(self, job: Job) -> int | None:
        """The version an earlier attempt of this job published, if one did."""
        return self.store.published_by_job(job.memory_name, job.id, tenant=job.tenant)

    def _heartbeat(self, stop: threading.Event, done: threading.Event) -> None:
        ttl = self.config.claim_idle
        while not done.is_set():
            if stop.is_set() and self._stopping_since is None:
                self._stopping_since = time.monotonic()
            with self._lock:
                running = self._running
            try:
                if not self.queue.heartbeat(self.name, ttl, running) and running is not None:
                    with self._lock:
                        self._lost = running[1]
            except RedisError as exc:
                log.warning("worker %s: heartbeat failed: %s", self.name, exc)
            done.wait(
                min(self.config.heartbeat_interval, 0.2) if stop.is_set() else self.config.heartbeat_interval
            )


def run_worker(
    redis_url: str,
    model_config: ModelConfig,
    config: WorkerConfig,
    *,
    plugins: tuple[str, ...] = (),
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
) -> None:
    """`memserve worker`: runs until SIGTERM/SIGINT (the job in hand is finished first; a
    second signal exits at once, and another worker takes the job over). With `metrics_port`,
    serves /metrics: jobs by kind and state, job durations, the queue and the live workers."""
    load_plugins(plugins)
    if metrics_port is not None:
        try:
            start_http_server(metrics_port, addr=metrics_host)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {metrics_host}:{metrics_port}: {exc}") from exc
    loaded = load_model(model_config)
    client = connect(redis_url)
    wait_for_redis(client, timeout=30)
    queue = JobQueue(client)
    register_job_queue(queue.depth, queue.workers_alive)
    precreate_job_series(registered_kinds())
    worker = Worker(RedisStore(client), queue, lambda: loaded, config=config)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if stop.is_set():
            raise SystemExit(128 + signum)
        log.info(
            "worker %s: stopping; the job in hand gets %.0f s to finish, then goes back to the queue "
            "(signal again to exit now)",
            worker.name,
            config.drain_seconds,
        )
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(
        "worker %s: %s on %s, kinds: %s",
        worker.name,
        loaded.name,
        redacted(redis_url),
        ", ".join(registered_kinds()),
    )
    worker.run(stop)
