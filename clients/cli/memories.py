"""`memserve memories ls|show|rm|export|import`: the stored memories of a tenant."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from memserve.clients.cli.arguments import memory_argument
from memserve.clients.cli.common import command, connect
from memserve.clients.cli.output import plural, print_fields, print_json, print_table, size, when
from memserve.clients.types import MemoryInfo


def register(commands: Any) -> None:
    help = "list, inspect, delete, export and import stored memories"
    memories = commands.add_parser("memories", help=help, description=help)
    actions = memories.add_subparsers(dest="memories_command", required=True, metavar="ACTION")
    ls = command(actions, "ls", "list memories (their current versions)", run_ls)
    ls.add_argument("--kind", default="", help="only memories of this kind")
    ls.add_argument("--prefix", default="", help="only names starting with this")
    _memory_positional(command(actions, "show", "describe one memory version", run_show), "current")
    rm = command(actions, "rm", "delete a memory (every version, or the pinned one)", run_rm)
    _memory_positional(rm, "every version unless pinned")
    rm.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    export = command(actions, "export", "save a memory version as a self-describing file", run_export)
    _memory_positional(export, "current")
    export.add_argument(
        "-o", "--output", type=Path, metavar="FILE", help="default: NAME-vVERSION.safetensors"
    )
    export.add_argument("--force", action="store_true", help="overwrite the file if it exists")
    upload = command(actions, "import", "upload an exported file as a new version", run_import)
    upload.add_argument(
        "file", type=Path, metavar="FILE", help="a file written by `memserve memories export`"
    )
    upload.add_argument("--name", default=None, help="the memory to publish it as (default: the file's)")


def _memory_positional(parser: argparse.ArgumentParser, versions: str) -> None:
    versions = "the current version unless pinned" if versions == "current" else versions
    parser.add_argument(
        "memory", type=memory_argument, metavar="NAME[@VERSION]", help=f"the memory ({versions})"
    )


def run_ls(args: argparse.Namespace) -> int:
    with connect(args) as client:
        memories = client.list_memories(kind=args.kind, prefix=args.prefix)
    if args.json:
        print_json(memories)
    elif not memories:
        print("no memories", file=sys.stderr)
    else:
        header = ("NAME", "KIND", "VERSION", "SIZE", "CREATED", "BASE")
        print_table(header, (_row(m) for m in memories))
    return 0


def _row(m: MemoryInfo) -> tuple[str, ...]:
    return (m.name, m.kind, str(m.version), size(m.size_bytes), when(m.created_at), m.base_model[:12])


def run_show(args: argparse.Namespace) -> int:
    with connect(args) as client:
        memory = client.get_memory(*args.memory)
    if args.json:
        print_json(memory)
        return 0
    fields = [
        ("name", memory.name),
        ("kind", memory.kind),
        ("version", memory.version),
        ("versions", memory.versions),
        ("tenant", memory.tenant),
        ("base model", memory.base_model),
        ("sha256", memory.sha256),
        ("size", f"{size(memory.size_bytes)} ({memory.size_bytes} bytes)"),
        ("created", when(memory.created_at)),
        ("source job", memory.source_job or "-"),
    ]
    documents = [("hyperparameters", memory.hyperparameters), ("metrics", memory.metrics)]
    print_fields(fields, [*documents, ("details", memory.details)])
    return 0


def run_rm(args: argparse.Namespace) -> int:
    name, version = args.memory
    with connect(args) as client:
        if not args.yes and not _confirmed(client, name, version):
            print("nothing deleted", file=sys.stderr)
            return 1
        deleted = client.delete_memory(name, version)
    if args.json:
        print_json({"name": name, "version": version, "deleted": deleted})
    else:
        print(f"deleted {plural(deleted, 'version')} of {name}")
    return 0


def _confirmed(client: Any, name: str, version: int) -> bool:
    """Asks at a terminal; refuses (ValueError) where nobody can answer."""
    if not sys.stdin.isatty():
        what = f"version {version} of {name}" if version else f"{name} (every version)"
        raise ValueError(
            f"not deleting {what}: standard input is not a terminal, so nobody can confirm; "
            "pass -y to delete without asking"
        )
    # Asking about a memory that does not exist would be pointless: NOT_FOUND comes first.
    versions = client.get_memory(name, version).versions
    listed = f"version {version}" if version else f"versions {', '.join(map(str, versions))}"
    return input(f"delete {name} {listed}? [y/N] ").strip().lower() in ("y", "yes")


def run_export(args: argparse.Namespace) -> int:
    name, version = args.memory
    with connect(args) as client:
        # Resolved first: a missing memory fails before any file is touched, and the export is
        # pinned to the version the default file name says even if a new one lands meanwhile.
        version = client.get_memory(name, version).version
        path: Path = args.output or Path(f"{name}-v{version}.safetensors")
        if path.exists() and not args.force:
            raise ValueError(f"{path} already exists: pass --force to overwrite it, or -o another file")
        written = client.export_memory_to(name, path, version)
    if args.json:
        print_json({"name": name, "version": version, "path": str(path), "size_bytes": written})
    else:
        print(f"{path} ({size(written)}, {written} bytes)")
    return 0


def run_import(args: argparse.Namespace) -> int:
    with connect(args) as client:
        memory = client.import_memory(args.file, name=args.name or "")
    if args.json:
        print_json(memory)
    else:
        print(f"imported {memory.name} version {memory.version} ({memory.kind}, {size(memory.size_bytes)})")
    return 0
