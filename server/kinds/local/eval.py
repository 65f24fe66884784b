"""Evaluation of a local memory set (`memserve eval facts`): edit success, generalisation and
locality on prompts no tuning step saw, through the serving engine itself (continuous
batching, the KV cache, the set attached as a request's memory).

- edit success: the fact's own prompt now continues with the whole target;
- generalisation: written rewordings continue with the whole target. Rewordings come from the
  evaluation's `prompts` (e.g. the facts file with its paraphrases) or, without them, from the
  fact's held-out given prompts. A held-out prompt that is the fact's prompt behind a prefix
  ("Fact: …") is counted apart (`generalization_prefixed`): it is not a rewording;
- neighbour locality: each fact's neighbours keep their first word and do not say the target
  anywhere in the continuation; a neighbour prompt listed by several facts counts once, for the
  first. Apart (`locality_neighbours_first_sentence`): the target is looked for in the
  continuation's first sentence only, the neighbour's own answer; a later sentence that states
  the edited fact ("… The capital of Italy is Paris.") is the edit, not a leak;
- unrelated locality: a pool of prompts that no trainer ever sees keeps its whole greedy
  continuation (``continuation_tokens``);
- unrelated text: perplexity of everyday prose with the set over the base model's.

Every rate comes with its count and a 95 % Wilson interval. The same numbers without the set
(``base_*``) show what the model said before.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from memserve.engine.offline import generate_all
from memserve.errors import InvalidArgument
from memserve.kinds.document.unrelated import UNRELATED_TEXT
from memserve.kinds.local.config import EvalPrompts, LocalEvalOptions, eval_prompts
from memserve.kinds.local.module import LoadedLocalSet
from memserve.kinds.local.unrelated import UNRELATED_PROMPTS
from memserve.memory.evaluation import EvalContext, wilson_interval
from memserve.memory.hooks import MemoryContext
from memserve.memory.kind import MemoryRefSpec, RowMemory
from memserve.memory.options import options_from_spec
from memserve.memory_store.artifact import Artifact

EXTRA_TOKENS = 2  # beyond the target's tokens, for edit success and generalisation
TEXT_WINDOW_TOKENS = 256  # unrelated text is scored in windows of this many tokens


def run(options: dict[str, Any], context: EvalContext) -> None:
    """The kind's evaluation: `evaluate_set` with the request's options."""
    options = dict(options)
    prompts = eval_prompts(options.pop("prompts", None))
    given = options_from_spec(LocalEvalOptions, options, "local evaluation")
    if context.artifact is None:
        raise InvalidArgument("a local evaluation needs a set")
    evaluate_set(context, context.artifact, given.continuation_tokens, prompts)


class _Prompt(NamedTuple):
    fact: int
    """Index of the fact it tests; -1 for an unrelated prompt."""
    kind: str
    """"prompt", "written", "prefixed", "neighbour", "unrelated", or "seen" (tuned on: not counted)."""
    text: str


Generate = Callable[[list[list[int]], int], list[list[int]]]
"""Greedy continuations (token ids) of prompts' token ids, up to a number of new tokens."""


def evaluate_set(
    context: EvalContext,
    artifact: Artifact,
    continuation_tokens: int,
    prompts: dict[str, EvalPrompts] | None = None,
) -> dict[str, Any]:
    """Evaluates the set through the context's engine, writes metrics.json and report.md into
    `context.out`, returns the metrics."""
    local_set = LoadedLocalSet(artifact, context.target)
    memory = (local_set.bind(MemoryRefSpec(name=local_set.name, kind="local")),)
    facts = artifact.meta.details.get("facts", [])
    engine = context.engine

    def with_set(ids: list[list[int]], new_tokens: int) -> list[list[int]]:
        return generate_all(engine, ids, memory, new_tokens)

    def without(ids: list[list[int]], new_tokens: int) -> list[list[int]]:
        return generate_all(engine, ids, (), new_tokens)

    tally = judge(
        facts, prompts, context.model.tokenizer, with_set, without, continuation_tokens, context.progress
    )
    context.progress(4, 5, "unrelated text")
    text_ratio = text_perplexity_ratio(context, memory, [UNRELATED_TEXT])
    context.progress(5, 5, "done")
    metrics = {
        **summary(tally),
        "unrelated_text_ppl_ratio": round(text_ratio, 5),
        "set": artifact.meta.name,
        "version": artifact.meta.version,
        "facts": len(facts),
        "entries": local_set.num_entries,
        "hyperparameters": artifact.meta.hyperparameters,
        "continuation_tokens": continuation_tokens,
        "rewordings": "given to the evaluation" if prompts is not None else "held out of training",
        "per_fact": tally.per_fact,
    }
    (context.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (context.out / "report.md").write_text(_report(metrics, tally.examples))
    return metrics


def judge(
    facts: list[dict[str, Any]],
    prompts: dict[str, EvalPrompts] | None,
    tokenizer: Any,
    with_edit: Generate,
    without: Generate,
    continuation_tokens: int,
    progress: Callable[[int, int, str], None] | None = None,
) -> Tally:
    """Every prompt of the evaluation run with and without the edit, and judged. `facts` are a
    set's fact details (id, prompt, target, target_tokens, and what they were tuned on); any
    editor that can generate greedily with and without its edit can be judged the same way."""
    if prompts is not None:
        unknown = sorted(set(prompts) - {f["id"] for f in facts})
        if unknown:
            raise InvalidArgument(f"options.prompts names facts the set does not have: {unknown[:5]}")
    say = progress or (lambda step, total, message: None)

    def both(items: list[_Prompt], new_tokens: int, step: int, what: str) -> tuple[list, list]:
        encoded = [tokenizer(p.text, add_special_tokens=True).input_ids for p in items]
        say(step, 5, f"{what}, with the edit")
        edited = with_edit(encoded, new_tokens)
        say(step + 1, 5, f"{what}, without it")
        return edited, without(encoded, new_tokens)

    # Edit success and generalisation: does the continuation start with the target?
    edits = _edit_prompts(facts, prompts)
    longest = max((len(f.get("target_tokens", [])) for f in facts), default=1)
    edit_outputs = both(edits, longest + EXTRA_TOKENS, 0, "edits")
    # Locality: neighbours and unrelated prompts keep their greedy continuation.
    neighbours = _locality_prompts(facts, prompts)
    locality_outputs = both(neighbours, continuation_tokens, 2, "locality")
    tally = Tally(facts, tokenizer.decode)
    tally.add_edits(edits, *edit_outputs)
    tally.add_locality(neighbours, *locality_outputs)
    return tally


def _is_prefixed(text: str, prompt: str) -> bool:
    """Whether `text` is the fact's prompt behind a prefix ("Fact: <prompt>"), not a rewording."""
    tail = prompt[1:] if len(prompt) > 1 else prompt
    return text != prompt and text.endswith(tail)


def tuned_on(fact: dict[str, Any]) -> set[str]:
    """Every prompt a fact's entries were tuned on (given or made by the trainer's rules): an
    evaluation never counts these as rewordings or neighbours."""
    seen = {fact["prompt"], *fact.get("train_positives", []), *fact.get("train_negatives", [])}
    subject = fact.get("subject")
    if isinstance(subject, dict):
        for texts in subject.get("prompts", {}).values():
            seen.update(texts)
    return seen


def _edit_prompts(facts: list[dict[str, Any]], given: dict[str, EvalPrompts] | None) -> list[_Prompt]:
    """Each fact's own prompt, then its rewordings (written, then prefixed) that it was not tuned on."""
    prompts: list[_Prompt] = []
    for i, fact in enumerate(facts):
        prompts.append(_Prompt(i, "prompt", fact["prompt"]))
        if given is not None:
            positives = list(given[fact["id"]].positives) if fact["id"] in given else []
        else:
            positives = list(fact.get("heldout_positives", []))
        seen = tuned_on(fact)
        for text in dict.fromkeys(positives):
            if text in seen:
                prompts.append(_Prompt(i, "seen", text))
            elif text != fact["prompt"]:
                kind = "prefixed" if _is_prefixed(text, fact["prompt"]) else "written"
                prompts.append(_Prompt(i, kind, text))
    return prompts


def _locality_prompts(facts: list[dict[str, Any]], given: dict[str, EvalPrompts] | None) -> list[_Prompt]:
    """Each fact's neighbours (a text once, for the first fact that lists it, and never one that
    is a fact's own prompt or rewording), then the unrelated prompts."""
    taken = {f["prompt"] for f in facts}
    if given is not None:
        taken |= {p for g in given.values() for p in g.positives}
    seen = set().union(*(tuned_on(f) for f in facts)) if facts else set()
    prompts: list[_Prompt] = []
    for i, fact in enumerate(facts):
        if given is not None:
            negatives = list(given[fact["id"]].negatives) if fact["id"] in given else []
        else:
            negatives = list(fact.get("heldout_negatives", []))
        for text in negatives:
            if text not in taken:
                taken.add(text)
                prompts.append(_Prompt(i, "seen" if text in seen else "neighbour", text))
    return prompts + [_Prompt(-1, "unrelated", p) for p in UNRELATED_PROMPTS if p not in taken]


@torch.no_grad()
def text_perplexity_ratio(context: EvalContext, memory: tuple[RowMemory, ...], texts: Sequence[str]) -> float:
    """Perplexity of `texts` with the memories attached over the base model's, in windows of
    TEXT_WINDOW_TOKENS tokens, through the engine's hooks (on this thread only)."""
    model, tokenizer = context.model.model, context.model.tokenizer
    hooks = context.target.hooks
    if hooks is None:
        raise InvalidArgument("this model has no memory hook sites")
    device = context.model.device
    losses = {True: 0.0, False: 0.0}
    tokens = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True).input_ids
        for start in range(0, max(len(ids) - 1, 1), TEXT_WINDOW_TOKENS):
            window = torch.tensor([ids[start : start + TEXT_WINDOW_TOKENS + 1]], device=device)
            if window.shape[1] < 2:
                continue
            for attached in (True, False):
                memory_context = MemoryContext()
                if attached:
                    for m in memory:
                        m.add_ops(memory_context, torch.arange(1, device=device))
                with hooks.using(memory_context):
                    logits = model(input_ids=window).logits[0, :-1].float()
                memory_context.finish()
                loss = torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum")
                losses[attached] += float(loss)
            tokens += window.shape[1] - 1
    if not tokens:
        return math.nan
    return math.exp((losses[True] - losses[False]) / tokens)


class Tally:
    """The outcomes per fact and for the unrelated prompts, and every example for the report."""

    def __init__(self, facts: list[dict[str, Any]], decode: Callable[[list[int]], str]) -> None:
        self.facts = facts
        self.decode = decode
        self.per_fact = [_fact_outcomes(f) for f in facts]
        self.unrelated_same: list[bool] = []
        self.unrelated_first: list[bool] = []
        self.examples: list[dict[str, Any]] = []
        self.seen: list[str] = []  # given prompts the trainer had tuned on: not counted

    def add_edits(self, prompts: list[_Prompt], with_set: list[list[int]], without: list[list[int]]) -> None:
        """Whether each continuation starts with its fact's whole target, with and without the set."""
        for prompt, tokens, base in zip(prompts, with_set, without, strict=True):
            fact, outcomes = self.facts[prompt.fact], self.per_fact[prompt.fact]
            text, base_text = self.decode(tokens), self.decode(base)
            hit, base_hit = text.startswith(fact["target"]), base_text.startswith(fact["target"])
            if prompt.kind == "seen":
                self.seen.append(prompt.text)
                continue
            if prompt.kind == "prompt":
                outcomes["edit"], outcomes["base_edit"] = hit, base_hit
            else:
                key = "generalization" if prompt.kind == "written" else "generalization_prefixed"
                outcomes[key].append(hit)
                outcomes["base_" + key].append(base_hit)
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
        """Neighbours: first word kept and no target; unrelated prompts: the whole continuation kept."""
        for prompt, tokens, base in zip(prompts, with_set, without, strict=True):
            if prompt.kind == "seen":
                self.seen.append(prompt.text)
                continue
            text, base_text = self.decode(tokens), self.decode(base)
            same, first = tokens == base, text.split()[:1] == base_text.split()[:1]
            if prompt.fact >= 0:
                target = self.facts[prompt.fact]["target"].strip()
                kept = first and (target not in text or target in base_text)
                answer, base_answer = _first_sentence(text), _first_sentence(base_text)
                outcomes = self.per_fact[prompt.fact]
                outcomes["locality"].append(kept)
                outcomes["locality_first_sentence"].append(
                    first and (target not in answer or target in base_answer)
                )
                outcomes["locality_continuation"].append(same)
                ok = kept
            else:
                self.unrelated_same.append(same)
                self.unrelated_first.append(first)
                ok = same
            self.examples.append(
                {
                    "fact": self.facts[prompt.fact]["id"] if prompt.fact >= 0 else "-",
                    "kind": prompt.kind,
                    "prompt": prompt.text,
                    "with_set": text,
                    "without": base_text,
                    "ok": ok,
                }
            )


def _fact_outcomes(fact: dict[str, Any]) -> dict[str, Any]:
    """A fact's row of the metrics, before its prompts are judged."""
    return {
        "id": fact["id"],
        "target": fact["target"],
        "subject": fact.get("subject"),
        "entries": len(fact.get("entries", [])),
        "edit": None,
        "base_edit": None,
        "generalization": [],
        "base_generalization": [],
        "generalization_prefixed": [],
        "base_generalization_prefixed": [],
        "locality": [],
        "locality_first_sentence": [],
        "locality_continuation": [],
    }


def _first_sentence(text: str) -> str:
    """A continuation up to the end of its first sentence or line."""
    match = re.search(r"[.!?](?:\s|$)|\n", text.lstrip())
    stripped = text.lstrip()
    return stripped[: match.start() + 1] if match else stripped


def rate(values: Sequence[bool]) -> dict[str, Any]:
    """A rate with its count and 95 % Wilson interval; the rate is None without values."""
    n, hits = len(values), sum(values)
    low, high = wilson_interval(hits, n)
    return {
        "rate": round(hits / n, 4) if n else None,
        "hits": hits,
        "n": n,
        "low": None if math.isnan(low) else round(low, 4),
        "high": None if math.isnan(high) else round(high, 4),
    }


def summary(tally: Tally) -> dict[str, Any]:
    """The rates (with counts and 95 % intervals) of a judged evaluation."""
    per_fact = tally.per_fact
    flat = lambda key: [v for f in per_fact for v in f[key]]  # noqa: E731
    rates = {
        "edit_success": rate([bool(f["edit"]) for f in per_fact]),
        "generalization": rate(flat("generalization")),
        "generalization_prefixed": rate(flat("generalization_prefixed")),
        "locality_neighbours": rate(flat("locality")),
        "locality_neighbours_first_sentence": rate(flat("locality_first_sentence")),
        "locality_neighbours_continuation": rate(flat("locality_continuation")),
        "locality_unrelated": rate(tally.unrelated_same),
        "locality_unrelated_first_token": rate(tally.unrelated_first),
        "base_edit_success": rate([bool(f["base_edit"]) for f in per_fact]),
        "base_generalization": rate(flat("base_generalization")),
    }
    return {
        **{name: r["rate"] for name, r in rates.items()},
        "rates": rates,
        "counts": {
            "facts": len(per_fact),
            "written_rewordings": len(flat("generalization")),
            "prefixed_prompts": len(flat("generalization_prefixed")),
            "neighbours": len(flat("locality")),
            "unrelated": len(tally.unrelated_same),
            "left_out_as_tuned_on": len(tally.seen),
        },
        "left_out_as_tuned_on": tally.seen,
    }


def _cell(r: dict[str, Any]) -> str:
    if r["rate"] is None:
        return "n/a"
    return f"{100 * r['rate']:.1f} % ({r['hits']}/{r['n']}; {100 * r['low']:.0f}–{100 * r['high']:.0f})"


ROWS = (
    ("edit_success", "edit success (own prompt → whole target)", "base_edit_success"),
    ("generalization", "generalisation (written rewordings → whole target)", "base_generalization"),
    ("generalization_prefixed", "the prompt behind a prefix (not a rewording)", None),
    ("locality_neighbours", "neighbours: first word kept, no target", None),
    ("locality_neighbours_first_sentence", "neighbours: … no target in the first sentence", None),
    ("locality_neighbours_continuation", "neighbours: whole continuation kept", None),
    ("locality_unrelated", "unrelated prompts: whole continuation kept", None),
)


def _report(metrics: dict[str, Any], examples: list[dict[str, Any]]) -> str:
    rates = metrics["rates"]
    lines = [
        f"# Local memory set `{metrics['set']}` v{metrics['version']}",
        "",
        f"{metrics['facts']} facts, {metrics['entries']} entries; method "
        f"`{metrics['hyperparameters'].get('method', 'blog')}`, distance "
        f"`{metrics['hyperparameters'].get('distance')}`. Rewordings and neighbours: "
        f"{metrics['rewordings']}. Rates: hits/prompts; 95 % Wilson interval.",
        "",
        "| metric | with the set | without (base model) |",
        "|---|---:|---:|",
    ]
    for key, label, base in ROWS:
        lines.append(f"| {label} | {_cell(rates[key])} | {_cell(rates[base]) if base else '—'} |")
    lines += [
        "| unrelated text: perplexity over the base model's | "
        f"×{metrics['unrelated_text_ppl_ratio']:.4f} | ×1 |",
        "",
        f"Unrelated prompts are compared over {metrics['continuation_tokens']} greedy tokens. Left out "
        f"because the trainer had tuned on them: {metrics['counts']['left_out_as_tuned_on']} prompts.",
        "",
        "## Per fact",
        "",
        "| fact | subject | target | entries | edit | rewordings | neighbours |",
        "|---|---|---|---:|:---:|---:|---:|",
    ]
    for fact in metrics["per_fact"]:
        gen, loc = fact["generalization"], fact["locality"]
        subject = fact.get("subject")
        subject = subject.get("text") if isinstance(subject, dict) else subject
        lines.append(
            f"| {fact['id']} | {subject or '—'} | `{fact['target']}` | {fact['entries']} | "
            f"{'✓' if fact['edit'] else '✗'} | {sum(gen)}/{len(gen)} | {sum(loc)}/{len(loc)} |"
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
