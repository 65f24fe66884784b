"""JSON-lines files, read one object a line with the line named in every error (client and server)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any


def json_objects(text: str, name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """("NAME line N", object) for each non-blank line of `text`; ValueError for a line that is not
    a JSON object."""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{name} line {number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is not JSON: {exc.msg}") from None
        if not isinstance(value, dict):
            raise ValueError(f"{where} is not a JSON object")
        yield where, value
