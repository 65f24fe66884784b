"""Two standard model-editing baselines, ROME and GRACE, for benchmarks only (not the product).

Both edit the same model on the same facts as the `subject` method, and both make their value with
the same optimisation (memserve.kinds.local.values), so that a benchmark compares where an edit
lives and how it is switched on, not how hard its value was trained:

- **ROME** (Meng et al. 2022) writes the fact into the weights: a rank-one update of one layer's
  MLP down projection, keyed on the subject's last token, that maps the subject's key k* to
  W(k* + Δ) while disturbing other keys as little as possible under their covariance C. The model
  itself changes (in place, reversibly), so it is judged with no memory context at all.
- **GRACE** (Hartvigsen et al. 2023) keeps the model and adds a codebook at one layer: keys are
  activations at the prompt's last token, each with a deferral radius; an activation within a
  key's radius is replaced by that key's value (a hard switch, no blending).

Also here: greedy decoding and text NLL through the memory hooks, which both baselines (and any
other editor) are judged with.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from memserve.kinds.local.config import LocalConfig
from memserve.kinds.local.eval import TEXT_WINDOW_TOKENS
from memserve.kinds.local.runner import Cell, Runner, _Op
from memserve.kinds.local.subject import BACKGROUND, find_subject, subject_prompts
from memserve.kinds.local.train import FactTrainer
from memserve.kinds.local.values import CHECK_EVERY, CONFIDENT, ValueTrainer, locate
from memserve.memory.hooks import MemoryContext, MemoryHooks, Site
from memserve.models import LoadedModel
from memserve.padding import left_padded_positions, pad_rows, pad_token_id

DOCUMENTS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "documents"
# Tokens of generic text that ROME's key covariance is estimated on, and the window they are read
# in (a few thousand: several times the MLP width of the default model, 1536).
COVARIANCE_TOKENS = 4096
COVARIANCE_WINDOW = 256


def _config(config: LocalConfig | None) -> LocalConfig:
    return (config or LocalConfig()).resolved()


def _fact_trainer(loaded: LoadedModel, hooks: MemoryHooks, config: LocalConfig) -> FactTrainer:
    """Only for `target_tokens`: the target's tokens exactly as the subject method takes them."""
    return FactTrainer(loaded.model, loaded.tokenizer, hooks, config)


# ------------------------------------------------------------------------------------------- ROME


def covariance_texts() -> list[str]:
    """Generic text for ROME's key statistics: the trainer's own background sentences and the
    document fixtures. Not the evaluation's unrelated text, which the perplexity is measured on:
    a covariance fitted to it would flatter ROME's locality."""
    texts = list(BACKGROUND)
    if DOCUMENTS.is_dir():
        texts += [p.read_text(encoding="utf-8") for p in sorted(DOCUMENTS.glob("*.txt"))]
    return texts


def key_covariance(
    loaded: LoadedModel,
    hooks: MemoryHooks,
    layer: int,
    texts: Sequence[str],
    max_tokens: int = COVARIANCE_TOKENS,
    window: int = COVARIANCE_WINDOW,
) -> tuple[torch.Tensor, int]:
    """(C = E[k kᵀ] of the down projection's inputs at `layer` (d_ff, d_ff) float64, tokens used):
    over the texts in windows of `window` tokens, until `max_tokens` tokens are read. Every
    position counts, as ROME's statistics over Wikipedia do."""
    tokenizer = loaded.tokenizer
    runner = Runner(loaded.model, hooks, LocalConfig())
    cell: Cell = (layer, Site.MLP_DOWN.value)
    windows: list[list[int]] = []
    total = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True).input_ids
        for start in range(0, len(ids), window):
            piece = ids[start : start + window][: max_tokens - total]
            if piece:
                windows.append(piece)
                total += len(piece)
            if total >= max_tokens:
                break
        if total >= max_tokens:
            break
    if not windows:
        raise ValueError("no text to estimate the key covariance on")
    covariance: torch.Tensor | None = None
    for activations in runner.activations(windows, [cell], ())[cell]:
        k = activations.double()
        outer = k.T @ k
        covariance = outer if covariance is None else covariance + outer
    assert covariance is not None
    return covariance / total, total


@dataclass
class RomeFact:
    """One fact's edit, as applied: for the benchmark's details and the tests."""

    id: str
    subject: str
    key: torch.Tensor  # k* (d_ff,) float32: the mean down-projection input at the subject's last token
    residual: torch.Tensor  # δ (d_model,): the optimised change of the MLP's output at k*
    value_steps: int
    target_nll: float
    relation_kl: float


@dataclass
class RomeEdit:
    """The edited model's record; calling it puts the original weights back (exactly)."""

    layer: int
    weight: torch.nn.Parameter
    original: torch.Tensor
    facts: list[RomeFact] = field(default_factory=list)
    covariance_tokens: int = 0

    def __call__(self) -> None:
        with torch.no_grad():
            self.weight.copy_(self.original)

    def details(self) -> list[dict[str, Any]]:
        return [
            {
                "id": f.id,
                "subject": f.subject,
                "value_steps": f.value_steps,
                "target_nll": round(f.target_nll, 4),
                "relation_kl": round(f.relation_kl, 4),
                "residual_norm": round(float(f.residual.norm()), 4),
            }
            for f in self.facts
        ]


def rome_edit(
    loaded: LoadedModel,
    facts: Sequence[dict[str, Any]],
    layer: int = 8,
    config: LocalConfig | None = None,
    texts: Sequence[str] | None = None,
    regularisation: float = 1e-2,
    covariance_tokens: int = COVARIANCE_TOKENS,
    clamp_norm_factor: float = 4.0,
) -> RomeEdit:
    """Sequential ROME: each fact in turn, a rank-one update of `layer`'s down projection W
    (d_model, d_ff), in place on `loaded.model`, its key and value computed on the model as
    edited so far. Returns a `RomeEdit`, a callable that restores the original weights.

    Per fact, with the subject method's rows, relations, targets and value optimisation:
    k* is the mean down-projection input at the subject's last token over the rows, and δ the
    optimised change of the MLP's output there (added to the residual stream after the layer,
    which is the same sum), its norm clamped to `clamp_norm_factor` × ‖W k*‖ as ROME does: an
    unclamped δ is large, and the rank-one update carries a share of it to every other key.
    With C = E[k kᵀ] over generic text (`texts`, default `covariance_texts()`), regularised
    by `regularisation`·mean(diag C)·I so that directions the text never visits cannot blow the
    update up,
        W ← W + δ (C⁻¹k*)ᵀ / (k*ᵀ C⁻¹ k*),
    the least change (in the C-weighted sense) with W' k* = W k* + δ exactly.

    The model must be fp32: the update is small next to W's entries, and bf16 rounding would eat it.
    """
    model, tokenizer = loaded.model, loaded.tokenizer
    config = _config(config)
    hooks = MemoryHooks(model)  # our own, removed below
    cell: Cell = (layer, Site.MLP_DOWN.value)
    edit: RomeEdit | None = None
    try:
        weight = hooks.sites[layer].mlp_down_proj.weight
        if weight.dtype != torch.float32:
            raise ValueError(f"ROME needs the model in fp32, not {weight.dtype}: the update would be rounded")
        edit = RomeEdit(layer, weight, weight.detach().clone())
        # The keys at `layer` come before its down projection: edits to it never change them,
        # so one covariance serves every fact.
        covariance, edit.covariance_tokens = key_covariance(
            loaded, hooks, layer, covariance_texts() if texts is None else texts, covariance_tokens
        )
        width = covariance.shape[0]
        regularised = covariance + regularisation * covariance.diagonal().mean() * torch.eye(
            width, dtype=covariance.dtype, device=covariance.device
        )
        keys = ValueTrainer(model, tokenizer, hooks, config, cell)
        # The value is the change δ of the MLP's output at the subject, optimised where it acts:
        # the residual stream after the layer (the same sum), its norm clamped as ROME clamps it.
        values = ValueTrainer(model, tokenizer, hooks, config, (layer, Site.RESIDUAL.value))
        targets_of = _fact_trainer(loaded, hooks, config)
        for fact in facts:
            prompt = fact["prompt"]
            subject = find_subject(prompt, fact.get("subject", "")).text
            made = subject_prompts(prompt, subject, 3, random.Random(0), [])
            rows = [x for x in (locate(tokenizer, t, subject) for t in made.train) if x.subject_positions]
            relations = [
                x for x in (locate(tokenizer, t, subject) for t in made.relations) if x.subject_positions
            ]
            if not rows:
                raise ValueError(f"the subject {subject!r} is not found in the tokens of {prompt!r}")
            targets = targets_of.target_tokens(prompt, fact["target"])
            key, _ = keys.key(rows)
            with torch.no_grad():
                output_norm = float((weight @ key.to(weight.device)).norm())
            value = values.value(
                rows, targets, relations, weight.shape[0], max_norm=clamp_norm_factor * output_norm
            )
            with torch.no_grad():
                w = weight.detach().double()
                k = key.double().to(w.device)
                residual = value.delta.double().to(w.device)
                c_inv_k = torch.linalg.solve(regularised.to(w.device), k)
                weight.copy_((w + torch.outer(residual, c_inv_k) / (k @ c_inv_k)).to(weight.dtype))
            edit.facts.append(
                RomeFact(
                    str(fact.get("id", prompt)),
                    subject,
                    key.float(),
                    residual.float(),
                    value.steps,
                    value.target_nll,
                    value.relation_kl,
                )
            )
    except BaseException:
        if edit is not None:  # a fact that fails leaves the model as it was, not half edited
            edit()
        raise
    finally:
        hooks.remove()
    assert edit is not None
    return edit


# ------------------------------------------------------------------------------------------ GRACE


@dataclass
class GraceEntry:
    key: torch.Tensor  # (D,) float32: the site's input at the prompt's last token
    value: torch.Tensor  # (D,) float32: what replaces an activation within the radius
    radius: float  # ε, euclidean
    target: str  # the edit's label: entries with the same target may merge
    label: str


class GraceCodebook:
    """GRACE's codebook at one layer's `mlp_down` site input (see the module docstring).

    Codebook maintenance, for a new key at distance d from the nearest existing one (GRACE's
    rules; a conflict is the new key's ε_init-ball overlapping the existing entry's ball,
    d ≤ ε + ε_init, which includes a new key inside the existing radius):
    - no conflict: the new entry is added with ε_init;
    - conflict, same target: expand: the existing radius grows to cover the new key's ball,
      ε ← max(ε, d + ε_init), and the new key is not added (its value is not trained);
    - conflict, another target: split: the new entry is added, and both radii become d/2, so the
      two balls just touch.
    ε_init = `eps_rel`·‖key‖: relative, since activation norms differ from model to model.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        hooks: MemoryHooks,
        layer: int = 20,
        config: LocalConfig | None = None,
        eps_rel: float = 0.5,
    ) -> None:
        self.loaded, self.hooks, self.layer, self.eps_rel = loaded, hooks, layer, eps_rel
        self.config = _config(config)
        self.cell: Cell = (layer, Site.MLP_DOWN.value)
        self.runner = Runner(loaded.model, hooks, self.config)
        self.width = self.runner._width(self.cell)
        self.device = next(loaded.model.parameters()).device
        self.entries: list[GraceEntry] = []
        self._targets = _fact_trainer(loaded, hooks, self.config)

    # --- editing

    def add(self, fact: dict[str, Any]) -> dict[str, Any]:
        """Edits one fact: its key, then the codebook's rule for it, and a value trained only when
        an entry is added. Returns what happened, for the benchmark's details."""
        prompt, target = fact["prompt"], fact["target"]
        label = str(fact.get("id", prompt))
        ids = self.loaded.tokenizer(prompt, add_special_tokens=True).input_ids
        key = self.runner.activations([ids], [self.cell], ())[self.cell][0][-1]
        action, nearest = self._rule(key, target)
        found: dict[str, Any] = {"id": label, "action": action}
        if nearest is not None:
            found["nearest"] = self.entries[nearest].label
        if action == "expand":
            self.add_entry(key, None, target, label)
            return found
        # The value trains with the codebook as it will be once the entry is in (a split first
        # shrinks the nearest radius): what serving will do at every other position.
        entries = [replace(e) for e in self.entries]
        if action == "split":
            assert nearest is not None
            entries[nearest].radius = float((entries[nearest].key - key).norm()) / 2
        targets = self._targets.target_tokens(prompt, target)
        delta, steps, nll_before, nll_after = self._train_value(ids, targets, key, self._op(entries))
        self.add_entry(key, key + delta, target, label)
        found.update(
            value_steps=steps, target_nll_before=round(nll_before, 4), target_nll=round(nll_after, 4)
        )
        return found

    def _rule(self, key: torch.Tensor, target: str) -> tuple[str, int | None]:
        """("add" | "expand" | "split", the nearest entry's index when it conflicts)."""
        if not self.entries:
            return "add", None
        keys = torch.stack([e.key for e in self.entries])
        distances = (keys - key.float().to(keys.device)).norm(dim=-1)
        nearest = int(distances.argmin())
        d = float(distances[nearest])
        if d > self.entries[nearest].radius + self.eps_rel * float(key.norm()):
            return "add", None
        return ("expand" if self.entries[nearest].target == target else "split"), nearest

    def add_entry(self, key: torch.Tensor, value: torch.Tensor | None, target: str, label: str) -> str:
        """Applies the codebook's rule to a key whose value is known (None: only if it expands an
        entry); returns the action taken. Split out of `add` so the rules can be checked alone."""
        key = key.detach().float().to(self.device)
        action, nearest = self._rule(key, target)
        eps_init = self.eps_rel * float(key.norm())
        if action == "expand":
            assert nearest is not None
            existing = self.entries[nearest]
            existing.radius = max(existing.radius, float((existing.key - key).norm()) + eps_init)
            return action
        if value is None:
            raise ValueError("a key that adds an entry needs a value")
        radius = eps_init
        if action == "split":
            assert nearest is not None
            half = float((self.entries[nearest].key - key).norm()) / 2
            self.entries[nearest].radius = half
            radius = half
        self.entries.append(GraceEntry(key, value.detach().float().to(self.device), radius, target, label))
        return action

    def _train_value(
        self,
        ids: list[int],
        targets: list[int],
        key: torch.Tensor,
        codebook: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> tuple[torch.Tensor, int, float, float]:
        """(Δ, steps, target NLL before, after): the prompt's last-token activation replaced by
        key + Δ (what the new entry will do there), with the subject method's optimiser, learning
        rate, steps, decay and stopping rule, and `codebook` (the other entries) at the other
        positions.

        Only the target NLL and the decay: the subject method's KL term keeps the subject's
        other relations where Δ is added at the subject in them, which has no counterpart here
        (GRACE fires by its radius, not at a chosen position; the radius is its locality), and
        `ValueTrainer.value` cannot run without relations (the KL's mean over none is NaN)."""
        config, model = self.config, self.loaded.model
        sequence = torch.tensor([ids + targets], device=self.device)
        last = len(ids) - 1
        labels = torch.tensor(targets, device=self.device)
        scored = slice(last, last + len(targets))
        key = key.float().to(self.device)
        delta = torch.zeros(self.width, device=self.device, requires_grad=True)

        def op(hidden: torch.Tensor) -> torch.Tensor:
            hidden = (codebook(hidden) if codebook is not None else hidden).clone()
            hidden[:, last] = (key + delta).to(hidden.dtype)
            return hidden

        def token_nll() -> torch.Tensor:
            context = MemoryContext()
            context.add(self.layer, Site.MLP_DOWN, _Op("grace value"), op)
            with torch.enable_grad(), self.hooks.using(context):
                logits = model(input_ids=sequence).logits[0, scored].float()
            return torch.nn.functional.cross_entropy(logits, labels, reduction="none")

        with torch.no_grad():
            before = float(token_nll().mean())
        optimiser = torch.optim.Adam([delta], lr=config.value_lr)
        step = 0
        for step in range(1, config.value_steps + 1):
            nll = token_nll()
            loss = nll.mean() + config.value_decay * delta.square().sum() / self.width
            (delta.grad,) = torch.autograd.grad(loss, [delta])
            optimiser.step()
            if step % CHECK_EVERY == 0 and bool((nll < -math.log(CONFIDENT)).all()):
                break
        with torch.no_grad():
            after = float(token_nll().mean())
        return delta.detach().float().clone(), step, before, after

    # --- serving

    def _op(
        self, entries: Sequence[GraceEntry] | None = None
    ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The codebook (or `entries`) as a site op (None when empty), at every row and position:
        among the keys whose radius holds the activation, the nearest one's value replaces it.
        (GRACE takes the nearest key and checks its radius; the same once splits have made the
        balls disjoint, and an expanded ball may hold others.)"""
        entries = self.entries if entries is None else entries
        if not entries:
            return None
        keys = torch.stack([e.key for e in entries])
        values = torch.stack([e.value for e in entries])
        radii = torch.tensor([e.radius for e in entries], device=keys.device)

        def op(hidden: torch.Tensor) -> torch.Tensor:
            shape = hidden.shape
            flat = hidden.reshape(-1, shape[-1])
            # Exact differences, not the matmul shortcut, whose rounding would blur the radii.
            distances = torch.cdist(
                flat.float(), keys.to(flat.device), compute_mode="donot_use_mm_for_euclid_dist"
            )
            distances = distances.masked_fill(distances > radii.to(flat.device), math.inf)
            best, index = distances.min(-1)
            hit = torch.isfinite(best)
            if not bool(hit.any()):
                return hidden
            replaced = torch.where(hit[:, None], values.to(flat.device, flat.dtype)[index], flat)
            return replaced.reshape(shape)

        return op

    def context(self) -> MemoryContext:
        """A fresh context applying the codebook to every row and position (empty: no op)."""
        context = MemoryContext()
        op = self._op()
        if op is not None:
            context.add(self.layer, Site.MLP_DOWN, _Op("grace codebook"), op)
        return context


# ------------------------------------------------------------------------------- judging an edit


def greedy(
    loaded: LoadedModel,
    hooks: MemoryHooks,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    context_factory: Callable[[], MemoryContext] | None = None,
    stop_at_eos: bool = False,
    batch_rows: int = 64,
) -> list[list[int]]:
    """Greedy continuations (new tokens only), batched with left padding, the whole sequence
    recomputed each step: an op sees every position each time, exactly as it would with no cache,
    and the prompts are short. `context_factory` gives a fresh context per forward. By default
    EOS does not stop a row, as the evaluation's engine runs (ignore_eos); with `stop_at_eos` a
    row ends with its EOS, as Hugging Face's `generate` does."""
    model, device = loaded.model, next(loaded.model.parameters()).device
    pad, eos = pad_token_id(loaded.tokenizer), loaded.tokenizer.eos_token_id
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_rows):
        rows = [list(p) for p in prompts[start : start + batch_rows]]
        new: list[list[int]] = [[] for _ in rows]
        done = [False] * len(rows)
        for _ in range(max_new_tokens):
            live = [i for i in range(len(rows)) if not done[i]]
            if not live:
                break
            ids, mask = pad_rows([rows[i] + new[i] for i in live], pad, left=True, device=device)
            context = context_factory() if context_factory is not None else None
            if context is not None and context.mask is None:
                context.mask = mask
            with torch.no_grad(), hooks.using(context):
                logits = model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=left_padded_positions(mask),
                    logits_to_keep=1,
                ).logits[:, -1]
            if context is not None:
                context.finish()
            for i, token in zip(live, logits.argmax(-1).tolist(), strict=True):
                new[i].append(int(token))
                done[i] = stop_at_eos and token == eos
        out += new
    return out


def text_nll(
    loaded: LoadedModel,
    hooks: MemoryHooks,
    texts: Sequence[str],
    context_factory: Callable[[], MemoryContext] | None = None,
    window: int = TEXT_WINDOW_TOKENS,
) -> tuple[float, int]:
    """(summed NLL, tokens scored) of `texts`, in windows of `window` tokens as the evaluation
    scores its unrelated text. Two calls, with and without an edit (ROME: edited, then
    restored), give the perplexity ratio: exp((nll_edited − nll_base) / tokens)."""
    model, device = loaded.model, next(loaded.model.parameters()).device
    total, tokens = 0.0, 0
    for text in texts:
        ids = loaded.tokenizer(text, add_special_tokens=True).input_ids
        for start in range(0, max(len(ids) - 1, 1), window):
            piece = torch.tensor([ids[start : start + window + 1]], device=device)
            if piece.shape[1] < 2:
                continue
            context = context_factory() if context_factory is not None else None
            with torch.no_grad(), hooks.using(context):
                logits = model(input_ids=piece).logits[0, :-1].float()
            if context is not None:
                context.finish()
            total += float(torch.nn.functional.cross_entropy(logits, piece[0, 1:], reduction="sum"))
            tokens += piece.shape[1] - 1
    return total, tokens


def perplexity_ratio(edited: tuple[float, int], base: tuple[float, int]) -> float:
    """exp of the mean NLL difference of two `text_nll` results on the same texts."""
    if edited[1] != base[1] or not base[1]:
        raise ValueError("the two NLLs must be over the same, non-empty texts")
    return math.exp((edited[0] - base[0]) / base[1])
