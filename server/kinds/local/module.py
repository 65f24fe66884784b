"""Local (fact) memories: bounded key/delta entries at attention and MLP sites. docs/design.md, "local".

An entry holds a key a_mem (an activation seen at the last token of a fact's prompt), a
delta Δ (one gradient step on that activation towards the target token), a boundary b and a
hardness h, at one layer and site. At every position, the live activation a is compared
with the keys and the delta is added as far as the trigger lets it:

    x = distance(a, a_mem)       "euclidean":  ‖a − a_mem‖ / ‖a_mem‖               (two-sided)
                                 "projection": 1 − min(a·a_mem / ‖a_mem‖², 1)     (the blog)
                                 "mixed":      ½|1 − a·a_mem/‖a_mem‖²| + ½(1 − cos(a, a_mem))
    f = exp(−(x² / b²)^h)        1 on the key, 1/e at x = b, ~0 beyond
    a ← a + f·Δ                  "top1": only the best-triggered entry per position (default)
                                 "sum":  every entry, weighted by its trigger (the original)

Sites read nothing but their own input, so entries work the same with the KV cache:
a decode step checks its one new position. Every request that uses a set shares one op
per (layer, site) and forward pass, whatever the batch.

A set may also hold gates (the `gated` method, gates.py): subject detectors at one site and
answers at the LM head (its logits). Their ops are `_DetectorOp` and `_AnswerOp`; what a request's
earlier forwards saw (its subjects) is kept in the engine's per-request state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from memserve.errors import InvalidArgument
from memserve.kinds.local.config import ANSWER_SCOPES, COMBINATIONS, DISTANCES, LOCAL_SITES
from memserve.kinds.local.gates import SEEN_AT, USED_AT, Answered, Gates
from memserve.memory.group import GroupOp, rows_of
from memserve.memory.hooks import GroupKey, MemoryContext, Site, TraceRecord
from memserve.memory.kind import LoadedMemory, LoadTarget, MemoryRefSpec, RowMemory
from memserve.memory_store.artifact import Artifact

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
    return Entries(keys, bounds, hardness, keys, distance).triggers(activations)


class Entries:
    """Entries of one (layer, site) in the form the trigger is computed from fastest.

    f = exp(−z) with z = (x²/b²)^h, so `top1` needs one exp per position, not one per entry,
    and the constants of the distance (1/‖a_mem‖², ‖a_mem‖, 1/b) are folded into the keys
    once at load time. With the projection distance and one hardness for all entries (what
    the trainer makes), x/b = 1/b − a·(a_mem/(‖a_mem‖²·b)) is a single addmm and the best
    entry is the one with the smallest x/b: so a decode step at a site is a handful of ops
    whatever the number of entries.
    """

    def __init__(
        self,
        keys: torch.Tensor,
        bounds: torch.Tensor,
        hardness: torch.Tensor,
        deltas: torch.Tensor,
        distance: str,
        dtype: torch.dtype | None = None,
    ) -> None:
        if distance not in DISTANCES:
            raise InvalidArgument(f"distance must be one of {DISTANCES}, got {distance!r}")
        self.distance = distance
        # Distances are taken in fp32 whatever the model's dtype: a trigger lives on the
        # difference between a projection and 1, which half precision would blur.
        keys, bounds, hardness = keys.float(), bounds.float(), hardness.float()
        norms_sq = (keys * keys).sum(-1)
        self.uniform_hardness = (
            float(hardness[0]) if len(hardness) and bool((hardness == hardness[0]).all()) else None
        )
        self.linear = distance == "projection" and self.uniform_hardness is not None
        if distance == "euclidean":
            # x²/b² = ‖a‖²·c − 2a·a_mem·c + 1/b² with c = 1/(‖a_mem‖²·b²): one addmm and a rank-one term.
            scale = 1 / (norms_sq * bounds * bounds)
            self.inv_bounds_sq = 1 / (bounds * bounds)
            self.norm_scale = scale
            self.keys_t = (keys * (-2 * scale)[:, None]).T.contiguous()
            self.hardness = hardness
            constants = [self.keys_t, self.inv_bounds_sq, self.norm_scale, self.hardness]
        elif self.linear:
            self.inv_bounds = 1 / bounds
            # a @ this + 1/b = (1 − a·a_mem/‖a_mem‖²)/b
            self.keys_t = (keys * (-self.inv_bounds / norms_sq)[:, None]).T.contiguous()
            constants = [self.keys_t, self.inv_bounds]
        else:
            self.keys_t = (keys / norms_sq[:, None]).T.contiguous()  # a @ this = a·a_mem/‖a_mem‖²
            self.key_norms = norms_sq.sqrt()
            self.inv_bounds_sq = 1 / (bounds * bounds)
            self.hardness = hardness
            constants = [self.keys_t, self.key_norms, self.inv_bounds_sq, self.hardness]
        self.deltas = deltas.to(dtype or deltas.dtype)
        self.nbytes = sum(t.nbytes for t in (*constants, self.deltas))

    def __len__(self) -> int:
        return self.deltas.shape[0]

    def exponents(self, activations: torch.Tensor) -> torch.Tensor:
        """z for every activation against every entry: (N, D) → (N, n) fp32, f = exp(−z)."""
        a = activations.float()
        if self.distance == "euclidean":
            return self._scaled_squares(a).pow_(self.uniform_hardness or self.hardness)
        if self.linear:
            scaled = torch.addmm(self.inv_bounds, a, self.keys_t).clamp_(min=0)  # x/b
            return scaled.pow_(2 * self.uniform_hardness)
        projection = a @ self.keys_t
        if self.distance == "projection":
            x = (1 - projection).clamp_(min=0)  # 1 − min(p, 1)
        else:
            # cos(a, a_mem) = p·‖a_mem‖/‖a‖; the norm floor keeps a zero activation finite.
            cosine = projection * (self.key_norms / a.norm(dim=-1, keepdim=True).clamp(min=1e-12))
            x = (1 - projection).abs_().add_(1 - cosine).mul_(0.5)
        return x.square_().mul_(self.inv_bounds_sq).pow_(self.hardness)

    def _scaled_squares(self, a: torch.Tensor) -> torch.Tensor:
        """x²/b² of the euclidean distance for fp32 activations (N, D) → (N, n), clamped at 0
        (rounding can take ‖a − a_mem‖² a hair below it)."""
        squares = (a * a).sum(-1, keepdim=True)
        scaled = torch.addmm(self.inv_bounds_sq, a, self.keys_t).addcmul_(squares, self.norm_scale)
        return scaled.clamp_(min=0)

    def triggers(self, activations: torch.Tensor) -> torch.Tensor:
        """f for every activation against every entry: (N, D) → (N, n) fp32."""
        return self.exponents(activations).neg_().exp_()

    def update(self, hidden: torch.Tensor, combination: str) -> tuple[torch.Tensor, torch.Tensor]:
        """For (N, D) activations: the (N, D) update in their dtype and each position's
        strongest trigger (N,) in fp32."""
        if combination == "top1":
            if self.distance == "euclidean" and self.uniform_hardness is not None:
                best_scaled, index = self._scaled_squares(hidden.float()).min(-1)  # smallest x²/b²
                best = best_scaled.pow_(self.uniform_hardness).neg_().exp_()
            elif self.linear:  # smallest x/b first, then f of that one only
                # Clamped first: every saturated entry (f = 1) ties, and the first one wins, as in f.max().
                scaled = torch.addmm(self.inv_bounds, hidden.float(), self.keys_t).clamp_(min=0)
                best_scaled, index = scaled.min(-1)
                best = best_scaled.pow_(2 * self.uniform_hardness).neg_().exp_()
            else:
                best_z, index = self.exponents(hidden).min(-1)
                best = best_z.neg_().exp_()
            return self.deltas.index_select(0, index) * best.to(hidden.dtype)[:, None], best
        f = self.triggers(hidden)
        return f.to(hidden.dtype) @ self.deltas, f.max(-1).values


@dataclass(frozen=True)
class TriggerStats:
    """Per forward and set, over all its sites: what the metrics layer reads (trigger rate and
    values). A position is checked once per site; the trigger rate is triggered / checked."""

    set: str
    sites: int
    positions_checked: int  # real (non-pad) positions × sites
    positions_triggered: int  # of those, where the site's strongest trigger is >= TRIGGERED_ABOVE
    values: torch.Tensor  # the strongest triggers that are >= NEGLIGIBLE (CPU, fp32)


class EntryGroup:
    """The entries of one set at one (layer, site), on the model's device."""

    def __init__(
        self,
        layer: int,
        site: str,
        labels: list[str],
        tensors: dict[str, torch.Tensor],
        target: LoadTarget,
        distance: str,
    ) -> None:
        self.layer, self.site, self.labels = layer, Site(site), labels
        on_device = {k: v.to(target.device) for k, v in tensors.items()}
        keys, bounds, hardness, deltas = (on_device[k] for k in ("keys", "bounds", "hardness", "deltas"))
        self.entries = Entries(keys, bounds, hardness, deltas, distance, target.dtype)

    @property
    def nbytes(self) -> int:
        return self.entries.nbytes

    def __len__(self) -> int:
        return len(self.labels)


class LoadedLocalSet(LoadedMemory):
    """A local memory set on the model's device: its entries, grouped by (layer, site)."""

    def __init__(self, artifact: Artifact, target: LoadTarget) -> None:
        meta = artifact.meta
        self.observe = target.observe
        self.name, self.version = meta.name, meta.version
        hyper = meta.hyperparameters
        self.distance = str(hyper.get("distance", "projection"))
        self.combination = str(hyper.get("combination", "top1"))
        if self.distance not in DISTANCES or self.combination not in COMBINATIONS:
            raise InvalidArgument(
                f"local memory set {meta.name!r} has distance {self.distance!r} and combination "
                f"{self.combination!r}; this server knows {DISTANCES} and {COMBINATIONS}"
            )
        # Sets made before there was a choice answered to the end of the request.
        self.answer_scope = str(hyper.get("answer_scope", "request"))
        if self.answer_scope not in ANSWER_SCOPES:
            raise InvalidArgument(
                f"local memory set {meta.name!r} has answer scope {self.answer_scope!r}; this "
                f"server knows {ANSWER_SCOPES}"
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
            if set(tensors) != {"keys", "deltas", "bounds", "hardness"}:
                raise InvalidArgument(f"local memory set {meta.name!r}: group {i} is incomplete")
            keys, deltas = tensors["keys"], tensors["deltas"]
            width = _site_width(target, layer, site)
            if keys.ndim != 2 or keys.shape[1] != width or deltas.shape != keys.shape:
                raise InvalidArgument(
                    f"local memory set {meta.name!r}: entries at layer {layer} ({site}) are "
                    f"{tuple(keys.shape[1:])} wide; this model's site is {width} wide"
                )
            counts = (len(group["entries"]), len(tensors["bounds"]), len(tensors["hardness"]))
            if tensors["bounds"].ndim != 1 or tensors["hardness"].ndim != 1 or set(counts) != {len(keys)}:
                raise InvalidArgument(f"local memory set {meta.name!r}: group {i} is inconsistent")
            bounds, hardness = tensors["bounds"], tensors["hardness"]
            problem = _entry_problem(keys, deltas, bounds, hardness)
            if problem:
                raise InvalidArgument(f"local memory set {meta.name!r}: group {i} {problem}")
            self.groups.append(
                EntryGroup(layer, site, list(group["entries"]), tensors, target, self.distance)
            )
        self.gates: Gates | None = None
        described = meta.details.get("gates")
        if described:
            if not isinstance(described, dict) or not {"detector", "facts", "subjects", "answers"} <= set(
                described
            ):
                raise InvalidArgument(f"local memory set {meta.name!r}: its gates are not described")
            tensors = {k[len("gates.") :]: v for k, v in artifact.tensors.items() if k.startswith("gates.")}
            detector = described["detector"]
            layer = int(detector.get("layer", -1)) if isinstance(detector, dict) else -1
            if not 0 <= layer < target.num_layers or detector.get("site") not in LOCAL_SITES:
                raise InvalidArgument(
                    f"local memory set {meta.name!r}: its subject detectors are at a site this model lacks"
                )
            head = target.hooks.head if target.hooks is not None else None
            width = _site_width(target, layer, str(detector["site"]))
            self.gates = Gates(
                meta.name, described, tensors, head, target.num_layers, width, target.device, target.dtype
            )
        if not self.groups and self.gates is None:
            raise InvalidArgument(f"local memory set {meta.name!r} has no entries")

    @property
    def nbytes(self) -> int:
        return sum(group.nbytes for group in self.groups) + (self.gates.nbytes if self.gates else 0)

    @property
    def num_entries(self) -> int:
        return sum(len(group) for group in self.groups) + (len(self.gates) if self.gates else 0)

    def group_at(self, layer: int, site: Site) -> EntryGroup:
        """The set's entries at one (layer, site): one group per cell."""
        return next(g for g in self.groups if g.layer == layer and g.site == site)

    def bind(self, ref: MemoryRefSpec) -> BoundLocalSet:
        return BoundLocalSet(self.name, self, ref.scale)


@dataclass(eq=False)
class BoundLocalSet(RowMemory):
    """One request's view of a set: the set and its scale."""

    name: str
    set: LoadedLocalSet
    scale: float

    @property
    def loaded(self) -> LoadedLocalSet:
        return self.set

    def add_ops(self, context: MemoryContext, rows: torch.Tensor) -> None:
        for group in self.set.groups:
            _SiteOp.join(context, GroupKey("local", group.layer, group.site), self, rows)
        gates = self.set.gates
        if gates is not None:
            _DetectorOp.join(context, GroupKey("local-subjects", gates.layer, gates.site), self, rows)
            _AnswerOp.join(context, GroupKey("local-answers", gates.head_layer, Site.HEAD), self, rows)


@dataclass(frozen=True)
class _Rows:
    """The batch rows that use one set in one forward pass, shared by all of its sites."""

    rows: torch.Tensor
    scales: torch.Tensor | None  # (R, 1, 1) per row; None when every scale is 1
    count: int
    in_order: bool  # rows are 0..count-1: the whole batch when it has `count` rows


class _SiteOp(GroupOp[BoundLocalSet]):
    """Every row of one forward that uses a local set at one (layer, site)."""

    def op(self, hidden: torch.Tensor) -> torch.Tensor:
        out = hidden
        for parts in self.by_memory():
            local_set = parts[0][0].set
            group = local_set.group_at(self.key.layer, self.key.site)
            rows = _set_rows(self.context, local_set, parts)
            whole = rows.in_order and rows.count == hidden.shape[0]
            update = self._update(local_set, group, hidden if whole else hidden[rows.rows], rows)
            out = out + update if whole else out.index_add(0, rows.rows, update)
        return out

    def _update(
        self, local_set: LoadedLocalSet, group: EntryGroup, hidden: torch.Tensor, rows: _Rows
    ) -> torch.Tensor:
        """The (R, T, D) update of one set's entries at this site."""
        r, t, d = hidden.shape
        update, best = group.entries.update(hidden.reshape(r * t, d), local_set.combination)
        update = update.reshape(r, t, d)
        if rows.scales is not None:
            update = update * rows.scales.to(hidden.dtype)
        if local_set.observe is not None:
            _collect(self.context, self.members, local_set, best.reshape(r, t), rows.rows)
        for i, row in self.context.traced_rows(rows.rows):
            self._trace(local_set, group, group.entries.triggers(hidden[i, -1:])[0], row)
        return update

    def _trace(self, local_set: LoadedLocalSet, group: EntryGroup, f: torch.Tensor, row: int) -> None:
        """Records the entries that acted on the row's last position (the one that picks the token)."""
        top = 1 if local_set.combination == "top1" else min(TRACE_TOP, len(group))
        values, index = f.topk(top)
        for value, i in zip(values.tolist(), index.tolist(), strict=True):
            if value >= NEGLIGIBLE:
                label = f"{group.labels[i]} ({self.key.site.value})"
                self.context.record(row, TraceRecord(local_set.name, "local", self.key.layer, label, value))


def _set_rows(
    context: MemoryContext, local_set: LoadedLocalSet, parts: list[tuple[BoundLocalSet, torch.Tensor]]
) -> _Rows:
    """The set's rows and scales, worked out at its first site and reused at the others (every
    op of the set sees its rows in this order)."""
    key = ("local-rows", id(local_set))
    rows = context.shared.get(key)
    if rows is None:
        indices, scales = rows_of(parts, torch.float32)
        listed = indices.tolist()
        rows = _Rows(indices, scales, count=len(listed), in_order=listed == list(range(len(listed))))
        context.shared[key] = rows
    return rows


def _collect(
    context: MemoryContext,
    members: list[BoundLocalSet],
    local_set: LoadedLocalSet,
    best: torch.Tensor,
    rows: torch.Tensor,
) -> None:
    """Keeps a site's strongest triggers (R, T'), for the last T' positions of the forward; the
    set's statistics are made once, after the forward."""
    key = ("local-stats", id(local_set))
    collected = context.shared.get(key)
    if collected is None:
        collected = _TriggerCollector(context, local_set, rows, [m for m in members if m.set is local_set])
        context.shared[key] = collected
        context.finishers.append((collected, collected.finish))
    real = context.real_positions(rows)
    if real is not None:
        real = real[:, real.shape[1] - best.shape[1] :]
    collected.bests.append(best[real] if real is not None else best.reshape(-1))


class _DetectorOp(GroupOp[BoundLocalSet]):
    """The subject detectors of every set with gates at one (layer, site): they change nothing,
    and leave, for the answers at the head, which subjects each position has seen."""

    def op(self, hidden: torch.Tensor) -> torch.Tensor:
        for parts in self.by_memory():
            local_set = parts[0][0].set
            gates = local_set.gates
            assert gates is not None
            rows = _set_rows(self.context, local_set, parts)
            listed = rows.rows.tolist()
            state_key = ("local-seen", id(local_set))
            states = self.context.row_states
            before = None
            if states is not None:
                empty = torch.zeros(len(gates.facts), dtype=torch.bool, device=hidden.device)
                before = torch.stack([states[row].get(state_key, empty) for row in listed])
                ended = self.context.sentence_ends
                if ended is not None and local_set.answer_scope == "sentence":
                    # The model ended a sentence of its own: what it writes next is not where
                    # the fact was asked, unless it names the subject again.
                    before = before & ~ended[rows.rows, None]
            seen, f = gates.seen(hidden[rows.rows], self.context.real_positions(rows.rows), before)
            self.context.shared[state_key] = seen
            if states is not None:
                for i, row in enumerate(listed):
                    states[row][state_key] = seen[i, -1].clone()
            for i, row in self.context.traced_rows(rows.rows):
                strongest = f[i].max(0).values
                for s in (strongest >= SEEN_AT).nonzero()[:, 0].tolist():
                    label = f"{gates.subjects[s]} (subject seen, {self.key.site.value})"
                    self.context.record(
                        row, TraceRecord(local_set.name, "local", self.key.layer, label, float(strongest[s]))
                    )
        return hidden


class _AnswerOp(GroupOp[BoundLocalSet]):
    """The answers of every set with gates, at the LM head (its logits)."""

    def op(self, hidden: torch.Tensor) -> torch.Tensor:
        out = hidden
        for parts in self.by_memory():
            local_set = parts[0][0].set
            gates = local_set.gates
            assert gates is not None
            rows = _set_rows(self.context, local_set, parts)
            seen = self.context.shared.get(("local-seen", id(local_set)))
            if seen is None:  # the detectors' layer did not run (a partial forward): nothing seen
                continue
            k = hidden.shape[1]
            answered = gates.answer(hidden[rows.rows], seen[:, seen.shape[1] - k :])
            if answered.update is not None:
                update = answered.update
                if rows.scales is not None:
                    update = update * rows.scales.to(hidden.dtype)
                out = out.index_add(0, rows.rows, update)
            if local_set.observe is not None:
                _collect(self.context, self.members, local_set, answered.best, rows.rows)
            if self.context.row_states is not None:
                _forget_used(self.context.row_states, local_set, gates, answered, rows.rows)
            for i, row in self.context.traced_rows(rows.rows):
                value, index = float(answered.best[i, -1]), int(answered.chosen[i, -1])
                if index >= 0 and value >= NEGLIGIBLE:
                    label = f"{gates.answers[index]} (answer, head)"
                    self.context.record(
                        row, TraceRecord(local_set.name, "local", self.key.layer, label, value)
                    )
        return out


def _forget_used(
    states: list[dict[Any, Any]],
    local_set: LoadedLocalSet,
    gates: Gates,
    answered: Answered,
    rows: torch.Tensor,
) -> None:
    """Where the answer that gives a fact's last target token acted on the position that produces
    the next token, the request forgets the subject until the text mentions it again: an answer
    is given once per mention, and a generated loop of the target (", Sydney, Sydney") cannot
    start."""
    chosen, best = answered.chosen[:, -1], answered.best[:, -1]
    used = (chosen >= 0) & (best >= USED_AT)
    if not bool(used.any()):
        return
    key = ("local-seen", id(local_set))
    for i in used.nonzero()[:, 0].tolist():
        answer = int(chosen[i])
        if bool(gates.answer_final[answer]):
            seen = states[int(rows[i])][key]
            seen[int(gates.answer_facts[answer])] = False


@dataclass(eq=False)
class _TriggerCollector:
    """One set's strongest triggers at each of its sites in one forward: a few ops for all of them."""

    context: MemoryContext
    local_set: LoadedLocalSet
    rows: torch.Tensor
    members: list[BoundLocalSet]  # the requests' views of the set: a failure is blamed on them
    bests: list[torch.Tensor] = field(default_factory=list)  # per site, its real positions' triggers

    @property
    def name(self) -> str:
        return self.local_set.name

    def finish(self) -> None:
        observer = self.local_set.observe
        if observer is None or not self.bests:
            return
        values = torch.cat(self.bests).detach().float()
        observer(
            TriggerStats(
                set=self.name,
                sites=len(self.bests),
                positions_checked=values.numel(),
                positions_triggered=int((values >= TRIGGERED_ABOVE).sum()),
                values=values[values >= NEGLIGIBLE].cpu(),
            )
        )


def _entry_problem(
    keys: torch.Tensor, deltas: torch.Tensor, bounds: torch.Tensor, hardness: torch.Tensor
) -> str:
    """What makes a group's tensors unusable, or "" (a set may come from any export file)."""
    if len(keys) == 0:
        return "has no entries"
    if not all(bool(t.isfinite().all()) for t in (keys, deltas, bounds, hardness)):
        return "has values that are not finite"
    if not bool((bounds > 0).all()) or not bool((hardness > 0).all()):
        return "has a bound or a hardness <= 0"
    if not bool(((keys.float() * keys.float()).sum(-1) > 0).all()):
        return "has a key of norm 0"
    return ""


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
