"""Gated answers: the `gated` method's entries, which act only where a fact is asked.

A fact's memory is two bounded triggers and one value (docs/design.md, "gated answers"):

1. **Subject detector** at (layer, site) of the subject's last token, as the `subject` method
   keys it: f_s = exp(−(x²/b_s²)^h_s) with the euclidean distance. It changes nothing; a
   position "has seen the subject" once f_s ≥ ½ at it or at any earlier position of the
   sequence. The engine keeps that per request (MemoryContext.row_states), so a decode step
   knows what the prompt mentioned, as the KV cache knows what attention needs. With
   `answer_scope="sentence"` a sentence the model ends (MemoryContext.sentence_ends) forgets it.
2. **Answer** at the LM head, for each target token: where the subject has been
   seen, the distance is the Jensen–Shannon divergence between the model's own next-token
   distribution there and the one it had on the fact's prompt (the reference's top K tokens
   and the rest of the mass, K + 1 bins): a rewording asks for the same kind of answer
   ("…in the city of" and "the city where … stands is" both expect a city), while another
   relation of the same subject ("…was built in the year") expects another kind. The trigger
   is f = exp(−(x²/b²)^h), and the best-triggered answer raises its target token's logit by f·β:
   the model's own logits give the distribution compared, so the head runs once, and a weak
   trigger can make only the target likelier. (Sets made before the boost add f·W v, a value v
   at the head's input; they are still served so.)

A gate costs nothing at positions where no subject was seen: the head's answers are only
compared where a subject is, and then only that subject's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from memserve.errors import InvalidArgument
from memserve.memory.hooks import Site

# A subject counts as seen at a position where its detector's trigger is at least this.
SEEN_AT = 0.5
# Tensors of a set's gates in its artifact, under "gates.".
GATE_TENSORS = (
    "subject_keys",
    "subject_bounds",
    "subject_hardness",
    "subject_facts",
    "answer_facts",
    "answer_tokens",
    "answer_ids",
    "answer_reference",
    "answer_bounds",
    "answer_hardness",
    "answer_targets",
    "answer_boosts",
)
INDEX_TENSORS = ("subject_facts", "answer_facts", "answer_tokens", "answer_ids", "answer_targets")
# The first gated sets' answers: a value at the head's input (answer_values) for the boost.
LEGACY_GATE_TENSORS = (*GATE_TENSORS[:-2], "answer_values")
# Below this trigger an answer changes nothing worth computing.
ACTS_AT = 1e-4
# A fact's answer uses up the subject's mention when it acts at least this much on a position
# that produces a token.
USED_AT = 0.5


def fingerprint(logprobs: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A next-token distribution's fingerprint: its top K token ids (N, K) and the probabilities
    of those and of the rest (N, K + 1), from log-probabilities (N, V)."""
    values, ids = logprobs.float().topk(top_k, dim=-1)
    return ids, _with_rest(values.exp())


def fingerprint_distance(logprobs: torch.Tensor, ids: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon divergence (nats, in [0, ln 2]) between distributions (N, V) and reference
    fingerprints (ids (N, K), probabilities (N, K + 1)), on the reference's K + 1 bins."""
    probs = logprobs.float().gather(-1, ids).exp()
    return _js(_with_rest(probs), reference)


def triggers(x: torch.Tensor, bounds: torch.Tensor, hardness: torch.Tensor) -> torch.Tensor:
    """f = exp(−(x²/b²)^h), elementwise."""
    return (x * x / (bounds * bounds)).pow(hardness).neg().exp()


@dataclass(frozen=True)
class Answered:
    """The head's update for one set's rows, and what acted (for metrics and traces)."""

    update: torch.Tensor | None  # (R, k, V) of the logits, in their dtype; None when nothing acted
    best: torch.Tensor  # (R, k) the strongest answer trigger per position, fp32
    chosen: torch.Tensor  # (R, k) its answer index (−1: none)


class Gates:
    """A set's subject detectors and answers on the model's device."""

    def __init__(
        self,
        name: str,
        described: dict[str, Any],
        tensors: dict[str, torch.Tensor],
        head: torch.nn.Module | None,
        num_layers: int,
        site_width: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        where = f"local memory set {name!r}"
        legacy = set(tensors) == set(LEGACY_GATE_TENSORS)
        if set(tensors) != set(GATE_TENSORS) and not legacy:
            raise InvalidArgument(f"{where}: its gates need tensors {GATE_TENSORS}")
        if head is None or not hasattr(head, "weight"):
            raise InvalidArgument(f"{where} has gated answers; this model has no LM head")
        self.layer = int(described["detector"]["layer"])
        self.site = Site(str(described["detector"]["site"]))
        self.facts = [str(f) for f in described["facts"]]
        self.subjects = [str(s) for s in described["subjects"]]
        self.answers = [str(a) for a in described["answers"]]
        if not 0 <= self.layer < num_layers or self.site not in (Site.ATTN_OUT, Site.MLP_DOWN):
            raise InvalidArgument(f"{where}: its subject detectors are at a site this model lacks")
        t = {k: v.to(device) for k, v in tensors.items()}
        keys = t["subject_keys"].float()
        facts, subjects, answers = len(self.facts), len(self.subjects), len(self.answers)
        width = head.weight.shape[1]
        shapes_ok = (
            keys.shape == (subjects, site_width)
            and t["subject_bounds"].shape == t["subject_hardness"].shape == (subjects,)
            and t["subject_facts"].shape == (subjects,)
            and t["answer_facts"].shape
            == t["answer_bounds"].shape
            == t["answer_hardness"].shape
            == (answers,)
            and t["answer_ids"].ndim == 2
            and t["answer_ids"].shape[0] == answers
            and t["answer_reference"].shape == (answers, t["answer_ids"].shape[1] + 1)
            and (
                t["answer_values"].shape == (answers, width)
                if legacy
                else t["answer_targets"].shape == t["answer_boosts"].shape == (answers,)
            )
        )
        if not shapes_ok or facts == 0 or subjects == 0 or answers == 0:
            raise InvalidArgument(f"{where}: its gates are inconsistent with each other or this model")
        floats = [t[k].float() for k in (*GATE_TENSORS, "answer_values") if k in t and k not in INDEX_TENSORS]
        if not all(bool(v.isfinite().all()) for v in floats):
            raise InvalidArgument(f"{where}: its gates have values that are not finite")
        if not all(
            bool((t[k] > 0).all())
            for k in ("subject_bounds", "subject_hardness", "answer_bounds", "answer_hardness")
        ):
            raise InvalidArgument(f"{where}: its gates have a bound or a hardness <= 0")
        self.subject_facts = t["subject_facts"].long()
        self.answer_facts = t["answer_facts"].long()
        self.answer_ids = t["answer_ids"].long()
        tokens = t["answer_tokens"].long()
        vocabulary = head.weight.shape[0]
        # What an answer adds: β on its target's logit, or (legacy) W v.
        self.targets = None if legacy else t["answer_targets"].long()
        self.boosts = None if legacy else t["answer_boosts"].float()
        self.values = t["answer_values"].to(dtype) if legacy else None
        if (
            _outside(self.subject_facts, facts)
            or _outside(self.answer_facts, facts)
            or _outside(self.answer_ids, vocabulary)
            or (self.targets is not None and _outside(self.targets, vocabulary))
        ):
            raise InvalidArgument(f"{where}: its gates name facts or tokens that do not exist")
        # Whether an answer gives its fact's last target token: once that is generated, the
        # request forgets the subject until the text mentions it again (`forget`).
        last = torch.full((facts,), -1, dtype=torch.long, device=tokens.device)
        last.scatter_reduce_(0, self.answer_facts, tokens, reduce="amax")
        self.answer_final = tokens == last[self.answer_facts]
        if not bool(((keys * keys).sum(-1) > 0).all()):
            raise InvalidArgument(f"{where}: its gates have a key of norm 0")
        # The detectors are entries with the euclidean distance and nothing to add: the serving
        # entries' fast form of the trigger computes them (module.py imports this one, hence here).
        from memserve.kinds.local.module import Entries

        nothing = torch.zeros(subjects, 1, device=keys.device)
        self.detectors = Entries(keys, t["subject_bounds"], t["subject_hardness"], nothing, "euclidean")
        self.answer_reference = t["answer_reference"].float()
        self.answer_bounds, self.answer_hardness = t["answer_bounds"].float(), t["answer_hardness"].float()
        self.head = head
        self.head_layer = num_layers - 1
        self.nbytes = self.detectors.nbytes + sum(
            v.nbytes
            for v in (
                self.subject_facts,
                self.answer_facts,
                self.answer_ids,
                self.answer_reference,
                self.answer_bounds,
                self.answer_hardness,
                *(v for v in (self.values, self.targets, self.boosts) if v is not None),
            )
        )

    def __len__(self) -> int:
        return len(self.subjects) + len(self.answers)

    def subject_triggers(self, activations: torch.Tensor) -> torch.Tensor:
        """f_s of every detector at every position: (N, D) → (N, subjects) fp32."""
        return self.detectors.triggers(activations)

    def seen(
        self, hidden: torch.Tensor, real: torch.Tensor | None, before: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For a forward's (R, T, D) detector-site activations: which facts' subjects each position
        has seen, itself or earlier, (R, T, facts) bool; and the detectors' triggers (R, T,
        subjects). `real` (R, T) leaves padding out; `before` (R, facts) is what earlier forwards
        saw. A fact may have several detectors (forms of its subject); any of them counts."""
        r, t, d = hidden.shape
        f = self.subject_triggers(hidden.reshape(r * t, d)).reshape(r, t, -1)
        if real is not None:
            f = f * real[..., None]
        hits = (f >= SEEN_AT).to(torch.uint8)
        per_fact = torch.zeros(r, t, len(self.facts), dtype=torch.uint8, device=hidden.device)
        per_fact.index_add_(2, self.subject_facts, hits)
        seen = per_fact.clamp_(max=1).cummax(dim=1).values.bool()
        if before is not None:
            seen |= before[:, None, :]
        return seen, f

    def answer(self, logits: torch.Tensor, seen: torch.Tensor) -> Answered:
        """The update of (R, k, V) logits whose positions have seen the facts' subjects `seen`
        (R, k, facts): the best-triggered answer among those of the facts seen adds f·β to its
        target's logit (a legacy answer: f·W v, what f·v added to the head's input gives). The
        model's own logits are the distribution compared, so the head runs once."""
        r, k, vocabulary = logits.shape
        active = seen[..., self.answer_facts]  # (R, k, answers)
        best = torch.zeros(r * k, device=logits.device)
        chosen = torch.full((r * k,), -1, device=logits.device, dtype=torch.long)
        if not bool(active.any()):
            return Answered(None, best.reshape(r, k), chosen.reshape(r, k))
        rows, columns, answers = active.nonzero(as_tuple=True)
        flat = rows * k + columns
        positions, which = flat.unique(return_inverse=True)
        logprobs = logits.reshape(r * k, vocabulary)[positions].float().log_softmax(-1)  # (P, V)
        x = _distance_at(logprobs, which, self.answer_ids[answers], self.answer_reference[answers])
        f = triggers(x, self.answer_bounds[answers], self.answer_hardness[answers])
        best.scatter_reduce_(0, flat, f, reduce="amax")
        winners = f >= best[flat]
        chosen[flat[winners]] = answers[winners]
        acting = best >= ACTS_AT
        if not bool(acting.any()):
            return Answered(None, best.reshape(r, k), chosen.reshape(r, k))
        index = acting.nonzero()[:, 0]
        update = torch.zeros(r * k, vocabulary, device=logits.device, dtype=logits.dtype)
        if self.boosts is not None and self.targets is not None:
            acted = chosen[index]
            update[index, self.targets[acted]] = (best[index] * self.boosts[acted]).to(logits.dtype)
        else:
            assert self.values is not None
            weight = self.head.weight
            shifts = F.linear(self.values[chosen[index]].to(weight.dtype), weight)  # (n, V): W v
            update[index] = (shifts.float() * best[index, None]).to(logits.dtype)
        return Answered(update.reshape(r, k, vocabulary), best.reshape(r, k), chosen.reshape(r, k))


def _outside(indices: torch.Tensor, count: int) -> bool:
    return bool((indices < 0).any() | (indices >= count).any())


def _distance_at(
    logprobs: torch.Tensor, which: torch.Tensor, ids: torch.Tensor, reference: torch.Tensor
) -> torch.Tensor:
    """fingerprint_distance for pairs (position `which`, answer) without copying a row of V per pair."""
    return _js(_with_rest(logprobs[which[:, None], ids].exp()), reference)


def _with_rest(probs: torch.Tensor) -> torch.Tensor:
    """(N, K) probabilities of K tokens → (N, K + 1) with the rest of the mass last."""
    return torch.cat([probs, (1 - probs.sum(-1, keepdim=True)).clamp(min=0)], -1)


def _js(probs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    middle = ((probs + reference) / 2).clamp(min=1e-12).log()

    def divergence(p: torch.Tensor) -> torch.Tensor:
        return (p * (p.clamp(min=1e-12).log() - middle)).sum(-1)

    return (0.5 * divergence(probs) + 0.5 * divergence(reference)).clamp(min=0)
