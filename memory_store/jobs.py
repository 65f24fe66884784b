"""Training jobs on Redis Streams.

- ``memserve:{jobs}:stream``: one entry per queued job, read by the consumer
  group ``workers``. An entry stays pending until its worker acknowledges it;
  a running worker heartbeats by re-claiming its own entry (which resets the
  entry's idle time), so an entry idle for longer than ``claim_idle`` belongs to
  a dead worker and another worker takes it over with XAUTOCLAIM.
- ``memserve:{jobs}:job:<id>``: the job record (hash), the source of truth for
  its state. Every state change goes through a Lua script that checks who owns
  the job, so a worker that was presumed dead cannot overwrite its successor.
- ``memserve:{jobs}:index:<tenant>``: the tenant's job ids, scored by a global
  submission counter (``memserve:{jobs}:seq``): unique and in order, so a page
  token is simply the last score seen and pages never shift.
- ``memserve:{jobs}:active:<tenant>``: the tenant's jobs not yet final, for its quota; a job
  that ended is forgotten there by the next submission.
- ``memserve:{jobs}:worker:<name>``: one key per live worker, expiring unless
  refreshed.
- channel ``memserve:jobs``: the id of each job whose record changed.

All job keys share the ``{jobs}`` hash tag: one Redis Cluster slot.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from redis.exceptions import RedisError, ResponseError

from memserve.errors import InvalidArgument, NotFound, ResourceExhausted
from memserve.memory_store import lua
from memserve.memory_store.redis_store import RedisClient, store_error
from memserve.names import DEFAULT_TENANT

JOBS_CHANNEL = "memserve:jobs"
T = TypeVar("T")
STREAM = "memserve:{jobs}:stream"
GROUP = "workers"
WORKER_PREFIX = "memserve:{jobs}:worker:"
SEQUENCE = "memserve:{jobs}:seq"


JOB_ID_PATTERN = re.compile(r"[0-9a-f]{18}")


def job_key(job_id: str) -> str:
    return f"memserve:{{jobs}}:job:{job_id}"


def index_key(tenant: str) -> str:
    return f"memserve:{{jobs}}:index:{tenant}"


def active_key(tenant: str) -> str:
    return f"memserve:{{jobs}}:active:{tenant}"


def new_job_id() -> str:
    """Milliseconds since the epoch, then randomness, in hex."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(3)}"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class Progress:
    step: int = 0
    total: int = 0
    loss: float | None = None  # None: the trainer has no loss (local memories search)
    eta_seconds: float = 0.0
    message: str = ""


@dataclass(frozen=True)
class Job:
    id: str
    kind: str
    tenant: str
    memory_name: str
    state: JobState
    spec: dict[str, Any] = field(repr=False, default_factory=dict)
    progress: Progress = Progress()
    error: str = ""
    result_version: int = 0
    created_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    worker: str = ""
    attempts: int = 0
    cancel_requested: bool = False

    @classmethod
    def from_hash(cls, data: dict[bytes, bytes]) -> Job:
        get = {k.decode(): v.decode() for k, v in data.items()}
        progress = json.loads(get.get("progress") or "{}")
        return cls(
            id=get["id"],
            kind=get["kind"],
            tenant=get.get("tenant", DEFAULT_TENANT),
            memory_name=get["memory_name"],
            state=JobState(get["state"]),
            spec=json.loads(get.get("spec") or "{}"),
            progress=Progress(**progress),
            error=get.get("error", ""),
            result_version=int(get.get("result_version") or 0),
            created_at=float(get.get("created_at") or 0),
            started_at=float(get.get("started_at") or 0),
            finished_at=float(get.get("finished_at") or 0),
            worker=get.get("worker", ""),
            attempts=int(get.get("attempts") or 0),
            cancel_requested=get.get("cancel") == "1",
        )


class JobQueue:
    """The Redis side of jobs: what servers (submit, read, cancel) and workers (claim, report) do."""

    def __init__(self, client: RedisClient, *, retention_seconds: int = 7 * 24 * 3600) -> None:
        self.client = client
        self.retention_seconds = retention_seconds
        self._submit = client.register_script(lua.SUBMIT_JOB)
        self._start = client.register_script(lua.START_ATTEMPT)
        self._heartbeat = client.register_script(lua.HEARTBEAT)
        self._update = client.register_script(lua.UPDATE_JOB)
        self._finish = client.register_script(lua.FINISH_JOB)
        self._cancel = client.register_script(lua.CANCEL_JOB)
        self._hand_back = client.register_script(lua.HAND_BACK)
        self._group_ready = False

    def ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            self.client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise store_error(exc) from exc
        except RedisError as exc:
            raise store_error(exc) from exc
        self._group_ready = True

    def _with_group(self, call: Callable[[], T]) -> T:
        """Runs a stream command; if Redis lost the group (a flush, a failover to an empty
        replica), makes it again and retries once."""
        self.ensure_group()
        try:
            return call()
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._group_ready = False
            self.ensure_group()
            return call()

    # --- servers ------------------------------------------------------------
    def submit(
        self,
        kind: str,
        memory_name: str,
        spec: dict[str, Any],
        *,
        tenant: str = DEFAULT_TENANT,
        max_active: int = 0,
    ) -> Job:
        """Queues a job; RESOURCE_EXHAUSTED when the tenant already has `max_active` (0: no
        limit) jobs queued or running."""
        self.ensure_group()
        job_id = new_job_id()
        now = time.time()
        record = {
            "id": job_id,
            "kind": kind,
            "tenant": tenant,
            "memory_name": memory_name,
            "state": JobState.QUEUED.value,
            "spec": json.dumps(spec, allow_nan=False),
            "created_at": repr(now),
        }
        fields = [item for pair in record.items() for item in pair]
        try:
            seq = self._submit(
                keys=[job_key(job_id), index_key(tenant), STREAM, SEQUENCE, active_key(tenant)],
                args=[job_id, max_active, job_key(""), *fields],
            )
        except RedisError as exc:
            raise store_error(exc) from exc
        if int(seq) <= 0:
            raise ResourceExhausted(
                f"tenant {tenant!r} has {-int(seq)} job(s) queued or running, its quota: "
                "wait for one to finish, or cancel one"
            )
        self._notify(job_id)
        # As queued: a worker may already have taken it, but that is the next state, not this answer.
        return Job(job_id, kind, tenant, memory_name, JobState.QUEUED, spec=spec, created_at=now)

    def get(self, job_id: str) -> Job:
        if not JOB_ID_PATTERN.fullmatch(job_id):
            raise InvalidArgument(f"{job_id!r} is not a job id (18 hex digits)")
        try:
            data = self.client.hgetall(job_key(job_id))
        except RedisError as exc:
            raise store_error(exc) from exc
        if not data:
            raise NotFound(f"job {job_id!r} does not exist (or has expired)")
        return Job.from_hash(data)

    def cancel(self, job_id: str) -> Job:
        self.get(job_id)  # checks the id
        try:
            outcome = self._cancel(keys=[job_key(job_id)], args=[repr(time.time()), self.retention_seconds])
        except RedisError as exc:
            raise store_error(exc) from exc
        if outcome == b"missing":
            raise NotFound(f"job {job_id!r} does not exist (or has expired)")
        self._notify(job_id)
        return self.get(job_id)

    def list(
        self,
        *,
        state: JobState | None = None,
        kind: str = "",
        tenant: str = DEFAULT_TENANT,
        page_size: int = 50,
        page_token: str = "",
    ) -> tuple[list[Job], str]:
        """The tenant's jobs, newest first; `page_token` is where the previous page ended."""
        if page_size <= 0:
            raise InvalidArgument("page_size must be positive")
        if page_token and not (page_token.isascii() and page_token.isdigit() and len(page_token) <= 20):
            raise InvalidArgument(f"page_token {page_token!r} is not one this server gave")
        index = index_key(tenant)
        high = f"({page_token}" if page_token else "+inf"
        jobs: list[Job] = []
        try:
            while len(jobs) < page_size:
                found = self.client.zrevrangebyscore(
                    index, high, "-inf", start=0, num=page_size, withscores=True
                )
                if not found:
                    return jobs, ""
                for raw, score in found:
                    job_id = raw.decode()
                    high = f"({int(score)}"
                    data = self.client.hgetall(job_key(job_id))
                    if not data:  # expired: forget it
                        self.client.zrem(index, job_id)
                        continue
                    job = Job.from_hash(data)
                    if (state is None or job.state == state) and (not kind or job.kind == kind):
                        jobs.append(job)
                        if len(jobs) == page_size:
                            break
            more = self.client.zrevrangebyscore(index, high, "-inf", start=0, num=1)
        except RedisError as exc:
            raise store_error(exc) from exc
        return jobs, high[1:] if more else ""

    def depth(self) -> int:
        """Jobs waiting for a worker (not yet delivered to any)."""
        # Finished entries are deleted, so the stream holds exactly the waiting and the
        # running (pending) ones. (XINFO's `lag` would say this directly, from Redis 7 on.)
        try:
            groups = self.client.xinfo_groups(STREAM)
            length = self.client.xlen(STREAM)
        except ResponseError:  # no stream yet
            return 0
        except RedisError as exc:
            raise store_error(exc) from exc
        pending = sum(int(g.get("pending") or 0) for g in groups)
        return max(length - pending, 0)

    def workers_alive(self) -> list[str]:
        try:
            return sorted(
                k.decode()[len(WORKER_PREFIX) :] for k in self.client.scan_iter(f"{WORKER_PREFIX}*")
            )
        except RedisError as exc:
            raise store_error(exc) from exc

    def _notify(self, job_id: str) -> None:
        with contextlib.suppress(RedisError):  # watchers also poll
            self.client.publish(JOBS_CHANNEL, job_id)

    # --- workers ------------------------------------------------------------
    def next_entry(self, consumer: str, *, claim_idle: float, block: float) -> tuple[str, str] | None:
        """(stream entry id, job id) of a job to run: first one a dead worker left, else a new one."""

        def claim() -> Any:
            return self.client.xautoclaim(
                STREAM, GROUP, consumer, min_idle_time=int(claim_idle * 1000), start_id="0-0", count=1
            )

        def read() -> Any:
            return self.client.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=1, block=int(block * 1000))

        try:
            for entry in self._with_group(claim)[1]:
                if entry and entry[1]:
                    return entry[0].decode(), entry[1][b"job"].decode()
            delivered = self._with_group(read)
        except RedisError as exc:
            raise store_error(exc) from exc
        for _stream, entries in delivered or ():
            for entry_id, fields in entries:
                return entry_id.decode(), fields[b"job"].decode()
        return None

    def heartbeat(self, consumer: str, ttl: float, running: tuple[str, str] | None = None) -> bool:
        """Says this worker is alive and, for `running` = (entry id, job id), that it still
        runs that job. Returns False when the job is no longer this worker's."""
        self.client.set(WORKER_PREFIX + consumer, repr(time.time()), px=int(ttl * 1000))
        if running is None:
            return True
        entry_id, job_id = running
        return bool(self._heartbeat(keys=[job_key(job_id), STREAM], args=[consumer, entry_id, GROUP]))

    def leave(self, consumer: str) -> None:
        """Forgets this worker; a job it still holds stays pending, for another to take over."""
        with contextlib.suppress(RedisError):
            self.client.delete(WORKER_PREFIX + consumer)
            holding = self.client.xpending_range(STREAM, GROUP, "-", "+", 1, consumername=consumer)
            if not holding:
                self.client.xgroup_delconsumer(STREAM, GROUP, consumer)

    def start_attempt(self, job_id: str, consumer: str, max_attempts: int) -> bool:
        outcome = self._start(
            keys=[job_key(job_id)], args=[consumer, repr(time.time()), max_attempts, self.retention_seconds]
        )
        self._notify(job_id)
        return bool(outcome == b"run")

    def report(self, job_id: str, consumer: str, progress: Progress) -> str:
        """Writes progress; returns 'ok', 'cancel' or 'lost' (see lua.UPDATE_JOB)."""
        payload = json.dumps(progress.__dict__, allow_nan=False)
        outcome = self._update(keys=[job_key(job_id)], args=[consumer, "progress", payload]).decode()
        if outcome == "ok":
            self._notify(job_id)
        return str(outcome)

    def finish(
        self,
        job_id: str,
        entry_id: str,
        consumer: str,
        state: JobState,
        *,
        error: str = "",
        result_version: int = 0,
        progress: Progress | None = None,
    ) -> bool:
        """Ends the job and acknowledges its stream entry, if this worker still owns it
        (if not, the entry belongs to the worker that took over, and stays)."""
        fields: list[str] = ["state", state.value, "finished_at", repr(time.time())]
        if error:
            fields += ["error", error[:4000]]
        if result_version:
            fields += ["result_version", str(result_version)]
        if progress is not None:
            fields += ["progress", json.dumps(progress.__dict__, allow_nan=False)]
        owned = (
            self._finish(keys=[job_key(job_id)], args=[consumer, self.retention_seconds, *fields]) == b"ok"
        )
        if owned:
            self.acknowledge(entry_id)
            self._notify(job_id)
        return bool(owned)

    def hand_back(self, job_id: str, entry_id: str, consumer: str, progress: Progress | None) -> bool:
        """Queues a job this worker runs again, for the next worker, keeping its progress and not
        counting the attempt; False when the job is no longer this worker's."""
        payload = json.dumps((progress or Progress(0, 0)).__dict__, allow_nan=False)
        keys = [job_key(job_id), STREAM]
        handed = bool(self._hand_back(keys=keys, args=[consumer, entry_id, GROUP, job_id, payload]))
        if handed:
            self._notify(job_id)
        return handed

    def acknowledge(self, entry_id: str) -> None:
        self.client.xack(STREAM, GROUP, entry_id)
        self.client.xdel(STREAM, entry_id)
