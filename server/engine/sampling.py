"""Choosing the next token of each batch row, each with its own parameters and seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Below this, dividing by the temperature overflows float32 for ordinary logits;
# such a temperature means "take the most likely token", so it is decoded greedily.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    """0 (or anything below GREEDY_BELOW) = greedy."""
    top_k: int = 0
    """0 = no limit."""
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True)
class Choice:
    token: int
    logprob: float | None
    top: list[tuple[int, float]]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019): shrink the scores of tokens already seen."""
    scores = logits.gather(0, seen)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(0, seen, scores)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Masks (to -inf) every token outside the top k and outside the top-p nucleus."""
    if top_k > 0 and top_k < logits.numel():
        threshold = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    seen: torch.Tensor | None,
    logprobs: bool,
    top_logprobs: int,
) -> Choice:
    """Picks one token from one row's logits (V,), float32.

    Log-probabilities are those of the model itself, before penalties and
    filters, so they are comparable across sampling settings.
    """
    log_probs = logits.log_softmax(-1) if logprobs or top_logprobs else None
    scores = logits
    if params.repetition_penalty != 1.0 and seen is not None and seen.numel():
        scores = apply_repetition_penalty(scores, seen, params.repetition_penalty)
    if params.greedy:
        token = int(scores.argmax())
    else:
        # Extreme penalties or temperatures may overflow: keep the scores finite for softmax.
        largest = torch.finfo(scores.dtype).max
        scores = (scores / params.temperature).clamp(-largest, largest)
        scores = filter_top_k_top_p(scores, params.top_k, params.top_p)
        token = int(torch.multinomial(scores.softmax(-1), 1, generator=generator))
    top: list[tuple[int, float]] = []
    if log_probs is not None and top_logprobs:
        values, ids = torch.topk(log_probs, top_logprobs)
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return Choice(token, float(log_probs[token]) if log_probs is not None and logprobs else None, top)
