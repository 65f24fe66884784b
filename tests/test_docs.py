"""The README and docs/ render as written and point only inside the repository.

Each Markdown file is parsed with a CommonMark parser (markdown-it-py). A check fails on a code
fence that is never closed or whose closing line has text after it (the rest of the file would
render as code), on a relative link or image whose target does not exist in the repository, and
on any tracked file that points at the team's notes outside the repository.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from markdown_it import MarkdownIt
from markdown_it.token import Token

ROOT = Path(__file__).resolve().parent.parent
MARKDOWN = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
# Built from parts, so that this file does not match itself.
OUTSIDE = ("../" + "shared", "shared/" + "DESIGN")
PARSER = MarkdownIt("commonmark")


def fence_problems(text: str) -> list[str]:
    """Fences never closed (markdown-it closes them silently at the end) or whose would-be
    closing line carries text, like "``` Errors arrive…", so that they run on."""
    lines = text.splitlines()
    problems: list[str] = []
    for token in PARSER.parse(text):
        if token.type != "fence" or token.map is None:
            continue
        start, end = token.map
        char, width = token.markup[0], len(token.markup)
        closing = lines[end - 1].strip(" \t>") if end - 1 > start else ""
        if not (len(closing) >= width and set(closing) == {char}):
            problems.append(f"line {start + 1}: the fence {token.markup} is never closed")
        for number in range(start + 1, end - 1):
            line = lines[number].strip(" \t>")
            if line.startswith(char * width) and line.rstrip(char).strip():
                problems.append(f"line {number + 1}: a fence line with text after it: {line[:40]!r}")
    return problems


def _targets(tokens: list[Token]) -> list[tuple[int, str]]:
    """(line, target) of every link and image, inline ones included."""
    found: list[tuple[int, str]] = []
    for token in tokens:
        line = token.map[0] + 1 if token.map else 0
        for child in token.children or []:
            target = child.attrGet("href") if child.type == "link_open" else child.attrGet("src")
            if child.type in ("link_open", "image") and isinstance(target, str):
                found.append((line, target))
    return found


def broken_links(text: str, folder: Path, root: Path = ROOT) -> list[str]:
    """Relative targets (no scheme, not '#…') missing under `root`, resolved against `folder`."""
    problems: list[str] = []
    for line, target in _targets(PARSER.parse(text)):
        parts = urlsplit(target)
        if parts.scheme or parts.netloc or target.startswith("#"):
            continue
        path = (folder / unquote(parts.path)).resolve()
        if not path.exists() or not path.is_relative_to(root):
            problems.append(f"line {line}: {target} does not exist in the repository")
    return problems


def _tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: no list of tracked files")
    return [ROOT / name for name in listed.stdout.decode().split("\0") if name]


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda path: str(path.relative_to(ROOT)))
def test_markdown_fences_are_closed(path: Path) -> None:
    assert fence_problems(path.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda path: str(path.relative_to(ROOT)))
def test_markdown_relative_links_resolve(path: Path) -> None:
    assert broken_links(path.read_text(encoding="utf-8"), path.parent) == []


def test_no_tracked_file_points_outside_the_repository() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for path in _tracked_files()
        if path.is_file() and any(needle.encode() in path.read_bytes() for needle in OUTSIDE)
    ]
    assert offenders == []


def test_the_docs_exist() -> None:
    names = {path.name for path in MARKDOWN}
    assert {"README.md", "design.md", "memories.md", "api.md", "cli.md", "operations.md"} <= names
    assert (ROOT / "LICENSE").is_file()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("# t\n\n```sh\nmake serve\n", "never closed"),
        ("````\ncode\n```\n", "never closed"),
        ("```python\nx = 1\n``` Then prose.\n\n## Next\n```\n", "text after it"),
    ],
)
def test_fence_check_reports_a_bad_fence(text: str, problem: str) -> None:
    assert any(problem in found for found in fence_problems(text))


def test_fence_check_accepts_closed_fences() -> None:
    assert fence_problems("```sh\nmake test\n```\n\n~~~~\n```\n~~~~\n\n    indented\n") == []


def test_link_check_reports_a_missing_target(tmp_path: Path) -> None:
    (tmp_path / "here.md").write_text("x")
    text = "[ok](here.md#part) [web](https://example.org) [top](#top) [gone](missing.md#x) ![i](no.png)\n"
    problems = broken_links(text, tmp_path, tmp_path)
    assert len(problems) == 2
    assert "missing.md#x" in problems[0] and "no.png" in problems[1]
