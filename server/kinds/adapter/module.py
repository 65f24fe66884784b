"""Adapter memories: the residual neural memory of the FEVER study. docs/design.md, "adapter".

    h ← h + gate · LayerNorm(W_down GELU(W_up h))

at one block's output (default ~75 % depth), hidden size 128. The gate is a scalar that
starts at 0, so an untrained adapter is the identity (the seed initialised it at 1, and with
a LayerNorm output of norm ≈ √d its first injection was large). The base model stays frozen.
Every request that uses one adapter shares one op per forward pass, whatever the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from memserve.errors import InvalidArgument
from memserve.kinds.adapter.config import MAX_HIDDEN_SIZE
from memserve.memory.group import GroupOp, add_rows, residual_key, rows_of
from memserve.memory.hooks import MemoryContext, TraceRecord
from memserve.memory.kind import LoadedMemory, LoadTarget, MemoryRefSpec, RowMemory
from memserve.memory_store.artifact import Artifact


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


class LoadedAdapter(LoadedMemory):
    """An adapter on the model's device."""

    def __init__(self, artifact: Artifact, target: LoadTarget) -> None:
        meta = artifact.meta
        self.observe = target.observe
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
class BoundAdapter(RowMemory):
    """One request's view of an adapter: the adapter and its scale."""

    name: str
    adapter: LoadedAdapter
    scale: float
    apply_order: ClassVar[int] = 20  # after document banks at the same layer

    @property
    def loaded(self) -> LoadedAdapter:
        return self.adapter

    def add_ops(self, context: MemoryContext, rows: torch.Tensor) -> None:
        _AdapterGroup.join(context, residual_key("adapter", self.adapter.layer), self, rows)


class _AdapterGroup(GroupOp[BoundAdapter]):
    """Every row of one forward that uses an adapter at one layer."""

    def op(self, hidden: torch.Tensor) -> torch.Tensor:
        for member, row in self.traced():
            gate = member.adapter.gate * member.scale
            self.context.record(row, TraceRecord(member.name, "adapter", member.adapter.layer, "", gate))
        out = hidden
        for pairs in self.by_memory():
            loaded = pairs[0][0].adapter
            rows, scales = rows_of(pairs, hidden.dtype)
            if loaded.observe is not None:
                real = self.context.real_positions(rows)
                tokens = int(real.sum()) if real is not None else rows.numel() * hidden.shape[1]
                loaded.observe(AdapterStats(loaded.name, rows.numel(), tokens))
            out = add_rows(out, rows, loaded.adapter(hidden[rows]), scales)
        return out


def adapter_tensors(adapter: Adapter) -> dict[str, Any]:
    """The artifact tensors of an adapter (fp32, on the CPU)."""
    return {f"adapter.{k}": v.detach().float().cpu().contiguous() for k, v in adapter.state_dict().items()}
