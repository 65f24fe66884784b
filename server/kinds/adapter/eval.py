"""The few-shot factuality evaluation of the FEVER study (docs/design.md, "adapter").

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

**By likelihood** (an addition, not the study's): the label whose answer " (a)", " (b)" or
" (c)" is the most likely continuation of the prompt. It never gives an invalid answer, so it
tells what the model prefers even when its greedy output breaks the format.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memserve.engine.threads import run_in_compute_thread
from memserve.errors import InvalidArgument
from memserve.jsonl import json_objects
from memserve.kinds.adapter.config import FactualityOptions
from memserve.memory.evaluation import EvalContext
from memserve.memory.options import options_from_spec

LABELS = ("supports", "refutes", "not enough info")
LETTERS = ("a", "b", "c")
INSTRUCTION = (
    "Determine the factuality of the following claims\n"
    "Answer candidates: (a) supports, (b) refutes, (c) not enough info\n"
)
INVALID = "invalid"
MAX_SHOTS = 5
ANSWER_TOKENS = 6  # enough for "(c) not enough info"'s first words; parsing reads the start only
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
        per_label[label] = {"precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
                            "f1": _ratio(2 * tp, 2 * tp + fp + fn), "support": tp + fn}  # fmt: skip
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


Generate = Callable[[list[str]], list[str]]
"""Greedy continuations (text) of prompts, batched."""


def evaluate(
    claims: Sequence[Claim], shots: Sequence[int], generate: Generate, seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """For each k in `shots`: the test claims' answers with k shots, and their scores."""
    if any(not 0 <= k <= MAX_SHOTS for k in shots):
        raise ValueError(f"shots must be 0 to {MAX_SHOTS}, got {list(shots)}")
    test = [c for c in claims if c.split == "test"]
    results: dict[str, Any] = {}
    for done, k in enumerate(shots, 1):
        prompts = prompts_for(claims, k, seed)
        answers = generate(prompts)
        predicted = [parse_answer(a) for a in answers]
        results[str(k)] = {
            **scores([c.label for c in test], predicted),
            "answers": [
                {"id": c.id, "label": c.label, "predicted": p, "output": a}
                for c, p, a in zip(test, predicted, answers, strict=True)
            ],
        }
        if progress:
            progress(done)
    return results


def prompts_for(claims: Sequence[Claim], k: int, seed: int = 0) -> list[str]:
    """The prompt of every test claim with k shots."""
    train = [c for c in claims if c.split == "train"]
    return [prompt_for(c, shots_for(c, train, k, seed)) for c in claims if c.split == "test"]


def add_likelihood(results: dict[str, Any], claims: Sequence[Claim], rank: Callable[[str], str],
                   seed: int = 0) -> None:  # fmt: skip
    """Adds, for each k in `results`, the scores of the label chosen by likelihood (`rank`)."""
    test = [c for c in claims if c.split == "test"]
    for k, result in results.items():
        chosen = [rank(p) for p in prompts_for(claims, int(k), seed)]
        likely = scores([c.label for c in test], chosen)
        result["by_likelihood"] = {
            key: likely[key] for key in ("accuracy", "micro_f1", "macro_f1", "confusion")
        }
        for answer, label in zip(result["answers"], chosen, strict=True):
            answer["likely"] = label


def write_report(out: Path, title: str, results: dict[str, Any], about: dict[str, Any]) -> None:
    """`out`/metrics.json (without the per-claim answers, which go to answers.jsonl) and report.md."""
    out.mkdir(parents=True, exist_ok=True)
    summary = {k: {key: v for key, v in r.items() if key != "answers"} for k, r in results.items()}
    (out / "metrics.json").write_text(json.dumps({**about, "shots": summary}, indent=2) + "\n")
    with (out / "answers.jsonl").open("w") as file:
        for k, r in results.items():
            for answer in r["answers"]:
                file.write(json.dumps({"shots": int(k), **answer}) + "\n")
    lines = [f"# {title}", ""]
    lines += [f"- {key}: {value}" for key, value in about.items()]
    lines += [
        "",
        "| shots | accuracy | micro-F1 | macro-F1 | invalid | claims |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for k, r in summary.items():
        lines.append(f"| {k} | {r['accuracy']:.3f} | {r['micro_f1']:.3f} | {r['macro_f1']:.3f} | "
                     f"{r['invalid_rate']:.3f} | {r['claims']} |")  # fmt: skip
    if all("by_likelihood" in r for r in summary.values()):
        lines += ["", "By likelihood (the most likely of the three answers; never invalid):", "",
                  "| shots | accuracy | macro-F1 |", "|---:|---:|---:|"]  # fmt: skip
        for k, r in summary.items():
            likely = r["by_likelihood"]
            lines.append(f"| {k} | {likely['accuracy']:.3f} | {likely['macro_f1']:.3f} |")
    for k, r in summary.items():
        lines += ["", f"## {k} shots: confusion (rows gold, columns predicted)", "",
                  "| gold | " + " | ".join((*LABELS, INVALID)) + " |", "|---" * 5 + "|"]  # fmt: skip
        for gold in LABELS:
            lines.append(
                f"| {gold} | " + " | ".join(str(r["confusion"][gold][p]) for p in (*LABELS, INVALID)) + " |"
            )
    lines += ["", "Answer parsing and metrics: `server/factuality.py` (module docstring)."]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def about_claims(claims: Sequence[Claim]) -> dict[str, Any]:
    test = [c for c in claims if c.split == "test"]
    return {
        "documents": len({c.document for c in claims}),
        "train_claims": len(claims) - len(test),
        "test_claims": len(test),
        "test_labels": {label: sum(c.label == label for c in test) for label in LABELS},
    }


def run(options: dict[str, Any], context: EvalContext) -> None:
    """The kind's evaluation: few-shot factuality of the model, with the adapter if there is one."""
    given = dict(options)
    rows = given.pop("claims", None)
    if not isinstance(rows, list) or not rows:
        raise InvalidArgument(
            "a factuality evaluation needs claims: a list of {id, document, claim, label, split}"
        )
    try:
        claims = claims_from(((f"claims[{i}]", row) for i, row in enumerate(rows)), "the claims")
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None
    source = str(given.pop("source", "claims"))
    settings = options_from_spec(FactualityOptions, given, "factuality evaluation")
    artifact = context.artifact
    results = evaluate_model(context, claims, settings.shots, settings.seed)
    adapter = f"{artifact.meta.name}@{artifact.meta.version}" if artifact else None
    about = {"claims_file": source, "adapter": adapter, "model": context.model.name, **about_claims(claims)}
    title = f"Factuality of {source}, " + (f"adapter {adapter}" if adapter else "base model")
    write_report(context.out, title, results, about)


def evaluate_model(
    context: EvalContext, claims: Sequence[Claim], shots: Sequence[int], seed: int = 0
) -> dict[str, Any]:
    """`evaluate` through the context's engine, with the context's adapter (if any) attached to
    every request."""
    from memserve.engine.offline import generate_all
    from memserve.kinds.adapter.module import LoadedAdapter
    from memserve.memory.kind import MemoryRefSpec

    tokenizer, adapter = context.model.tokenizer, context.artifact
    memories: tuple[Any, ...] = ()
    if adapter is not None:
        loaded_adapter = LoadedAdapter(adapter, context.target)
        memories = (loaded_adapter.bind(MemoryRefSpec(name=adapter.meta.name, kind="adapter")),)

    def generate(prompts: list[str]) -> list[str]:
        encoded = [tokenizer(p, add_special_tokens=True).input_ids for p in prompts]
        outputs = generate_all(context.engine, encoded, memories, ANSWER_TOKENS)
        return [tokenizer.decode(o, skip_special_tokens=True) for o in outputs]

    def progress(done: int) -> None:
        context.progress(done, len(shots), f"{done} of {len(shots)} shot counts")

    results = evaluate(claims, shots, generate, seed, progress)
    rank = _likelihood_ranker(context.model, context.engine.hooks, memories)
    # In a thread of its own: the forward passes run beside the engine thread, one OpenMP team each.
    run_in_compute_thread(lambda: add_likelihood(results, claims, rank, seed), name="factuality-likelihood")
    return results


def _likelihood_ranker(loaded: Any, hooks: Any, memories: tuple[Any, ...]) -> Callable[[str], str]:
    """rank(prompt): the label whose answer is the most likely continuation (summed log-probs)."""
    import torch

    from memserve.memory.hooks import MemoryContext

    model, tokenizer = loaded.model, loaded.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0

    def rank(prompt: str) -> str:
        base = tokenizer(prompt, add_special_tokens=True).input_ids
        rows = [
            tokenizer(f"{prompt} {answer_of(label)}", add_special_tokens=True).input_ids for label in LABELS
        ]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=loaded.device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=loaded.device)
        context = MemoryContext()
        for memory in memories:
            memory.add_ops(context, torch.arange(len(rows), device=loaded.device))
        with torch.inference_mode(), hooks.using(context) if hooks is not None else contextlib.nullcontext():
            logprobs = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        totals = []
        for i, row in enumerate(rows):
            start = len(base) if row[: len(base)] == base else len(base) - 1  # where the answer begins
            positions = torch.arange(start, len(row), device=loaded.device)
            totals.append(
                float(logprobs[i, positions - 1, torch.tensor(row[start:], device=loaded.device)].sum())
            )
        return LABELS[max(range(len(LABELS)), key=totals.__getitem__)]

    return rank


def _main() -> None:
    """python -m memserve.kinds.adapter.eval templates CLAIMS.jsonl OUT.jsonl: the training claims as
    question/answer templates (the study's "Temp" data), for `memserve adapters add --templates`."""
    import sys

    if len(sys.argv) != 4 or sys.argv[1] != "templates":
        sys.exit("usage: python -m memserve.kinds.adapter.eval templates CLAIMS.jsonl OUT.jsonl")
    claims = read_claims(Path(sys.argv[2]))
    lines = [json.dumps(template_for(c)) for c in claims if c.split == "train"]
    Path(sys.argv[3]).write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} templates to {sys.argv[3]}")


if __name__ == "__main__":
    _main()
