"""The FEVER study's few-shot factuality protocol (docs/design.md, "adapter"): claims, shots,
prompts, answer parsing and scores. Torch-free: the CLI checks a claims file with it offline.

A claim about a document is labelled `supports`, `refutes` or `not enough info`. The model
is asked, with the study's prompt and k solved examples before the claim:

    Determine the factuality of the following claims
    Answer candidates: (a) supports, (b) refutes, (c) not enough info
    Claim: <a training claim>
    A: (b)
    ...
    Claim: <the test claim>
    A:

**Shots** are training claims about the same document, covering the labels in turn, topped up
from other documents' training claims when the document has too few, and shown in a seeded
random order (in a fixed order, the default model answers by continuing the letters).

**Answer parsing** (the study does not show its rule; this one is strict, like its near-zero
zero-shot scores suggest): the greedy continuation, stripped, must begin with the letter of
an answer candidate in parentheses ("(a)", "(a) supports"), with "a)", or with a bare letter
that ends the answer or is followed by punctuation ("a", "a."; "A Dunhaven fund ..." is the
article, not an answer), or with one of the label words ("supports", "refutes", "not enough
info", any case). Anything else is *invalid* and counts as wrong.

**Metrics**: accuracy (invalid answers wrong); micro-F1 over the three labels (an invalid
answer is a false negative of its gold label and a false positive of none, so micro-F1
equals accuracy only when every answer is valid); macro-F1 (the mean of the labels' F1);
the invalid rate and the confusion matrix.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memserve.jsonl import json_objects

LABELS = ("supports", "refutes", "not enough info")
LETTERS = ("a", "b", "c")
INSTRUCTION = (
    "Determine the factuality of the following claims\n"
    "Answer candidates: (a) supports, (b) refutes, (c) not enough info\n"
)
INVALID = "invalid"
MAX_CLAIM_CHARS = 2000

# A candidate's letter: "(a)", "a)", or a bare "a" that ends the answer or is followed by
# punctuation; "a" before a word is the article ("A Dunhaven fund ..."), not an answer.
_LETTER = re.compile(r"\(([abc])\)|([abc])(?:\)|[.:,]|\s*$|\s*\n)", re.IGNORECASE)


@dataclass(frozen=True)
class Claim:
    id: str
    document: str
    claim: str
    label: str
    split: str  # "train" or "test"


def read_claims(path: Path) -> list[Claim]:
    """Claims from a JSONL file of {id, document, claim, label, split}; ValueError, with the line,
    for anything else."""
    return claims_from(json_objects(path.read_text(encoding="utf-8"), str(path)), str(path))


def claims_from(rows: Iterable[tuple[str, Any]], source: str) -> list[Claim]:
    """Claims from (where, row) pairs of {id, document, claim, label, split}; ValueError, saying
    where, for anything else."""
    claims: list[Claim] = []
    seen: set[str] = set()
    for where, row in rows:
        claim = _claim(where, row)
        if claim.id in seen:
            raise ValueError(f"{where}: claim id {claim.id!r} appears twice")
        seen.add(claim.id)
        claims.append(claim)
    if not any(c.split == "test" for c in claims):
        raise ValueError(f"{source} has no test claims")
    return claims


def _claim(where: str, row: Any) -> Claim:
    if not isinstance(row, dict):
        raise ValueError(f"{where} must be an object with id, document, claim, label and split")
    missing = [k for k in ("id", "document", "claim", "label", "split") if not isinstance(row.get(k), str)]
    if missing:
        raise ValueError(f"{where} needs string fields {missing}")
    if row["label"] not in LABELS:
        raise ValueError(f"{where}: label {row['label']!r} is not one of {list(LABELS)}")
    if row["split"] not in ("train", "test"):
        raise ValueError(f"{where}: split {row['split']!r} is not 'train' or 'test'")
    if not row["claim"].strip() or len(row["claim"]) > MAX_CLAIM_CHARS:
        raise ValueError(f"{where}: the claim must have 1 to {MAX_CLAIM_CHARS} characters")
    return Claim(row["id"], row["document"], row["claim"].strip(), row["label"], row["split"])


def answer_of(label: str) -> str:
    return f"({LETTERS[LABELS.index(label)]})"


def shots_for(claim: Claim, train: Sequence[Claim], k: int, seed: int = 0) -> list[Claim]:
    """k training claims for `claim`: its document's first, covering the labels in turn (in an
    order drawn per claim), then other documents'; shown in a shuffled order. A fixed order would
    let a small model answer by continuing the letters: after "(a)", "(b)", "(c)" it says "(d)"."""
    if k == 0:
        return []
    rng = random.Random(f"{seed}:{claim.id}")
    own = [c for c in train if c.document == claim.document and c.id != claim.id]
    others = [c for c in train if c.document != claim.document]
    picked = _round_robin(own, rng)[:k]
    if len(picked) < k:
        picked += _round_robin(others, rng)[: k - len(picked)]
    rng.shuffle(picked)
    return picked


def _round_robin(claims: list[Claim], rng: random.Random) -> list[Claim]:
    """The claims shuffled, then ordered one label after another, the labels in a random order."""
    labels = list(LABELS)
    rng.shuffle(labels)
    by_label = {label: [c for c in claims if c.label == label] for label in labels}
    for group in by_label.values():
        rng.shuffle(group)
    ordered: list[Claim] = []
    while any(by_label.values()):
        for label in labels:
            if by_label[label]:
                ordered.append(by_label[label].pop())
    return ordered


def prompt_for(claim: Claim, shots: Sequence[Claim]) -> str:
    solved = "".join(f"Claim: {s.claim}\nA: {answer_of(s.label)}\n" for s in shots)
    return f"{INSTRUCTION}{solved}Claim: {claim.claim}\nA:"


def template_for(claim: Claim) -> dict[str, str]:
    """A training claim as a question/answer template (the study's "Temp" data), zero-shot form."""
    return {"question": prompt_for(claim, []), "answer": f" {answer_of(claim.label)}"}


def parse_answer(text: str) -> str:
    """The label a continuation gives, or INVALID (the module's rule)."""
    stripped = text.strip().lower()
    for label in LABELS:
        if stripped.startswith(label):
            return label
    match = _LETTER.match(stripped)
    return LABELS[LETTERS.index((match.group(1) or match.group(2)).lower())] if match else INVALID


def scores(gold: Sequence[str], predicted: Sequence[str]) -> dict[str, Any]:
    """Accuracy, micro- and macro-F1 over LABELS (invalid answers: wrong, no label's positive)."""
    total = len(gold)
    correct = sum(g == p for g, p in zip(gold, predicted, strict=True))
    per_label: dict[str, dict[str, float]] = {}
    tp_all = fp_all = fn_all = 0
    for label in LABELS:
        tp = sum(g == label and p == label for g, p in zip(gold, predicted, strict=True))
        fp = sum(g != label and p == label for g, p in zip(gold, predicted, strict=True))
        fn = sum(g == label and p != label for g, p in zip(gold, predicted, strict=True))
        tp_all, fp_all, fn_all = tp_all + tp, fp_all + fp, fn_all + fn
        per_label[label] = {
            "precision": _ratio(tp, tp + fp),
            "recall": _ratio(tp, tp + fn),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "support": tp + fn,
        }
    confusion = {g: {p: 0 for p in (*LABELS, INVALID)} for g in LABELS}
    for g, p in zip(gold, predicted, strict=True):
        confusion[g][p] += 1
    return {
        "claims": total,
        "accuracy": _ratio(correct, total),
        "micro_f1": _ratio(2 * tp_all, 2 * tp_all + fp_all + fn_all),
        "macro_f1": sum(v["f1"] for v in per_label.values()) / len(LABELS),
        "invalid_rate": _ratio(sum(p == INVALID for p in predicted), total),
        "per_label": per_label,
        "confusion": confusion,
    }


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def prompts_for(claims: Sequence[Claim], k: int, seed: int = 0) -> list[str]:
    """The prompt of every test claim with k shots."""
    train = [c for c in claims if c.split == "train"]
    return [prompt_for(c, shots_for(c, train, k, seed)) for c in claims if c.split == "test"]


def about_claims(claims: Sequence[Claim]) -> dict[str, Any]:
    test = [c for c in claims if c.split == "test"]
    return {
        "documents": len({c.document for c in claims}),
        "train_claims": len(claims) - len(test),
        "test_claims": len(test),
        "test_labels": {label: sum(c.label == label for c in test) for label in LABELS},
    }
