"""A kind's training options, defined once: one dataclass whose fields carry their help and bounds.

The trainer reads the dataclass; the RPC's config message documents the same fields
(`scripts/gen_protos.py` writes each field's comment from here, and a test fails when the
two disagree); the CLI makes one flag per field from `describe`. Nothing here imports torch,
so the CLI can build its parser without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, Protocol, TypeVar

from memserve.errors import InvalidArgument


class Options(Protocol):
    __dataclass_fields__: dict[str, Field[Any]]

    def check(self) -> None:
        """Raises InvalidArgument, saying what to fix, for values out of range."""


T = TypeVar("T", bound=Options)


def option(
    default: Any,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    choices: Sequence[str] = (),
    item: type | None = None,
    kind: type | None = None,
) -> Any:
    """A training option: its default, what it does (one sentence), and what values it takes.

    `low`/`high` bound a number (inclusive), `choices` a string (or each string of a list);
    `item` is the type of a list option's items; `kind` the type of an option whose default is None."""
    kind = kind or (tuple if item is not None else type(default))
    metadata = {"help": help, "low": low, "high": high, "choices": tuple(choices), "item": item, "kind": kind}
    if isinstance(default, list | tuple):
        return field(default=tuple(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class OptionInfo:
    """One option as users see it: in the CLI's help and in the API's documentation."""

    name: str
    type: type
    default: Any
    help: str
    low: float | None
    high: float | None
    choices: tuple[str, ...]
    item: type | None

    @property
    def is_list(self) -> bool:
        return self.item is not None

    def describe(self) -> str:
        """The help, the values it takes and the default, as one line of prose."""
        parts = [self.help.rstrip(".") + "."]
        if self.choices:
            parts.append("One of " + ", ".join(f'"{c}"' for c in self.choices) + ".")
        elif self.low is not None and self.high is not None:
            parts.append(f"From {_number(self.low)} to {_number(self.high)}.")
        elif self.low is not None:
            parts.append(f"At least {_number(self.low)}.")
        parts.append(f"Default: {_default_text(self.default)}.")
        return " ".join(parts)


def describe(cls: type[Options]) -> list[OptionInfo]:
    """The options of a kind's config dataclass, in declaration order."""
    described = []
    for f in fields(cls):  # type: ignore[arg-type]
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with option()")
        default = f.default if f.default is not MISSING else None
        meta = f.metadata
        bounds = (meta["low"], meta["high"], meta["choices"], meta["item"])
        described.append(OptionInfo(f.name, meta["kind"], default, meta["help"], *bounds))
    return described


def section_of(cls: type) -> str:
    """Where a request carries these options, for error messages: a training spec's `config`,
    or an evaluation's `options` (a class says so with `section: ClassVar[str]`)."""
    return str(getattr(cls, "section", "config"))


def check_options(options: Options) -> None:
    """Checks every option against its declared bounds and choices (InvalidArgument, naming it)."""
    section = section_of(type(options))
    for info in describe(type(options)):
        value = getattr(options, info.name)
        for one in value if info.is_list else (value,):
            _check_value(info, one, section)


def _check_value(info: OptionInfo, value: Any, section: str) -> None:
    name = f"{section}.{info.name}"
    if info.choices and value not in info.choices:
        raise InvalidArgument(f"{name} must be one of {list(info.choices)}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgument(f"{name} must be finite, got {value}")
    if value is None or isinstance(value, str):
        return
    if (info.low is not None and value < info.low) or (info.high is not None and value > info.high):
        low = "-inf" if info.low is None else _number(info.low)
        high = "inf" if info.high is None else _number(info.high)
        raise InvalidArgument(f"{name} must be in [{low}, {high}], got {value}")


def options_from_spec(
    cls: type[T], given: dict[str, Any], what: str, convert: Callable[[str, Any], Any] | None = None
) -> T:
    """The dataclass `cls` of options from a spec's `config`: unknown names are refused, each
    value takes its declared type (a float with a fraction is no int; a list option takes a
    list), then the options check themselves. Every problem is an InvalidArgument that names
    the option."""
    section = section_of(cls)
    noun = f"{what} training options" if section == "config" else f"{what} options"
    if not isinstance(given, dict):
        raise InvalidArgument(f"the {noun} must be an object of option: value")
    infos = {info.name: info for info in describe(cls)}
    unknown = set(given) - set(infos)
    if unknown:
        raise InvalidArgument(f"unknown {noun}: {sorted(unknown)}")
    values: dict[str, Any] = {}
    for name, value in given.items():
        try:
            values[name] = convert(name, value) if convert else _converted(infos[name], value)
        except (TypeError, ValueError):
            raise InvalidArgument(f"{section}.{name} has the wrong type: {value!r}") from None
    options = cls(**values)
    options.check()
    return options


def _converted(info: OptionInfo, value: Any) -> Any:
    if info.item is not None:
        if not isinstance(value, list | tuple):
            raise TypeError(info.name)
        return tuple(_scalar(info.item, v) for v in value)
    if value is None and info.default is None:
        return None
    return _scalar(info.type, value)


def _scalar(kind: type, value: Any) -> Any:
    # JSON specs carry numbers as floats: 128.0 is 128, 128.9 is no int.
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    if kind in (int, float) and isinstance(value, bool):
        raise TypeError(value)
    return kind(value)  # a numeric string is fine: the API's JSON form carries 64-bit integers as strings


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _default_text(default: Any) -> str:
    if default is None:
        return "unset"
    if isinstance(default, tuple):
        return "[" + ", ".join(_default_text(v) for v in default) + "]" if default else "empty"
    if isinstance(default, str):
        return f'"{default}"'
    if isinstance(default, float):
        return f"{default:g}"
    return str(default)


def check_layer(value: int | None, num_layers: int, name: str, *, from_end: bool) -> None:
    """A block index of the served model: 0 … num_layers-1, or with `from_end` also -1 … -num_layers."""
    if value is None:
        return
    low = -num_layers if from_end else 0
    if not low <= value < num_layers:
        counting = f" (or {low} … -1 from the end)" if from_end else ""
        raise InvalidArgument(f"{name} {value} is not a block of this model: 0 … {num_layers - 1}{counting}")


def spec_object(value: Any, where: str, known: set[str]) -> dict[str, Any]:
    """A JSON object of a spec, with no key outside `known` (a typo is refused, not ignored)."""
    if not isinstance(value, dict):
        raise InvalidArgument(f"{where} must be an object with {sorted(known)}")
    unknown = set(value) - known
    if unknown:
        raise InvalidArgument(f"{where} has unknown keys {sorted(unknown)}; it takes {sorted(known)}")
    return value


def spec_text(value: dict[str, Any], key: str, where: str) -> str:
    """A string field of a spec's object; missing or null is empty; any other type is refused."""
    text = value.get(key)
    if text is None:
        return ""
    if not isinstance(text, str):
        raise InvalidArgument(f"{where}.{key} must be a string, not {type(text).__name__}")
    return text


def spec_texts(value: dict[str, Any], key: str, where: str) -> list[str]:
    """A list-of-strings field of a spec's object; missing or null is empty."""
    texts = value.get(key)
    if texts is None:
        return []
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise InvalidArgument(f"{where}.{key} must be a list of strings")
    return texts
