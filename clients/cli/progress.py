"""Following a job to its end (`jobs watch`, `--wait`) and an evaluation's progress bar."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterable
from typing import Any

from memserve.clients.cli.common import connect
from memserve.clients.cli.output import duration, print_json_line
from memserve.clients.types import JobInfo

BAR_FORMAT = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}"
EVALUATION_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {elapsed}{postfix}"


def follow(args: argparse.Namespace, job_id: str) -> int:
    """Follows a job until it ends: a bar at a terminal, a line per update elsewhere, JSON lines
    with --json. Exit code 0 only if it succeeded."""
    with connect(args) as client, contextlib.closing(client.watch_job(job_id)) as updates:
        if args.json:
            last = _follow_with_json(updates)
        else:
            last = _follow_with_bar(updates) if sys.stdout.isatty() else _follow_with_lines(updates)
    if args.json:
        return 0 if last is not None and last.state == "succeeded" else 1
    return _verdict(job_id, last)


def submitted(args: argparse.Namespace, job: JobInfo, what: str) -> int:
    """Prints the job just queued (`what` it trains on), then follows it if --wait."""
    if args.json:
        print_json_line(job)
    else:
        print(f"job {job.id}: {what} → {job.memory_name}, {job.state}")
    return follow(args, job.id) if args.wait else 0


def _verdict(job_id: str, last: JobInfo | None) -> int:
    if last is None or not last.final:
        state = last.state if last else "unknown"
        print(f"the watch ended before job {job_id} finished (last state: {state}); watch it again")
        return 1
    if last.state == "succeeded":
        print(f"succeeded: published {last.memory_name} version {last.result_version}")
        return 0
    print(f"failed: {last.error}" if last.state == "failed" else last.state)
    return 1


def _follow_with_bar(updates: Iterable[JobInfo]) -> JobInfo | None:
    from tqdm import tqdm  # only a watch on a terminal needs it

    last: JobInfo | None = None
    with tqdm(total=None, unit="step", file=sys.stdout, dynamic_ncols=True, bar_format=BAR_FORMAT) as bar:
        for job in updates:
            last = job
            bar.total = job.total or None
            bar.n = job.step
            bar.set_description_str(job.state, refresh=False)
            bar.set_postfix_str(progress_details(job), refresh=False)
            bar.refresh()  # updates arrive when the job changes: show each one now
    return last


def _follow_with_lines(updates: Iterable[JobInfo]) -> JobInfo | None:
    last: JobInfo | None = None
    for job in updates:
        last = job
        print(f"{job.state} {progress(job)} {progress_details(job)}".rstrip(), flush=True)
    return last


def _follow_with_json(updates: Iterable[JobInfo]) -> JobInfo | None:
    last: JobInfo | None = None
    for job in updates:
        last = job
        print_json_line(job)
    return last


def progress(job: JobInfo) -> str:
    return f"{job.step}/{job.total}" if job.total else "-"


def progress_details(job: JobInfo) -> str:
    parts: list[str] = []
    if job.step:
        if job.loss is not None:
            parts.append(f"loss {job.loss:.4g}")
        parts.append(f"eta {duration(job.eta_seconds)}")
    if job.message:
        parts.append(job.message)
    return ", ".join(parts)


class EvaluationBar:
    """A progress bar on stderr fed with (step, total, message), as an evaluation reports them;
    drawn from the first report on (a call refused at once draws none)."""

    def __init__(self, description: str) -> None:
        self.description = description
        self._bar: Any = None

    def __call__(self, step: int, total: int, message: str) -> None:
        if self._bar is None:
            from tqdm import tqdm

            form = EVALUATION_FORMAT
            self._bar = tqdm(total=total, desc=self.description, file=sys.stderr, bar_format=form)
        self._bar.total = total or None
        self._bar.n = step
        self._bar.set_postfix_str(message, refresh=False)
        self._bar.refresh()

    def __enter__(self) -> EvaluationBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
