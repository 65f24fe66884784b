"""How commands print: aligned tables and fields for people, JSON for programs."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any


def plain(value: Any) -> Any:
    """JSON-ready values of the client's dataclasses (`to_dict()` where they have one), named
    tuples (as objects), lists and dicts."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return {name: plain(item) for name, item in zip(value._fields, value, strict=True)}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    return value.isoformat() if isinstance(value, datetime) else value


def print_json(value: Any) -> None:
    """One JSON document."""
    print(json.dumps(plain(value), indent=2))


def print_json_line(value: Any) -> None:
    """One line of a JSON-lines stream."""
    print(json.dumps(plain(value)), flush=True)


def print_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    table = [list(header), *(list(row) for row in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def print_fields(fields: Sequence[tuple[str, Any]], documents: Sequence[tuple[str, Any]] = ()) -> None:
    """Aligned `label: value` lines (lists joined with commas), then indented JSON documents."""
    width = max(len(label) for label, _ in fields) + 1
    for label, value in fields:
        shown = ", ".join(map(str, value)) if isinstance(value, list | tuple) else value
        print(f"{label + ':':<{width}} {shown}")
    for label, document in documents:
        body = json.dumps(document, indent=2, sort_keys=True)
        print(f"{label}:\n" + "\n".join(f"  {line}" for line in body.splitlines()))


def size(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    value = count / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%SZ") if moment else "-"


def duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
