"""Where memories enter the model: a per-architecture table of hook sites, and the hooks.

Three sites per decoder layer (docs/design.md):
- ``residual``: the residual stream after the block (document and adapter memories);
- ``attn_out``: the input of attention's output projection, heads concatenated
  (local memories, "before W_out");
- ``mlp_down``: the input of the MLP's down projection, after the activation
  (local memories);
and one after the last: ``head``, the LM head's output (the logits) at the positions
whose logits are computed (a local set's gated answers). It is addressed as (last layer,
``head``).

A site's hook is installed once, the first time a memory uses the site, and
stays. Each forward pass reads a ``MemoryContext`` that says which batch rows use
which memory at which site; it is set for exactly one forward by
``MemoryHooks.using`` and always cleared afterwards, so a failed forward can
never leave routing state behind. With no memory in the batch, an installed hook
is a single attribute check, and a site no memory has used has no hook at all.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from memserve.errors import MemoryHookError, UnsupportedArchitecture

if TYPE_CHECKING:
    from memserve.memory.group import GroupOp


class Site(StrEnum):
    RESIDUAL = "residual"
    ATTN_OUT = "attn_out"
    MLP_DOWN = "mlp_down"
    HEAD = "head"


# The sites every decoder layer has (the head is after the last one only).
LAYER_SITES = (Site.RESIDUAL, Site.ATTN_OUT, Site.MLP_DOWN)


@dataclass(frozen=True)
class ArchitectureSites:
    """Dotted module paths: the decoder layers, then the two projections inside a layer."""

    layers: str
    attn_out_proj: str
    mlp_down_proj: str
    # The norm after the last layer, relative to the layers' parent (the base model).
    final_norm: str = "norm"
    # Whether the base model takes `inputs_embeds` as the residual stream as it is (no
    # absolute position embeddings added): trainers can then run a slice of the layers.
    embeds_are_residual: bool = True


# Keyed by `config.model_type`. Llama-family models share one layout.
_LLAMA = ArchitectureSites("model.layers", "self_attn.o_proj", "mlp.down_proj")
ARCHITECTURES: dict[str, ArchitectureSites] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gpt_neox": ArchitectureSites(
        "gpt_neox.layers", "attention.dense", "mlp.dense_4h_to_h", final_norm="final_layer_norm"
    ),
    "gpt2": ArchitectureSites(
        "transformer.h", "attn.c_proj", "mlp.c_proj", final_norm="ln_f", embeds_are_residual=False
    ),
}


@dataclass(frozen=True)
class LayerSites:
    """The modules of one decoder layer that carry hooks."""

    block: nn.Module
    attn_out_proj: nn.Module
    mlp_down_proj: nn.Module


def find_sites(model: nn.Module) -> list[LayerSites]:
    """Returns, per decoder layer, the modules whose activations memories read and change."""
    model_type = model.config.model_type
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise UnsupportedArchitecture(
            f"no hook sites known for model_type {model_type!r}; supported: {sorted(ARCHITECTURES)}"
        )
    layers = model.get_submodule(arch.layers)
    return [
        LayerSites(
            block=layer,
            attn_out_proj=layer.get_submodule(arch.attn_out_proj),
            mlp_down_proj=layer.get_submodule(arch.mlp_down_proj),
        )
        for layer in layers
    ]


SiteOp = Callable[[torch.Tensor], torch.Tensor]
"""Takes the site's activation (B, T, D) of the whole batch, returns the new one.

An op knows which batch rows it applies to; it must leave the other rows alone.
"""


class NamedMemory(Protocol):
    """Whatever owns an op: a loaded memory, with the name users know it by."""

    name: str


@dataclass(frozen=True)
class BoundOp:
    """One memory's op at one site; the memory is kept for errors and tracing."""

    memory: NamedMemory
    op: SiteOp


@dataclass(frozen=True)
class TraceRecord:
    """One memory's effect on the position that produced a token (a request's memory trace)."""

    memory: str
    kind: str
    layer: int
    entry: str  # the document (bank), the entry (local set); empty for an adapter
    value: float  # selection mass (document), trigger value in [0, 1] (local), gate (adapter)


@dataclass(frozen=True)
class GroupKey:
    """Where a group op acts, and for which kind."""

    kind: str
    layer: int
    site: Site


@dataclass
class MemoryContext:
    """Which memory ops run at which (layer, site) in one forward pass."""

    ops: dict[tuple[int, Site], list[BoundOp]] = field(default_factory=dict)
    # (B, T), 1 at real positions and 0 at padding; None: every position is real.
    mask: torch.Tensor | None = None
    # Batch rows that asked for a memory trace, and what the ops recorded for them at
    # the last position (the one that produces the next token).
    traced: frozenset[int] = frozenset()
    trace: dict[int, list[TraceRecord]] = field(default_factory=dict)
    # The forward's group ops (memserve.memory.group), so that many requests using one
    # loaded memory run as one op (e.g. every row of a document bank, whatever its DocRep).
    groups: dict[GroupKey, GroupOp[Any]] = field(default_factory=dict)
    # Per-forward state one loaded memory shares between its sites, by (what, id(memory)).
    shared: dict[tuple[str, int], Any] = field(default_factory=dict)
    # Per batch row, state that lives as long as the row's request (kept by the engine): what a
    # memory must remember of positions an earlier forward saw, as the KV cache does for
    # attention (a local set's subjects seen). None: every forward starts afresh.
    row_states: list[dict[Any, Any]] | None = None
    # (B,) bool, in a decode step: the rows whose input token, one the model generated, ends a
    # sentence ('.', '!', '?', a line break). None in a prompt's forward and outside the engine.
    sentence_ends: torch.Tensor | None = None
    # Run once the forward pass is done (e.g. a kind's per-forward statistics for the metrics).
    finishers: list[tuple[NamedMemory, Callable[[], None]]] = field(default_factory=list)

    def finish(self) -> None:
        """Runs the finishers after the forward; one that fails fails the requests of its memory,
        with its name (MemoryHookError), as a failing op would."""
        for memory, finisher in self.finishers:
            try:
                finisher()
            except Exception as exc:
                raise MemoryHookError(memory, "while reporting its per-forward statistics", exc) from exc

    def add(self, layer: int, site: Site | str, memory: NamedMemory, op: SiteOp) -> None:
        self.ops.setdefault((layer, Site(site)), []).append(BoundOp(memory, op))

    def record(self, row: int, record: TraceRecord) -> None:
        self.trace.setdefault(row, []).append(record)

    def traced_rows(self, rows: torch.Tensor) -> list[tuple[int, int]]:
        """(index within `rows`, batch row) for the rows among `rows` that asked for a trace."""
        if not self.traced:
            return []
        return [(i, row) for i, row in enumerate(rows.tolist()) if row in self.traced]

    def real_positions(self, rows: torch.Tensor) -> torch.Tensor | None:
        """(R, T) bool of the real positions of `rows`; None when every position is real."""
        return None if self.mask is None else self.mask[rows].bool()

    def __bool__(self) -> bool:
        return bool(self.ops)


def rows_and_scales(
    parts: Sequence[tuple[float, torch.Tensor]], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For the requests sharing one loaded memory in a forward, given as (scale, rows) pairs: their
    batch rows in order, and their scales as an (R, 1, 1) factor (None when every scale is 1)."""
    rows = torch.cat([r for _, r in parts]) if len(parts) > 1 else parts[0][1]
    if all(scale == 1 for scale, _ in parts):
        return rows, None
    scales = [scale for scale, r in parts for _ in range(len(r))]
    return rows, torch.tensor(scales, device=rows.device, dtype=dtype)[:, None, None]


class MemoryHooks:
    """Owns the model's memory hooks and routes each forward through a context.

    A site's hook is installed the first time a memory uses that site, and then
    stays for the life of the server: a model no memory has touched carries no
    hook at all, and a hook, once there, is never added or removed per request.
    """

    def __init__(self, model: nn.Module) -> None:
        self.sites = find_sites(model)
        self.head: nn.Module | None = (
            model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        )
        # Per thread: a trainer running the same model in another thread (the
        # in-process worker) must never see the serving engine's routing.
        self._local = threading.local()
        self._handles: dict[tuple[int, Site], torch.utils.hooks.RemovableHandle] = {}

    @property
    def num_layers(self) -> int:
        return len(self.sites)

    @property
    def installed(self) -> frozenset[tuple[int, Site]]:
        """The (layer, site) pairs that carry a hook."""
        return frozenset(self._handles)

    def install(self, layer: int, site: Site | str) -> None:
        """Puts the hook on one site (idempotent)."""
        site = Site(site)
        if (layer, site) in self._handles:
            return
        if not 0 <= layer < len(self.sites):
            raise ValueError(f"layer {layer} does not exist: the model has layers 0..{len(self.sites) - 1}")
        sites = self.sites[layer]
        if site is Site.HEAD:
            if layer != len(self.sites) - 1 or self.head is None:
                raise ValueError(
                    f"the head site is at the last layer ({len(self.sites) - 1}) of a model with an LM head"
                )
            handle = self.head.register_forward_hook(self._head_hook(layer))
        elif site is Site.RESIDUAL:
            handle = sites.block.register_forward_hook(self._block_hook(layer))
        else:
            module = sites.attn_out_proj if site is Site.ATTN_OUT else sites.mlp_down_proj
            handle = module.register_forward_pre_hook(self._input_hook(layer, site))
        self._handles[(layer, site)] = handle

    def install_all(self) -> None:
        for layer in range(len(self.sites)):
            for site in LAYER_SITES:
                self.install(layer, site)
        if self.head is not None:
            self.install(len(self.sites) - 1, Site.HEAD)

    @contextmanager
    def using(self, context: MemoryContext | None) -> Iterator[None]:
        """Routes the forward passes inside the block through `context` (None or empty: no memory)."""
        if context:
            for (layer, site), bound in context.ops.items():
                try:
                    self.install(layer, site)
                except ValueError as exc:  # blame the memory that asked for a site that does not exist
                    raise MemoryHookError(bound[0].memory, f"at layer {layer} ({site.value})", exc) from exc
        self._local.context = context if context else None
        try:
            yield
        finally:
            self._local.context = None

    def remove(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()

    def _block_hook(self, layer: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            context = getattr(self._local, "context", None)
            if context is None or (layer, Site.RESIDUAL) not in context.ops:
                return None
            # Most blocks return the hidden states; some (older GPT-2) a tuple led by them.
            if isinstance(output, tuple):
                return (_apply(context, layer, Site.RESIDUAL, output[0]), *output[1:])
            return _apply(context, layer, Site.RESIDUAL, output)

        return hook

    def _head_hook(self, layer: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> Any:
            context = getattr(self._local, "context", None)
            if context is None or (layer, Site.HEAD) not in context.ops:
                return None
            return _apply(context, layer, Site.HEAD, output)

        return hook

    def _input_hook(self, layer: int, site: Site) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Sequence[Any]) -> Any:
            context = getattr(self._local, "context", None)
            if context is None or (layer, site) not in context.ops:
                return None
            return (_apply(context, layer, site, args[0]), *args[1:])

        def idle() -> bool:
            """Whether the hook does nothing in this thread's current forward (a packed model's
            fused decode step may then skip the module it sits on)."""
            context = getattr(self._local, "context", None)
            return context is None or (layer, site) not in context.ops

        hook.idle = idle  # type: ignore[attr-defined]
        return hook


def _apply(context: MemoryContext, layer: int, site: Site, hidden: torch.Tensor) -> torch.Tensor:
    for bound in context.ops[(layer, site)]:
        try:
            hidden = bound.op(hidden)
        except Exception as exc:  # re-raised with the memory's name: fails the request loudly
            raise MemoryHookError(bound.memory, f"at layer {layer} ({site.value})", exc) from exc
    return hidden
