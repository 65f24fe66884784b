"""The registry of memory kinds: the one place that knows what a kind is.

A kind supplies two halves, and the rest of memserve stays kind-agnostic:
- its **trainer** (worker side): a job spec → the tensors and metadata of an artifact;
- its **inference module** (server side): an artifact → a ready-to-run memory on
  the model's device, which binds to a request's reference as a ``RowMemory``.

The built-in kinds register themselves when their module is imported; other
kinds come from plugins: modules named by ``--plugin`` / ``$MEMSERVE_PLUGINS``
(comma-separated), or installed packages that declare a ``memserve.kinds``
entry point. A plugin module registers its kinds with ``register_kind``.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar

import torch

from memserve.engine import RowMemory
from memserve.errors import Cancelled, InvalidArgument, Unimplemented
from memserve.hooks import MemoryHooks
from memserve.memory_store.artifact import Artifact
from memserve.models import LoadedModel

log = logging.getLogger(__name__)

PLUGINS_ENV = "MEMSERVE_PLUGINS"
ENTRY_POINT_GROUP = "memserve.kinds"

# The built-in kinds and the issue each lands with, for a clear UNIMPLEMENTED until then.
PLANNED_KINDS: dict[str, str] = {}
# The built-in kinds' modules: each registers its kind when imported.
BUILTIN_KINDS = ("memserve.document_train", "memserve.local_train", "memserve.adapter_train")


@dataclass(frozen=True)
class MemoryKey:
    """What selects inside a memory, for kinds that need it (document banks)."""

    document_id: str = ""
    docrep: tuple[float, ...] = ()
    mix: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class MemoryRefSpec:
    """A request's reference to one memory, checked for shape but not yet resolved."""

    name: str
    kind: str | None  # None: any kind (a reference by name)
    version: int = 0  # 0 = current
    scale: float = 1.0
    key: MemoryKey | None = None


@dataclass(frozen=True)
class Trained:
    """What a trainer returns: the artifact's tensors and its descriptive metadata."""

    tensors: dict[str, torch.Tensor]
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


class JobCancelled(Cancelled):
    """Raised inside a trainer (by `TrainContext.report`) when its job is cancelled."""


class TrainContext(ABC):
    """What a trainer may use: the base model, and a way to report progress."""

    job_id: str
    tenant: str
    memory_name: str

    @property
    @abstractmethod
    def model(self) -> LoadedModel:
        """The base model, frozen (loaded on first use)."""

    @abstractmethod
    def report(self, step: int, total: int, loss: float | None = None, message: str = "") -> None:
        """Publishes progress (throttled); raises JobCancelled when the job was cancelled."""

    @abstractmethod
    def current_artifact(self) -> Artifact | None:
        """The memory's current version, if it has one (to train a new version over it)."""


@dataclass(frozen=True)
class LoadTarget:
    """Where a loaded memory will run."""

    device: torch.device
    dtype: torch.dtype
    hooks: MemoryHooks | None
    num_layers: int
    hidden_size: int


class LoadedMemory(ABC):
    """A ready-to-run memory (tensors on the model's device), shared by the requests using it."""

    name: str
    version: int

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Device bytes it holds (what the cache counts)."""

    @abstractmethod
    def bind(self, ref: MemoryRefSpec) -> RowMemory:
        """The per-request view: this memory with the reference's scale and key."""


class MemoryKind(ABC):
    name: ClassVar[str]
    # Kinds whose references must carry a key (a document bank needs a DocRep).
    needs_key: ClassVar[bool] = False

    @abstractmethod
    def validate_spec(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Checks a training spec before it is queued (InvalidArgument, with the fix); returns it."""

    @abstractmethod
    def train(self, spec: dict[str, Any], context: TrainContext) -> Trained:
        """Trains on the worker; calls `context.report` often enough to be cancelled."""

    @abstractmethod
    def load(self, artifact: Artifact, target: LoadTarget) -> LoadedMemory:
        """Builds the inference module from a checked artifact."""


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
    if name in PLANNED_KINDS:
        raise Unimplemented(
            f"the {name!r} memory kind is not implemented yet (it lands with {PLANNED_KINDS[name]})"
        )
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
