"""The `memserve` command line: `serve` and `worker` run the server's parts in this process; every
other command calls a running server through the client (`memserve.clients.Client`).

One module per command group registers its subcommands; `common` has what they share. An
expected error ends a command with one line on stderr (`memserve: error: ...`) and exit code 1;
a usage error exits with 2 (argparse's).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from memserve.clients.cli import adapters, docs, evaluate, facts, generate, info, jobs, memories, serve
from memserve.clients.cli.common import run, version
from memserve.clients.cli.logs import configure

GROUPS = (serve, generate, info, memories, docs, facts, adapters, jobs, evaluate)
"""The command groups, in the order `memserve --help` lists them."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memserve", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=version())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `memserve ARGV`; returns the exit code (a usage error exits with 2 from argparse)."""
    args = build_parser().parse_args(argv)
    configure(getattr(args, "log_level", "WARNING"), getattr(args, "log_format", "text"))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
