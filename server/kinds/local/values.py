"""The `subject` method's entry of a fact: a key at the subject's last token, a value optimised
over several steps, and a boundary learned from the subject's contexts and other subjects.

1. **Key.** The site's activation at the subject's last token, averaged over the training rows
   (the prompt, behind prefixes and reworded) and the subject in other sentences: the point the
   subject's mentions have in common, as ROME averages its key over prefixes.
2. **Value.** Δ, added at the subject's last token of every training row, is optimised with Adam
   to make the target follow (teacher-forced, every target token) while the subject's other
   relations ("The Eiffel Tower is a") keep their next-token distributions (a KL term from the
   subject on), with a small L2 penalty. The edit then travels the way the model reads a fact
   about a subject: from the subject's position, by attention, to wherever the fact is asked.
3. **Boundary.** Two-sided distances (euclidean by default) of the subject's mentions (positives)
   and of every position of sentences about other subjects (negatives, the subject's own positions
   left out) give the threshold in the widest gap, as GRACE grows a radius to cover an input of
   its own and shrinks it away from others.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memserve.kinds.local.config import LocalConfig
from memserve.kinds.local.runner import Cell, Entry, Runner, _distance, _Op, _threshold
from memserve.kinds.local.subject import BACKGROUND
from memserve.memory.hooks import MemoryContext, MemoryHooks
from memserve.padding import pad_rows
from memserve.training.frozen import logits_after, residual_at

# Stop optimising once every training row gives each target token at least this probability.
CONFIDENT = 0.9
CHECK_EVERY = 4  # steps between checks of that


@dataclass(frozen=True)
class Located:
    """A sentence's tokens and the positions of the subject's last token in it (may be empty)."""

    ids: list[int]
    subject_positions: list[int]
    subject_tokens: set[int]  # every position of the subject's mentions


def locate(tokenizer: PreTrainedTokenizerBase, text: str, subject: str) -> Located:
    """Tokenises `text` and finds the subject's mentions (case-insensitive) in it."""
    encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = encoded.input_ids, encoded.offset_mapping
    lowered, needle = text.lower(), subject.lower()
    last, covered = [], set()
    start = lowered.find(needle)
    while start >= 0 and needle:
        end = start + len(needle)
        inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        if inside:
            last.append(inside[-1])
            covered.update(inside)
        start = lowered.find(needle, end)
    return Located(list(ids), last, covered)


@dataclass
class ValueResult:
    delta: torch.Tensor
    steps: int
    target_nll: float
    relation_kl: float


class ValueTrainer:
    """Optimises and bounds subject entries at one (layer, site) on a frozen model."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        hooks: MemoryHooks,
        config: LocalConfig,
        cell: Cell,
    ) -> None:
        self.model, self.tokenizer, self.hooks, self.config, self.cell = model, tokenizer, hooks, config, cell
        self.runner = Runner(model, hooks, config)
        self.device = next(model.parameters()).device
        self.background: torch.Tensor | None = None
        self._last_activations: tuple[tuple[tuple[int, ...], ...], list[torch.Tensor]] | None = None

    def key(self, sentences: Sequence[Located]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the mean activation at the subject's last tokens, each of those activations)."""
        seen = self.runner.activations([s.ids for s in sentences], [self.cell], ())[self.cell]
        mentions = [a[p] for a, s in zip(seen, sentences, strict=True) for p in s.subject_positions]
        return torch.stack(mentions).mean(0), mentions

    def value(
        self,
        rows: Sequence[Located],
        targets: list[int],
        relations: Sequence[Located],
        width: int,
        max_norm: float | None = None,
    ) -> ValueResult:
        """Δ that makes `targets` follow every row, keeping the relations' outputs; its norm kept
        at most `max_norm` when given (ROME clamps its value so).

        Rows and relations go in one batch; the layers before the entry's run once (their output
        does not depend on Δ), each step runs the rest."""
        config = self.config
        sequences = [r.ids + targets for r in rows] + [r.ids for r in relations]
        ids, mask = pad_rows(sequences, 0, left=False, device=self.device)
        labels = torch.full_like(ids, -100)
        for i, r in enumerate(rows):
            labels[i, len(r.ids) : len(r.ids) + len(targets)] = torch.tensor(targets, device=self.device)
        # The KL counts from the subject on: positions before it cannot see Δ.
        after = torch.zeros_like(mask, dtype=torch.bool)
        for i, r in enumerate(relations, start=len(rows)):
            after[i, min(r.subject_positions) : len(r.ids)] = True
        positions = [r.subject_positions for r in [*rows, *relations]]
        # The head runs only where a loss is read: before each target token, and the relations'
        # positions from the subject on.
        next_label = torch.full_like(labels, -100)
        next_label[:, :-1] = labels[:, 1:]
        scored = after | (next_label >= 0)
        wanted = next_label[scored]
        is_target = wanted >= 0
        is_relation = after[scored]
        layer = self.cell[0]
        start = residual_at(self.model, layer - 1, ids, mask) if layer > 0 else None
        with torch.no_grad():
            base = (
                self._logits(ids, mask, start, positions, None, scored)[is_relation].float().log_softmax(-1)
            )
        delta = torch.zeros(width, device=self.device, requires_grad=True)
        optimiser = torch.optim.Adam([delta], lr=config.value_lr)
        nll = kl = torch.zeros(())
        step = 0
        for step in range(1, config.value_steps + 1):
            logprobs = self._logits(ids, mask, start, positions, delta, scored).float().log_softmax(-1)
            token_nll = -logprobs[is_target].gather(-1, wanted[is_target][:, None])[:, 0]
            nll = token_nll.mean()
            edited = logprobs[is_relation]
            kl = (base.exp() * (base - edited)).sum(-1).mean()
            loss = nll + config.kl_weight * kl + config.value_decay * delta.square().sum() / width
            # Only Δ's gradient: the model's own parameters stay out of the graph's work.
            (delta.grad,) = torch.autograd.grad(loss, [delta])
            optimiser.step()
            if max_norm is not None:
                with torch.no_grad():
                    delta.mul_(min(1.0, max_norm / max(float(delta.norm()), 1e-12)))
            if step % CHECK_EVERY == 0 and bool((token_nll < -math.log(CONFIDENT)).all()):
                break
        return ValueResult(delta.detach().float().clone(), step, float(nll.detach()), float(kl.detach()))

    def _logits(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        start: torch.Tensor | None,
        positions: list[list[int]],
        delta: torch.Tensor | None,
        scored: torch.Tensor,
    ) -> torch.Tensor:
        """The logits at the `scored` positions (N, V) with Δ added at each row's subject
        positions (none: without it), from the residual stream before the entry's layer when given."""
        context = MemoryContext()
        if delta is not None:
            rows = torch.tensor([i for i, ps in enumerate(positions) for _ in ps], device=self.device)
            columns = torch.tensor([p for ps in positions for p in ps], device=self.device)

            def op(hidden: torch.Tensor) -> torch.Tensor:
                added = torch.zeros_like(hidden)
                added[rows, columns] = delta.to(hidden.dtype)
                return hidden + added

            context.add(self.cell[0], self.cell[1], _Op("subject value"), op)
        with torch.enable_grad(), self.hooks.using(context):
            if start is None:
                return self.model(input_ids=ids, attention_mask=mask).logits[scored]
            return logits_after(self.model, self.cell[0] - 1, start, mask, only=scored)

    def boundary(
        self,
        key: torch.Tensor,
        required: Sequence[torch.Tensor],
        wanted: Sequence[torch.Tensor],
        negatives: Sequence[Located],
    ) -> tuple[float, int, int]:
        """(threshold on the distance, mentions inside, negatives outside).

        The training rows' mentions (`required`) define the fact and are always inside; the
        subject in other sentences (`wanted`) is taken in as far as no negative comes nearer,
        as GRACE grows a radius for inputs of its own label and stops at another's. The
        threshold sits in the middle (geometrically) of the gap to the nearest negative. If a
        negative is nearer than a required mention, the widest gap that puts most right wins. The
        negatives counted outside include the background sentences (one more than `negatives`).
        """
        distance = self.config.distance
        required_x = [float(_distance(m[None], key, distance)[0]) for m in required]
        wanted_x = [float(_distance(m[None], key, distance)[0]) for m in wanted]
        seen = self._activations(negatives)
        negative_x = [float(_distance(self._background(), key, distance).min())]
        for activations, sentence in zip(seen, negatives, strict=True):
            x = _distance(activations, key, distance)
            keep = [i for i in range(len(sentence.ids)) if i not in sentence.subject_tokens]
            if keep:
                negative_x.append(float(x[keep].min()))
        nearest = min(negative_x)
        limit = nearest * self.config.boundary_margin
        if max(required_x) < limit:
            covered = max(x for x in [*required_x, *wanted_x] if x < limit)
            threshold = min(math.sqrt(max(covered, 1e-4) * nearest), limit)
        else:
            threshold, _, _ = _threshold(required_x, negative_x)
        inside = sum(x <= threshold for x in [*required_x, *wanted_x])
        return threshold, inside, sum(x > threshold for x in negative_x)

    def _activations(self, sentences: Sequence[Located]) -> list[torch.Tensor]:
        """The cell's activations of sentences; the last list's are kept, as a fact's keys are
        bounded one after another against the same negatives."""
        ids = tuple(tuple(s.ids) for s in sentences)
        if self._last_activations is None or self._last_activations[0] != ids:
            seen = self.runner.activations([list(i) for i in ids], [self.cell], ())[self.cell]
            self._last_activations = (ids, seen)
        return self._last_activations[1]

    def _background(self) -> torch.Tensor:
        """Every position of the background sentences at the cell (T, D), read once."""
        if self.background is None:
            sentences = [self.tokenizer(t, add_special_tokens=True).input_ids for t in BACKGROUND]
            self.background = torch.cat(self.runner.activations(sentences, [self.cell], ())[self.cell])
        return self.background

    def entry(self, key: torch.Tensor, delta: torch.Tensor, threshold: float, label: str) -> Entry:
        hardness = self.config.subject_hardness
        scale = math.log(2) ** (1 / (2 * hardness))  # f(x) >= 1/2 exactly when x <= b·scale
        return Entry(self.cell[0], self.cell[1], key, delta, threshold / scale, hardness, label)
