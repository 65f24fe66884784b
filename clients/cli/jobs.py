"""`memserve jobs ls|show|watch|cancel|submit`: training jobs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from memserve.clients.cli.common import command, connect
from memserve.clients.cli.output import duration, print_fields, print_json, print_table, when
from memserve.clients.cli.progress import follow, progress, submitted
from memserve.clients.types import JOB_STATES, JobInfo


def register(commands: Any) -> None:
    help = "follow and control training jobs"
    jobs = commands.add_parser("jobs", help=help, description=help)
    actions = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    ls = command(actions, "ls", "list jobs, newest first", run_ls)
    ls.add_argument("--state", choices=JOB_STATES, default=None, help="only jobs in this state")
    ls.add_argument("--kind", default="", help="only jobs of this memory kind")
    command(actions, "show", "describe one job", run_show).add_argument("id", metavar="ID", help="the job id")
    cancel = command(actions, "cancel", "ask a queued or running job to stop", run_cancel)
    cancel.add_argument("id", metavar="ID", help="the job id")
    help = "follow a job's progress until it ends (exit 0 only if it succeeds)"
    command(actions, "watch", help, run_watch).add_argument("id", metavar="ID", help="the job id")
    _submit_parser(actions)


def _submit_parser(actions: Any) -> None:
    help = "train a memory of any registered kind (plugin kinds) from a JSON spec"
    submit = command(actions, "submit", help, run_submit)
    submit.add_argument("kind", metavar="KIND", help="a memory kind the server knows (`memserve info`)")
    submit.add_argument("memory_name", metavar="NAME", help="the memory the job publishes a version of")
    given = submit.add_mutually_exclusive_group()
    given.add_argument("--spec", default="{}", help="the kind's training spec, a JSON object")
    given.add_argument("--spec-file", type=Path, default=None, help="read the spec from this JSON file")
    submit.add_argument("--wait", action="store_true", help="then follow it, as `jobs watch` does")


def run_ls(args: argparse.Namespace) -> int:
    with connect(args) as client:
        jobs = client.list_jobs(state=args.state or "", kind=args.kind)
    if args.json:
        print_json(jobs)
    elif not jobs:
        print("no jobs", file=sys.stderr)
    else:
        header = ("ID", "KIND", "MEMORY", "STATE", "PROGRESS", "CREATED")
        print_table(
            header, ((j.id, j.kind, j.memory_name, j.state, progress(j), when(j.created_at)) for j in jobs)
        )
    return 0


def run_show(args: argparse.Namespace) -> int:
    with connect(args) as client:
        job = client.get_job(args.id)
    if args.json:
        print_json(job)
    else:
        print_fields(_fields(job))
    return 0


def _fields(job: JobInfo) -> list[tuple[str, Any]]:
    return [
        ("id", job.id),
        ("kind", job.kind),
        ("memory", job.memory_name),
        ("state", job.state),
        ("progress", progress(job)),
        ("loss", "-" if job.loss is None else f"{job.loss:.6g}"),
        ("eta", duration(job.eta_seconds)),
        ("message", job.message or "-"),
        ("error", job.error or "-"),
        ("result version", job.result_version or "-"),
        ("created", when(job.created_at)),
        ("started", when(job.started_at)),
        ("finished", when(job.finished_at)),
        ("worker", job.worker or "-"),
    ]


def run_cancel(args: argparse.Namespace) -> int:
    with connect(args) as client:
        job = client.cancel_job(args.id)
    if args.json:
        print_json(job)
    elif job.state == "cancelled":
        print(f"job {job.id}: cancelled")
    elif job.final:
        print(f"job {job.id} already {job.state}: nothing to cancel")
    else:  # a running job stops at its worker's next progress report
        print(
            f"job {job.id}: cancellation requested (still {job.state}); `memserve jobs watch {job.id}` "
            f"follows it"
        )
    return 0


def run_watch(args: argparse.Namespace) -> int:
    return follow(args, args.id)


def run_submit(args: argparse.Namespace) -> int:
    text = args.spec_file.read_text() if args.spec_file else args.spec
    try:
        spec = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"the spec is not valid JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise ValueError("the spec must be a JSON object, like '{\"epochs\": 3}'")
    with connect(args) as client:
        job = client.submit_job(args.kind, args.memory_name, spec)
    return submitted(args, job, job.kind)
