"""Evaluation of a local memory set (`memserve eval facts`): edit success, generalisation and
locality on the prompts the boundary search never saw, through the serving engine itself
(continuous batching, the KV cache, the set attached as a request's memory).

- edit success: the fact's own prompt now continues with the whole target;
- generalisation: the held-out positive prompts (paraphrases) continue with the whole target;
- locality: the held-out negative prompts (neighbours) and a fixed pool of unrelated prompts
  give the same greedy continuation as without the set: the first token, and the whole
  continuation (``continuation_tokens``).

The same numbers without the set (``base_*``) show what the model said before.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from memserve.engine.offline import generate_all
from memserve.errors import InvalidArgument
from memserve.kinds.local.config import LocalEvalOptions
from memserve.kinds.local.module import LoadedLocalSet
from memserve.memory.evaluation import EvalContext
from memserve.memory.kind import MemoryRefSpec
from memserve.memory.options import options_from_spec
from memserve.memory_store.artifact import Artifact

# Unrelated prompts for locality, never used to tune a boundary (the trainer has its own).
UNRELATED_PROMPTS = (
    "The recipe calls for two cups of",
    "In the morning, the children walked to",
    "The football match ended with a score of",
    "She opened the window and saw",
    "The most popular programming language is",
    "Water boils at a temperature of",
    "The author of the novel Pride and Prejudice is",
    "The largest ocean on Earth is the",
    "My brother bought a new car that is",
    "The train to the airport leaves every",
)
EXTRA_TOKENS = 2  # beyond the target's tokens, for edit success and generalisation


def run(options: dict[str, Any], context: EvalContext) -> None:
    """The kind's evaluation: `evaluate_set` with the request's options."""
    given = options_from_spec(LocalEvalOptions, options, "local evaluation")
    if context.artifact is None:
        raise InvalidArgument("a local evaluation needs a set")
    evaluate_set(context, context.artifact, given.continuation_tokens)


def evaluate_set(context: EvalContext, artifact: Artifact, continuation_tokens: int) -> dict[str, Any]:
    """Evaluates the set through the context's engine, writes metrics.json and report.md into
    `context.out`, returns the metrics."""
    out, progress, engine = context.out, context.progress, context.engine
    tokenizer = context.model.tokenizer
    local_set = LoadedLocalSet(artifact, context.target)
    memory = (local_set.bind(MemoryRefSpec(name=local_set.name, kind="local")),)
    facts = artifact.meta.details.get("facts", [])
    encode = lambda text: tokenizer(text, add_special_tokens=True).input_ids  # noqa: E731
    # Edit success and generalisation: does the continuation start with the target?
    edit_rows: list[tuple[int, str, str]] = []  # (fact index, "prompt" | "heldout", prompt)
    for i, fact in enumerate(facts):
        edit_rows.append((i, "prompt", fact["prompt"]))
        edit_rows += [(i, "heldout", p) for p in fact.get("heldout_positives", [])]
    longest = max((len(f.get("target_tokens", [])) for f in facts), default=1)
    prompts = [encode(p) for _, _, p in edit_rows]
    if progress:
        progress(0, 4, "edits, with the set")
    with_set = generate_all(engine, prompts, memory, longest + EXTRA_TOKENS)
    if progress:
        progress(1, 4, "edits, without it")
    without = generate_all(engine, prompts, (), longest + EXTRA_TOKENS)
    # Locality: neighbours and unrelated prompts keep their greedy continuation.
    local_rows = [(i, "neighbour", p) for i, f in enumerate(facts) for p in f.get("heldout_negatives", [])]
    local_rows += [(-1, "unrelated", p) for p in UNRELATED_PROMPTS]
    local_prompts = [encode(p) for _, _, p in local_rows]
    if progress:
        progress(2, 4, "locality, with the set")
    local_with = generate_all(engine, local_prompts, memory, continuation_tokens)
    if progress:
        progress(3, 4, "locality, without it")
    local_without = generate_all(engine, local_prompts, (), continuation_tokens)
    if progress:
        progress(4, 4, "done")
    decode = tokenizer.decode
    per_fact: list[dict[str, Any]] = [
        {"id": f["id"], "target": f["target"], "entries": len(f.get("entries", [])), "edit": None,
         "base_edit": None, "generalization": [], "base_generalization": [], "locality": [],
         "locality_first_token": []}
        for f in facts
    ]  # fmt: skip
    examples: list[dict[str, Any]] = []
    for (i, what, prompt), tokens, base in zip(edit_rows, with_set, without, strict=True):
        target_text = facts[i]["target"]
        hit, base_hit = decode(tokens).startswith(target_text), decode(base).startswith(target_text)
        if what == "prompt":
            per_fact[i]["edit"], per_fact[i]["base_edit"] = hit, base_hit
        else:
            per_fact[i]["generalization"].append(hit)
            per_fact[i]["base_generalization"].append(base_hit)
        examples.append({"fact": facts[i]["id"], "kind": what, "prompt": prompt, "target": target_text,
                         "with_set": decode(tokens), "without": decode(base), "ok": hit})  # fmt: skip
    unrelated_same: list[bool] = []
    unrelated_first: list[bool] = []
    for (i, what, prompt), tokens, base in zip(local_rows, local_with, local_without, strict=True):
        same, first = tokens == base, tokens[:1] == base[:1]
        if i >= 0:
            per_fact[i]["locality"].append(same)
            per_fact[i]["locality_first_token"].append(first)
        else:
            unrelated_same.append(same)
            unrelated_first.append(first)
        examples.append({"fact": facts[i]["id"] if i >= 0 else "-", "kind": what, "prompt": prompt,
                         "with_set": decode(tokens), "without": decode(base), "ok": same})  # fmt: skip
    metrics = _summary(per_fact, unrelated_same, unrelated_first)
    metrics.update(
        {
            "set": artifact.meta.name,
            "version": artifact.meta.version,
            "facts": len(facts),
            "entries": local_set.num_entries,
            "hyperparameters": artifact.meta.hyperparameters,
            "continuation_tokens": continuation_tokens,
            "per_fact": per_fact,
        }
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "report.md").write_text(_report(metrics, examples))
    return metrics


def _mean(values: Sequence[bool]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def _summary(
    per_fact: list[dict[str, Any]], unrelated: list[bool], unrelated_first: list[bool]
) -> dict[str, Any]:
    flat = lambda key: [v for f in per_fact for v in f[key]]  # noqa: E731
    neighbours, neighbours_first = flat("locality"), flat("locality_first_token")
    return {
        "edit_success": _mean([bool(f["edit"]) for f in per_fact]),
        "generalization": _mean(flat("generalization")),
        "locality": _mean(neighbours + unrelated),
        "locality_first_token": _mean(neighbours_first + unrelated_first),
        "locality_neighbours": _mean(neighbours),
        "locality_unrelated": _mean(unrelated),
        "base_edit_success": _mean([bool(f["base_edit"]) for f in per_fact]),
        "base_generalization": _mean(flat("base_generalization")),
        "counts": {
            "facts": len(per_fact),
            "heldout_positives": len(flat("generalization")),
            "heldout_negatives": len(neighbours),
            "unrelated": len(unrelated),
        },
    }


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _report(metrics: dict[str, Any], examples: list[dict[str, Any]]) -> str:
    counts = metrics["counts"]
    lines = [
        f"# Local memory set `{metrics['set']}` v{metrics['version']}",
        "",
        f"{metrics['facts']} facts, {metrics['entries']} entries; distance "
        f"`{metrics['hyperparameters'].get('distance')}`, combination "
        f"`{metrics['hyperparameters'].get('combination')}`. "
        "Judged on prompts the boundary search never saw.",
        "",
        "| metric | with the set | without (base model) | prompts |",
        "|---|---:|---:|---:|",
        f"| edit success (own prompt → whole target) | {_percent(metrics['edit_success'])} | "
        f"{_percent(metrics['base_edit_success'])} | {counts['facts']} |",
        f"| generalisation (held-out paraphrases → whole target) | {_percent(metrics['generalization'])} | "
        f"{_percent(metrics['base_generalization'])} | {counts['heldout_positives']} |",
        f"| locality (continuation of {metrics['continuation_tokens']} tokens unchanged) | "
        f"{_percent(metrics['locality'])} | 100 % | {counts['heldout_negatives'] + counts['unrelated']} |",
        f"| locality, first token | {_percent(metrics['locality_first_token'])} | 100 % | "
        f"{counts['heldout_negatives'] + counts['unrelated']} |",
        f"| locality, held-out neighbours | {_percent(metrics['locality_neighbours'])} | 100 % | "
        f"{counts['heldout_negatives']} |",
        f"| locality, unrelated prompts | {_percent(metrics['locality_unrelated'])} | 100 % | "
        f"{counts['unrelated']} |",
        "",
        "## Per fact",
        "",
        "| fact | target | entries | edit | generalisation | locality |",
        "|---|---|---:|:---:|---:|---:|",
    ]
    for fact in metrics["per_fact"]:
        gen, loc = fact["generalization"], fact["locality"]
        lines.append(
            f"| {fact['id']} | `{fact['target']}` | {fact['entries']} | {'✓' if fact['edit'] else '✗'} | "
            f"{sum(gen)}/{len(gen)} | {sum(loc)}/{len(loc)} |"
        )
    lines += ["", "## Prompts that went wrong", ""]
    wrong = [e for e in examples if not e["ok"]]
    if not wrong:
        lines.append("None.")
    for e in wrong:
        lines.append(
            f"- {e['kind']} of `{e['fact']}`: {e['prompt']!r} → with the set {e['with_set']!r}, "
            f"without {e['without']!r}"
        )
    return "\n".join(lines) + "\n"
