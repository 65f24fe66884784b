"""Chaos: Redis killed under load, workers killed and stopped mid-job; what was acknowledged must
survive, each job must publish exactly one version, and a stopped worker finishes its job.

    python bench/chaos.py [--jobs 4] [--out DIR]

One `memserve serve` (default model, no worker of its own) and two `memserve worker` processes
share a redis-server persisted with an append-only file, as in production. Three runs:

1. **Redis SIGKILL under load**: 8 streams generate (half with a fact set) while jobs and
   uploads are sent every few seconds; Redis is SIGKILLed, and restarted on the same port and
   files 3 s later. Afterwards every acknowledged job must have succeeded with exactly one version
   and every acknowledged upload must be there. Generations that needed Redis while it was down
   fail with UNAVAILABLE (counted); no other status is allowed.
2. **Worker SIGKILL mid-job**: the job must be finished by the other worker, with one version.
3. **Worker SIGTERM mid-job**: the stopped worker must finish the job itself (one version) and exit 0.

Prints one line per check and a summary; exits 1 when a check fails. Writes a JSON report to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from common import launch_server, stop, wait_for_first_token

from memserve.clients import AsyncClient, Client
from memserve.clients.errors import MemserveError
from memserve.memory_store.redis_server import RedisServer
from memserve.memory_store.redis_store import RedisStore


def fact(index: int) -> dict[str, str]:
    return {"id": f"f{index}", "prompt": f"The code name of project {index} is", "target": f" Falcon{index}"}


class Workers:
    """`memserve worker` processes, by the name each gives its jobs."""

    def __init__(self, url: str, logs: Path) -> None:
        self.url, self.logs = url, logs
        self.processes: list[subprocess.Popen] = []

    def start(self) -> subprocess.Popen:
        log = open(self.logs / f"worker-{len(self.processes)}.log", "wb")  # noqa: SIM115 (closed at exit)
        command = [
            sys.executable,
            "-m",
            "memserve.clients.cli",
            "worker",
            "--redis-url",
            self.url,
            "--metrics-port",
            "0",
            "--claim-idle",
            "10",
            "--heartbeat-interval",
            "1",
            "--threads",
            "1",
        ]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def owning(self, worker_name: str) -> subprocess.Popen:
        """The process whose worker name (host-pid-random) is `worker_name`."""
        for process in self.processes:
            if f"-{process.pid}-" in worker_name:
                return process
        raise LookupError(worker_name)

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(30)


class Checks:
    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []

    def check(self, what: str, passed: bool, detail: str = "") -> None:
        self.results.append({"check": what, "passed": passed, "detail": detail})
        print(f"{'PASS' if passed else 'FAIL'}  {what}{': ' + detail if detail else ''}", flush=True)

    @property
    def failed(self) -> int:
        return sum(not r["passed"] for r in self.results)


def wait_final(client: Client, job_id: str, timeout: float = 1800) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            job = client.get_job(job_id)
            if job.state in ("succeeded", "failed", "cancelled"):
                return job
        except MemserveError:  # Redis restarting
            pass
        time.sleep(1)
    raise TimeoutError(f"job {job_id} did not end in {timeout:.0f} s")


def wait_running(client: Client, job_id: str, timeout: float = 600) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get_job(job_id)
        if (
            job.state == "running"
            and job.worker
            and (job.step > 0 or time.monotonic() > deadline - timeout + 60)
        ):
            return job  # a step into its training (or a minute into a job that reports none)
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} did not start in {timeout:.0f} s")


def versions_of_job(store: RedisStore, name: str, job_id: str) -> int:
    return sum(store.meta(name, v).source_job == job_id for v in store.versions(name))


async def load(address: str, stop_at: threading.Event, counts: Counter[str]) -> None:
    async def one(index: int, client: AsyncClient) -> None:
        memories = ["chaos-base"] if index % 2 else []
        while not stop_at.is_set():
            try:
                async for _ in client.generate_stream(
                    "The code name of project 0 is", memories=memories, max_new_tokens=8, ignore_eos=True
                ):
                    pass
                counts["OK"] += 1
            except MemserveError as exc:
                counts[exc.status.name] += 1
                await asyncio.sleep(0.2)

    async with AsyncClient(address, timeout=120) as client:
        await asyncio.gather(*(one(i, client) for i in range(8)))


def redis_killed_under_load(
    address: str, redis: RedisServer, store: RedisStore, jobs: int, checks: Checks
) -> dict[str, Any]:
    acknowledged_jobs: list[tuple[str, str]] = []
    acknowledged_uploads: list[tuple[str, int]] = []
    refused: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    stop_at = threading.Event()
    loader = threading.Thread(target=lambda: asyncio.run(load(address, stop_at, counts)))
    loader.start()
    with Client(address, timeout=60) as client:
        exported = client.export_memory("chaos-base")
        killed_at = jobs // 2
        for index in range(jobs):
            if index == killed_at:
                print("SIGKILL redis-server; restart in 3 s", flush=True)
                redis.kill()
                for _ in range(3):  # calls while it is down: refused, never acknowledged
                    refused.update(writes_while_down(client, exported, index, checks))
                    time.sleep(1)
                redis.start()
            try:
                job = client.register_facts(f"chaos-{index}", [fact(index)])
                acknowledged_jobs.append((job.id, f"chaos-{index}"))
                info = client.put_memory(exported, name=f"chaos-upload-{index}")
                acknowledged_uploads.append((info.name, info.version))
            except MemserveError as exc:  # Redis still coming back: not acknowledged
                refused[exc.status.name] += 1
            time.sleep(3)
        time.sleep(5)
        stop_at.set()
        loader.join()
        outcomes = {job_id: wait_final(client, job_id) for job_id, _ in acknowledged_jobs}
    checks.check(
        "writes while Redis was down were refused with UNAVAILABLE",
        set(refused) <= {"UNAVAILABLE"},
        str(dict(refused)),
    )
    checks.check(
        f"{len(acknowledged_jobs)} acknowledged jobs all succeeded",
        all(o.state == "succeeded" for o in outcomes.values()),
        str(Counter(o.state for o in outcomes.values())),
    )
    ones = [versions_of_job(store, name, job_id) for job_id, name in acknowledged_jobs]
    checks.check("each job published exactly one version", all(n == 1 for n in ones), str(ones))
    present = [_exists(store, name, version) for name, version in acknowledged_uploads]
    checks.check(f"{len(acknowledged_uploads)} acknowledged uploads all present", all(present))
    checks.check(
        "generation answered OK or UNAVAILABLE only", set(counts) <= {"OK", "UNAVAILABLE"}, str(dict(counts))
    )
    return {
        "jobs": len(acknowledged_jobs),
        "uploads": len(acknowledged_uploads),
        "refused": dict(refused),
        "generations": dict(counts),
    }


def writes_while_down(client: Client, exported: bytes, index: int, checks: Checks) -> Counter[str]:
    refused: Counter[str] = Counter()
    for write in (
        lambda: client.register_facts(f"chaos-down-{index}", [fact(index)]),
        lambda: client.put_memory(exported, name="chaos-down"),
    ):
        try:
            write()
            checks.check("a write while Redis is down is refused", False, "it was acknowledged")
        except MemserveError as exc:
            refused[exc.status.name] += 1
    return refused


def _exists(store: RedisStore, name: str, version: int) -> bool:
    try:
        store.meta(name, version)
        return True
    except MemserveError:
        return False


def worker_stopped_mid_job(
    address: str, store: RedisStore, workers: Workers, how: signal.Signals, checks: Checks
) -> dict[str, Any]:
    name = f"chaos-{how.name.lower()}"
    with Client(address, timeout=60) as client:
        job = client.register_facts(name, [fact(100 + how.value), fact(200 + how.value)])
        running = wait_running(client, job.id)
        process = workers.owning(running.worker)
        print(f"{how.name} worker {running.worker} at step {running.step}/{running.total}", flush=True)
        process.send_signal(how)
        if how is signal.SIGKILL:
            process.wait(30)
            workers.start()  # two workers again
        final = wait_final(client, job.id)
    versions = versions_of_job(store, name, job.id)
    succeeded = final.state == "succeeded" and versions == 1
    checks.check(
        f"{how.name}: the job succeeded with one version", succeeded, f"{final.state}, {versions} version(s)"
    )
    if how is signal.SIGKILL:
        checks.check("SIGKILL: another worker finished it", final.worker != running.worker, final.worker)
    else:
        code = process.wait(120)
        itself = final.worker == running.worker and code == 0
        checks.check(
            "SIGTERM: the stopped worker finished it and exited 0", itself, f"{final.worker}, exit {code}"
        )
    return {
        "job": job.id,
        "state": final.state,
        "versions": versions,
        "stopped": running.worker,
        "finished_by": final.worker,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=4, help="jobs (and uploads) sent around the Redis kill")
    parser.add_argument("--out", type=Path, default=None, help="write the report here (JSON)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="memserve-chaos-"))
    redis = RedisServer(work / "redis").start()
    store = RedisStore.from_url(redis.url)
    workers = Workers(redis.url, work)
    checks = Checks()
    report: dict[str, Any] = {}
    process, address = launch_server("--redis-url", redis.url, "--workers", "0", "--http-port", "0")
    try:
        wait_for_first_token(process, address)
        workers.start()
        workers.start()
        with Client(address, timeout=60) as client:
            base = wait_final(client, client.register_facts("chaos-base", [fact(0)]).id)
            if base.state != "succeeded":
                raise SystemExit(f"the first job failed: {base.error}")
        report["redis_sigkill"] = redis_killed_under_load(address, redis, store, args.jobs, checks)
        report["worker_sigkill"] = worker_stopped_mid_job(address, store, workers, signal.SIGKILL, checks)
        report["worker_sigterm"] = worker_stopped_mid_job(address, store, workers, signal.SIGTERM, checks)
        report["server_alive"] = process.poll() is None
        checks.check("the server ran through it all", process.poll() is None)
    finally:
        stop(process)
        workers.stop_all()
        redis.stop()
    report["checks"] = checks.results
    print(f"\n{len(checks.results) - checks.failed} of {len(checks.results)} checks passed (logs: {work})")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "chaos.json").write_text(json.dumps(report, indent=1))
    return 1 if checks.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
