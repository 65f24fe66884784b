"""The factuality evaluation of an adapter (or the base model): the study's protocol
(`memserve.kinds.adapter.claims`) run through the serving engine, scored, and written as a report.

**By likelihood** (an addition, not the study's): the label whose answer " (a)", " (b)" or
" (c)" is the most likely continuation of the prompt. It never gives an invalid answer, so it
tells what the model prefers even when its greedy output breaks the format.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from memserve.engine.threads import run_in_compute_thread
from memserve.errors import InvalidArgument
from memserve.kinds.adapter.claims import (
    INVALID,
    LABELS,
    Claim,
    about_claims,
    answer_of,
    claims_from,
    parse_answer,
    prompts_for,
    read_claims,
    scores,
    template_for,
)
from memserve.kinds.adapter.config import FactualityOptions
from memserve.memory.evaluation import EvalContext
from memserve.memory.options import options_from_spec

MAX_SHOTS = 5
ANSWER_TOKENS = 6  # enough for "(c) not enough info"'s first words; parsing reads the start only

Generate = Callable[[list[str]], list[str]]
"""Greedy continuations (text) of prompts, batched."""


def evaluate(
    claims: Sequence[Claim],
    shots: Sequence[int],
    generate: Generate,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
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


def add_likelihood(
    results: dict[str, Any], claims: Sequence[Claim], rank: Callable[[str], str], seed: int = 0
) -> None:
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
        lines.append(
            f"| {k} | {r['accuracy']:.3f} | {r['micro_f1']:.3f} | {r['macro_f1']:.3f} | "
            f"{r['invalid_rate']:.3f} | {r['claims']} |"
        )
    if all("by_likelihood" in r for r in summary.values()):
        lines += ["", "By likelihood (the most likely of the three answers; never invalid):", ""]
        lines += ["| shots | accuracy | macro-F1 |", "|---:|---:|---:|"]
        for k, r in summary.items():
            likely = r["by_likelihood"]
            lines.append(f"| {k} | {likely['accuracy']:.3f} | {likely['macro_f1']:.3f} |")
    for k, r in summary.items():
        lines += ["", f"## {k} shots: confusion (rows gold, columns predicted)", ""]
        lines += ["| gold | " + " | ".join((*LABELS, INVALID)) + " |", "|---" * 5 + "|"]
        for gold in LABELS:
            lines.append(
                f"| {gold} | " + " | ".join(str(r["confusion"][gold][p]) for p in (*LABELS, INVALID)) + " |"
            )
    lines += ["", "Answer parsing and metrics: `server/kinds/adapter/claims.py` (module docstring)."]
    (out / "report.md").write_text("\n".join(lines) + "\n")


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
    from memserve.padding import pad_rows, pad_token_id

    model, tokenizer = loaded.model, loaded.tokenizer
    pad = pad_token_id(tokenizer)

    def rank(prompt: str) -> str:
        base = tokenizer(prompt, add_special_tokens=True).input_ids
        rows = [
            tokenizer(f"{prompt} {answer_of(label)}", add_special_tokens=True).input_ids for label in LABELS
        ]
        ids, mask = pad_rows(rows, pad, left=False, device=loaded.device)
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
