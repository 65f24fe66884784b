"""Token rows of different lengths as one (B, T) batch, and the pad token that fills it.

Generation pads on the left, so that every row's last position is its newest token (the
engine's prefill, and the local trainer's forwards, which must see what the engine sees);
training pads on the right, so that labels line up with the text. Either way the mask says
which positions are real, and what stands under a mask of 0 never reaches a real position.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad token, else its EOS token, else 0."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id or 0)


def pad_rows(
    rows: Sequence[Sequence[int]], pad_id: int, *, left: bool, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (B, T) int64 with T the longest row: `pad_id` and 0 where a row is
    padding, its tokens and 1 where it is real; padded on the left or on the right."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        real = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, real] = torch.tensor(row, dtype=torch.long)
        mask[i, real] = 1
    return ids.to(device), mask.to(device)


def left_padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, T) of left-padded rows: 0 at each row's first real token (and on its
    padding), so that a row's output does not depend on how much padding it got."""
    return (mask.cumsum(-1) - 1).clamp(min=0)
