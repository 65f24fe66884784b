"""`memserve facts add|ls`: the facts of local memory sets."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from memserve.clients.cli.arguments import memory_argument
from memserve.clients.cli.common import add_flags, command, connect, flag
from memserve.clients.cli.files import json_file_objects
from memserve.clients.cli.options import add_options, given_options
from memserve.clients.cli.output import plural, print_json, print_table
from memserve.clients.cli.progress import submitted
from memserve.kinds.local.config import LocalConfig
from memserve.names import check_name

TRAINING = "training options (not given: the set's current setting, else the default shown)"
FACT_FLAGS = (
    flag("--prompt", default="", help="the prompt the fact completes"),
    flag("--target", default="", help="what the prompt should continue with, e.g. ' Kathmandu'"),
    flag(
        "--positive",
        action="append",
        default=[],
        metavar="PROMPT",
        help="a prompt that must also continue with the target: a paraphrase (repeatable)",
    ),
    flag(
        "--negative",
        action="append",
        default=[],
        metavar="PROMPT",
        help="a prompt whose continuation must not change: a neighbour (repeatable)",
    ),
    flag("--id", dest="fact_id", default="", help="the fact's id (default: made from its prompt)"),
    flag(
        "--subject",
        default="",
        help="what the fact is about, as written in the prompt, e.g. 'The Eiffel Tower' (default: "
        "the trainer finds it: the words before the prompt's first verb)",
    ),
    flag(
        "--file",
        default=None,
        metavar="FACTS.jsonl",
        help=(
            "many facts, one JSON object per line: {prompt, target, id?, subject?, positive_prompts?, "
            "negative_prompts?} ('-' = standard input)"
        ),
    ),
    flag("--wait", action="store_true", help="then follow the job, as `jobs watch` does"),
)


def register(commands: Any) -> None:
    help = "register and list the facts of local memory sets"
    facts = commands.add_parser("facts", help=help, description=help)
    actions = facts.add_subparsers(dest="facts_command", required=True, metavar="ACTION")
    add = command(
        actions,
        "add",
        "train a new version of a local memory set with these facts added (an id it has already "
        "replaces that fact)",
        run_add,
    )
    add.add_argument("set", metavar="SET", help="the local memory set (created if new)")
    add_flags(add, FACT_FLAGS)
    add_options(add, LocalConfig, TRAINING)
    ls = command(actions, "ls", "list the facts of a local memory set", run_ls)
    ls.add_argument(
        "set", type=memory_argument, metavar="SET[@VERSION]", help="the set (current version unless pinned)"
    )


def run_add(args: argparse.Namespace) -> int:
    check_name(args.set, "memory set name")
    facts = read_facts(args)
    with connect(args) as client:
        job = client.register_facts(args.set, facts, given_options(args, LocalConfig))
    return submitted(args, job, plural(len(facts), "fact"))


def read_facts(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The fact of --prompt/--target (with --positive, --negative, --id), and those of --file."""
    facts = _given_fact(args)
    if args.file:
        facts += [fact for _, fact in json_file_objects(args.file)]
    if not facts:
        raise ValueError("no fact given: pass --prompt and --target, or --file FACTS.jsonl")
    return facts


def _given_fact(args: argparse.Namespace) -> list[dict[str, Any]]:
    if not (args.prompt or args.target):
        if args.positive or args.negative or args.fact_id or args.subject:
            raise ValueError(
                "--positive, --negative, --id and --subject describe the fact of --prompt and --target"
            )
        return []
    if not (args.prompt and args.target):
        raise ValueError("give both --prompt and --target (or a --file of facts)")
    fact = {"prompt": args.prompt, "target": args.target, "positive_prompts": args.positive}
    fact["negative_prompts"] = args.negative
    if args.subject:
        fact["subject"] = args.subject
    return [{**fact, "id": args.fact_id} if args.fact_id else fact]


def run_ls(args: argparse.Namespace) -> int:
    name, version = args.set
    with connect(args) as client:
        memory = client.get_memory(name, version)
    if memory.kind != "local":
        raise ValueError(f"{name} is a {memory.kind} memory, not a local memory set")
    facts = memory.details.get("facts", [])
    if args.json:
        print_json(facts)
    elif not facts:
        print(f"{name} version {memory.version} has no facts", file=sys.stderr)
    else:
        print_table(("ID", "PROMPT", "TARGET", "ENTRIES", "TRAIN +/-", "HELD-OUT +/-"), map(_row, facts))
    return 0


def _row(fact: dict[str, Any]) -> tuple[str, ...]:
    prompt = fact["prompt"] if len(fact["prompt"]) <= 48 else fact["prompt"][:47] + "…"
    train = f"{len(fact.get('train_positives', []))}/{len(fact.get('train_negatives', []))}"
    held_out = f"{len(fact.get('heldout_positives', []))}/{len(fact.get('heldout_negatives', []))}"
    return fact["id"], prompt, repr(fact["target"]), str(len(fact.get("entries", []))), train, held_out
