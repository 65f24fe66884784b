"""The running batch: its rows and their shared, left-padded KV cache.

Invariant: the cache holds `kv_length` positions for every row, `mask` (B, T)
marks which of them are real tokens (1) or left padding (0), and `positions`
holds each row's next position id, so no row sees its neighbours' padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from memserve.engine.kv_cache import new_cache

RowT = TypeVar("RowT")


class Batch(Generic[RowT]):
    """The running rows and their shared, left-padded KV cache."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        """Empties the batch."""
        device = self.device
        self.rows: list[RowT] = []
        self.cache: DynamicCache = new_cache()
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=device)  # (B, T): 1 = real token
        self.positions = torch.zeros(0, dtype=torch.long, device=device)  # (B,) next position id
        self.last_tokens = torch.zeros(0, dtype=torch.long, device=device)  # (B,) next input token

    @property
    def kv_length(self) -> int:
        return self.mask.shape[1]

    def join(
        self,
        rows: list[RowT],
        cache: DynamicCache,
        mask: torch.Tensor,
        positions: torch.Tensor,
        last_tokens: torch.Tensor,
        keep: torch.Tensor,
    ) -> None:
        """Adds prefilled rows (the `keep` rows of `cache`/`mask`) to the batch."""
        mask = mask[keep]
        if not self.rows:
            _select_rows(cache, keep)
            self.cache = cache
            self.rows, self.mask = list(rows), mask
            self.positions, self.last_tokens = positions[keep], last_tokens
            self._trim()
            return
        width = max(self.kv_length, mask.shape[1])
        old_pad, new_pad = width - self.kv_length, width - mask.shape[1]
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.replace(
                torch.cat([_pad_left(old.keys, old_pad), _pad_left(new.keys[keep], new_pad)]),
                torch.cat([_pad_left(old.values, old_pad), _pad_left(new.values[keep], new_pad)]),
            )
        self.mask = torch.cat([F.pad(self.mask, (old_pad, 0)), F.pad(mask, (new_pad, 0))])
        self.positions = torch.cat([self.positions, positions[keep]])
        self.last_tokens = torch.cat([self.last_tokens, last_tokens])
        self.rows.extend(rows)
        self._trim()

    def keep(self, rows: Sequence[RowT]) -> None:
        """Keeps only `rows` (a subsequence of the current rows), freeing the others' slots."""
        if len(rows) == len(self.rows):
            return
        if not rows:
            self.reset()
            return
        index = torch.tensor([self.rows.index(r) for r in rows], device=self.device)
        _select_rows(self.cache, index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        self.last_tokens = self.last_tokens[index]
        self.rows = list(rows)
        self._trim()

    def crop(self, length: int) -> None:
        """Undoes a partly applied forward: cuts every layer's KV back to `length` tokens."""
        for layer in self.cache.layers:
            if layer.get_seq_length() > length:
                layer.crop(length - layer.get_seq_length())

    def _trim(self) -> None:
        """Drops leading columns that are padding in every row (left by rows that left)."""
        real = self.mask.any(0).nonzero()
        start = int(real[0]) if real.numel() else 0
        if start:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.replace(layer.keys[..., start:, :], layer.values[..., start:, :])


def _select_rows(cache: DynamicCache, index: torch.Tensor) -> None:
    for layer in cache.layers:
        layer.batch_select_indices(index)


def _pad_left(kv: torch.Tensor, n: int) -> torch.Tensor:
    return F.pad(kv, (0, 0, n, 0)) if n else kv  # (B, H, T, D): pad T on the left
