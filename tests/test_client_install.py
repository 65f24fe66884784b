"""The client install (`pip install memserve`, no extras) runs without the server's dependencies:
the Python client and every client command import and work with torch, numpy, redis, … absent,
a server-only command says how to install the server, and everything the client imports is
linted for Python 3.10."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from importlib import metadata
from pathlib import Path

import pytest

from memserve.clients.cli.common import SERVER_INSTALL_HINT, SERVER_ONLY_MODULES

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Runs in a fresh interpreter where importing any server-only module fails as if it were not
# installed; prints the memserve modules the client loaded, as files relative to the repository.
WITHOUT_SERVER = """
import importlib.abc, json, sys
BLOCKED = set(json.loads(sys.argv[1]))

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
import contextlib, io
from memserve.clients import Client
from memserve.clients.cli import build_parser, main

commands = build_parser()._subparsers._group_actions[0].choices
for name in commands:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main([name, "--help"])
Client("127.0.0.1:1").close()
code = main(sys.argv[2:]) if len(sys.argv) > 2 else 0
files = sorted({m.__file__ for m in list(sys.modules.values())
                if m.__name__.startswith("memserve") and getattr(m, "__file__", None)})
print(json.dumps({"code": code, "files": files, "commands": sorted(commands)}))
"""


def run_without_server(*argv: str) -> tuple[dict, str]:
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_SERVER, json.dumps(sorted(SERVER_ONLY_MODULES)), *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_every_client_command_runs_without_the_server_dependencies() -> None:
    result, _ = run_without_server()
    assert {"generate", "facts", "docs", "jobs", "memories", "serve"} <= set(result["commands"])
    assert result["code"] == 0


@pytest.mark.parametrize("argv", [["serve"], ["worker", "--redis-url", "redis://127.0.0.1:1"]])
def test_a_server_command_without_the_server_says_how_to_install_it(argv: list[str]) -> None:
    result, stderr = run_without_server(*argv)
    assert result["code"] == 1
    assert SERVER_INSTALL_HINT in stderr
    assert "Traceback" not in stderr


def test_what_the_client_imports_is_linted_for_python_3_10() -> None:
    result, _ = run_without_server()
    globs = PYPROJECT["tool"]["ruff"]["per-file-target-version"]
    py310 = [glob for glob, version in globs.items() if version == "py310"]
    files = [str(Path(file).resolve().relative_to(ROOT)) for file in result["files"]]
    assert files, result
    unlinted = [file for file in files if not any(fnmatch(file, glob) for glob in py310)]
    assert not unlinted, f"add to [tool.ruff] per-file-target-version as py310: {unlinted}"
    assert PYPROJECT["project"]["requires-python"] == ">=3.10"


def test_the_client_install_needs_nothing_of_the_server_and_the_server_extra_has_it_all() -> None:
    project = PYPROJECT["project"]
    assert {distribution(r) for r in project["dependencies"]} == {"grpcio", "protobuf", "tqdm"}
    server = {distribution(r) for r in project["optional-dependencies"]["server"]}
    distributions = metadata.packages_distributions()
    for module in SERVER_ONLY_MODULES:
        owners = {distribution(name) for name in distributions.get(module, [])}
        assert owners & server, f"{module} comes from {owners}, none of them in memserve[server]"


def distribution(requirement: str) -> str:
    """The normalised distribution name of a requirement ("redis[hiredis]>=5" → "redis")."""
    name = re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()
