"""Adapter memories: the residual neural memory of the FEVER study. DESIGN.md §1 "adapter".

    h ← h + gate · LayerNorm(W_down GELU(W_up h))

at one block's output (default ~75 % depth), hidden size 128. The gate is a scalar that
starts at 0, so an untrained adapter is the identity (the seed initialised it at 1, and with
a LayerNorm output of norm ≈ √d its first injection was large). The base model stays frozen.
Every request that uses one adapter shares one op per forward pass, whatever the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from memserve.errors import InvalidArgument
from memserve.hooks import MemoryContext, Site, TraceRecord, rows_and_scales
from memserve.kinds import LoadedMemory, LoadTarget, MemoryRefSpec
from memserve.memory_store.artifact import Artifact

MAX_HIDDEN_SIZE = 8192


class Adapter(nn.Module):
    """up (d → hidden) → GELU → down (hidden → d) → LayerNorm(d) · gate."""

    def __init__(self, model_size: int, hidden_size: int = 128) -> None:
        super().__init__()
        if not 1 <= hidden_size <= MAX_HIDDEN_SIZE:
            raise InvalidArgument(
                f"an adapter's hidden_size must be 1 to {MAX_HIDDEN_SIZE}, got {hidden_size}"
            )
        self.up = nn.Linear(model_size, hidden_size)
        self.down = nn.Linear(hidden_size, model_size)
        self.norm = nn.LayerNorm(model_size)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The update (not the new residual) for `hidden` (..., d)."""
        return self.gate * self.norm(self.down(nn.functional.gelu(self.up(hidden))))


def adapter_shape(tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(model size, hidden size) of an adapter's saved tensors; InvalidArgument when they do not
    make one."""
    expected = {"up.weight", "up.bias", "down.weight", "down.bias", "norm.weight", "norm.bias", "gate"}
    names = {k[len("adapter.") :] for k in tensors if k.startswith("adapter.")}
    if names != expected:
        raise InvalidArgument(f"an adapter artifact holds {sorted(expected)}; this one {sorted(names)}")
    up = tensors["adapter.up.weight"]
    if up.ndim != 2:
        raise InvalidArgument("an adapter's up projection must be a matrix")
    return int(up.shape[1]), int(up.shape[0])


@dataclass(frozen=True)
class AdapterStats:
    """Per forward and adapter: what the metrics layer reads (tokens the adapter acted on)."""

    adapter: str
    rows: int
    tokens: int  # real (non-pad) positions


AdapterObserver = Callable[[AdapterStats], None]


class LoadedAdapter(LoadedMemory):
    """An adapter on the model's device."""

    observer: AdapterObserver | None = None  # set by the metrics layer

    def __init__(self, artifact: Artifact, target: LoadTarget) -> None:
        meta = artifact.meta
        self.name, self.version = meta.name, meta.version
        layer = int(meta.hyperparameters.get("layer", -1))
        if not 0 <= layer < target.num_layers:
            raise InvalidArgument(
                f"adapter {meta.name!r} is at layer {layer}; the model has layers 0..{target.num_layers - 1}"
            )
        self.layer = layer
        model_size, hidden_size = adapter_shape(artifact.tensors)
        if model_size != target.hidden_size:
            raise InvalidArgument(
                f"adapter {meta.name!r} is {model_size} wide; this model's residual stream is "
                f"{target.hidden_size}"
            )
        self.adapter = Adapter(model_size, hidden_size)
        state = {k[len("adapter.") :]: v for k, v in artifact.tensors.items() if k.startswith("adapter.")}
        try:
            self.adapter.load_state_dict(state)
        except RuntimeError as exc:  # shapes that do not fit together
            raise InvalidArgument(f"adapter {meta.name!r} is inconsistent: {exc}") from exc
        self.adapter.to(target.device, target.dtype).eval().requires_grad_(False)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.adapter.parameters())

    @property
    def gate(self) -> float:
        return float(self.adapter.gate)

    def bind(self, ref: MemoryRefSpec) -> BoundAdapter:
        return BoundAdapter(self.name, self, ref.scale)


@dataclass(eq=False)
class BoundAdapter:
    """One request's view of an adapter: the adapter and its scale."""

    name: str
    adapter: LoadedAdapter
    scale: float
    apply_order: ClassVar[int] = 20  # after document banks at the same layer

    def add_ops(self, context: MemoryContext, rows: torch.Tensor) -> None:
        key = ("adapter", self.adapter.layer)
        group = context.groups.get(key)
        if group is None:
            group = _AdapterGroup(context)
            context.groups[key] = group
            context.add(self.adapter.layer, Site.RESIDUAL, group, group.op)
        group.join(self, rows)


@dataclass(eq=False)
class _AdapterGroup:
    """Every row of one forward that uses an adapter at one layer. Each adapter reads the same
    input and their updates add up, so the order of a request's adapters does not matter."""

    context: MemoryContext
    members: list[BoundAdapter] = field(default_factory=list)
    _rows: list[torch.Tensor] = field(default_factory=list)

    @property
    def name(self) -> str:
        return ", ".join(sorted({m.adapter.name for m in self.members}))

    def join(self, memory: BoundAdapter, rows: torch.Tensor) -> None:
        self.members.append(memory)
        self._rows.append(rows)

    def op(self, hidden: torch.Tensor) -> torch.Tensor:
        adapters: dict[int, list[tuple[BoundAdapter, torch.Tensor]]] = {}
        for member, rows in zip(self.members, self._rows, strict=True):
            adapters.setdefault(id(member.adapter), []).append((member, rows))
            for _, row in self.context.traced_rows(rows):
                gate = member.adapter.gate * member.scale
                self.context.record(
                    row, TraceRecord(member.adapter.name, "adapter", member.adapter.layer, "", gate)
                )
        out = hidden
        for pairs in adapters.values():
            loaded = pairs[0][0].adapter
            rows, scales = rows_and_scales([(m.scale, r) for m, r in pairs], hidden.dtype)
            update = loaded.adapter(hidden[rows])
            if scales is not None:
                update = update * scales
            observer = LoadedAdapter.observer
            if observer is not None:
                real = self.context.real_positions(rows)
                tokens = int(real.sum()) if real is not None else rows.numel() * hidden.shape[1]
                observer(AdapterStats(loaded.name, rows.numel(), tokens))
            out = out.index_add(0, rows, update)
        return out


def adapter_tensors(adapter: Adapter) -> dict[str, Any]:
    """The artifact tensors of an adapter (fp32, on the CPU)."""
    return {f"adapter.{k}": v.detach().float().cpu().contiguous() for k, v in adapter.state_dict().items()}
