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
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from memserve.engine.offline import generate_all
from memserve.errors import InvalidArgument
from memserve.kinds.local.config import LocalEvalOptions
from memserve.kinds.local.module import LoadedLocalSet
from memserve.memory.evaluation import EvalContext
from memserve.memory.kind import MemoryRefSpec, RowMemory
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


class _Prompt(NamedTuple):
    fact: int
    """Index of the fact it tests; -1 for an unrelated prompt."""
    kind: str
    """"prompt", "heldout", "neighbour" or "unrelated"."""
    text: str


def evaluate_set(context: EvalContext, artifact: Artifact, continuation_tokens: int) -> dict[str, Any]:
    """Evaluates the set through the context's engine, writes metrics.json and report.md into
    `context.out`, returns the metrics."""
    local_set = LoadedLocalSet(artifact, context.target)
    memory = (local_set.bind(MemoryRefSpec(name=local_set.name, kind="local")),)
    facts = artifact.meta.details.get("facts", [])
    # Edit success and generalisation: does the continuation start with the target?
    edits = _edit_prompts(facts)
    longest = max((len(f.get("target_tokens", [])) for f in facts), default=1)
    edit_outputs = _with_and_without(context, memory, edits, longest + EXTRA_TOKENS, 0, "edits")
    # Locality: neighbours and unrelated prompts keep their greedy continuation.
    neighbours = _locality_prompts(facts)
    locality_outputs = _with_and_without(context, memory, neighbours, continuation_tokens, 2, "locality")
    context.progress(4, 4, "done")
    tally = _Tally(facts, context.model.tokenizer.decode)
    tally.add_edits(edits, *edit_outputs)
    tally.add_locality(neighbours, *locality_outputs)
    metrics = {
        **_summary(tally.per_fact, tally.unrelated_same, tally.unrelated_first),
        "set": artifact.meta.name,
        "version": artifact.meta.version,
        "facts": len(facts),
        "entries": local_set.num_entries,
        "hyperparameters": artifact.meta.hyperparameters,
        "continuation_tokens": continuation_tokens,
        "per_fact": tally.per_fact,
    }
    (context.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (context.out / "report.md").write_text(_report(metrics, tally.examples))
    return metrics


def _edit_prompts(facts: list[dict[str, Any]]) -> list[_Prompt]:
    """Each fact's own prompt, then its held-out paraphrases."""
    prompts: list[_Prompt] = []
    for i, fact in enumerate(facts):
        prompts.append(_Prompt(i, "prompt", fact["prompt"]))
        prompts += [_Prompt(i, "heldout", p) for p in fact.get("heldout_positives", [])]
    return prompts


def _locality_prompts(facts: list[dict[str, Any]]) -> list[_Prompt]:
    """Each fact's held-out neighbours, then the unrelated prompts."""
    prompts = [
        _Prompt(i, "neighbour", p) for i, f in enumerate(facts) for p in f.get("heldout_negatives", [])
    ]
    return prompts + [_Prompt(-1, "unrelated", p) for p in UNRELATED_PROMPTS]


def _with_and_without(
    context: EvalContext,
    memory: tuple[RowMemory, ...],
    prompts: list[_Prompt],
    max_new_tokens: int,
    step: int,
    what: str,
) -> tuple[list[list[int]], list[list[int]]]:
    """The prompts' greedy continuations with the set, then without it (progress steps `step`
    and `step + 1` of 4)."""
    tokenizer = context.model.tokenizer
    encoded = [tokenizer(p.text, add_special_tokens=True).input_ids for p in prompts]
    context.progress(step, 4, f"{what}, with the set")
    with_set = generate_all(context.engine, encoded, memory, max_new_tokens)
    context.progress(step + 1, 4, f"{what}, without it")
    return with_set, generate_all(context.engine, encoded, (), max_new_tokens)


class _Tally:
    """The outcomes per fact and for the unrelated prompts, and every example for the report."""

    def __init__(self, facts: list[dict[str, Any]], decode: Callable[[list[int]], str]) -> None:
        self.facts = facts
        self.decode = decode
        self.per_fact = [_fact_outcomes(f) for f in facts]
        self.unrelated_same: list[bool] = []
        self.unrelated_first: list[bool] = []
        self.examples: list[dict[str, Any]] = []

    def add_edits(self, prompts: list[_Prompt], with_set: list[list[int]], without: list[list[int]]) -> None:
        """Whether each continuation starts with its fact's whole target, with and without the set."""
        for prompt, tokens, base in zip(prompts, with_set, without, strict=True):
            fact, outcomes = self.facts[prompt.fact], self.per_fact[prompt.fact]
            text, base_text = self.decode(tokens), self.decode(base)
            hit, base_hit = text.startswith(fact["target"]), base_text.startswith(fact["target"])
            if prompt.kind == "prompt":
                outcomes["edit"], outcomes["base_edit"] = hit, base_hit
            else:
                outcomes["generalization"].append(hit)
                outcomes["base_generalization"].append(base_hit)
            self.examples.append(
                {
                    "fact": fact["id"],
                    "kind": prompt.kind,
                    "prompt": prompt.text,
                    "target": fact["target"],
                    "with_set": text,
                    "without": base_text,
                    "ok": hit,
                }
            )

    def add_locality(
        self, prompts: list[_Prompt], with_set: list[list[int]], without: list[list[int]]
    ) -> None:
        """Whether each continuation (and its first token) is the same with the set as without."""
        for prompt, tokens, base in zip(prompts, with_set, without, strict=True):
            same, first = tokens == base, tokens[:1] == base[:1]
            if prompt.fact >= 0:
                self.per_fact[prompt.fact]["locality"].append(same)
                self.per_fact[prompt.fact]["locality_first_token"].append(first)
            else:
                self.unrelated_same.append(same)
                self.unrelated_first.append(first)
            self.examples.append(
                {
                    "fact": self.facts[prompt.fact]["id"] if prompt.fact >= 0 else "-",
                    "kind": prompt.kind,
                    "prompt": prompt.text,
                    "with_set": self.decode(tokens),
                    "without": self.decode(base),
                    "ok": same,
                }
            )


def _fact_outcomes(fact: dict[str, Any]) -> dict[str, Any]:
    """A fact's row of the metrics, before its prompts are judged."""
    return {
        "id": fact["id"],
        "target": fact["target"],
        "entries": len(fact.get("entries", [])),
        "edit": None,
        "base_edit": None,
        "generalization": [],
        "base_generalization": [],
        "locality": [],
        "locality_first_token": [],
    }


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
