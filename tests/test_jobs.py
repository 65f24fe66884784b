"""Trainer workers on Redis Streams: run, fail, cancel, die mid-job and be replaced."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import tests.kinds  # noqa: F401  (registers the test-bias kind)
from memserve.memory_store.artifact import MemoryMeta
from memserve.memory_store.jobs import Job, JobQueue, JobState, Progress
from memserve.memory_store.redis_store import RedisStore
from memserve.models import LoadedModel, ModelConfig, load_model
from memserve.training.worker import Worker, WorkerConfig
from tests.conftest import wait_until

REPO = Path(__file__).resolve().parent.parent
FAST = WorkerConfig(heartbeat_interval=0.2, claim_idle=1.5, report_interval=0.0)


@pytest.fixture(scope="module")
def tiny_loaded(tiny_llama_dir) -> LoadedModel:
    return load_model(ModelConfig(model=str(tiny_llama_dir), device="cpu"))


@pytest.fixture
def store(redis_url: str) -> Iterator[RedisStore]:
    store = RedisStore.from_url(redis_url)
    yield store
    store.client.close()


@pytest.fixture
def queue(store: RedisStore) -> JobQueue:
    return JobQueue(store.client)


@pytest.fixture
def worker(store, queue, tiny_loaded) -> Iterator[Worker]:
    worker = Worker(store, queue, lambda: tiny_loaded, config=FAST, name="in-thread")
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    yield worker
    stop.set()
    thread.join(10)


def wait_final(queue: JobQueue, job_id: str, timeout: float = 30) -> Job:
    wait_until(lambda: queue.get(job_id).state.final, timeout)
    return queue.get(job_id)


def test_a_worker_trains_and_publishes(worker, queue, store, tiny_loaded):
    job = queue.submit("test-bias", "bias", {"steps": 5, "layer": 1, "seed": 3})
    done = wait_final(queue, job.id)
    assert done.state is JobState.SUCCEEDED, done.error
    assert done.result_version == 1 and done.worker == "in-thread" and done.attempts == 1
    assert done.progress.step == done.progress.total == 5 and done.progress.message == "published"
    assert done.started_at >= done.created_at and done.finished_at >= done.started_at
    meta = store.meta("bias")
    assert meta.source_job == job.id and meta.base_model == tiny_loaded.fingerprint
    assert meta.hyperparameters == {"layer": 1, "value": 1.0, "seed": 3}
    assert meta.metrics == {"final_loss": 0.2}
    expected = torch.randn(64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(store.load("bias").tensors["delta"], expected)


def test_a_failing_job_records_why_and_the_worker_goes_on(worker, queue, store):
    failing = queue.submit("test-bias", "bias", {"steps": 5, "fail_at": 2})
    unknown = queue.submit("no-such-kind", "x", {})
    assert wait_final(queue, failing.id).error == "RuntimeError: failing at step 2, as asked"
    assert wait_final(queue, failing.id).progress.step == 2
    assert "unknown memory kind 'no-such-kind'" in wait_final(queue, unknown.id).error
    assert wait_final(queue, queue.submit("test-bias", "bias", {}).id).state is JobState.SUCCEEDED
    assert store.versions("bias") == [1]


def test_cancelling_a_running_job_stops_it_without_publishing(worker, queue, store):
    job = queue.submit("test-bias", "bias", {"steps": 500, "step_seconds": 0.01})
    wait_until(lambda: queue.get(job.id).progress.step > 2, 30)
    assert queue.cancel(job.id).cancel_requested
    done = wait_final(queue, job.id)
    assert done.state is JobState.CANCELLED and 2 < done.progress.step < 500
    assert store.versions("bias") == []


def test_an_attempt_after_publishing_does_not_publish_again(worker, queue, store, tiny_loaded):
    job = queue.submit("test-bias", "bias", {"steps": 1})
    # As if an earlier attempt published and then died before marking the job done:
    earlier = MemoryMeta(kind="test-bias", name="bias", base_model=tiny_loaded.fingerprint,
                         hyperparameters={"layer": 0})  # fmt: skip
    store.publish(earlier, {"delta": torch.zeros(64), "padding": torch.zeros(0, 64)}, job_id=job.id)
    done = wait_final(queue, job.id)
    assert done.state is JobState.SUCCEEDED and done.result_version == 1
    assert store.versions("bias") == [1]


def test_a_presumed_dead_worker_cannot_overwrite_its_successor(queue):
    job = queue.submit("test-bias", "bias", {})
    assert queue.start_attempt(job.id, "first", max_attempts=3)
    assert queue.start_attempt(job.id, "second", max_attempts=3)  # took it over
    assert queue.report(job.id, "first", Progress(1, 2)) == "lost"
    assert queue.report(job.id, "second", Progress(1, 2)) == "ok"
    assert not queue.finish(job.id, "0-1", "first", JobState.FAILED, error="zombie")
    assert queue.get(job.id).state is JobState.RUNNING
    assert queue.start_attempt(job.id, "third", max_attempts=3)
    assert not queue.start_attempt(job.id, "fourth", max_attempts=3)  # a fourth death: give up
    failed = queue.get(job.id)
    assert failed.state is JobState.FAILED and "gave up after 3 attempts" in failed.error


def _worker_process(redis_url: str, model_dir: Path, log: Path, *options: str) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "memserve.clients.cli", "worker", "--redis-url", redis_url,
        "--model", str(model_dir), "--device", "cpu", "--plugin", "tests.kinds",
        "--heartbeat-interval", "0.2", "--claim-idle", "1.5", "--metrics-port", "0", *options,
    ]  # fmt: skip
    return subprocess.Popen(command, cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip


def test_a_killed_workers_job_is_finished_by_another_with_one_version(queue, store, redis_url, tiny_llama_dir,
                                                                       tmp_path):  # fmt: skip
    job = queue.submit("test-bias", "bias", {"steps": 30, "step_seconds": 0.05, "seed": 7})
    first = _worker_process(redis_url, tiny_llama_dir, tmp_path / "first.log")
    second = None
    try:
        wait_until(lambda: queue.get(job.id).progress.step >= 5, 60)
        doomed = queue.get(job.id).worker
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        assert queue.get(job.id).state is JobState.RUNNING  # nobody has noticed yet
        second = _worker_process(redis_url, tiny_llama_dir, tmp_path / "second.log")
        done = wait_final(queue, job.id, timeout=60)
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(20)
    log = (tmp_path / "second.log").read_text()
    assert done.state is JobState.SUCCEEDED, f"{done.error}\n{log}"
    assert done.worker != doomed and done.attempts == 2
    assert store.versions("bias") == [1]
    assert store.meta("bias").source_job == job.id
    assert torch.equal(
        store.load("bias").tensors["delta"], torch.randn(64, generator=torch.Generator().manual_seed(7))
    )
    assert queue.depth() == 0


def _pending(queue: JobQueue) -> list[tuple[str, str]]:
    """(entry id, consumer) of every pending stream entry."""
    rows = queue.client.xpending_range("memserve:{jobs}:stream", "workers", "-", "+", 100)
    return [(r["message_id"].decode(), r["consumer"].decode()) for r in rows]


def test_a_worker_that_lost_its_job_leaves_the_entry_to_its_successor(queue):
    job = queue.submit("test-bias", "bias", {})
    entry, _ = queue.next_entry("first", claim_idle=60, block=0.1)
    assert queue.start_attempt(job.id, "first", max_attempts=3)
    # "first" stalls; "second" finds the entry idle and takes the job over.
    assert queue.next_entry("second", claim_idle=0, block=0.1) == (entry, job.id)
    assert queue.start_attempt(job.id, "second", max_attempts=3)
    assert not queue.heartbeat("first", ttl=5, running=(entry, job.id))  # does not claim it back
    assert _pending(queue) == [(entry, "second")]
    assert not queue.finish(job.id, entry, "first", JobState.FAILED, error="zombie")
    assert _pending(queue) == [(entry, "second")]  # not acknowledged by the wrong worker
    assert queue.heartbeat("second", ttl=5, running=(entry, job.id))
    assert queue.finish(job.id, entry, "second", JobState.SUCCEEDED, result_version=1)
    assert _pending(queue) == [] and queue.get(job.id).state is JobState.SUCCEEDED


def test_a_worker_leaving_with_a_job_in_hand_leaves_it_claimable(queue):
    job = queue.submit("test-bias", "bias", {})
    entry, _ = queue.next_entry("leaver", claim_idle=60, block=0.1)
    queue.start_attempt(job.id, "leaver", max_attempts=3)
    queue.leave("leaver")
    assert _pending(queue) == [(entry, "leaver")]
    assert queue.next_entry("heir", claim_idle=0, block=0.1) == (entry, job.id)


def test_the_group_is_made_again_when_redis_lost_it(queue, store):
    queue.submit("test-bias", "first", {})
    for key in ("memserve:{jobs}:stream",):
        store.client.delete(key)  # as after a flush or a failover to an empty replica
    job = queue.submit("test-bias", "second", {})
    assert queue.next_entry("w", claim_idle=60, block=0.1)[1] == job.id


def test_a_sigtermed_worker_finishes_its_job_while_another_waits(
    queue, store, redis_url, tiny_llama_dir, tmp_path
):
    # Long enough that the second worker is up while the first still trains (a worker's start
    # takes seconds), and would take the job over if the first went silent.
    job = queue.submit("test-bias", "drained", {"steps": 240, "step_seconds": 0.05, "seed": 3})
    first = _worker_process(redis_url, tiny_llama_dir, tmp_path / "first.log")
    second = None
    try:
        wait_until(lambda: queue.get(job.id).progress.step >= 5, 60)
        running = queue.get(job.id).worker
        first.send_signal(signal.SIGTERM)  # finish what you hold; take nothing new
        second = _worker_process(
            redis_url, tiny_llama_dir, tmp_path / "second.log"
        )  # would steal a silent job
        done = wait_final(queue, job.id, timeout=60)
        assert first.wait(30) == 0  # and then it exits
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(20)
    assert done.state is JobState.SUCCEEDED, (tmp_path / "first.log").read_text()
    assert done.worker == running and done.attempts == 1  # the same worker, never restarted
    assert store.versions("drained") == [1]


def test_past_its_grace_a_stopping_worker_hands_the_job_back(
    queue, store, redis_url, tiny_llama_dir, tmp_path
):
    job = queue.submit("test-bias", "handed", {"steps": 60, "step_seconds": 0.05, "seed": 4})
    first = _worker_process(redis_url, tiny_llama_dir, tmp_path / "first.log", "--drain-seconds", "0")
    second = None
    try:
        wait_until(lambda: queue.get(job.id).progress.step >= 5, 60)
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0
        handed = queue.get(job.id)
        assert handed.state is JobState.QUEUED and handed.attempts == 0 and handed.progress.step >= 5
        second = _worker_process(redis_url, tiny_llama_dir, tmp_path / "second.log")
        done = wait_final(queue, job.id, timeout=60)  # taken at once, not after a silence
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(20)
    assert "handed back" in (tmp_path / "first.log").read_text()
    assert done.state is JobState.SUCCEEDED and done.attempts == 1
    assert store.versions("handed") == [1]
