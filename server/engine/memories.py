"""The memories of one forward: which batch rows use which memory, and whom a failure fails.

Apart from the scheduler because this is the one place where the engine meets the memory
kinds: it only knows `RowMemory` (add your ops for these rows) and `MemoryHookError` (this
memory raised), so the batching code never depends on what a kind does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memserve.engine.requests import GenerationRequest, Row
from memserve.errors import MemoryHookError, UnsupportedArchitecture
from memserve.memory.hooks import MemoryContext, MemoryHooks
from memserve.memory.kind import JoinedOp, RowMemory

log = logging.getLogger(__name__)


def hooks_or_none(model: PreTrainedModel) -> MemoryHooks | None:
    """The model's memory hooks, or None (and a warning) on an architecture without hook sites."""
    try:
        return MemoryHooks(model)
    except UnsupportedArchitecture as exc:
        log.warning("%s: serving without memories", exc)
        return None


def memory_context(
    requests: Sequence[GenerationRequest],
    device: torch.device,
    new_positions: torch.Tensor | None,
    row_states: list[dict[Any, Any]] | None = None,
    sentence_ends: torch.Tensor | None = None,
) -> MemoryContext | None:
    """The ops of every memory the batch rows use, each given the rows that use it; None when
    no row uses one. `new_positions` (B, T) marks the real input positions (None: all are);
    `row_states` are the rows' per-request memory state (MemoryContext.row_states);
    `sentence_ends` (B,) the rows whose generated input token ends a sentence (a decode step)."""
    groups: dict[int, tuple[RowMemory, list[int]]] = {}
    for index, request in enumerate(requests):
        for memory in request.memories:
            groups.setdefault(id(memory), (memory, []))[1].append(index)
    if not groups:
        return None
    traced = frozenset(i for i, request in enumerate(requests) if request.trace)
    context = MemoryContext(
        mask=new_positions, traced=traced, row_states=row_states, sentence_ends=sentence_ends
    )
    # Kinds that share a site apply in a fixed order (documents, then adapters), whatever
    # order a request lists its memories in (README: "One request, several memories").
    ordered = sorted(groups.values(), key=lambda group: group[0].apply_order)
    for memory, indices in ordered:
        try:
            memory.add_ops(context, torch.tensor(indices, device=device))
        except Exception as exc:
            raise MemoryHookError(memory, "while preparing its ops", exc) from exc
    return context


def rows_to_blame(error: MemoryHookError, rows: list[Row]) -> list[Row]:
    """The rows whose requests use the memory that raised; all of them if none does.

    Identity, not name: two memories may share a name."""
    return [r for r in rows if any(_blames(error.memory, m) for m in r.request.memories)] or rows


def _blames(culprit: object, memory: object) -> bool:
    """Whether a failure of `culprit` concerns `memory`: itself, or a group op it joined."""
    if culprit is memory:
        return True
    return isinstance(culprit, JoinedOp) and any(member is memory for member in culprit.members)


# Text after which a token ends a sentence: its last non-space character, closing quotes and
# brackets aside, is one of these, or it holds a line break.
SENTENCE_END_MARKS = (".", "!", "?")


def sentence_end_table(tokenizer: PreTrainedTokenizerBase, size: int, device: torch.device) -> torch.Tensor:
    """(size,) bool: the tokens that end a sentence ("." "!" "?" "...", '."', a line break). A
    decimal point counts too ("3.5"): a memory that forgets at a sentence's end then forgets early,
    never late."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    ends = [
        "\n" in text or text.rstrip().rstrip("\"')]}\u201d\u2019").endswith(SENTENCE_END_MARKS)
        for text in texts
    ]
    ends += [False] * (size - len(ends))  # the model's rows beyond the tokenizer's vocabulary
    return torch.tensor(ends[:size], dtype=torch.bool, device=device)
