"""The `local` kind's training: turning facts into bounded local memory entries.

A fact is (prompt, target text, optional positive prompts, optional negative prompts). For
each target token (the blog handled the first one only, and later tokens drifted):

1. The context is the prompt plus the target tokens before this one. If the model, with the
   fact's entries so far, already continues the context and every training positive with
   the token, it needs no entry.
2. **Edit.** One forward and backward give, at every candidate (layer, site), the activation
   a at the context's last token and g = ∂CE(token)/∂a. Every cell × step size α is tried in
   one batched forward of the last token over a cached prefix (an edit at the last token
   changes nothing before it); each cell keeps the smallest α that makes the token the
   model's choice.
3. **Boundary.** The activations of the training positives and negatives are read at every
   cell in one forward each. A cell is good when the positives' last tokens are close to its
   key and every position of the negatives is far: the boundary goes in the widest gap,
   geometrically in its middle. The best cells are then checked for real, entry applied at
   every position, with α and 2α; the best outcome on the training prompts wins.

Positive and negative prompts, given and generated alike, are split into a training part
and a held-out part (``holdout``); the boundary only ever sees the training part, and
``memserve eval facts`` judges the held-out one. Generated paraphrases put the prompt in
new contexts; generated neighbours swap the prompt's names for others, and other facts'
prompts in the set are neighbours too.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memserve.errors import FailedPrecondition, InvalidArgument
from memserve.kinds.local.config import Fact, LocalConfig, check_spec, fact_from_dict, settings_over
from memserve.kinds.local.gated import (
    FactGate,
    GatedFactTrainer,
    gate_tensors,
    has_legacy_gates,
    in_memory_set,
    next_tokens_with,
    previous_gates,
)
from memserve.kinds.local.module import group_tensors
from memserve.kinds.local.prompts import GENERIC_NEIGHBOURS, FactPrompts, split_prompts
from memserve.kinds.local.runner import Cell, Entry, Runner, _distance, _threshold
from memserve.kinds.local.subject import find_subject, subject_prompts
from memserve.kinds.local.values import ValueTrainer, locate
from memserve.memory.hooks import MemoryHooks
from memserve.memory.kind import TrainContext, Trained
from memserve.memory_store.artifact import Artifact

# Per cell: the activation at the context's last token and ∂CE(token)/∂ it, each (D,).
Gradients = dict[Cell, tuple[torch.Tensor, torch.Tensor]]

MAX_TARGET_TOKENS = 16
# Neighbours taken from other facts of the set, per fact.
OTHER_FACT_NEIGHBOURS = 32


# ---------------------------------------------------------------------------------- the trainer


@dataclass
class FactResult:
    fact: Fact
    prompts: FactPrompts
    target_tokens: list[int]
    entries: list[Entry] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    subject: dict[str, Any] | None = None  # the subject entry's search, with the `subject` method
    gate: FactGate | None = None  # with the `gated` method

    def details(self, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        return {
            "id": self.fact.id,
            "prompt": self.fact.prompt,
            "target": self.fact.target,
            "target_tokens": [tokenizer.decode([t]) for t in self.target_tokens],
            "entries": [e.label for e in self.entries] + (self.gate.labels() if self.gate else []),
            "train_positives": self.prompts.train_positives,
            "train_negatives": self.prompts.train_negatives,
            "heldout_positives": self.prompts.heldout_positives,
            "heldout_negatives": self.prompts.heldout_negatives,
            "generated_prompts": self.prompts.generated,
            **({"subject": self.subject} if self.subject else {}),
            "tokens": self.steps,
        }


@dataclass(frozen=True)
class _Checks:
    """What an entry for one target token is judged on: the training contexts that must go on
    with the token, and the negatives that must keep their own next token (`expected`)."""

    positives: list[list[int]]
    negatives: list[list[int]]
    expected: list[int]

    @property
    def rows(self) -> list[list[int]]:
        return [*self.positives, *self.negatives]


class FactTrainer:
    """Searches the entries of facts on a frozen model (see the module's docstring)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        hooks: MemoryHooks,
        config: LocalConfig,
    ) -> None:
        self.tokenizer, self.config = tokenizer, config
        self.runner = Runner(model, hooks, config)
        num_layers = hooks.num_layers
        for layer in config.layers:
            if layer >= num_layers:
                raise InvalidArgument(
                    f"config.layers: layer {layer} does not exist (the model has {num_layers})"
                )
        layers = config.layers or tuple(range(num_layers))
        self.cells: list[Cell] = [(layer, site) for layer in layers for site in config.sites]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True).input_ids

    def target_tokens(self, prompt: str, target: str) -> list[int]:
        """The target's tokens as they follow the prompt (BPE merges across the boundary differ)."""
        prompt_ids, joint = self.encode(prompt), self.encode(prompt + target)
        if joint[: len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
            tokens = joint[len(prompt_ids) :]
        else:
            tokens = self.tokenizer(target, add_special_tokens=False).input_ids
        if not tokens:
            raise InvalidArgument(f"the target {target!r} has no tokens")
        if len(tokens) > MAX_TARGET_TOKENS:
            raise InvalidArgument(
                f"the target {target!r} has {len(tokens)} tokens; at most {MAX_TARGET_TOKENS}"
            )
        return tokens

    def train(
        self,
        fact: Fact,
        prompts: FactPrompts,
        other_prompts: Sequence[str],
        first: Sequence[Entry] = (),
        result: FactResult | None = None,
    ) -> FactResult:
        """Last-token entries for each target token the fact's entries so far (`first`) do not
        yet produce on the training positives."""
        if result is None:
            result = FactResult(fact, prompts, self.target_tokens(fact.prompt, fact.target))
        result.entries = [*first, *result.entries]
        prompt_ids = self.encode(fact.prompt)
        positives = [self.encode(p) for p in [fact.prompt, *prompts.train_positives]]
        negative_texts = list(dict.fromkeys([*prompts.train_negatives, *other_prompts]))
        negatives = [self.encode(p) for p in negative_texts]
        # Negatives are right when their next token does not change.
        expected_negatives = self.runner.next_tokens(negatives, [()] * len(negatives)) if negatives else []
        for k, token in enumerate(result.target_tokens):
            prefix = result.target_tokens[:k]
            contexts = [p + prefix for p in positives]
            checks = _Checks(contexts, negatives, expected_negatives)
            step: dict[str, Any] = {"token": self.tokenizer.decode([token])}
            result.steps.append(step)
            entries = tuple(result.entries)
            produced = self.runner.next_tokens(contexts, [entries] * len(contexts))
            if all(t == token for t in produced):
                step["entry"] = None  # the model already goes on with it
                continue
            entry, found = self._search(prompt_ids + prefix, token, checks, entries)
            entry.label = f"{fact.id}#{k}"
            result.entries.append(entry)
            step.update(found)
            # A training positive the entry does not reach gets a key of its own (as GRACE adds
            # a key for an input outside every radius), up to `extra_keys` per token.
            extra = []
            for j in range(self.config.extra_keys):
                entries = tuple(result.entries)
                produced = self.runner.next_tokens(contexts, [entries] * len(contexts))
                missed = [c for c, t in zip(contexts, produced, strict=True) if t != token]
                if not missed:
                    break
                entry, found = self._search(missed[0], token, checks, entries)
                entry.label = f"{fact.id}#{k}.{j + 1}"
                result.entries.append(entry)
                extra.append(found)
            if extra:
                step["extra_keys"] = extra
        return result

    def _search(
        self, sequence: list[int], token: int, checks: _Checks, entries: tuple[Entry, ...]
    ) -> tuple[Entry, dict[str, Any]]:
        """The entry that makes `token` follow `sequence` and the positives, and leaves the
        negatives' next tokens alone (the module docstring's steps 2 and 3); and what was
        found, for the job's details."""
        grads = self.runner.gradients(sequence, token, self.cells, entries)
        edits, edit_found = self._edits(sequence, token, grads, entries)
        ranked = self._ranked_boundaries(edits, grads, checks, entries)
        trials = self._trials(ranked, edits, grads)
        chosen, pos_ok, neg_ok = self._best_trial(trials, token, checks, entries)
        found = {
            "entry": f"layer {chosen.layer} {chosen.site}",
            "alpha": round(float(chosen.delta.norm() / grads[(chosen.layer, chosen.site)][1].norm()), 4),
            "bound": round(chosen.bound, 6),
            "edit_found": edit_found,
            "train_positives_correct": f"{pos_ok}/{len(checks.positives)}",
            "train_negatives_correct": f"{neg_ok}/{len(checks.negatives)}",
        }
        return chosen, found

    def _edits(
        self, sequence: list[int], token: int, grads: Gradients, entries: tuple[Entry, ...]
    ) -> tuple[dict[Cell, tuple[float, float]], bool]:
        """The edit: per cell, the smallest step α that makes the token the model's choice, with
        the token's log-probability; and whether any step did (if none, the step that makes the
        token most likely stands alone)."""
        alphas = self.config.alphas
        patches = [(cell, -alpha * grads[cell][1]) for cell in self.cells for alpha in alphas]
        logprobs = self.runner.edit_trials(sequence, patches, entries)
        edits: dict[Cell, tuple[float, float]] = {}
        best_try: tuple[float, Cell, float] | None = None
        for i, (cell, _) in enumerate(patches):
            alpha = alphas[i % len(alphas)]
            logprob = float(logprobs[i, token])
            if best_try is None or logprob > best_try[0]:
                best_try = (logprob, cell, alpha)
            if int(logprobs[i].argmax()) == token and cell not in edits:
                edits[cell] = (alpha, logprob)
        if edits:
            return edits, True
        assert best_try is not None
        return {best_try[1]: (best_try[2], best_try[0])}, False

    def _ranked_boundaries(
        self,
        edits: dict[Cell, tuple[float, float]],
        grads: Gradients,
        checks: _Checks,
        entries: tuple[Entry, ...],
    ) -> list[tuple[int, float, float, Cell, float]]:
        """The boundary: per edited cell, the threshold that puts the positives' last tokens near
        the key and every position of the negatives far; as (prompts right, gap, edit log-prob,
        cell, threshold), best first."""
        cells = list(edits)
        positives = len(checks.positives)
        seen = self.runner.activations(checks.rows, cells, entries)
        ranked = []
        for cell in cells:
            x = [_distance(a, grads[cell][0], self.config.distance) for a in seen[cell]]
            positive_x = [float(d[-1]) for d in x[:positives]]
            negative_x = [float(d.min()) for d in x[positives:]]
            threshold, correct, margin = _threshold(positive_x, negative_x)
            ranked.append((correct, margin, edits[cell][1], cell, threshold))
        ranked.sort(key=lambda r: (r[0], r[1], r[2]), reverse=True)
        return ranked

    def _trials(
        self,
        ranked: list[tuple[int, float, float, Cell, float]],
        edits: dict[Cell, tuple[float, float]],
        grads: Gradients,
    ) -> list[Entry]:
        """Candidate entries: the best cells, each with α and 2α."""
        config = self.config
        scale = math.log(2) ** (1 / (2 * config.hardness))  # f(x) >= 1/2 exactly when x <= b·scale
        trials: list[Entry] = []
        for _, _, _, cell, threshold in ranked[: config.candidates]:
            alpha = edits[cell][0]
            key, gradient = grads[cell]
            for factor in (1.0, 2.0):
                delta = -alpha * factor * gradient
                trials.append(Entry(cell[0], cell[1], key, delta, threshold / scale, config.hardness, ""))
        return trials

    def _best_trial(
        self, trials: list[Entry], token: int, checks: _Checks, entries: tuple[Entry, ...]
    ) -> tuple[Entry, int, int]:
        """Each trial checked for real, applied at every position of every training prompt: the
        one that puts the most right, with its positives and negatives right."""
        rows = checks.rows
        positives = len(checks.positives)
        row_entries = [(*entries, trial) for trial in trials for _ in rows]
        produced = self.runner.next_tokens(rows * len(trials), row_entries)
        scored = []
        for t, trial in enumerate(trials):
            out = produced[t * len(rows) : (t + 1) * len(rows)]
            pos_ok = sum(o == token for o in out[:positives])
            neg_ok = sum(o == e for o, e in zip(out[positives:], checks.expected, strict=True))
            # Ties go to the smaller step, then to the better-separated cell.
            scored.append((pos_ok + neg_ok, -t, trial, pos_ok, neg_ok))
        _, _, chosen, pos_ok, neg_ok = max(scored, key=lambda s: (s[0], s[1]))
        return chosen, pos_ok, neg_ok


def _previous(artifact: Artifact | None) -> tuple[list[dict[str, Any]], list[Entry]]:
    """The current version's facts and entries, to train a new version over them."""
    if artifact is None:
        return [], []
    entries: list[Entry] = []
    for i, group in enumerate(artifact.meta.details.get("groups", [])):
        t = {name: artifact.tensors[f"group{i}.{name}"] for name in ("keys", "deltas", "bounds", "hardness")}
        for j, label in enumerate(group["entries"]):
            entries.append(
                Entry(
                    layer=int(group["layer"]),
                    site=str(group["site"]),
                    key=t["keys"][j],
                    delta=t["deltas"][j],
                    bound=float(t["bounds"][j]),
                    hardness=float(t["hardness"][j]),
                    label=str(label),
                )
            )
    return list(artifact.meta.details.get("facts", [])), entries


def _groups(entries: list[Entry]) -> list[dict[str, Any]]:
    cells: dict[Cell, list[Entry]] = {}
    for entry in entries:
        cells.setdefault((entry.layer, entry.site), []).append(entry)
    return [
        {
            "layer": layer,
            "site": site,
            "labels": [e.label for e in group],
            "keys": torch.stack([e.key for e in group]),
            "deltas": torch.stack([e.delta for e in group]),
            "bounds": torch.tensor([e.bound for e in group]),
            "hardness": torch.tensor([e.hardness for e in group]),
        }
        for (layer, site), group in sorted(cells.items())
    ]


class SubjectFactTrainer:
    """The `subject` method: one subject entry per fact (values.py), then last-token entries by
    the blog's search only for the target tokens the subject entry does not yet produce on the
    training rows."""

    def __init__(self, blog: FactTrainer, layer: int) -> None:
        config = blog.config
        site = "mlp_down" if "mlp_down" in config.sites else config.sites[0]
        self.blog, self.config = blog, config
        runner = blog.runner
        self.values = ValueTrainer(runner.model, blog.tokenizer, runner.hooks, config, (layer, site))
        self.width = blog.runner._width((layer, site))

    def train(
        self,
        fact: Fact,
        prompts: FactPrompts,
        other_prompts: Sequence[str],
        other_subjects: Sequence[str],
        rng: random.Random,
    ) -> FactResult:
        tokenizer, config = self.blog.tokenizer, self.config
        subject = find_subject(fact.prompt, fact.subject)
        made = subject_prompts(fact.prompt, subject.text, config.generated_prompts, rng, list(other_subjects))
        targets = self.blog.target_tokens(fact.prompt, fact.target)
        at = lambda texts: [locate(tokenizer, t, subject.text) for t in texts]  # noqa: E731
        mentioning = lambda located: [x for x in located if x.subject_positions]  # noqa: E731
        rows = mentioning(at(dict.fromkeys([*made.train, *prompts.train_positives])))
        relations = mentioning(at(dict.fromkeys([*made.relations, *prompts.train_negatives])))
        contexts = mentioning(at(made.contexts))
        started = time.monotonic()
        key, required = self.values.key(rows)
        _, wanted = self.values.key(contexts) if contexts else (None, [])
        value = self.values.value(rows, targets, relations, self.width)
        value_seconds = time.monotonic() - started
        negatives = at([*made.neighbours, *prompts.train_negatives, *other_prompts, *GENERIC_NEIGHBOURS])
        threshold, inside, outside = self.values.boundary(key, required, wanted, negatives)
        entry = self.values.entry(key, value.delta, threshold, f"{fact.id}#s")
        # The blog's search then makes last-token entries where the subject entry falls short
        # on the fact's own prompt and its given positives (the rule-made rows train the value).
        blog_prompts = FactPrompts(
            train_positives=list(prompts.train_positives),
            train_negatives=list(dict.fromkeys([*prompts.train_negatives, *made.neighbours])),
            heldout_positives=prompts.heldout_positives,
            heldout_negatives=prompts.heldout_negatives,
            generated=len(made.train) - 1 + len(made.neighbours) + len(made.contexts) + len(made.relations),
        )
        result = FactResult(fact, blog_prompts, targets)
        result.subject = {
            "text": subject.text,
            "found_by": subject.found_by,
            "entry": f"layer {entry.layer} {entry.site}",
            "value_steps": value.steps,
            "target_nll": round(value.target_nll, 4),
            "relation_kl": round(value.relation_kl, 4),
            "bound": round(entry.bound, 5),
            "mentions_inside": f"{inside}/{len(required) + len(wanted)}",
            "value_seconds": round(value_seconds, 2),
            "negatives_outside": f"{outside}/{len(negatives) + 1}",  # and the background
            "training_rows": len(rows),
            "relations": len(relations),
            # Every sentence the entry was tuned on: the evaluation leaves these out.
            "prompts": {
                "rows": made.train,
                "relations": made.relations,
                "contexts": made.contexts,
                "neighbours": made.neighbours,
            },
        }
        return self.blog.train(fact, blog_prompts, other_prompts, first=[entry], result=result)


def train_set(spec: dict[str, Any], context: TrainContext) -> Trained:
    """Trains a new version of the set: its current facts, and entries for the given ones; then
    re-checks every fact of the set against all the others' entries, and trains again those that
    an entry of another broke."""
    spec = check_spec(spec)
    current = context.current_artifact()
    config = settings_over(current, spec["config"])
    loaded = context.model
    model, tokenizer = loaded.model, loaded.tokenizer
    try:
        hooks = MemoryHooks(model)  # the trainer's own: routing is per thread, serving is untouched
    except FailedPrecondition as exc:
        raise FailedPrecondition(f"local memories cannot train on this model: {exc}") from exc
    new_facts = [fact_from_dict(f) for f in spec["facts"]]
    old_facts, old_entries = _previous(current)
    if has_legacy_gates(current):
        # The set's answers are of the first gated form: its facts are trained again, from what
        # the set keeps of them, so that one set holds one form.
        given = {f.id for f in new_facts}
        new_facts = [_stored_fact(f) for f in old_facts if f["id"] not in given] + new_facts
        old_facts = []
    replaced = {f.id for f in new_facts}
    kept_facts = [f for f in old_facts if f["id"] not in replaced]
    kept_entries = [e for e in old_entries if e.label.split("#")[0] not in replaced]
    old_gates, old_cell = previous_gates(current)
    kept_gates = [g for g in old_gates if g.fact_id not in replaced]
    started = time.monotonic()
    steps = len(new_facts) + 1
    try:
        trainer = FactTrainer(model, tokenizer, hooks, config)
        subject_trainer = None
        gated_trainer = None
        layer = config.subject_layer if config.subject_layer >= 0 else int(hooks.num_layers * 0.27)
        if config.method in ("subject", "gated") and layer >= hooks.num_layers:
            raise InvalidArgument(
                f"config.subject_layer: layer {layer} does not exist (the model has {hooks.num_layers})"
            )
        cell = (layer, "mlp_down" if "mlp_down" in config.sites else config.sites[0])
        if config.method == "subject":
            subject_trainer = SubjectFactTrainer(trainer, layer)
        elif config.method == "gated":
            if old_cell is not None and old_cell != cell:
                raise FailedPrecondition(
                    f"the set's subject detectors are at layer {old_cell[0]} ({old_cell[1]}); "
                    f"this job asks for layer {cell[0]} ({cell[1]})"
                )
            gated_trainer = GatedFactTrainer(model, tokenizer, hooks, config, cell)
        rng = random.Random(config.seed)
        all_prompts = [f["prompt"] for f in kept_facts] + [f.prompt for f in new_facts]
        subjects = [f["subject"]["text"] for f in kept_facts if isinstance(f.get("subject"), dict)]
        subjects += [find_subject(f.prompt, f.subject).text for f in new_facts]

        def train_one(fact: Fact, prompts: FactPrompts) -> FactResult:
            others = [p for p in all_prompts if p != fact.prompt]
            others = rng.sample(others, min(OTHER_FACT_NEIGHBOURS, len(others)))
            if subject_trainer is None and gated_trainer is None:
                return trainer.train(fact, prompts, others)
            own = find_subject(fact.prompt, fact.subject).text.lower()
            other_subjects = [s for s in subjects if s.lower() != own]
            if subject_trainer is not None:
                return subject_trainer.train(fact, prompts, others, other_subjects, rng)
            assert gated_trainer is not None
            targets = trainer.target_tokens(fact.prompt, fact.target)
            gate, found = gated_trainer.train(fact, prompts, targets, others, other_subjects, rng)
            return FactResult(fact, prompts, targets, subject=found, gate=gate)

        split_config = replace(config, generated_prompts=0) if subject_trainer or gated_trainer else config
        results: list[FactResult] = []
        for i, fact in enumerate(new_facts):
            context.report(i, steps, message=f"fact {fact.id}")
            results.append(train_one(fact, split_prompts(fact, split_config, rng)))
        gates = kept_gates + [r.gate for r in results if r.gate is not None]
        context.report(len(new_facts), steps, message="re-checking every fact against the others")
        if gates:
            entries = kept_entries + [e for r in results for e in r.entries]
            details, tensors = _described(entries, gates, cell if gated_trainer else old_cell or cell)
            checked = in_memory_set("training", asdict(config), details, tensors, hooks, model)
            recheck = _gated_recheck(trainer, kept_facts, results, checked, hooks)
        else:
            recheck = _recheck(trainer, kept_facts, kept_entries, results)  # may add entries
            entries = kept_entries + [e for r in results for e in r.entries]
            details, tensors = _described(entries, [], cell)
        context.report(steps, steps, message="done")
    finally:
        hooks.remove()
    facts = kept_facts + [r.details(tokenizer) for r in results]
    details["facts"] = facts
    token_steps = [s for r in results for s in r.steps if s.get("entry")]
    metrics = {
        "facts": len(facts),
        "entries": len(entries) + sum(len(g.detectors) + len(g.answers) for g in gates),
        "gated_facts": len(gates),
        "new_facts": len(results),
        "new_entries": sum(len(r.entries) for r in results),
        "edits_found": sum(bool(s.get("edit_found")) for s in token_steps),
        "recheck": recheck,
        "train_seconds": round(time.monotonic() - started, 2),
    }
    return Trained(tensors=tensors, hyperparameters=asdict(config), metrics=metrics, details=details)


def _stored_fact(raw: dict[str, Any]) -> Fact:
    """A fact as a set's details keep it, to train it again: its given prompts and given subject."""
    subject = raw.get("subject")
    given = isinstance(subject, dict) and subject.get("found_by") == "given"
    return Fact(
        id=raw["id"],
        prompt=raw["prompt"],
        target=raw["target"],
        positive_prompts=(*raw.get("train_positives", ()), *raw.get("heldout_positives", ())),
        negative_prompts=(*raw.get("train_negatives", ()), *raw.get("heldout_negatives", ())),
        subject=str(subject["text"]) if given else "",
    )


def _recheck(
    trainer: FactTrainer,
    kept_facts: list[dict[str, Any]],
    kept_entries: list[Entry],
    results: list[FactResult],
) -> dict[str, Any]:
    """Sequential editing without silent interference: every fact's own prompt is run with the
    whole set; a new fact that fails is trained again with the others in place (its last-token
    entries then see them), an old one is reported (its prompts are not kept to train it again).
    Returns what was found, for the job's metrics."""
    everyone = [(f["id"], f["prompt"], f.get("target", "")) for f in kept_facts]
    everyone += [(r.fact.id, r.fact.prompt, r.fact.target) for r in results]
    entries = tuple(kept_entries + [e for r in results for e in r.entries])
    failing = _failing(trainer, everyone, entries)
    repaired: list[str] = []
    by_id = {r.fact.id: i for i, r in enumerate(results)}
    for fact_id in failing:
        if fact_id not in by_id:
            continue
        index = by_id[fact_id]
        old = results[index]
        others = [e for e in entries if e.label.split("#")[0] != fact_id]
        # The search runs with every other entry in place; only the fact's own entries are kept.
        retried = trainer.train(old.fact, old.prompts, [], first=[*others, *old.entries])
        added = [e for e in retried.entries if e not in others and e not in old.entries]
        for entry in added:
            entry.label += "r"
        old.entries = [*old.entries, *added]
        old.steps.append({"recheck": retried.steps})
        entries = tuple(kept_entries + [e for r in results for e in r.entries])
        if not _failing(trainer, [everyone[len(kept_facts) + index]], entries):
            repaired.append(fact_id)
    still = _failing(trainer, everyone, entries) if failing else []
    return {"checked": len(everyone), "failing": failing, "repaired": repaired, "still_failing": still}


def _described(
    entries: list[Entry], gates: list[FactGate], cell: tuple[int, str]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The artifact's details (but its facts) and tensors of a set's entries and gates."""
    groups = _groups(entries)
    tensors = group_tensors(groups)
    details: dict[str, Any] = {
        "groups": [{"layer": g["layer"], "site": g["site"], "entries": g["labels"]} for g in groups]
    }
    if gates:
        details["gates"], gated = gate_tensors(gates, cell)
        tensors.update(gated)
    return details, tensors


def _gated_recheck(
    trainer: FactTrainer,
    kept_facts: list[dict[str, Any]],
    results: list[FactResult],
    local_set: Any,
    hooks: MemoryHooks,
) -> dict[str, Any]:
    """Every fact's own prompt run with the whole set through the serving ops, teacher-forced:
    the facts that do not give their target are reported (a gated answer of another fact can
    only win on a prompt that mentions that fact's subject too)."""
    everyone = [(f["id"], f["prompt"], f.get("target", "")) for f in kept_facts]
    everyone += [(r.fact.id, r.fact.prompt, r.fact.target) for r in results]
    model = trainer.runner.model
    failing = _failing(trainer, everyone, (), lambda rows: next_tokens_with(model, hooks, local_set, rows))
    return {"checked": len(everyone), "failing": failing, "repaired": [], "still_failing": failing}


def _failing(
    trainer: FactTrainer,
    facts: list[tuple[str, str, str]],
    entries: tuple[Entry, ...],
    next_tokens: Any = None,
) -> list[str]:
    """The ids of the facts whose own prompt does not go on with every target token, teacher-forced."""
    rows, owners, wanted = [], [], []
    for fact_id, prompt, target in facts:
        if not target:
            continue
        prompt_ids, tokens = trainer.encode(prompt), trainer.target_tokens(prompt, target)
        for k, token in enumerate(tokens):
            rows.append(prompt_ids + tokens[:k])
            owners.append(fact_id)
            wanted.append(token)
    if next_tokens is None:
        produced = trainer.runner.next_tokens(rows, [entries] * len(rows)) if rows else []
    else:
        produced = next_tokens(rows) if rows else []
    return list(dict.fromkeys(o for o, p, w in zip(owners, produced, wanted, strict=True) if p != w))
