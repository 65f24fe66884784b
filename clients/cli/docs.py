"""`memserve docs add|ls`: the documents of document banks."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from memserve.clients.cli.arguments import memory_argument
from memserve.clients.cli.common import command, connect
from memserve.clients.cli.files import read_documents
from memserve.clients.cli.options import add_options, given_options
from memserve.clients.cli.output import plural, print_json, print_table
from memserve.clients.cli.progress import submitted
from memserve.kinds.document.config import DocumentConfig
from memserve.names import check_name

SHOWN_DOCREP_VALUES = 3
TRAINING = "training options (not given: the bank's current setting, else the default shown)"
# Counts come back as floats (details travel as a protobuf Struct): shown as the integers they are.
DOCUMENT_COUNTS = frozenset({"words", "train_windows", "holdout_windows"})


def register(commands: Any) -> None:
    help = "register and list the documents of document banks"
    docs = commands.add_parser("docs", help=help, description=help)
    actions = docs.add_subparsers(dest="docs_command", required=True, metavar="ACTION")
    add = command(
        actions,
        "add",
        "train a new version of a document bank with these documents added (an id it has already "
        "replaces that document's text)",
        run_add,
    )
    add.add_argument("bank", metavar="BANK", help="the document bank (created if new)")
    add_document_files(add, required=True)
    add.add_argument("--wait", action="store_true", help="then follow the job, as `jobs watch` does")
    add_options(add, DocumentConfig, TRAINING)
    ls = command(actions, "ls", "list the documents of a document bank", run_ls)
    ls.add_argument(
        "bank",
        type=memory_argument,
        metavar="BANK[@VERSION]",
        help="the document bank (its current version unless pinned)",
    )


def add_document_files(parser: argparse.ArgumentParser, required: bool) -> None:
    """FILE... with --id and --title: documents, one per file (`docs add`, `adapters add`)."""
    parser.add_argument(
        "files",
        nargs="+" if required else "*",
        metavar="FILE",
        help=(
            "a UTF-8 text file per document; '-' reads one from standard input (then --id is needed). "
            "A first line '# TITLE' is the document's title and is not part of its text"
        ),
    )
    parser.add_argument(
        "--id",
        action="append",
        default=[],
        metavar="ID",
        help=(
            "the documents' ids, one per file in order (default: each file's name without its "
            "extension); 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        ),
    )
    parser.add_argument(
        "--title",
        action="append",
        default=[],
        metavar="TITLE",
        help=(
            "the documents' titles, one per file in order, for files without a '# TITLE' line "
            "(default: the id)"
        ),
    )


def run_add(args: argparse.Namespace) -> int:
    check_name(args.bank, "bank name")
    documents = read_documents(args.files, args.id, args.title)
    with connect(args) as client:
        job = client.register_documents(args.bank, documents, given_options(args, DocumentConfig))
    return submitted(args, job, plural(len(documents), "document"))


def run_ls(args: argparse.Namespace) -> int:
    name, version = args.bank
    with connect(args) as client:
        bank = client.get_memory(name, version)
    if bank.kind != "document":
        raise ValueError(f"{name} is a {bank.kind} memory, not a document bank")
    documents = [_counted(document) for document in bank.details.get("documents", [])]
    if args.json:
        print_json(documents)
    elif not documents:
        print(f"{name} version {bank.version} has no documents", file=sys.stderr)
    else:
        print_table(("ID", "TITLE", "WORDS", "DOCREP"), map(_row, documents))
    return 0


def _counted(document: dict[str, Any]) -> dict[str, Any]:
    return {key: int(value) if key in DOCUMENT_COUNTS else value for key, value in document.items()}


def _row(document: dict[str, Any]) -> tuple[str, ...]:
    values = document.get("docrep", [])
    # The table shows a DocRep's first values; --json has them all.
    docrep = ",".join(f"{value:.3g}" for value in values[:SHOWN_DOCREP_VALUES])
    docrep += f",… ({len(values)} values)" if len(values) > SHOWN_DOCREP_VALUES else ""
    return document["id"], document.get("title") or "-", str(document.get("words", 0)), docrep
