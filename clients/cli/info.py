"""`memserve info`: the served model and the server's limits."""

from __future__ import annotations

import argparse
from typing import Any

from memserve.clients.cli.common import command, connect
from memserve.clients.cli.output import print_fields, print_json


def register(commands: Any) -> None:
    command(commands, "info", "describe the served model and the server's limits", run, tenant=False)


def run(args: argparse.Namespace) -> int:
    with connect(args) as client:
        info = client.model_info()
    if args.json:
        print_json(info)
        return 0
    print_fields([(name.replace("_", " "), value) for name, value in info.to_dict().items()])
    return 0
