"""Reading what commands send: document files, JSON-lines files, '-' for standard input."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from memserve.jsonl import json_objects
from memserve.names import check_name

HEADING = "# "


def where(file: str) -> str:
    return "standard input" if file == "-" else file


def read_text(file: str) -> str:
    """A UTF-8 file ('-' = standard input); a byte-order mark is dropped."""
    try:
        if file == "-":
            return sys.stdin.read()
        return Path(file).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where(file)} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def json_file_objects(file: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, object) for each non-blank line of a JSON-lines file ('-' = standard input)."""
    return json_objects(read_text(file), where(file))


def read_documents(files: Sequence[str], ids: Sequence[str], titles: Sequence[str]) -> list[dict[str, str]]:
    """One document per file ('-' = standard input): its id (--id, else the file name without its
    extension), its title (a first line "# TITLE", else --title, else the id) and its text."""
    _check_document_arguments(files, ids, titles)
    documents: list[dict[str, str]] = []
    for index, file in enumerate(files):
        doc_id = _document_id(file, ids[index] if ids else None, {d["id"] for d in documents})
        title, text = _title_and_text(read_text(file), titles[index] if titles else doc_id)
        if not text.split():
            raise ValueError(f"{where(file)} has no text")
        documents.append({"id": doc_id, "title": title, "text": text})
    return documents


def _check_document_arguments(files: Sequence[str], ids: Sequence[str], titles: Sequence[str]) -> None:
    if ids and len(ids) != len(files):
        raise ValueError(f"give one --id per file, in order: {len(ids)} --id for {len(files)} files")
    if titles and len(titles) != len(files):
        raise ValueError(f"give one --title per file, in order: {len(titles)} --title for {len(files)} files")
    if files.count("-") > 1:
        raise ValueError("'-' (standard input) can be given only once")
    if "-" in files and not ids:
        raise ValueError("a document read from standard input ('-') needs its id: pass --id for each file")


def _document_id(file: str, given: str | None, seen: set[str]) -> str:
    doc_id = Path(file).stem if given is None else given
    hint = "" if given is not None else f" (taken from the file name {file!r}: pass --id to choose another)"
    try:
        check_name(doc_id, "document id")
    except ValueError as exc:
        raise ValueError(f"{exc}{hint}") from None
    if doc_id in seen:
        raise ValueError(f"document id {doc_id!r} is given twice{hint}")
    return doc_id


def _title_and_text(text: str, title: str) -> tuple[str, str]:
    """A first line "# TITLE" names the document and is not part of its text."""
    first, _, rest = text.partition("\n")
    if first.startswith(HEADING):
        return first[len(HEADING) :].strip() or title, rest
    return title, text


def read_templates(file: str) -> list[dict[str, str]]:
    """Question/answer templates, one JSON object {question, answer} per line."""
    templates: list[dict[str, str]] = []
    for line, template in json_file_objects(file):
        if not all(isinstance(template.get(key), str) for key in ("question", "answer")):
            raise ValueError(f"{line} must be a JSON object with string question and answer")
        templates.append({"question": template["question"], "answer": template["answer"]})
    if not templates:
        raise ValueError(f"{where(file)} has no templates")
    return templates
