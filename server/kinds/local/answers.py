"""Training of the `gated` method's answers (gates.py): per target token, the reference next-token
distributions of the training rows, a boundary on the divergence from them, and a value at the
LM head's input.

1. **References.** Each training row (the prompt, behind prefixes, reworded by rule) followed by
   the target tokens before this one gives the model's own next-token distribution; its top K
   tokens and the rest of the mass are the answer's reference (one answer per row).
2. **Boundary.** The same subject with other relations ("The Eiffel Tower is a", the contexts)
   must stay out: an answer's threshold is `answer_margin` × the divergence of the nearest of
   those from its reference. Other subjects are kept out by the subject detector, not here.
3. **Value.** v, added to the head's input, is optimised with Adam so that every row gives the
   target token, with full and with half the trigger (the edge of the boundary): the rest of
   the model never sees it, so there is nothing else for it to disturb.
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

VALUE_STEPS = 200
# Stop once every row gives the target at least this probability with half the value.
CONFIDENT_AT_HALF = 0.6
CHECK_EVERY = 10


@dataclass
class Answer:
    """One answer: a reference distribution and what it adds."""

    token_index: int  # which target token it gives
    ids: torch.Tensor  # (K,) the reference's top tokens
    reference: torch.Tensor  # (K + 1,) their probabilities and the rest
    bound: float  # b of f = exp(−(x²/b²)^h): f = ½ at `answer_margin` × the nearest other
    hardness: float
    value: torch.Tensor  # (D,)


@dataclass
class AnswerSearch:
    """What the answers of one target token found (for the job's details)."""

    token: int
    rows_inside: int
    rows: int
    nearest_other: float
    value_steps: int
    target_prob_at_half: float


class AnswerTrainer:
    """Makes the answers of facts on a frozen model."""

    def __init__(self, model: PreTrainedModel, config: LocalConfig) -> None:
        self.model, self.config = model, config
        self.head = model.get_output_embeddings()
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def head_inputs(self, sequences: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The LM head's input at each sequence's last token (N, D) fp32 and the model's
        log-probabilities there (N, V) fp32."""
        ids, mask = pad_rows(sequences, 0, left=False, device=self.device)
        hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        last = mask.sum(-1) - 1
        inputs = hidden[torch.arange(len(sequences), device=self.device), last].float()
        return inputs, self.logprobs(inputs)

    def logprobs(self, inputs: torch.Tensor) -> torch.Tensor:
        weight = self.head.weight
        logits = F.linear(inputs.to(weight.dtype), weight, getattr(self.head, "bias", None))
        return logits.float().log_softmax(-1)

    def answers(
        self, rows: Sequence[list[int]], others: Sequence[list[int]], targets: list[int]
    ) -> tuple[list[Answer], list[AnswerSearch]]:
        """The answers for every target token: one per training row (`rows`: token ids), bounded
        away from the subject's other relations (`others`)."""
        config = self.config
        answers: list[Answer] = []
        searches: list[AnswerSearch] = []
        for k, token in enumerate(targets):
            prefix = targets[:k]
            inputs, logprobs = self.head_inputs([r + prefix for r in rows])
            _, other_logprobs = self.head_inputs([o + prefix for o in others])
            ids, references = fingerprint(logprobs, config.answer_top_k)
            thresholds = []
            for i in range(len(rows)):
                n = len(others)
                x = fingerprint_distance(other_logprobs, ids[i].expand(n, -1), references[i].expand(n, -1))
                thresholds.append(config.answer_margin * float(x.min()))
            value, steps, at_half = self._value(inputs, token)
            # A row is its own answer's reference (at 0); it is lost only to an identical other.
            inside = sum(t > 0 for t in thresholds)
            hardness = config.answer_hardness
            half = math.log(2) ** (1 / (2 * hardness))  # f(x) >= ½ exactly when x <= b·half
            for i in range(len(rows)):
                bound = max(thresholds[i], 1e-6) / half
                answers.append(Answer(k, ids[i], references[i], bound, hardness, value))
            nearest = min(thresholds) / config.answer_margin
            searches.append(AnswerSearch(token, inside, len(rows), nearest, steps, at_half))
        return answers, searches

    def _value(self, inputs: torch.Tensor, token: int) -> tuple[torch.Tensor, int, float]:
        """v that makes every row's head input + v (and + v/2) give `token`."""
        scale = float(inputs.norm(dim=-1).mean()) / math.sqrt(inputs.shape[-1])
        value = torch.zeros(inputs.shape[-1], device=self.device, requires_grad=True)
        optimiser = torch.optim.Adam([value], lr=0.05 * scale)
        wanted = torch.full((len(inputs) * 2,), token, device=self.device)
        at_half = 0.0
        step = 0
        with torch.enable_grad():
            for step in range(1, VALUE_STEPS + 1):
                edited = torch.cat([inputs + value, inputs + value / 2])
                logprobs = self.logprobs(edited)
                loss = F.nll_loss(logprobs, wanted)
                (value.grad,) = torch.autograd.grad(loss, [value])
                optimiser.step()
                if step % CHECK_EVERY == 0:
                    at_half = float(logprobs[len(inputs) :, token].detach().exp().min())
                    if at_half >= CONFIDENT_AT_HALF:
                        break
        return value.detach().float().clone(), step, at_half
