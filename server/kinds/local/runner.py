"""Batched forwards of the frozen model with local entries patched in, for the fact trainer."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from memserve.kinds.local.config import LocalConfig
from memserve.kinds.local.module import Entries
from memserve.memory.hooks import MemoryContext, MemoryHooks, Site
from memserve.padding import left_padded_positions, pad_rows

Cell = tuple[int, str]  # (layer, site)

# Rows of one batched forward in the searches (short prompts: a few hundred tokens each way).
BATCH_ROWS = 128


@dataclass(eq=False)
class Entry:
    """One trained entry, as the trainer handles it."""

    layer: int
    site: str
    key: torch.Tensor  # (D,) fp32
    delta: torch.Tensor  # (D,) fp32
    bound: float
    hardness: float
    label: str  # "<fact id>#<target token index>"


def apply_entries(
    hidden: torch.Tensor, entries: Sequence[Entry], distance: str, combination: str
) -> torch.Tensor:
    """`hidden` (R, T, D) with `entries` (all at its site) applied at every position."""
    r, t, d = hidden.shape
    compiled = Entries(
        torch.stack([e.key for e in entries]).to(hidden.device),
        torch.tensor([e.bound for e in entries], device=hidden.device),
        torch.tensor([e.hardness for e in entries], device=hidden.device),
        torch.stack([e.delta for e in entries]).to(hidden.device),
        distance,
        hidden.dtype,
    )
    update, _ = compiled.update(hidden.reshape(r * t, d), combination)
    return hidden + update.reshape(r, t, d)


@dataclass(frozen=True)
class _Op:
    """A trainer's op, named for errors."""

    name: str = "local trainer"


class Runner:
    """Forward passes of the frozen model with the trainer's ops at chosen sites."""

    def __init__(self, model: PreTrainedModel, hooks: MemoryHooks, config: LocalConfig) -> None:
        self.model, self.hooks, self.config = model, hooks, config
        self.device = next(model.parameters()).device

    def _context(self, row_entries: Sequence[Sequence[Entry]]) -> MemoryContext:
        """Ops applying each row's entries (rows sharing an entry list share the op)."""
        context = MemoryContext()
        by_list: dict[int, tuple[Sequence[Entry], list[int]]] = {}
        for row, entries in enumerate(row_entries):
            if entries:
                by_list.setdefault(id(entries), (entries, []))[1].append(row)
        for entries, rows in by_list.values():
            index = torch.tensor(rows, device=self.device)
            cells: dict[Cell, list[Entry]] = {}
            for entry in entries:
                cells.setdefault((entry.layer, entry.site), []).append(entry)
            for (layer, site), at_cell in cells.items():
                context.add(layer, site, _Op(), self._entries_op(index, at_cell))
        return context

    def _entries_op(self, rows: torch.Tensor, entries: list[Entry]) -> Any:
        config = self.config

        def op(hidden: torch.Tensor) -> torch.Tensor:
            updated = apply_entries(hidden[rows], entries, config.distance, config.combination)
            return hidden.index_copy(0, rows, updated)

        return op

    def next_tokens(
        self, sequences: Sequence[Sequence[int]], row_entries: Sequence[Sequence[Entry]]
    ) -> list[int]:
        """The greedy next token of each sequence, with its entries applied at every position."""
        out: list[int] = []
        for start in range(0, len(sequences), BATCH_ROWS):
            chunk = sequences[start : start + BATCH_ROWS]
            logits = self._last_logits(chunk, row_entries[start : start + BATCH_ROWS])
            out += logits.argmax(-1).tolist()
        return out

    def _last_logits(
        self, sequences: Sequence[Sequence[int]], row_entries: Sequence[Sequence[Entry]]
    ) -> torch.Tensor:
        ids, mask = pad_rows(sequences, 0, left=True, device=self.device)  # as the engine does
        positions = left_padded_positions(mask)
        with torch.no_grad(), self.hooks.using(self._context(row_entries)):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
        return out.logits[:, -1].float()

    def gradients(
        self, sequence: Sequence[int], token: int, cells: Sequence[Cell], entries: Sequence[Entry]
    ) -> dict[Cell, tuple[torch.Tensor, torch.Tensor]]:
        """At each cell: (a, ∂CE(token)/∂a) at the sequence's last position, entries applied."""
        context = MemoryContext()
        probes: dict[Cell, torch.Tensor] = {}
        seen: dict[Cell, torch.Tensor] = {}
        for cell in cells:
            probe = torch.zeros(self._width(cell), device=self.device, requires_grad=True)
            probes[cell] = probe
            context.add(cell[0], cell[1], _Op(), self._probe_op(cell, probe, seen))
        # The entries run after the probe at a shared site: a key is the site's input as it arrives.
        for (layer, site), ops in self._context([entries]).ops.items():
            for bound in ops:
                context.add(layer, site, bound.memory, bound.op)
        ids = torch.tensor([list(sequence)], device=self.device)
        with torch.enable_grad(), self.hooks.using(context):
            logits = self.model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()
            loss = torch.nn.functional.cross_entropy(logits[None], torch.tensor([token], device=self.device))
            loss.backward()
        return {cell: (seen[cell], probes[cell].grad.detach().float().clone()) for cell in cells}

    def _probe_op(self, cell: Cell, probe: torch.Tensor, seen: dict[Cell, torch.Tensor]) -> Any:
        def op(hidden: torch.Tensor) -> torch.Tensor:
            seen[cell] = hidden[0, -1].detach().float().clone()
            return torch.cat([hidden[:, :-1], hidden[:, -1:] + probe.to(hidden.dtype)], dim=1)

        return op

    def _width(self, cell: Cell) -> int:
        sites = self.hooks.sites[cell[0]]
        module = sites.attn_out_proj if cell[1] == Site.ATTN_OUT.value else sites.mlp_down_proj
        return int(getattr(module, "in_features", None) or module.weight.shape[0])

    def edit_trials(
        self, sequence: Sequence[int], patches: Sequence[tuple[Cell, torch.Tensor]], entries: Sequence[Entry]
    ) -> torch.Tensor:
        """Last-position log-probabilities (N, V) with patch n added at its cell's last position.

        The prefix runs once; its cache is shared by every patch, since an edit at the last
        position changes nothing before it.
        """
        prefix, last = list(sequence[:-1]), sequence[-1]
        cache = DynamicCache()
        if prefix:
            with torch.no_grad(), self.hooks.using(self._context([entries])):
                self.model(
                    input_ids=torch.tensor([prefix], device=self.device),
                    past_key_values=cache,
                    use_cache=True,
                )
        results = []
        for start in range(0, len(patches), BATCH_ROWS * 4):
            chunk = patches[start : start + BATCH_ROWS * 4]
            rows = len(chunk)
            chunk_cache = DynamicCache()
            if prefix:
                for layer_index in range(len(cache.layers)):
                    keys, values = cache.layers[layer_index].keys, cache.layers[layer_index].values
                    chunk_cache.update(
                        keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), layer_index
                    )
            context = self._context([entries] * rows)
            by_cell: dict[Cell, list[int]] = {}
            for i, (cell, _) in enumerate(chunk):
                by_cell.setdefault(cell, []).append(i)
            for cell, indices in by_cell.items():
                vectors = torch.stack([chunk[i][1] for i in indices])
                context.add(
                    cell[0],
                    cell[1],
                    _Op(),
                    self._patch_op(torch.tensor(indices, device=self.device), vectors),
                )
            ids = torch.full((rows, 1), last, device=self.device)
            positions = torch.full((rows, 1), len(prefix), device=self.device)
            with torch.no_grad(), self.hooks.using(context):
                out = self.model(
                    input_ids=ids, position_ids=positions, past_key_values=chunk_cache, use_cache=True
                )
            results.append(out.logits[:, -1].float().log_softmax(-1))
        return torch.cat(results)

    @staticmethod
    def _patch_op(rows: torch.Tensor, vectors: torch.Tensor) -> Any:
        def op(hidden: torch.Tensor) -> torch.Tensor:
            patched = hidden[rows].clone()
            patched[:, -1] += vectors.to(patched.dtype)
            return hidden.index_copy(0, rows, patched)

        return op

    def activations(
        self, sequences: Sequence[Sequence[int]], cells: Sequence[Cell], entries: Sequence[Entry]
    ) -> dict[Cell, list[torch.Tensor]]:
        """Each sequence's activation (T, D) at every cell, with `entries` applied."""
        captured: dict[Cell, list[torch.Tensor]] = {cell: [] for cell in cells}
        for sequence in sequences:
            context = MemoryContext()
            for cell in cells:
                context.add(cell[0], cell[1], _Op(), self._capture_op(captured[cell]))
            for (layer, site), ops in self._context([entries]).ops.items():
                for bound in ops:
                    context.add(layer, site, bound.memory, bound.op)
            with torch.no_grad(), self.hooks.using(context):
                self.model(input_ids=torch.tensor([list(sequence)], device=self.device), logits_to_keep=1)
        return captured

    @staticmethod
    def _capture_op(into: list[torch.Tensor]) -> Any:
        def op(hidden: torch.Tensor) -> torch.Tensor:
            into.append(hidden[0].detach().float().clone())
            return hidden

        return op


def _distance(activations: torch.Tensor, key: torch.Tensor, distance: str) -> torch.Tensor:
    """x for each row of `activations` (T, D) against one key (with b = 1, before the trigger)."""
    if distance == "euclidean":
        return (activations - key).norm(dim=-1) / key.norm()
    dots = activations @ key
    projection = dots / (key @ key)
    if distance == "projection":
        return 1 - projection.clamp(max=1)
    cosine = dots / (activations.norm(dim=-1) * key.norm()).clamp(min=1e-12)
    return 0.5 * (1 - projection).abs() + 0.5 * (1 - cosine)


def _threshold(positive_x: list[float], negative_x: list[float]) -> tuple[float, int, float]:
    """(threshold, prompts right, log-width of its gap): the distance below which the trigger
    fires, in the middle of the widest gap among those that put the most prompts right."""
    points = sorted(set(positive_x) | set(negative_x))
    floor = 1e-4  # distances of 0 (the key itself) sit just below every candidate
    best = (-1, -math.inf, 0.0)
    for low, high in zip([0.0, *points], [*points, points[-1] * 4 + 1e-3], strict=True):
        low_c, high_c = max(low, floor), max(high, floor * 2)
        if high_c <= low_c:
            continue
        threshold = math.sqrt(low_c * high_c)
        correct = sum(x <= threshold for x in positive_x) + sum(x > threshold for x in negative_x)
        margin = math.log(high_c / low_c)
        if (correct, margin) > best[:2]:
            best = (correct, margin, threshold)
    return best[2], best[0], best[1]
