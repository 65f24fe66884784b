"""One OpenMP thread team at a time: how memserve keeps small ops fast on the CPU.

PyTorch's CPU backend runs each parallel op on an OpenMP team owned by the calling thread.
Once two threads of one process own multi-threaded teams (the main thread that loaded the
model, and the engine thread that decodes), libgomp finds more threads than CPUs and stops
spinning between parallel regions: every op then pays a futex wake-up. Measured here with
2 CPUs: a (1, 1536) × (1536, 167) addmm took 190 µs instead of 40 µs, and a decode step of
the default model 54 ms instead of 35 ms.

So the serving process gives every thread one OpenMP thread by default (OMP_NUM_THREADS=1,
set before torch is imported) and only the threads that compute, the engine thread and a
training job's thread, take `compute_threads()`. A training job runs in a thread of its own
that ends with the job, so that its team does not outlive it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TypeVar

THREADS_ENV = "MEMSERVE_THREADS"
_ARRANGED = "MEMSERVE_ONE_TEAM"  # set once OMP_NUM_THREADS is memserve's, not the user's

T = TypeVar("T")


def compute_threads() -> int:
    """Intra-op threads of the computing threads: $MEMSERVE_THREADS, else every CPU this process
    may use (its affinity, capped by a container's CPU limit)."""
    given = os.environ.get(THREADS_ENV, "").strip()
    if given:
        try:
            threads = int(given)
        except ValueError:
            raise ValueError(f"${THREADS_ENV} must be a whole number of threads, got {given!r}") from None
        if threads < 1:
            raise ValueError(f"${THREADS_ENV} must be >= 1, got {threads}")
        return threads
    try:
        usable = len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    quota = _cgroup_cpus()  # a container's CPU limit: fewer than the node's CPUs it can see
    return max(1, min(usable, quota)) if quota else usable


def _cgroup_cpus() -> int | None:
    """The CPU limit of this process's cgroup (v2 `cpu.max`, v1 `cfs_quota_us`), rounded up; None if none."""
    v1 = "/sys/fs/cgroup/cpu/cpu.cfs_"
    candidates = (("/sys/fs/cgroup/cpu.max", None), (f"{v1}quota_us", f"{v1}period_us"))
    for quota_path, period_path in candidates:
        try:
            with open(quota_path) as file:
                fields = file.read().split()
            if period_path is not None:
                with open(period_path) as file:
                    fields = [fields[0], file.read().strip()]
        except (OSError, IndexError):
            continue
        if len(fields) != 2 or fields[0] in ("max", "-1"):
            return None
        try:
            quota, period = int(fields[0]), int(fields[1])
        except ValueError:
            return None
        return -(-quota // period) if quota > 0 and period > 0 else None
    return None


def one_team_per_process() -> None:
    """Called first thing by a serving process, before torch is imported: every thread gets one
    OpenMP thread unless it asks for more. A user's OMP_NUM_THREADS becomes the compute threads."""
    if os.environ.get(_ARRANGED) == "1":  # done already (this process, or its parent)
        return
    user = os.environ.get("OMP_NUM_THREADS", "").strip()
    if user and not os.environ.get(THREADS_ENV):
        os.environ[THREADS_ENV] = user
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ[_ARRANGED] = "1"


def use_compute_threads(threads: int | None = None) -> int:
    """Gives the calling thread its compute threads (it owns the process's team from now on)."""
    import torch

    count = threads or compute_threads()
    torch.set_num_threads(count)
    return count


def run_in_compute_thread(work: Callable[[], T], name: str, threads: int | None = None) -> T:
    """Runs `work` in a new thread with the compute threads and returns its result (or raises its
    exception); the thread, and the OpenMP team it made, end with it."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            use_compute_threads(threads)
            result.append(work())
        except BaseException as exc:  # handed to the caller, raised there
            error.append(exc)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
