"""Training options from a job spec: one rule for every built-in kind."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Any, Protocol, TypeVar

from memserve.errors import InvalidArgument


class Options(Protocol):
    def check(self) -> None:
        """Raises InvalidArgument, saying what to fix, for values out of range."""


T = TypeVar("T", bound=Options)


def options_from_spec(
    cls: type[T], given: dict[str, Any], what: str, convert: Callable[[str, Any], Any] | None = None
) -> T:
    """The dataclass `cls` of options from a spec's `config`: unknown names are refused, each
    value takes its default's type (or `convert(name, value)`'s; a float with a fraction is no
    int), then the options check
    themselves. Every problem is an InvalidArgument that names the option."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = set(given) - known
    if unknown:
        raise InvalidArgument(f"unknown {what} training options: {sorted(unknown)}")
    if not isinstance(given, dict):
        raise InvalidArgument(f"the {what} training options must be an object of option: value")
    values: dict[str, Any] = {}
    for name, value in given.items():
        try:
            if isinstance(value, float) and isinstance(getattr(cls, name), int) and not value.is_integer():
                raise ValueError(name)  # JSON specs carry numbers as floats: 128.0 is 128, 128.9 is no int
            values[name] = convert(name, value) if convert else type(getattr(cls, name))(value)
        except (TypeError, ValueError):
            raise InvalidArgument(f"config.{name} has the wrong type: {value!r}") from None
    options = cls(**values)
    options.check()
    return options
