"""Local (fact) memories: bounded key/delta entries at attention and MLP sites. DESIGN.md §1 "local".

An entry holds a key a_mem (an activation seen at the last token of a fact's prompt), a
delta Δ (one gradient step on that activation towards the target token), a boundary b and a
hardness h, at one layer and site. At every position, the live activation a is compared
with the keys and the delta is added as far as the trigger lets it:

    x = distance(a, a_mem)       "projection": 1 − min(a·a_mem / ‖a_mem‖², 1)     (the blog)
                                 "mixed":      ½|1 − a·a_mem/‖a_mem‖²| + ½(1 − cos(a, a_mem))
    f = exp(−(x² / b²)^h)        1 on the key, 1/e at x = b, ~0 beyond
    a ← a + f·Δ                  "top1": only the best-triggered entry per position (default)
                                 "sum":  every entry, weighted by its trigger (the original)

Sites read nothing but their own input, so entries work the same with the KV cache:
a decode step checks its one new position. Every request that uses a set shares one op
per (layer, site) and forward pass, whatever the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from memserve.errors import InvalidArgument
from memserve.hooks import MemoryContext, Site, TraceRecord
from memserve.kinds import LoadedMemory, LoadTarget, MemoryRefSpec
from memserve.memory_store.artifact import Artifact

DISTANCES = ("projection", "mixed")
COMBINATIONS = ("top1", "sum")
LOCAL_SITES = (Site.ATTN_OUT.value, Site.MLP_DOWN.value)
# A position counts as triggered (for the metrics' trigger rate) at or above this value.
TRIGGERED_ABOVE = 0.5
# Triggers below this change nothing worth showing: left out of traces and trigger values.
NEGLIGIBLE = 0.01
# Entries a trace names per position and site with `sum`, strongest first.
TRACE_TOP = 4


def trigger_values(
    activations: torch.Tensor, keys: torch.Tensor, bounds: torch.Tensor, hardness: torch.Tensor, distance: str
) -> torch.Tensor:
    """f for every activation against every key: (N, D) × (n, D) → (N, n), in fp32."""
    a = activations.float()
    dots = a @ keys.T
    norms_sq = (keys * keys).sum(-1)
    projection = dots / norms_sq
    if distance == "projection":
        x = 1 - projection.clamp(max=1)
    else:
        cosine = dots / (a.norm(dim=-1, keepdim=True) * norms_sq.sqrt()).clamp(min=1e-12)
        x = 0.5 * (1 - projection).abs() + 0.5 * (1 - cosine)
    return torch.exp(-(((x / bounds) ** 2) ** hardness))


@dataclass(frozen=True)
class TriggerStats:
    """Per forward, set and site: what the metrics layer reads (trigger rate and values)."""

    set: str
    layer: int
    site: str
    positions_checked: int
    positions_triggered: int  # positions whose strongest trigger is >= TRIGGERED_ABOVE
    values: torch.Tensor  # strongest trigger of each position where it is >= NEGLIGIBLE (CPU, fp32)


TriggerObserver = Callable[[TriggerStats], None]


class EntryGroup:
    """The entries of one set at one (layer, site), on the model's device."""

    def __init__(self, layer: int, site: str, labels: list[str], tensors: dict[str, torch.Tensor],
                 target: LoadTarget) -> None:  # fmt: skip
        self.layer, self.site, self.labels = layer, Site(site), labels
        # Distances are taken in fp32 whatever the model's dtype: a trigger lives on the
        # difference between a projection and 1, which half precision would blur.
        self.keys = tensors["keys"].to(target.device, torch.float32)
        self.bounds = tensors["bounds"].to(target.device, torch.float32)
        self.hardness = tensors["hardness"].to(target.device, torch.float32)
        self.deltas = tensors["deltas"].to(target.device, target.dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.keys, self.bounds, self.hardness, self.deltas))

    def __len__(self) -> int:
        return len(self.labels)


class LoadedLocalSet(LoadedMemory):
    """A local memory set on the model's device: its entries, grouped by (layer, site)."""

    observer: TriggerObserver | None = None  # set by the metrics layer

    def __init__(self, artifact: Artifact, target: LoadTarget) -> None:
        meta = artifact.meta
        self.name, self.version = meta.name, meta.version
        hyper = meta.hyperparameters
        self.distance = str(hyper.get("distance", "projection"))
        self.combination = str(hyper.get("combination", "top1"))
        if self.distance not in DISTANCES or self.combination not in COMBINATIONS:
            raise InvalidArgument(
                f"local memory set {meta.name!r} has distance {self.distance!r} and combination "
                f"{self.combination!r}; this server knows {DISTANCES} and {COMBINATIONS}"
            )
        self.groups: list[EntryGroup] = []
        for i, group in enumerate(meta.details.get("groups", [])):
            layer, site = int(group["layer"]), str(group["site"])
            if not 0 <= layer < target.num_layers or site not in LOCAL_SITES:
                raise InvalidArgument(
                    f"local memory set {meta.name!r} has entries at layer {layer} ({site}); "
                    f"the model has layers 0..{target.num_layers - 1} and sites {LOCAL_SITES}"
                )
            prefix = f"group{i}."
            tensors = {k[len(prefix) :]: v for k, v in artifact.tensors.items() if k.startswith(prefix)}
            loaded = EntryGroup(layer, site, list(group["entries"]), tensors, target)
            width = _site_width(target, layer, site)
            if loaded.keys.shape[1:] != (width,) or loaded.deltas.shape != loaded.keys.shape:
                raise InvalidArgument(
                    f"local memory set {meta.name!r}: entries at layer {layer} ({site}) are "
                    f"{tuple(loaded.keys.shape[1:])} wide; this model's site is {width} wide"
                )
            if not len(loaded) == len(loaded.bounds) == len(loaded.hardness) == loaded.keys.shape[0]:
                raise InvalidArgument(f"local memory set {meta.name!r}: group {i} is inconsistent")
            self.groups.append(loaded)

    @property
    def nbytes(self) -> int:
        return sum(group.nbytes for group in self.groups)

    @property
    def num_entries(self) -> int:
        return sum(len(group) for group in self.groups)

    def bind(self, ref: MemoryRefSpec) -> BoundLocalSet:
        return BoundLocalSet(self.name, self, ref.scale)


@dataclass(eq=False)
class BoundLocalSet:
    """One request's view of a set: the set and its scale."""

    name: str
    set: LoadedLocalSet
    scale: float

    def add_ops(self, context: MemoryContext, rows: torch.Tensor) -> None:
        for group in self.set.groups:
            key = ("local", group.layer, group.site)
            site_op = context.groups.get(key)
            if site_op is None:
                site_op = _SiteOp(context, group.layer, group.site)
                context.groups[key] = site_op
                context.add(group.layer, group.site, site_op, site_op.op)
            site_op.join(self, group, rows)


@dataclass(eq=False)
class _SiteOp:
    """Every row of one forward that uses a local set at one (layer, site). Each set reads the
    same input and their updates add up, so the order of a request's sets does not matter."""

    context: MemoryContext
    layer: int
    site: Site
    members: list[BoundLocalSet] = field(default_factory=list)
    _parts: list[tuple[EntryGroup, torch.Tensor]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return ", ".join(sorted({m.set.name for m in self.members}))

    def join(self, memory: BoundLocalSet, group: EntryGroup, rows: torch.Tensor) -> None:
        self.members.append(memory)
        self._parts.append((group, rows))

    def op(self, hidden: torch.Tensor) -> torch.Tensor:
        sets: dict[int, list[tuple[BoundLocalSet, EntryGroup, torch.Tensor]]] = {}
        for member, (group, rows) in zip(self.members, self._parts, strict=True):
            sets.setdefault(id(group), []).append((member, group, rows))
        out = hidden
        for parts in sets.values():
            memory, group = parts[0][0], parts[0][1]
            rows = torch.cat([r for _, _, r in parts])
            scales = torch.tensor([m.scale for m, _, r in parts for _ in range(len(r))], device=hidden.device)
            out = out.index_add(0, rows, self._update(memory.set, group, hidden[rows], scales, rows))
        return out

    def _update(self, local_set: LoadedLocalSet, group: EntryGroup, hidden: torch.Tensor,
                scales: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """The (R, T, D) update of one set's entries at this site."""
        r, t, d = hidden.shape
        f = trigger_values(
            hidden.reshape(r * t, d), group.keys, group.bounds, group.hardness, local_set.distance
        )
        if local_set.combination == "top1":
            best, index = f.max(-1)
            update = group.deltas[index] * best.to(hidden.dtype)[:, None]
        else:
            best = f.max(-1).values
            update = f.to(hidden.dtype) @ group.deltas
        update = update.reshape(r, t, d) * scales.to(hidden.dtype)[:, None, None]
        if LoadedLocalSet.observer is not None:
            LoadedLocalSet.observer(self._stats(local_set, best.reshape(r, t), rows))
        for i, row in self.context.traced_rows(rows):
            self._trace(local_set, group, f.reshape(r, t, -1)[i, -1], row)
        return update

    def _stats(self, local_set: LoadedLocalSet, best: torch.Tensor, rows: torch.Tensor) -> TriggerStats:
        real = self.context.real_positions(rows)
        values = best if real is None else best[real]
        values = values.detach().float().cpu()
        return TriggerStats(
            set=local_set.name,
            layer=self.layer,
            site=self.site.value,
            positions_checked=values.numel(),
            positions_triggered=int((values >= TRIGGERED_ABOVE).sum()),
            values=values[values >= NEGLIGIBLE],
        )

    def _trace(self, local_set: LoadedLocalSet, group: EntryGroup, f: torch.Tensor, row: int) -> None:
        """Records the entries that acted on the row's last position (the one that picks the token)."""
        top = 1 if local_set.combination == "top1" else min(TRACE_TOP, len(group))
        values, index = f.topk(top)
        for value, i in zip(values.tolist(), index.tolist(), strict=True):
            if value >= NEGLIGIBLE:
                label = f"{group.labels[i]} ({self.site.value})"
                self.context.record(row, TraceRecord(local_set.name, "local", self.layer, label, value))


def _site_width(target: LoadTarget, layer: int, site: str) -> int:
    """The width of a site's activation: the input features of its projection."""
    if target.hooks is None:
        raise InvalidArgument("this model has no memory hook sites: local memories cannot run on it")
    sites = target.hooks.sites[layer]
    module = sites.attn_out_proj if site == Site.ATTN_OUT.value else sites.mlp_down_proj
    width = getattr(module, "in_features", None)
    if width is None:  # GPT-2's Conv1D keeps (in, out) weights
        width = module.weight.shape[0]
    return int(width)


def group_tensors(groups: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The artifact tensors of entry groups given as dicts of keys, deltas, bounds and hardness."""
    tensors: dict[str, torch.Tensor] = {}
    for i, group in enumerate(groups):
        for name in ("keys", "deltas", "bounds", "hardness"):
            tensors[f"group{i}.{name}"] = group[name].detach().float().cpu().contiguous()
    return tensors
