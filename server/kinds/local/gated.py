"""The `gated` method's trainer: per fact, a subject detector (values.py's key and boundary) and
answers at the LM head's input (answers.py), stored as a set's gates (gates.py)."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memserve.kinds.local.answers import Answer, AnswerTrainer
from memserve.kinds.local.config import Fact
from memserve.kinds.local.forms import subject_forms
from memserve.kinds.local.gates import GATE_TENSORS
from memserve.kinds.local.module import LoadedLocalSet
from memserve.kinds.local.prompts import GENERIC_NEIGHBOURS, FactPrompts
from memserve.kinds.local.relations import TEMPLATES, match_relation, relation_rows
from memserve.kinds.local.runner import _distance
from memserve.kinds.local.subject import find_subject, rewordings, subject_prompts
from memserve.kinds.local.values import ValueTrainer, locate
from memserve.memory.hooks import MemoryContext, MemoryHooks
from memserve.memory.kind import LoadTarget, MemoryRefSpec
from memserve.memory_store.artifact import Artifact, MemoryMeta
from memserve.padding import pad_rows

# Keys per other form of a subject (forms.py): its mid-sentence and text-initial spellings.
FORM_KEYS = 2


@dataclass
class Detector:
    key: torch.Tensor  # (D_site,)
    bound: float
    hardness: float


@dataclass
class FactGate:
    """One fact's subject detectors (one per form of the subject that needs its own key) and
    answers."""

    fact_id: str
    detectors: list[Detector] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)

    def detector_labels(self) -> list[str]:
        return [self.fact_id if i == 0 else f"{self.fact_id}@{i}" for i in range(len(self.detectors))]

    def answer_labels(self) -> list[str]:
        """`fact#token.row`: the answer for target token `token` from training row `row`."""
        labels, rows = [], {}
        for answer in self.answers:
            row = rows.get(answer.token_index, 0)
            rows[answer.token_index] = row + 1
            labels.append(f"{self.fact_id}#{answer.token_index}.{row}")
        return labels

    def labels(self) -> list[str]:
        """The names of its detectors and answers, as traces and the set's details give them."""
        return [*self.detector_labels(), *self.answer_labels()]


class GatedFactTrainer:
    """Makes the gates of facts at the detector cell `cell` (see the module's docstring)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        hooks: MemoryHooks,
        config: Any,
        cell: tuple[int, str],
    ) -> None:
        self.tokenizer, self.config, self.cell = tokenizer, config, cell
        self.detectors = ValueTrainer(model, tokenizer, hooks, config, cell)
        self.answers = AnswerTrainer(model, config)

    def _detector(self, key: torch.Tensor, threshold: float) -> Detector:
        entry = self.detectors.entry(key, torch.zeros(1), threshold, "")
        return Detector(key.float(), entry.bound, entry.hardness)

    def train(
        self,
        fact: Fact,
        prompts: FactPrompts,
        targets: list[int],
        other_prompts: Sequence[str],
        other_subjects: Sequence[str],
        rng: random.Random,
    ) -> tuple[FactGate, dict[str, Any]]:
        """The fact's gate and what was found (the job's details)."""
        config, tokenizer = self.config, self.tokenizer
        subject = find_subject(fact.prompt, fact.subject)
        made = subject_prompts(fact.prompt, subject.text, config.generated_prompts, rng, list(other_subjects))
        at = lambda texts: [locate(tokenizer, t, subject.text) for t in texts]  # noqa: E731
        mentioning = lambda located: [x for x in located if x.subject_positions]  # noqa: E731
        started = time.monotonic()
        # The relation the prompt asks for, asked other ways (relations.py): more rows, so that
        # the answers know the distributions of the relation's other wordings.
        relation = match_relation(fact.prompt, subject.text)
        use = relation is not None and config.relation_rows == "templates"
        asked = relation_rows(relation.relation, subject.text) if use and relation else []
        asked = [t for t in asked if t not in made.train and t not in prompts.train_positives]
        row_texts = list(dict.fromkeys([*made.train, *asked, *prompts.train_positives]))
        located = {t: x for t, x in zip(row_texts, at(row_texts), strict=True) if x.subject_positions}
        # The detector's key, and the mentions it must take in, are the prompt's own form of the
        # subject (behind prefixes); reworded forms ("Japan's") and the subject in other sentences
        # are taken in only as far as no other subject comes nearer: a detector wide enough for
        # every form would fire on everything.
        reworded = {*rewordings(fact.prompt, subject.text), *asked, *prompts.train_positives} - {fact.prompt}
        own_form = [x for t, x in located.items() if t not in reworded]
        other_forms = [x for t, x in located.items() if t in reworded] + mentioning(at(made.contexts))
        key, required = self.detectors.key(own_form)
        _, wanted = self.detectors.key(other_forms) if other_forms else (None, [])
        negatives = at([*made.neighbours, *prompts.train_negatives, *other_prompts, *GENERIC_NEIGHBOURS])
        threshold, inside, outside = self.detectors.boundary(key, required, wanted, negatives)
        detectors = [self._detector(key, threshold)]
        # Any mention the key's boundary leaves out gets a key of its own, as GRACE adds a key for
        # an input outside every radius: the training rows' first, then the subject in other
        # sentences and relations. A text that starts with the subject spells it without the
        # leading space ("Mozart" is three tokens there, " Mozart" one), the common such case.
        _, relation_mentions = self.detectors.key(mentioning(at(made.relations)))
        self._cover([*required, *wanted, *relation_mentions], negatives, detectors, config.extra_keys)
        # Other forms of the subject ("Mozart", "the Japanese government"): keys of their own,
        # bounded away from what names something else that way (forms.py).
        forms = []
        for form in subject_forms(subject.text):
            said = mentioning([locate(tokenizer, t, form.text) for t in form.sentences])
            if not said:
                continue
            _, mentions = self.detectors.key(said)
            before = len(detectors)
            self._cover(mentions, [*negatives, *at(form.others)], detectors, FORM_KEYS)
            forms.append({"text": form.text, "how": form.how, "detectors": len(detectors) - before})
        # Answers: the rows' own distributions, kept away from the subject's other relations (the
        # given negatives that mention it too).
        others = mentioning(at(dict.fromkeys([*made.relations, *made.contexts, *prompts.train_negatives])))
        own = [x for t, x in located.items() if t not in asked]
        answers, searches = self.answers.answers([r.ids for r in own], [o.ids for o in others], targets)
        templated = [x for t, x in located.items() if t in asked]
        if templated and relation is not None:
            # A template's row asks the relation in words the user did not write; its answer is
            # bounded away from every other relation's templates about the subject too ("The
            # capital of Nepal is" from "The official language of Nepal is"), which the prompt's
            # own rows are not: bounding those so cut the rewordings taken in by a third.
            elsewhere = [
                t
                for name in TEMPLATES
                if name != relation.relation
                for t in relation_rows(name, subject.text)
            ]
            bounded_by = [o.ids for o in [*others, *mentioning(at(elsewhere))]]
            more, more_searches = self.answers.answers([r.ids for r in templated], bounded_by, targets)
            answers += more
            for search, extra in zip(searches, more_searches, strict=True):
                search.template_rows_inside, search.template_rows = extra.rows_inside, extra.rows
        gate = FactGate(fact.id, detectors, answers)
        details = {
            "text": subject.text,
            "found_by": subject.found_by,
            "relation": {"name": relation.relation, "score": relation.score} if relation else None,
            "detector": f"layer {self.cell[0]} {self.cell[1]}",
            "bound": round(detectors[0].bound, 5),
            "detectors": len(detectors),
            "forms": forms,
            "mentions_inside": f"{inside}/{len(required) + len(wanted)}",
            "negatives_outside": f"{outside}/{len(negatives) + 1}",  # and the background
            "answers": [
                {
                    "token": tokenizer.decode([s.token]),
                    "rows_inside": f"{s.rows_inside}/{s.rows}",
                    "template_rows_inside": f"{s.template_rows_inside}/{s.template_rows}",
                    "nearest_other_relation": round(s.nearest_other, 4),
                    "boost": round(s.boost, 3),
                }
                for s in searches
            ],
            "seconds": round(time.monotonic() - started, 2),
            # Every sentence the gate was tuned on: the evaluation leaves these out.
            "prompts": {
                "rows": [*made.train, *asked],
                "relations": made.relations,
                "contexts": made.contexts,
                "neighbours": made.neighbours,
            },
        }
        return gate, details

    def _cover(
        self,
        mentions: Sequence[torch.Tensor],
        negatives: Sequence[Any],
        detectors: list[Detector],
        limit: int,
    ) -> None:
        """Adds up to `limit` detectors, in order, for the mentions that no detector takes in; each
        new one's boundary takes in as many of the mentions still left out as no negative prevents."""
        added = 0
        left = [m for m in mentions if not _inside(m, detectors)]
        while left and added < limit:
            mention, rest = left[0], left[1:]
            threshold, _, _ = self.detectors.boundary(mention, [mention], rest, negatives)
            detectors.append(self._detector(mention, threshold))
            added += 1
            left = [m for m in rest if not _inside(m, detectors)]


def _inside(mention: torch.Tensor, detectors: Sequence[Detector]) -> bool:
    return any(float(_distance(mention[None], d.key, "euclidean")[0]) <= _half(d) for d in detectors)


def _half(detector: Detector) -> float:
    """The distance at which a detector's trigger is ½ (it counts as having seen the subject)."""
    return detector.bound * math.log(2) ** (1 / (2 * detector.hardness))


def gate_tensors(
    gates: Sequence[FactGate], cell: tuple[int, str]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A set's gates as its artifact keeps them: (details["gates"], tensors under "gates.")."""
    subjects, subject_facts, detectors = [], [], []
    labels, owners, answers = [], [], []
    for i, gate in enumerate(gates):
        subjects += gate.detector_labels()
        subject_facts += [i] * len(gate.detectors)
        detectors += gate.detectors
        labels += gate.answer_labels()
        owners += [i] * len(gate.answers)
        answers += gate.answers
    tensors = {
        "subject_keys": torch.stack([d.key.float() for d in detectors]),
        "subject_bounds": torch.tensor([d.bound for d in detectors]),
        "subject_hardness": torch.tensor([d.hardness for d in detectors]),
        "subject_facts": torch.tensor(subject_facts, dtype=torch.long),
        "answer_facts": torch.tensor(owners, dtype=torch.long),
        "answer_tokens": torch.tensor([a.token_index for a in answers], dtype=torch.long),
        "answer_ids": torch.stack([a.ids for a in answers]).long(),
        "answer_reference": torch.stack([a.reference.float() for a in answers]),
        "answer_bounds": torch.tensor([a.bound for a in answers]),
        "answer_hardness": torch.tensor([a.hardness for a in answers]),
        "answer_targets": torch.tensor([a.target for a in answers], dtype=torch.long),
        "answer_boosts": torch.tensor([a.boost for a in answers]),
    }
    assert set(tensors) == set(GATE_TENSORS)
    described = {
        "detector": {"layer": cell[0], "site": cell[1]},
        "facts": [g.fact_id for g in gates],
        "subjects": subjects,
        "answers": labels,
    }
    return described, {f"gates.{k}": v.detach().cpu().contiguous() for k, v in tensors.items()}


def has_legacy_gates(artifact: Artifact | None) -> bool:
    """Whether a set's gated answers are the first form (a value at the head's input): a new
    version trains their facts again rather than mix the two."""
    return artifact is not None and "gates.answer_values" in artifact.tensors


def previous_gates(artifact: Artifact | None) -> tuple[list[FactGate], tuple[int, str] | None]:
    """The gates of a set's current version (to train a new version over them) and their cell."""
    if artifact is None or not artifact.meta.details.get("gates"):
        return [], None
    described = artifact.meta.details["gates"]
    if has_legacy_gates(artifact):
        detector = described["detector"]
        return [], (int(detector["layer"]), str(detector["site"]))
    t = {k[len("gates.") :]: v for k, v in artifact.tensors.items() if k.startswith("gates.")}
    gates = [FactGate(str(name)) for name in described["facts"]]
    for i in range(len(described["subjects"])):
        gates[int(t["subject_facts"][i])].detectors.append(
            Detector(t["subject_keys"][i], float(t["subject_bounds"][i]), float(t["subject_hardness"][i]))
        )
    for j in range(len(described["answers"])):
        gates[int(t["answer_facts"][j])].answers.append(
            Answer(
                int(t["answer_tokens"][j]),
                t["answer_ids"][j],
                t["answer_reference"][j],
                float(t["answer_bounds"][j]),
                float(t["answer_hardness"][j]),
                int(t["answer_targets"][j]),
                float(t["answer_boosts"][j]),
            )
        )
    detector = described["detector"]
    return gates, (int(detector["layer"]), str(detector["site"]))


def in_memory_set(
    name: str,
    hyperparameters: dict[str, Any],
    details: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    hooks: MemoryHooks,
    model: PreTrainedModel,
) -> LoadedLocalSet:
    """A set being trained, loaded as the server would load it (to check it with the serving ops)."""
    meta = MemoryMeta(
        kind="local", name=name, base_model="", hyperparameters=hyperparameters, details=details
    )
    parameter = next(model.parameters())
    config = model.config
    target = LoadTarget(parameter.device, parameter.dtype, hooks, hooks.num_layers, config.hidden_size)
    return LoadedLocalSet(Artifact(meta, tensors), target)


@torch.no_grad()
def next_tokens_with(
    model: PreTrainedModel, hooks: MemoryHooks, local_set: LoadedLocalSet, sequences: Sequence[list[int]]
) -> list[int]:
    """The greedy next token after each sequence with the set attached, through the serving ops."""
    bound = local_set.bind(MemoryRefSpec(name=local_set.name, kind="local"))
    device = next(model.parameters()).device
    out: list[int] = []
    for start in range(0, len(sequences), 16):
        batch = list(sequences[start : start + 16])
        ids, mask = pad_rows(batch, 0, left=False, device=device)
        context = MemoryContext(mask=mask)
        bound.add_ops(context, torch.arange(len(batch), device=device))
        with hooks.using(context):
            logits = model(input_ids=ids, attention_mask=mask).logits
        context.finish()
        last = mask.sum(-1) - 1
        out += logits[torch.arange(len(batch), device=device), last].argmax(-1).tolist()
    return out
