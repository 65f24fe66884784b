"""What a memory kind is: the interface between a kind and the rest of memserve.

A kind supplies two halves, and the store, the cache, the jobs and the RPCs stay
kind-agnostic:
- its **trainer** (worker side): a job spec → the tensors and metadata of an artifact;
- its **inference module** (server side): an artifact → a ready-to-run memory on
  the model's device (`LoadedMemory`), which binds to a request's reference as a
  `RowMemory`: the object the engine hands to the hooks for that request's batch rows.

Kinds register in `memserve.memory.registry`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from memserve.errors import Cancelled, Unimplemented

if TYPE_CHECKING:  # importing a kind's options (the CLI does) must not import torch
    import torch

    from memserve.memory.evaluation import EvalContext
    from memserve.memory.hooks import MemoryContext, MemoryHooks
    from memserve.memory_store.artifact import Artifact
    from memserve.models import LoadedModel

DEFAULT_APPLY_ORDER = 100


class RowMemory(ABC):
    """A ready-to-run memory attached to a request (what `LoadedMemory.bind` returns).

    The engine gives it the batch rows of the requests that use it, once per forward; it adds
    its ops at the hook sites. Where several kinds act at one site, lower `apply_order`s apply
    first (document banks 10, then adapters 20, then the default)."""

    name: str
    apply_order: ClassVar[int] = DEFAULT_APPLY_ORDER

    @abstractmethod
    def add_ops(self, context: MemoryContext, rows: torch.Tensor) -> None:
        """Adds this memory's ops for the batch rows `rows` (1-D index tensor) to `context`."""


@runtime_checkable
class JoinedOp(Protocol):
    """An op that several bound memories joined (a group op): when it raises, the requests of
    every member fail, and only theirs."""

    members: Sequence[RowMemory]


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


MemoryObserver = Callable[[Any], None]
"""Hears a kind's per-forward statistics (a kind's own stats dataclass); the metrics layer's."""


@dataclass(frozen=True)
class LoadTarget:
    """Where a loaded memory will run, and who hears its statistics (None: nobody, at no cost)."""

    device: torch.device
    dtype: torch.dtype
    hooks: MemoryHooks | None
    num_layers: int
    hidden_size: int
    observe: MemoryObserver | None = None

    @classmethod
    def for_model(
        cls, loaded: LoadedModel, hooks: MemoryHooks | None, observe: MemoryObserver | None = None
    ) -> LoadTarget:
        from memserve.models import DTYPES

        config = loaded.model.config
        dtype = DTYPES[loaded.dtype]
        return cls(loaded.device, dtype, hooks, config.num_hidden_layers, config.hidden_size, observe)


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

    def check_for_model(self, spec: dict[str, Any], num_layers: int) -> None:
        """What only the served model can tell of a checked spec (a layer past its last block),
        checked before the job is queued rather than failing on the worker. Nothing by default."""
        return None

    @abstractmethod
    def train(self, spec: dict[str, Any], context: TrainContext) -> Trained:
        """Trains on the worker; calls `context.report` often enough to be cancelled."""

    @abstractmethod
    def load(self, artifact: Artifact, target: LoadTarget) -> LoadedMemory:
        """Builds the inference module from a checked artifact."""

    def evaluate(self, options: dict[str, Any], context: EvalContext) -> None:
        """Measures what `context.artifact` does and writes the report into `context.out`
        (InvalidArgument for bad options, with the fix)."""
        raise Unimplemented(f"the {self.name!r} memory kind has no evaluation")
