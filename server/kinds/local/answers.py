"""Training of the `gated` method's answers (gates.py): per target token, the reference next-token
distributions of the training rows, a boundary on the divergence from them, and a value at the
LM head's input.

1. **References.** Each training row (the prompt, behind prefixes, reworded by rule) followed by
   the target tokens before this one gives the model's own next-token distribution; its top K
   tokens and the rest of the mass are the answer's reference (one answer per row).
2. **Boundary.** The same subject with other relations ("The Eiffel Tower is a", the contexts)
   must stay out: an answer's threshold is `answer_margin` × the divergence of the nearest of
   those from its reference. Other subjects are kept out by the subject detector, not here.
3. **Boost.** The answer raises the target token's logit by f·β and nothing else: a weak trigger
   can only make the target likelier, never turn the model to a third word. β is the least that
   gives the target probability CONFIDENT_AT_HALF on every row at f = ½ (the boundary's edge),
   read off the rows' logits in closed form: with z the row's logits and t the target,
   p_t ≥ c at f = ½ ⇔ β/2 ≥ log(c/(1−c)) + log Σ_{j≠t} e^{z_j} − z_t.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from memserve.kinds.local.config import LocalConfig
from memserve.kinds.local.gates import fingerprint, fingerprint_distance
from memserve.padding import pad_rows

# Every row gives the target at least this probability with half the boost (f = ½).
CONFIDENT_AT_HALF = 0.6
# A boost is at least this (logits), for rows that already give the target.
LEAST_BOOST = 2.0


@dataclass
class Answer:
    """One answer: a reference distribution and what it adds."""

    token_index: int  # which target token it gives
    ids: torch.Tensor  # (K,) the reference's top tokens
    reference: torch.Tensor  # (K + 1,) their probabilities and the rest
    bound: float  # b of f = exp(−(x²/b²)^h): f = ½ at `answer_margin` × the nearest other
    hardness: float
    target: int  # the token id it raises
    boost: float  # β: how much, at f = 1


@dataclass
class AnswerSearch:
    """What the answers of one target token found (for the job's details)."""

    token: int
    rows_inside: int
    rows: int
    nearest_other: float
    boost: float
    # Of the rows from the relation's templates (gated.py), bounded apart: how many are inside.
    template_rows_inside: int = 0
    template_rows: int = 0


class AnswerTrainer:
    """Makes the answers of facts on a frozen model."""

    def __init__(self, model: PreTrainedModel, config: LocalConfig) -> None:
        self.model, self.config = model, config
        self.head = model.get_output_embeddings()
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def logprobs_along(self, sequences: Sequence[list[int]], targets: list[int]) -> list[torch.Tensor]:
        """For each k, the (N, V) fp32 log-probabilities after each sequence + targets[:k]: one
        forward of sequence + targets[:-1] gives them all (a causal model's position depends on
        what precedes it only), instead of one forward per target token."""
        ids, mask = pad_rows([[*s, *targets[:-1]] for s in sequences], 0, left=False, device=self.device)
        hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        weight, rows = self.head.weight, torch.arange(len(sequences), device=self.device)
        ends = torch.tensor([len(s) - 1 for s in sequences], device=self.device)
        out = []
        for k in range(len(targets)):
            inputs = hidden[rows, ends + k].to(weight.dtype)
            logits = F.linear(inputs, weight, getattr(self.head, "bias", None))
            out.append(logits.float().log_softmax(-1))
        return out

    def answers(
        self, rows: Sequence[list[int]], others: Sequence[list[int]], targets: list[int]
    ) -> tuple[list[Answer], list[AnswerSearch]]:
        """The answers for every target token: one per training row (`rows`: token ids), bounded
        away from the subject's other relations (`others`)."""
        config = self.config
        answers: list[Answer] = []
        searches: list[AnswerSearch] = []
        rows_along, others_along = self.logprobs_along(rows, targets), self.logprobs_along(others, targets)
        for k, token in enumerate(targets):
            logprobs, other_logprobs = rows_along[k], others_along[k]
            ids, references = fingerprint(logprobs, config.answer_top_k)
            thresholds = []
            for i in range(len(rows)):
                n = len(others)
                x = fingerprint_distance(other_logprobs, ids[i].expand(n, -1), references[i].expand(n, -1))
                thresholds.append(config.answer_margin * float(x.min()))
            boost = _boost(logprobs, token)
            # A row is its own answer's reference (at 0); it is lost only to an identical other.
            inside = sum(t > 0 for t in thresholds)
            hardness = config.answer_hardness
            half = math.log(2) ** (1 / (2 * hardness))  # f(x) >= ½ exactly when x <= b·half
            for i in range(len(rows)):
                bound = max(thresholds[i], 1e-6) / half
                answers.append(Answer(k, ids[i], references[i], bound, hardness, token, boost))
            nearest = min(thresholds) / config.answer_margin
            searches.append(AnswerSearch(token, inside, len(rows), nearest, boost))
        return answers, searches


def _boost(logprobs: torch.Tensor, token: int) -> float:
    """β that gives `token` probability CONFIDENT_AT_HALF at f = ½ on every row (N, V)."""
    others = logprobs.clone()
    others[:, token] = -math.inf
    odds = math.log(CONFIDENT_AT_HALF / (1 - CONFIDENT_AT_HALF))
    needed = 2 * (odds + others.logsumexp(-1) - logprobs[:, token])
    return max(float(needed.max()), LEAST_BOOST)
