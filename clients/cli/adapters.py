"""`memserve adapters add|ls`: adapter memories."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from memserve.clients.cli.common import command, connect
from memserve.clients.cli.docs import add_document_files
from memserve.clients.cli.files import read_documents, read_templates
from memserve.clients.cli.options import add_options, given_options
from memserve.clients.cli.output import print_json, print_table
from memserve.clients.cli.progress import submitted
from memserve.clients.types import MemoryInfo
from memserve.kinds.adapter.config import AdapterConfig
from memserve.names import check_name

TRAINING = "training options (not given: the default shown; an adapter is trained afresh)"
HEADER = ("NAME", "VERSION", "LAYER", "HIDDEN", "DATA", "LOSS BASE → FINAL", "GATE")


def register(commands: Any) -> None:
    help = "train and list adapter memories"
    adapters = commands.add_parser("adapters", help=help, description=help)
    actions = adapters.add_subparsers(dest="adapters_command", required=True, metavar="ACTION")
    add = command(
        actions,
        "add",
        "train a new version of an adapter (afresh) on documents, question/answer templates, or both",
        run_add,
    )
    add.add_argument("name", metavar="NAME", help="the adapter (created if new)")
    add_document_files(add, required=False)
    add.add_argument(
        "--templates",
        default=None,
        metavar="FILE.jsonl",
        help="question/answer templates, one JSON object {question, answer} per line",
    )
    add.add_argument("--wait", action="store_true", help="then follow the job, as `jobs watch` does")
    add_options(add, AdapterConfig, TRAINING)
    command(actions, "ls", "list adapters (current versions) with their training figures", run_ls)


def run_add(args: argparse.Namespace) -> int:
    check_name(args.name, "adapter name")
    documents = read_documents(args.files, args.id, args.title) if args.files else []
    templates = read_templates(args.templates) if args.templates else []
    if not documents and not templates:
        raise ValueError("give document files, --templates FILE, or both")
    config = given_options(args, AdapterConfig)
    with connect(args) as client:
        job = client.register_adapter(args.name, documents, templates, config)
    return submitted(args, job, f"{len(documents)} documents, {len(templates)} templates")


def run_ls(args: argparse.Namespace) -> int:
    with connect(args) as client:
        adapters = client.list_memories(kind="adapter")
    if args.json:
        print_json([_summary(memory) for memory in adapters])
    elif not adapters:
        print("no adapters (train one with `memserve adapters add NAME FILE...`)", file=sys.stderr)
    else:
        print_table(HEADER, map(_row, adapters))
    return 0


def _summary(memory: MemoryInfo) -> dict[str, Any]:
    """The name, version, training options and figures (`metric_` + name) of an adapter."""
    metrics = {f"metric_{name}": value for name, value in memory.metrics.items()}
    return {"name": memory.name, "version": memory.version, **memory.hyperparameters, **metrics}


def _row(memory: MemoryInfo) -> tuple[str, ...]:
    options = memory.hyperparameters
    losses = f"{_metric(memory, 'base_loss', '.3f')} → {_metric(memory, 'final_loss', '.3f')}"
    layer, hidden = str(int(options.get("layer", -1))), str(int(options.get("hidden_size", 0)))
    data = str(memory.details.get("data", ""))
    return memory.name, str(memory.version), layer, hidden, data, losses, _metric(memory, "gate", ".4f")


def _metric(memory: MemoryInfo, name: str, form: str) -> str:
    value = memory.metrics.get(name)
    return "-" if not isinstance(value, int | float) else format(value, form)
