"""Sizes of the product code: lines per file and per function (generated stubs aside).

    python scripts/code_stats.py            # the summary, the files over 400 lines, functions over 50
    python scripts/code_stats.py --all      # every function over 20 lines too

A function's length counts its lines from `def` to its last line, decorators and docstring included.
"""

from __future__ import annotations

import argparse
import ast
import statistics
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("server", "memory_store", "clients")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 50


def product_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", *PRODUCT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [ROOT / f for f in listed if f.endswith(".py") and "/v1/" not in f and (ROOT / f).exists()]


def functions(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            found.append((f"{path.relative_to(ROOT)}:{node.lineno} {node.name}", node.end_lineno - start + 1))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="list every function over 20 lines")
    args = parser.parse_args()
    files = product_files()
    lengths = [f for path in files for f in functions(path)]
    sizes = {path: len(path.read_text().splitlines()) for path in files}
    counts = [n for _, n in lengths]
    print(
        f"{len(files)} files, {sum(sizes.values())} lines; {len(counts)} functions: "
        f"median {statistics.median(counts):g} lines, longest {max(counts)}"
    )
    for path, size in sorted(sizes.items(), key=lambda item: -item[1]):
        if size > MAX_FILE_LINES:
            print(f"file over {MAX_FILE_LINES} lines: {path.relative_to(ROOT)} ({size})")
    limit = 20 if args.all else MAX_FUNCTION_LINES
    for name, n in sorted(lengths, key=lambda item: -item[1]):
        if n > limit:
            print(f"function over {limit} lines: {name} ({n})")


if __name__ == "__main__":
    main()
