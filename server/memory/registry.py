"""The registry of memory kinds: the one place that knows which kinds exist.

The built-in kinds (`memserve.kinds.document`, `.local`, `.adapter`) register
themselves when their package is imported; other kinds come from plugins: modules
named by ``--plugin`` / ``$MEMSERVE_PLUGINS`` (comma-separated), or installed
packages that declare a ``memserve.kinds`` entry point. A plugin module registers
its kinds with ``register_kind``.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from typing import Any

from memserve.errors import InvalidArgument
from memserve.memory.kind import MemoryKind

log = logging.getLogger(__name__)

PLUGINS_ENV = "MEMSERVE_PLUGINS"
ENTRY_POINT_GROUP = "memserve.kinds"
# The built-in kinds' packages: each registers its kind when imported.
BUILTIN_KINDS = ("memserve.kinds.document", "memserve.kinds.local", "memserve.kinds.adapter")

_KINDS: dict[str, MemoryKind] = {}


def register_kind(kind: MemoryKind) -> MemoryKind:
    if not getattr(kind, "name", ""):
        raise ValueError(f"{type(kind).__name__} has no kind name")
    existing = _KINDS.get(kind.name)
    if existing is not None and type(existing) is not type(kind):  # re-importing a module is fine
        raise ValueError(f"memory kind {kind.name!r} is already registered by {type(existing).__name__}")
    _KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> MemoryKind:
    kind = _KINDS.get(name)
    if kind is not None:
        return kind
    raise InvalidArgument(f"unknown memory kind {name!r}; this server knows {registered_kinds() or 'none'}")


def registered_kinds() -> list[str]:
    return sorted(_KINDS)


def load_plugins(modules: Iterable[str] = ()) -> list[str]:
    """Imports plugin modules (arguments, $MEMSERVE_PLUGINS, entry points); returns what was loaded."""
    for builtin in BUILTIN_KINDS:
        importlib.import_module(builtin)
    names = [m.strip() for m in [*modules, *os.environ.get(PLUGINS_ENV, "").split(",")] if m.strip()]
    loaded: list[str] = []
    for module in dict.fromkeys(names):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            # As `python -m` would: a plugin module may sit in the working directory.
            if exc.name != module.split(".")[0] or os.getcwd() in sys.path:
                raise InvalidArgument(f"plugin module {module!r} cannot be imported: {exc}") from exc
            sys.path.append(os.getcwd())
            try:
                importlib.import_module(module)
            except ImportError as again:
                raise InvalidArgument(f"plugin module {module!r} cannot be imported: {again}") from again
        except ImportError as exc:
            raise InvalidArgument(f"plugin module {module!r} cannot be imported: {exc}") from exc
        loaded.append(module)
    for point in entry_points(group=ENTRY_POINT_GROUP):
        hook: Callable[[], Any] | Any = point.load()
        if callable(hook):
            hook()
        loaded.append(point.value)
    if loaded:
        log.info("plugins: %s; memory kinds: %s", ", ".join(loaded), ", ".join(registered_kinds()))
    return loaded
