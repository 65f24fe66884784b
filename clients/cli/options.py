"""Flags made from a kind's options dataclass (`memserve.memory.options.describe`): one flag per
option, named after it (`memory_dim` → `--memory-dim`), its help the option's own line with its
default. The CLI declares no default of its own: a flag not given is None, and is not sent (the
server then uses the kind's default, or the memory's current setting)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from typing import Any

from memserve.memory.options import OptionInfo, Options, describe


def add_options(parser: argparse.ArgumentParser, options: type[Options], title: str) -> None:
    """One flag per option of `options`, in a group titled `title`."""
    group = parser.add_argument_group(title)
    for info in describe(options):
        group.add_argument("--" + info.name.replace("_", "-"), **_flag(info))


def given_options(args: argparse.Namespace, options: type[Options]) -> dict[str, Any]:
    """The options given on the command line (those left unset are left out)."""
    given = {info.name: getattr(args, info.name) for info in describe(options)}
    return {name: value for name, value in given.items() if value is not None}


def _flag(info: OptionInfo) -> dict[str, Any]:
    help = info.describe().replace("%", "%%")
    if info.is_list:
        help += " Several values, separated by spaces or commas" + (", or A..B" if info.item is int else "")
        metavar = "{" + ",".join(info.choices) + "}" if info.choices else info.name.upper()
        items = {"nargs": "+", "type": _items(info), "action": ExtendUnique, "metavar": metavar}
        return {"dest": info.name, "default": None, "help": help + ".", **items}
    flag: dict[str, Any] = {"dest": info.name, "default": None, "type": _value(info, info.type), "help": help}
    if info.choices:
        flag["choices"] = info.choices
    return flag


def _value(info: OptionInfo, kind: type) -> Callable[[str], Any]:
    """Converts one value and checks it against the option's bounds (a usage error if outside)."""

    def convert(text: str) -> Any:
        value = kind(text)
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if isinstance(value, str) and info.is_list and info.choices and value not in info.choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(info.choices)}")
        if isinstance(value, int | float) and not _within(info, value):
            raise argparse.ArgumentTypeError(f"{text!r} is out of range: {_bounds(info)}")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in its message: "invalid int value"
    return convert


def _items(info: OptionInfo) -> Callable[[str], list[Any]]:
    """Converts one argument of a list option: A, A,B,... or (integers) A..B."""
    assert info.item is not None
    one = _value(info, info.item)

    def convert(text: str) -> list[Any]:
        low, dots, high = text.partition("..")
        if dots and info.item is int:
            return [one(str(k)) for k in range(int(low), int(high) + 1)]
        return [one(part) for part in text.split(",") if part.strip()]

    convert.__name__ = info.item.__name__
    return convert


def _within(info: OptionInfo, value: float) -> bool:
    return (info.low is None or value >= info.low) and (info.high is None or value <= info.high)


def _bounds(info: OptionInfo) -> str:
    low = "-inf" if info.low is None else _number(info.low)
    high = "inf" if info.high is None else _number(info.high)
    return f"{info.name} takes values from {low} to {high}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


class ExtendUnique(argparse.Action):
    """Collects a list option's values over its arguments (and repeats of the flag), once each."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        collected: list[Any] = list(getattr(namespace, self.dest) or [])
        for items in values if isinstance(values, Sequence) else [values]:
            collected += [item for item in items if item not in collected]
        setattr(namespace, self.dest, collected)
