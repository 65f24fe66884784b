"""Local (fact) memories: what they cost at decode time, and how well they edit.

python bench/bench_facts.py decode [--entries 10000] [--repeats 5] [--metrics] [--set PATH ...]
    Decode step time through the serving engine (KV cache, batch 1 and 8) with a set of N
    entries, against no memory, measured side by side in one run. Entries are real
    activations of the default model (keys) with random deltas, spread over 1, 8 or 60
    (layer, site) cells; the trigger is computed for every entry at every step either way.
    --set adds trained sets (a set.safetensors the other commands write), each on a prompt
    none of its facts is about and on its first fact's prompt (a gated set's answers then run
    at every step).

python bench/bench_facts.py counterfacts [--out DIR] [--config JSON] [--batch N] [--given] [--limit N]
    Registers the 50 counterfactual facts of tests/fixtures/facts/counterfacts.jsonl from their
    prompt and target alone (as a user does; --given adds their paraphrases and neighbours, half
    held out), N at a time, through the trainer a job runs; then judges the set on the file's
    written paraphrases and neighbours (which no tuning step saw), 50 unrelated prompts and
    unrelated text, with 95 % intervals.

python bench/bench_facts.py dtypes --set DIR/set.safetensors [--dtypes fp32,packed,bf16] [--out DIR]
    Judges one trained set as `counterfacts` does, once per way the model is served (dtype, or
    packed weights).

python bench/bench_facts.py scopes --set DIR/set.safetensors [--facts FILE] [--out DIR]
    Judges one trained set as `counterfacts` does, once per answer scope ("sentence": a subject
    is answered until the model ends a sentence of its own; "request": to the request's end).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import random
import statistics
import threading
import time
from pathlib import Path

import torch

from memserve.engine.offline import generate_all
from memserve.engine.requests import (
    Event,
    FailedEvent,
    FinishedEvent,
    GenerationRequest,
    StoppingParams,
    TokenEvent,
)
from memserve.engine.scheduler import Engine, EngineConfig
from memserve.engine.threads import compute_threads
from memserve.kinds.local.config import LOCAL_SITES
from memserve.kinds.local.module import LoadedLocalSet, group_tensors
from memserve.memory.hooks import MemoryContext
from memserve.memory.kind import LoadTarget, MemoryObserver, MemoryRefSpec, TrainContext
from memserve.memory_store import artifact as artifacts
from memserve.memory_store.artifact import Artifact, MemoryMeta
from memserve.models import LoadedModel, ModelConfig, load_model

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The history of the city begins in the early middle ages, when"


def synthetic_set(
    loaded: LoadedModel,
    engine: Engine,
    entries: int,
    cells: int,
    observe: MemoryObserver | None = None,
    seed: int = 0,
    distance: str = "projection",
) -> LoadedLocalSet:
    """A set of `entries` entries spread over `cells` (layer, site) cells: keys are real
    activations of varied prompts (so distances look as they do in use), deltas are random."""
    assert engine.hooks is not None
    model, tokenizer = loaded.model, loaded.tokenizer
    num_layers = model.config.num_hidden_layers
    all_cells = [(layer, site) for layer in range(num_layers) for site in LOCAL_SITES]
    chosen = random.Random(seed).sample(all_cells, cells)
    texts = [
        f"Fact number {i}: the {w} of the {v} is"
        for i, (w, v) in enumerate(
            zip(
                ["capital", "colour", "author", "height", "name"] * 40,
                ["city", "river", "book", "tower", "country"] * 40,
                strict=True,
            )
        )
    ]
    captured: dict[tuple[int, str], list[torch.Tensor]] = {cell: [] for cell in chosen}
    context = MemoryContext()

    class _Capture:
        name = "capture"

    for cell in chosen:

        def op(hidden: torch.Tensor, into: list[torch.Tensor] = captured[cell]) -> torch.Tensor:
            into.append(hidden.reshape(-1, hidden.shape[-1]).float())
            return hidden

        context.add(cell[0], cell[1], _Capture(), op)
    ids = tokenizer(texts, return_tensors="pt", padding=True).input_ids.to(loaded.device)
    with torch.no_grad(), engine.hooks.using(context):
        model(input_ids=ids, logits_to_keep=1)
    generator = torch.Generator().manual_seed(seed)
    groups = []
    per_cell = [entries // cells + (1 if i < entries % cells else 0) for i in range(cells)]
    for (layer, site), count in zip(chosen, per_cell, strict=True):
        pool = torch.cat(captured[(layer, site)])
        keys = pool[torch.randint(len(pool), (count,), generator=generator)].cpu()
        width = keys.shape[1]
        groups.append(
            {
                "layer": layer,
                "site": site,
                "labels": [f"e{layer}{site}{i}" for i in range(count)],
                "keys": keys,
                "deltas": torch.randn(count, width, generator=generator) * 0.1,
                "bounds": torch.full((count,), 0.05),
                "hardness": torch.full((count,), 3.0),
            }
        )
    meta = MemoryMeta(
        kind="local",
        name=f"bench-{entries}x{cells}",
        base_model=loaded.fingerprint,
        version=1,
        hyperparameters={"distance": distance, "combination": "top1"},
        details={
            "groups": [{"layer": g["layer"], "site": g["site"], "entries": g["labels"]} for g in groups]
        },
    )
    target = LoadTarget.for_model(loaded, engine.hooks, observe)
    return LoadedLocalSet(Artifact(meta, group_tensors(groups)), target)


def step_times(
    engine: Engine, prompt_ids: tuple[int, ...], memories: tuple, batch: int, tokens: int
) -> list[float]:
    """Seconds between consecutive tokens of the first request, with `batch` requests decoding together."""
    stamps: list[float] = []
    done = threading.Semaphore(0)
    errors: list[BaseException] = []

    def sink(event: Event, first: bool) -> None:
        if isinstance(event, TokenEvent) and first:
            stamps.append(time.perf_counter())
        elif isinstance(event, FailedEvent):
            errors.append(event.error)
            done.release()
        elif isinstance(event, FinishedEvent):
            done.release()

    stopping = StoppingParams(max_new_tokens=tokens, ignore_eos=True)
    for i in range(batch):
        request = GenerationRequest(prompt_ids, stopping=stopping, memories=memories)
        engine.submit(request, lambda e, first=(i == 0): sink(e, first))
    for _ in range(batch):
        done.acquire()
    if errors:
        raise errors[0]
    # The first interval includes joining the batch: left out.
    return [b - a for a, b in itertools.pairwise(stamps[1:])]


def decode(args: argparse.Namespace) -> None:
    # As in `memserve serve`: the engine thread owns the only multi-threaded OpenMP team; this
    # thread (loading, building the sets) stays on one (memserve/threads.py says why).
    torch.set_num_threads(1)
    observe = None
    if args.metrics:  # as `memserve serve` runs: the memory kinds report to Prometheus
        from memserve.metrics import MemoryMetrics

        observe = MemoryMetrics()
    loaded = load_model(ModelConfig())
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(max_batch_size=16, threads=args.threads))
    engine.start()
    prompt_ids = tuple(loaded.tokenizer(PROMPT).input_ids)
    sets = {
        f"{args.entries} random entries, {cells} cells": (
            synthetic_set(loaded, engine, args.entries, cells, observe, distance=args.distance),
            prompt_ids,
        )
        for cells in args.cells
    }
    target = LoadTarget.for_model(loaded, engine.hooks, observe)
    for path in args.set:  # trained sets: a prompt none of their facts is about, and their first fact's
        exported = artifacts.import_bytes(path.read_bytes())
        trained = LoadedLocalSet(exported, target)
        facts = exported.meta.details.get("facts", [])
        label = f"{path.parent.name} ({trained.num_entries} entries)"
        sets[f"{label}, unrelated prompt"] = (trained, prompt_ids)
        if facts:
            fact_ids = tuple(loaded.tokenizer(facts[0]["prompt"]).input_ids)
            sets[f"{label}, prompt of a fact"] = (trained, fact_ids)
    print(
        f"default model on {loaded.device} ({loaded.dtype}), {args.threads or compute_threads()} threads; "
        f"{args.entries} entries ({args.distance}); {args.tokens} tokens per run, {args.repeats} repeats, "
        "medians" + ("; metrics observers on" if args.metrics else "")
    )
    rows = []
    try:
        for batch in args.batches:
            step_times(engine, prompt_ids, (), batch, 8)  # warm-up
            medians: dict[str, list[float]] = {label: [] for label in sets}
            plain: dict[tuple[int, ...], list[float]] = {ids: [] for _, ids in sets.values()}
            for _ in range(args.repeats):  # interleaved, so drift hits both sides alike
                for ids, times in plain.items():
                    times.append(statistics.median(step_times(engine, ids, (), batch, args.tokens)))
                for label, (local_set, ids) in sets.items():
                    bound = local_set.bind(MemoryRefSpec(name=local_set.name, kind="local"))
                    times = step_times(engine, ids, (bound,), batch, args.tokens)
                    medians[label].append(statistics.median(times))
            for label, (_, ids) in sets.items():
                base = statistics.median(plain[ids])
                value = statistics.median(medians[label])
                rows.append((batch, label, base * 1000, value * 1000, value / base))
    finally:
        engine.stop()
    print()
    print("| batch | set | no memory (ms/step) | with the set (ms/step) | ratio |")
    print("|---:|---|---:|---:|---:|")
    for batch, label, base, value, ratio in rows:
        print(f"| {batch} | {label} | {base:.2f} | {value:.2f} | {ratio:.3f}× |")


# Published numbers (other models and datasets), for orientation only.
PUBLISHED = [
    ("GRACE (T5-small, zsRE; as in MELO's Table 2)", "—", "0.94", "0.69 (TRR)"),
    ("MELO (T5-small, zsRE)", "0.98", "0.97", "0.72"),
]


class BenchContext(TrainContext):
    """A trainer's context in this process: the model, the set's current version, a progress line."""

    job_id = "bench"
    tenant = "default"
    memory_name = "counterfacts"

    def __init__(self, loaded: LoadedModel, current: Artifact | None, label: str) -> None:
        self._loaded, self._current, self.label = loaded, current, label
        self.started = time.monotonic()

    @property
    def model(self) -> LoadedModel:
        return self._loaded

    def report(self, step: int, total: int, loss: float | None = None, message: str = "") -> None:
        elapsed = time.monotonic() - self.started
        print(f"\r{self.label}: {step}/{total} {message[:40]:40s} {elapsed:.0f} s", end="", flush=True)

    def current_artifact(self) -> Artifact | None:
        return self._current


def train_in_batches(
    loaded: LoadedModel, facts: list[dict], config: dict, batch: int, current: Artifact | None = None
) -> tuple[Artifact, list[dict]]:
    """The facts registered `batch` at a time, each batch a new version over the last (as
    `memserve facts add` does); returns the last version and each batch's job metrics."""
    from memserve.kinds.local.train import train_set

    metrics = []
    for start in range(0, len(facts), batch):
        chunk = facts[start : start + batch]
        context = BenchContext(loaded, current, f"facts {start + 1}-{start + len(chunk)}")
        trained = train_set({"facts": chunk, "config": config}, context)
        print()
        version = 1 if current is None else current.meta.version + 1
        meta = MemoryMeta(
            kind="local",
            name="counterfacts",
            base_model=loaded.fingerprint,
            version=version,
            hyperparameters=trained.hyperparameters,
            metrics=trained.metrics,
            details=trained.details,
        )
        # With its sha256, as the store keeps it (an export file carries it).
        current = artifacts.decode(*artifacts.encode(meta, trained.tensors))
        metrics.append(trained.metrics)
    assert current is not None
    return current, metrics


def _cell(rate: dict) -> str:
    if rate["rate"] is None:
        return "—"
    return f"{rate['rate']:.2f} ({rate['hits']}/{rate['n']}; {rate['low']:.2f}–{rate['high']:.2f})"


def counterfacts(args: argparse.Namespace) -> None:
    from memserve.kinds.local.config import eval_prompts
    from memserve.kinds.local.eval import evaluate_set
    from memserve.memory.evaluation import offline_context

    rows = [json.loads(line) for line in args.facts.read_text().splitlines() if line.strip()]
    rows = rows[: args.limit] if args.limit else rows
    given = ("positive_prompts", "negative_prompts")
    # From prompt and target alone, as a user registers a fact; the written rewordings and
    # neighbours are for the evaluation only.
    facts = rows if args.given else [{k: v for k, v in r.items() if k not in given} for r in rows]
    config = json.loads(args.config)
    loaded = load_model(ModelConfig())
    started = time.monotonic()
    artifact, jobs = train_in_batches(loaded, facts, config, args.batch or len(facts))
    train_seconds = time.monotonic() - started
    prompts = None if args.given else eval_prompts([{k: r[k] for k in ("id", *given)} for r in rows])
    with offline_context(loaded, artifact, args.out) as context:
        metrics = evaluate_set(context, artifact, 16, prompts)
    from memserve.memory_store.artifact import export_bytes

    (args.out / "set.safetensors").write_bytes(export_bytes(artifact))  # for `memserve memories import`
    metrics["train_seconds"] = round(train_seconds, 1)
    metrics["jobs"] = jobs
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    rates = metrics["rates"]
    method = artifact.meta.hyperparameters.get("method")
    print(
        f"{len(facts)} facts ({'with' if args.given else 'without'} given prompts, method {method}) → "
        f"{metrics['entries']} entries, trained in {train_seconds:.0f} s "
        f"({train_seconds / len(facts):.1f} s per fact); report in {args.out}/report.md"
    )
    recheck = jobs[-1].get("recheck", {})
    print(f"last batch's re-check: {recheck}")
    print()
    print(
        "| editor | edit success | generalisation (written) | neighbours kept | "
        "neighbours' first sentence kept | unrelated prompts kept | unrelated text ppl |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(
        f"| memserve local, {method} | {_cell(rates['edit_success'])} | {_cell(rates['generalization'])} | "
        f"{_cell(rates['locality_neighbours'])} | {_cell(rates['locality_neighbours_first_sentence'])} | "
        f"{_cell(rates['locality_unrelated'])} | "
        f"×{metrics['unrelated_text_ppl_ratio']:.4f} |"
    )
    print(
        f"| base model, no edit | {_cell(rates['base_edit_success'])} | "
        f"{_cell(rates['base_generalization'])} | — | — | — | ×1 |"
    )
    for name, es, gen, loc in PUBLISHED:
        print(f"| {name} | {es} | {gen} | {loc} | | | |")


JUDGED_HEADER = (
    "| edit success | generalisation (written) | neighbours kept | neighbours' first sentence kept "
    "| unrelated prompts kept | unrelated text ppl |"
)


def _judged_row(label: str, metrics: dict) -> str:
    rates = metrics["rates"]
    return (
        f"| {label} | {_cell(rates['edit_success'])} | {_cell(rates['generalization'])} | "
        f"{_cell(rates['locality_neighbours'])} | {_cell(rates['locality_neighbours_first_sentence'])} | "
        f"{_cell(rates['locality_unrelated'])} | ×{metrics['unrelated_text_ppl_ratio']:.4f} |"
    )


def _written_prompts(facts: Path) -> dict:
    from memserve.kinds.local.config import eval_prompts

    rows = [json.loads(line) for line in facts.read_text().splitlines() if line.strip()]
    return eval_prompts([{k: r[k] for k in ("id", "positive_prompts", "negative_prompts")} for r in rows])


def scopes(args: argparse.Namespace) -> None:
    """One trained set judged under each answer scope (a serving option: the entries are the
    same), so the scopes compare on the same facts, rewordings and neighbours."""
    from memserve.kinds.local.config import ANSWER_SCOPES
    from memserve.kinds.local.eval import evaluate_set
    from memserve.memory.evaluation import offline_context
    from memserve.memory_store.artifact import import_bytes

    prompts = _written_prompts(args.facts)
    loaded = load_model(ModelConfig())
    print(f"| answer scope {JUDGED_HEADER}\n|---|---:|---:|---:|---:|---:|---:|")
    for scope in ANSWER_SCOPES:
        artifact = import_bytes(args.set.read_bytes())
        artifact.meta.hyperparameters["answer_scope"] = scope
        with offline_context(loaded, artifact, args.out / scope) as context:
            metrics = evaluate_set(context, artifact, 16, prompts)
        print(_judged_row(scope, metrics), flush=True)


def dtypes(args: argparse.Namespace) -> None:
    """One trained set (trained in fp32) judged with the model served in each dtype: the same
    facts, rewordings and neighbours, so the dtypes compare on equal terms."""
    from memserve.kinds.local.eval import evaluate_set
    from memserve.memory.evaluation import offline_context
    from memserve.memory_store.artifact import import_bytes
    from memserve.packed import packed_weights

    prompts = _written_prompts(args.facts)
    print(f"| served in {JUDGED_HEADER} seconds |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    from mixed_precision import load

    for dtype in args.dtypes.split(","):
        loaded = load(dtype)
        artifact = import_bytes(args.set.read_bytes())
        started = time.monotonic()
        # As the Evaluate RPC judges: the judge's own forward passes read packed codes too.
        with offline_context(loaded, artifact, args.out / dtype) as context, packed_weights():
            metrics = evaluate_set(context, artifact, 16, prompts)
        (args.out / dtype / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"{_judged_row(dtype, metrics)[:-1]}| {time.monotonic() - started:.0f} |", flush=True)
        del loaded


# Made-up people and what the model cannot know about them: facts to add 20 at a time after
# the fixture's 50, so that a set reaches a few hundred facts. Every name is distinct.
FIRST_NAMES = ("Arlen", "Brisa", "Caspian", "Delphine", "Emrys", "Fenna", "Gideon", "Halina", "Ilsa",
               "Joren", "Katrin", "Lucan", "Marisol", "Nevin", "Odile")  # fmt: skip
LAST_NAMES = ("Ashgrove", "Bellweather", "Corrigan", "Dunmore", "Elsworth", "Fairbairn", "Galloway",
              "Hartigan", "Ivers", "Kettleby")  # fmt: skip
RELATIONS = (
    ("{} was born in the city of", (" Lisbon", " Oslo", " Nairobi", " Lima", " Hanoi", " Perth")),
    ("The favourite instrument of {} is the", (" cello", " banjo", " harp", " oboe", " tuba")),
    ("By profession, {} works as a", (" baker", " pilot", " surgeon", " plumber", " librarian")),
)


def made_up_facts(count: int, seed: int = 0) -> list[dict]:
    """`count` facts about made-up people: a prompt, a target, no paraphrases."""
    rng = random.Random(seed)
    people = [f"{a} {b}" for a, b in itertools.product(FIRST_NAMES, LAST_NAMES)]
    rng.shuffle(people)
    facts = []
    for i in range(count):
        person = people[i % len(people)]
        template, targets = RELATIONS[i % len(RELATIONS)]
        slug = person.lower().replace(" ", "-")
        facts.append({"id": f"{slug}-{i}", "prompt": template.format(person), "target": rng.choice(targets)})
    return facts


def sequential(args: argparse.Namespace) -> None:
    """The fixture's facts, then made-up ones, `--batch` at a time; after every batch the first
    batch's facts are re-checked (own prompt, whole target, teacher-forced), and the last version
    is evaluated in full."""
    from memserve.kinds.local.config import LocalConfig
    from memserve.kinds.local.eval import evaluate_set
    from memserve.kinds.local.gated import next_tokens_with
    from memserve.kinds.local.train import FactTrainer, _failing
    from memserve.memory.evaluation import offline_context
    from memserve.memory.hooks import MemoryHooks

    fixture = [json.loads(line) for line in args.facts.read_text().splitlines() if line.strip()]
    facts = [{k: r[k] for k in ("id", "prompt", "target")} for r in fixture]
    facts = (facts + made_up_facts(max(0, args.count - len(facts))))[: args.count]
    loaded = load_model(ModelConfig())
    config = json.loads(args.config)
    first = facts[: args.batch]
    current: Artifact | None = None
    rows = []
    started = time.monotonic()
    for start in range(0, len(facts), args.batch):
        current, _ = train_in_batches(loaded, facts[start : start + args.batch], config, args.batch, current)
        hooks = MemoryHooks(loaded.model)
        try:
            checker = FactTrainer(loaded.model, loaded.tokenizer, hooks, LocalConfig())
            local_set = LoadedLocalSet(current, LoadTarget.for_model(loaded, hooks))
            failing = _failing(
                checker,
                [(f["id"], f["prompt"], f["target"]) for f in first],
                (),
                functools.partial(next_tokens_with, loaded.model, hooks, local_set),
            )
        finally:
            hooks.remove()
        kept = 1 - len(failing) / len(first)
        entries = local_set.num_entries
        rows.append((start + args.batch, entries, kept, time.monotonic() - started))
        print(f"after {start + args.batch} facts: first {len(first)} keep {kept:.2f} ({entries} entries)")
    assert current is not None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "set.safetensors").write_bytes(artifacts.export_bytes(current))  # for `decode --set`
    with offline_context(loaded, current, args.out) as context:
        metrics = evaluate_set(context, current, 16)
    print()
    print("| facts in the set | entries | first batch's efficacy (teacher-forced) | time so far |")
    print("|---:|---:|---:|---:|")
    for count, entries, kept, seconds in rows:
        print(f"| {count} | {entries} | {kept:.2f} | {seconds:.0f} s |")
    edits = [f["edit"] for f in metrics["per_fact"][: len(first)]]
    print(
        f"first {len(first)} facts' edit success through the engine, last version: {sum(edits)}/{len(edits)}"
    )


def baselines(args: argparse.Namespace) -> None:
    """Our set (a trained export), ROME and GRACE on the same model and facts, judged by the same
    code on the same prompts in one run: greedy decoding recomputed every step, with and
    without each edit."""
    from baselines import GraceCodebook, greedy, perplexity_ratio, rome_edit, text_nll

    from memserve.kinds.document.unrelated import UNRELATED_TEXT
    from memserve.kinds.local.config import eval_prompts
    from memserve.kinds.local.eval import judge, summary
    from memserve.memory.evaluation import offline_context
    from memserve.memory.hooks import MemoryHooks
    from memserve.memory_store.artifact import import_bytes

    rows = [json.loads(line) for line in args.facts.read_text().splitlines() if line.strip()]
    rows = rows[: args.limit] if args.limit else rows
    given = ("positive_prompts", "negative_prompts")
    facts = [{k: v for k, v in r.items() if k not in given} for r in rows]
    prompts = eval_prompts([{k: r[k] for k in ("id", *given)} for r in rows])
    loaded = load_model(ModelConfig())
    tokenizer = loaded.tokenizer
    hooks = MemoryHooks(loaded.model)
    for fact in facts:  # what the judge reads of a fact
        fact["target_tokens"] = tokenizer(fact["prompt"] + fact["target"]).input_ids[
            len(tokenizer(fact["prompt"]).input_ids) :
        ]
    edited_model = lambda ids, n: greedy(loaded, hooks, ids, n)  # noqa: E731
    # "Without" is always the unedited model: its outputs are kept from GRACE's judging (same
    # facts, same prompts, run before ROME edits the weights), so ROME is compared with the model
    # before its edit.
    unedited: dict[tuple, list[list[int]]] = {}

    def plain(ids: list[list[int]], n: int) -> list[list[int]]:
        key = (tuple(map(tuple, ids)), n)
        if key not in unedited:
            unedited[key] = edited_model(ids, n)
        return unedited[key]

    base_nll = text_nll(loaded, hooks, [UNRELATED_TEXT])
    results: dict[str, dict] = {}

    def judged(name: str, details: list[dict], edited, seconds: float, factory=None) -> None:
        tally = judge(details, prompts, tokenizer, edited, plain, 16)
        ratio = perplexity_ratio(text_nll(loaded, hooks, [UNRELATED_TEXT], factory), base_nll)
        results[name] = {**summary(tally), "unrelated_text_ppl_ratio": ratio, "train_seconds": seconds}
        print(f"{name}: judged", flush=True)

    if args.set:
        # Ours runs as the server runs it: through the engine (KV cache, per-request state).
        artifact = import_bytes(args.set.read_bytes())
        hyper = artifact.meta.hyperparameters
        with offline_context(loaded, artifact, args.out) as context:
            bound = LoadedLocalSet(artifact, context.target).bind(MemoryRefSpec("memserve", "local"))

            def ours() -> MemoryContext:
                memory_context = MemoryContext()
                bound.add_ops(memory_context, torch.arange(1))
                return memory_context

            with_ours = lambda ids, n: generate_all(context.engine, ids, (bound,), n)  # noqa: E731
            trained = artifact.meta.metrics.get("train_seconds", float("nan"))
            judged(
                f"memserve local ({hyper.get('method')})",
                artifact.meta.details["facts"],
                with_ours,
                trained,
                ours,
            )

    started = time.monotonic()
    grace = GraceCodebook(loaded, hooks, layer=args.grace_layer, eps_rel=args.grace_eps)
    for i, fact in enumerate(facts):
        grace.add(fact)
        print(f"\rGRACE {i + 1}/{len(facts)} {time.monotonic() - started:.0f} s", end="", flush=True)
    print()
    with_grace = lambda ids, n: greedy(loaded, hooks, ids, n, grace.context)  # noqa: E731
    judged(f"GRACE (layer {args.grace_layer}, ε = {args.grace_eps}·‖key‖)", facts, with_grace,
           time.monotonic() - started, grace.context)  # fmt: skip

    started = time.monotonic()
    restore = rome_edit(loaded, facts, layer=args.rome_layer)
    seconds = time.monotonic() - started
    try:
        judged(f"ROME, sequential (layer {args.rome_layer})", facts, edited_model, seconds)
    finally:
        restore()
    hooks.remove()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "baselines.json").write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(
        "| editor | edit success | generalisation (written) | neighbours kept | neighbours' first sentence "
        "kept | unrelated prompts kept | unrelated text ppl | mean of generalisation and neighbours | "
        "editing time |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, m in results.items():
        rates = m["rates"]
        mean = (rates["generalization"]["rate"] + rates["locality_neighbours"]["rate"]) / 2
        print(
            f"| {name} | {_cell(rates['edit_success'])} | {_cell(rates['generalization'])} | "
            f"{_cell(rates['locality_neighbours'])} | {_cell(rates['locality_neighbours_first_sentence'])} | "
            f"{_cell(rates['locality_unrelated'])} | "
            f"×{m['unrelated_text_ppl_ratio']:.4f} | {mean:.3f} | {m['train_seconds']:.0f} s |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    dec = commands.add_parser("decode", help="decode step time with N entries vs none")
    dec.add_argument("--entries", type=int, default=10_000)
    dec.add_argument("--cells", type=int, nargs="*", default=[1, 8, 60], help="none: trained sets only")
    dec.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    dec.add_argument("--tokens", type=int, default=48)
    dec.add_argument("--repeats", type=int, default=5)
    dec.add_argument("--threads", type=int, default=0)
    dec.add_argument("--distance", choices=["euclidean", "projection", "mixed"], default="euclidean")
    dec.add_argument("--metrics", action="store_true", help="with the Prometheus observers, as a server runs")
    dec.add_argument(
        "--set",
        type=Path,
        nargs="*",
        default=[],
        help="trained sets too (set.safetensors of counterfacts/sequential)",
    )
    dec.set_defaults(run=decode)
    cf = commands.add_parser("counterfacts", help="train and evaluate the 50 counterfactual facts")
    cf.add_argument("--facts", type=Path, default=ROOT / "tests/fixtures/facts/counterfacts.jsonl")
    cf.add_argument("--out", type=Path, default=Path("eval-counterfacts"))
    cf.add_argument(
        "--config", default="{}", help='LocalTrainingConfig options as JSON, e.g. {"method": "blog"}'
    )
    cf.add_argument("--limit", type=int, default=0, help="the first N facts only")
    cf.add_argument("--batch", type=int, default=0, help="register N facts at a time (default: all at once)")
    cf.add_argument(
        "--given",
        action="store_true",
        help="register the file's paraphrases and neighbours too (half held out); default: prompt "
        "and target only, judged on all of them",
    )
    cf.set_defaults(run=counterfacts)
    sc = commands.add_parser("scopes", help="one trained set judged under each answer scope")
    sc.add_argument("--set", type=Path, required=True, help="counterfacts' set.safetensors")
    sc.add_argument("--facts", type=Path, default=ROOT / "tests/fixtures/facts/counterfacts.jsonl")
    sc.add_argument("--out", type=Path, default=Path("eval-scopes"))
    dt = commands.add_parser("dtypes", help="judge one trained set with the model served in each dtype")
    dt.add_argument("--set", type=Path, required=True, help="a set.safetensors the other commands write")
    dt.add_argument("--facts", type=Path, default=ROOT / "tests/fixtures/facts/counterfacts.jsonl")
    dt.add_argument(
        "--dtypes",
        default="fp32,packed,bf16",
        help="fp32 (dense), packed (--weights packed), bf16, bf16w (bench/mixed_precision.py)",
    )
    dt.add_argument("--out", type=Path, default=Path("eval-dtypes"))
    dt.set_defaults(run=dtypes)
    sc.set_defaults(run=scopes)
    base = commands.add_parser("baselines", help="our set beside ROME and GRACE, judged alike")
    base.add_argument("--facts", type=Path, default=ROOT / "tests/fixtures/facts/counterfacts.jsonl")
    base.add_argument(
        "--set", type=Path, default=None, help="our trained set (counterfacts' set.safetensors)"
    )
    base.add_argument("--limit", type=int, default=0)
    base.add_argument("--rome-layer", type=int, default=8)
    base.add_argument("--grace-layer", type=int, default=20)
    base.add_argument("--grace-eps", type=float, default=0.5)
    base.add_argument("--out", type=Path, default=Path("eval-baselines"))
    base.set_defaults(run=baselines)
    seq = commands.add_parser("sequential", help="add facts N at a time; re-check the first batch")
    seq.add_argument("--facts", type=Path, default=ROOT / "tests/fixtures/facts/counterfacts.jsonl")
    seq.add_argument("--count", type=int, default=200)
    seq.add_argument("--batch", type=int, default=20)
    seq.add_argument("--config", default="{}")
    seq.add_argument("--out", type=Path, default=Path("eval-sequential"))
    seq.set_defaults(run=sequential)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
