"""Running slices of the frozen base model, shared by every trainer.

A trainer whose memory sits after block L never changes what comes before it: the
residual stream at L is computed once (`residual_at`), and each step runs only the
blocks after L, the final norm and the LM head (`logits_after`).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memserve.errors import FailedPrecondition, InvalidArgument
from memserve.memory.hooks import ARCHITECTURES
from memserve.padding import pad_rows, pad_token_id


@contextmanager
def _layers_view(model: PreTrainedModel, keep: slice, final_norm: bool) -> Iterator[nn.Module]:
    """The base model with only `layers[keep]` (and optionally no final norm), as a new
    module object: the model itself is never changed, so a server may keep using it."""
    arch = ARCHITECTURES[model.config.model_type]
    parent_path, attr = arch.layers.rsplit(".", 1)
    parent = model.get_submodule(parent_path)
    view = copy.copy(parent)
    view._modules = dict(parent._modules)
    view._modules[attr] = nn.ModuleList(list(getattr(parent, attr))[keep])
    if not final_norm:
        view._modules[arch.final_norm] = nn.Identity()
    yield view


def residual_at(
    model: PreTrainedModel, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The residual stream after block `layer` (B, T, d), without running the layers after it."""
    with _layers_view(model, slice(0, layer + 1), final_norm=False) as view, torch.no_grad():
        out = view(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out[0]


def logits_after(
    model: PreTrainedModel,
    layer: int,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    only: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits from the residual stream after block `layer`: the later blocks, the norm, the head.
    With `only` (a (B, T) bool mask), the head runs on those positions alone: (N, vocabulary)."""
    with _layers_view(model, slice(layer + 1, None), final_norm=True) as view:
        out = view(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False)
        final = out[0] if only is None else out[0][only]
        # The LM head (vocabulary × hidden) is most of a training step: bf16 halves it on CPUs
        # with AVX512-BF16 and GPUs alike; the loss itself is taken in fp32.
        with torch.autocast(hidden.device.type, dtype=torch.bfloat16, enabled=_bf16_head(hidden)):
            return model.get_output_embeddings()(final)


def _bf16_head(hidden: torch.Tensor) -> bool:
    return hidden.dtype == torch.float32 and (hidden.device.type == "cuda" or _cpu_has_bf16())


@functools.cache
def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each row (R,), over its real (non-pad) tokens."""
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:]
    losses = nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none"
    ).view(targets.shape)
    counts = (targets != -100).sum(1).clamp_min(1)
    return losses.sum(1) / counts


@dataclass
class Windows:
    """Tokenised windows, right-padded: ids, mask, labels (pads -100) and their documents."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    documents: torch.Tensor  # index of each window's document

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @classmethod
    def of(cls, rows: list[list[int]], documents: list[int], pad_id: int) -> Windows:
        """Token rows right-padded into windows; `documents[i]` is row i's document."""
        ids, mask = pad_rows(rows, pad_id, left=False)
        labels = ids.masked_fill(mask == 0, -100)  # pads never count (the public code counted them)
        return cls(ids, mask, labels, torch.tensor(documents))


def tokenize_windows(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], documents: list[int], max_length: int
) -> Windows:
    encoded = [
        tokenizer(t, add_special_tokens=True, truncation=True, max_length=max_length).input_ids for t in texts
    ]
    return Windows.of(encoded, documents, pad_token_id(tokenizer))


# What one training job may hold, so that a request can never take the server's memory down
# (the worker may run inside the server): the cached residual stream, and one step's logits
# (positive and negative rows, fp32, with their copies for the loss and its gradient).
MAX_RESIDUAL_BYTES = 4 << 30


MAX_STEP_LOGIT_BYTES = 6 << 30


def check_memory_budget(model: PreTrainedModel, windows: int, tokens: int, batch_size: int) -> None:
    config = model.config
    residual = windows * tokens * config.hidden_size * 4
    if residual > MAX_RESIDUAL_BYTES:
        raise InvalidArgument(
            f"{windows} windows of up to {tokens} tokens need {residual / 2**30:.1f} GiB of cached "
            f"activations (limit {MAX_RESIDUAL_BYTES / 2**30:.0f} GiB): lower max_windows or max_length, "
            "or register fewer documents"
        )
    logits = 2 * min(batch_size, windows) * tokens * config.vocab_size * 4 * 3
    if logits > MAX_STEP_LOGIT_BYTES:
        raise InvalidArgument(
            f"a step of {batch_size} windows of {tokens} tokens needs {logits / 2**30:.1f} GiB of logits "
            f"(limit {MAX_STEP_LOGIT_BYTES / 2**30:.0f} GiB): lower batch_size or max_length"
        )


def check_trainable(model: PreTrainedModel, what: str) -> None:
    """Trainers that cache the residual stream need a model whose embeddings are the residual
    stream (Llama family, GPT-NeoX) and full attention in every layer."""
    arch = ARCHITECTURES.get(model.config.model_type)
    if arch is None or not arch.embeds_are_residual:
        raise FailedPrecondition(
            f"{what} train on Llama-family and GPT-NeoX models; this is {model.config.model_type}"
        )
    if any(t != "full_attention" for t in getattr(model.config, "layer_types", None) or ()):
        raise FailedPrecondition(f"{what} do not train on models with sliding-window layers yet")
