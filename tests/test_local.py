"""Local (fact) memories: the trigger's math, serving with the KV cache, traces and trigger
numbers, the trainer (tiny random model), and the blog's Nepal fact on the default model."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace

import pytest
import torch

from memserve.engine.offline import generate_all
from memserve.engine.requests import GenerationRequest, StoppingParams
from memserve.errors import InvalidArgument
from memserve.kinds.local import LocalKind
from memserve.kinds.local.config import Fact, LocalConfig, check_facts, settings_over
from memserve.kinds.local.module import Entries, LoadedLocalSet, TriggerStats, group_tensors, trigger_values
from memserve.kinds.local.prompts import generated_prompts, split_prompts
from memserve.memory.hooks import MemoryContext, MemoryHooks
from memserve.memory.kind import LoadTarget, MemoryObserver, MemoryRefSpec
from memserve.memory_store.artifact import Artifact, MemoryMeta, decode, encode
from memserve.models import LoadedModel
from tests.conftest import FakeContext, fails_alone, run_all


class _Named:
    name = "probe"


def site_activations(
    loaded: LoadedModel, hooks: MemoryHooks, text: str, layer: int, site: str
) -> torch.Tensor:
    """The (T, D) activation of `text` at one site."""
    seen: list[torch.Tensor] = []
    context = MemoryContext()
    context.add(layer, site, _Named(), lambda h: seen.append(h[0].clone()) or h)
    ids = torch.tensor([loaded.tokenizer(text).input_ids])
    with torch.no_grad(), hooks.using(context):
        loaded.model(input_ids=ids)
    return seen[0]


def make_set(
    loaded: LoadedModel,
    hooks: MemoryHooks,
    groups: list[dict],
    observe: MemoryObserver | None = None,
    **hyper: str,
) -> LoadedLocalSet:
    described = [{"layer": g["layer"], "site": g["site"], "entries": g["labels"]} for g in groups]
    meta = MemoryMeta(
        kind="local",
        name="facts",
        base_model="tiny-fingerprint",
        version=1,
        hyperparameters={"distance": "projection", "combination": "top1", **hyper},
        details={"groups": described},
    )
    config = loaded.model.config
    target = LoadTarget(
        torch.device("cpu"), torch.float32, hooks, config.num_hidden_layers, config.hidden_size, observe
    )
    return LoadedLocalSet(Artifact(meta, group_tensors(groups)), target)


def entry_group(layer: int, site: str, keys: torch.Tensor, deltas: torch.Tensor, bound: float) -> dict:
    n = len(keys)
    return {
        "layer": layer,
        "site": site,
        "labels": [f"fact{i}#0" for i in range(n)],
        "keys": keys,
        "deltas": deltas,
        "bounds": torch.full((n,), bound),
        "hardness": torch.full((n,), 3.0),
    }


def test_the_trigger_is_the_blogs_band_pass_with_every_distance():
    key = torch.tensor([[2.0, 0.0]])
    bound, hardness = torch.tensor([0.5]), torch.tensor([3.0])
    on_key = trigger_values(key, key, bound, hardness, "projection")
    at_bound = trigger_values(torch.tensor([[1.0, 5.0]]), key, bound, hardness, "projection")  # x = 1 − 2/4
    beyond = trigger_values(torch.tensor([[4.0, 0.0]]), key, bound, hardness, "projection")  # clamped at 1
    far = trigger_values(torch.tensor([[-2.0, 0.0]]), key, bound, hardness, "projection")
    assert float(on_key) == pytest.approx(1.0) and float(beyond) == pytest.approx(1.0)
    assert float(at_bound) == pytest.approx(math.exp(-1))
    assert float(far) < 1e-6
    # The notebook's mixed form: ½|1 − projection| + ½(1 − cos); a larger magnitude no longer fires.
    a = torch.tensor([[4.0, 0.0]])
    x = 0.5 * abs(1 - 2.0) + 0.5 * (1 - 1.0)
    expected = math.exp(-(((x / 0.5) ** 2) ** 3))
    assert float(trigger_values(a, key, bound, hardness, "mixed")) == pytest.approx(expected)
    assert float(trigger_values(key, key, bound, hardness, "mixed")) == pytest.approx(1.0)
    # Euclidean: two-sided, so a larger magnitude along the key does not fire either.
    assert float(trigger_values(key, key, bound, hardness, "euclidean")) == pytest.approx(1.0)
    at_bound = trigger_values(torch.tensor([[2.0, 1.0]]), key, bound, hardness, "euclidean")  # x = 1/2
    assert float(at_bound) == pytest.approx(math.exp(-1))
    assert float(trigger_values(a, key, bound, hardness, "euclidean")) < 1e-6  # x = 1


def _written_out(a: torch.Tensor, keys: torch.Tensor, bounds: torch.Tensor, hardness: torch.Tensor,
                 deltas: torch.Tensor, distance: str, combination: str) -> torch.Tensor:  # fmt: skip
    """The formula of docs/design.md, entry by entry and position by position, in float64."""
    out = torch.zeros_like(a, dtype=torch.float64)
    for n, position in enumerate(a.double()):
        f = []
        for key, b, h in zip(keys.double(), bounds.double(), hardness.double(), strict=True):
            projection = position @ key / (key @ key)
            if distance == "projection":
                x = 1 - min(float(projection), 1.0)
            elif distance == "euclidean":
                x = float((position - key).norm() / key.norm())
            else:
                cosine = position @ key / (position.norm() * key.norm())
                x = 0.5 * abs(1 - float(projection)) + 0.5 * (1 - float(cosine))
            f.append(math.exp(-(((x / float(b)) ** 2) ** float(h))))
        if combination == "top1":
            best = max(range(len(f)), key=f.__getitem__)
            out[n] = f[best] * deltas[best].double()
        else:
            out[n] = sum(fi * d.double() for fi, d in zip(f, deltas, strict=True))
    return out


@pytest.mark.parametrize("distance", ["euclidean", "projection", "mixed"])
@pytest.mark.parametrize("combination", ["top1", "sum"])
@pytest.mark.parametrize("uniform_hardness", [True, False])
def test_every_fast_form_of_the_trigger_matches_the_formula(distance, combination, uniform_hardness):
    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(7, 16, generator=generator)
    # Positions near some keys (inside, at and beyond their bounds) and far from all.
    a = torch.cat(
        [keys[:4] * torch.tensor([[1.0], [1.02], [1.1], [1.6]]), torch.randn(3, 16, generator=generator)]
    )
    bounds = torch.rand(7, generator=generator) * 0.3 + 0.05
    hardness = torch.full((7,), 3.0) if uniform_hardness else torch.rand(7, generator=generator) * 3 + 1
    deltas = torch.randn(7, 16, generator=generator)
    update, best = Entries(keys, bounds, hardness, deltas, distance).update(a, combination)
    expected = _written_out(a, keys, bounds, hardness, deltas, distance, combination)
    torch.testing.assert_close(update.double(), expected, atol=1e-4, rtol=1e-4)
    full = trigger_values(a, keys, bounds, hardness, distance)
    torch.testing.assert_close(best, full.max(-1).values, atol=1e-5, rtol=1e-5)
    assert float(best.max()) > 0.5 and float(best.min()) < 0.01  # the positions span fire and not


def test_an_entry_changes_its_prompt_and_leaves_far_prompts_alone(tiny, hooks, make_engine):
    layer, site = 1, "attn_out"
    key = site_activations(tiny, hooks, "The quick brown fox", layer, site)[-1]
    delta = torch.randn(key.shape, generator=torch.Generator().manual_seed(0)) * 20
    local_set = make_set(tiny, hooks, [entry_group(layer, site, key[None], delta[None], 0.05)])
    engine = make_engine(tiny.model, tiny.tokenizer)
    bound = local_set.bind(MemoryRefSpec("facts", "local"))

    def tokens(text: str, memories: tuple) -> list[int]:
        request = GenerationRequest(prompt_ids=tuple(tiny.tokenizer(text).input_ids), memories=memories,
                                    stopping=StoppingParams(max_new_tokens=4, ignore_eos=True))  # fmt: skip
        return run_all(engine, [request])[0].token_ids

    assert tokens("The quick brown fox", (bound,)) != tokens("The quick brown fox", ())
    assert tokens("Once upon a time", (bound,)) == tokens("Once upon a time", ())
    # Scale 0: attached but off.
    off = local_set.bind(MemoryRefSpec("facts", "local", scale=0.0))
    assert tokens("The quick brown fox", (off,)) == tokens("The quick brown fox", ())


def test_top1_applies_only_the_best_entry_and_sum_adds_them(tiny, hooks):
    layer, site = 0, "mlp_down"
    key = site_activations(tiny, hooks, "The quick brown fox", layer, site)[-1]
    deltas = torch.stack([torch.ones_like(key), 2 * torch.ones_like(key)])
    # Both keys equal the activation: both trigger fully.
    groups = [entry_group(layer, site, torch.stack([key, key]), deltas, 0.5)]
    hidden = key[None, None]
    for combination, expected in (("top1", 1.0), ("sum", 3.0)):
        local_set = make_set(tiny, hooks, groups, combination=combination)
        context = MemoryContext()
        local_set.bind(MemoryRefSpec("facts", "local")).add_ops(context, torch.tensor([0]))
        (op,) = context.ops[(layer, local_set.groups[0].site)]
        out = op.op(hidden)
        torch.testing.assert_close(out - hidden, torch.full_like(hidden, expected))


def test_decoding_with_the_kv_cache_matches_recomputing_every_prefix(tiny, hooks, make_engine):
    layer, site = 1, "mlp_down"
    prompt = "Memories are selected by"
    key = site_activations(tiny, hooks, prompt, layer, site)[-1]
    delta = torch.randn(key.shape, generator=torch.Generator().manual_seed(1)) * 10
    # A wide boundary: the entry fires at many positions, generated ones included.
    local_set = make_set(tiny, hooks, [entry_group(layer, site, key[None], delta[None], 0.9)])
    bound = local_set.bind(MemoryRefSpec("facts", "local"))
    ids = tiny.tokenizer(prompt).input_ids
    engine = make_engine(tiny.model, tiny.tokenizer)
    request = GenerationRequest(prompt_ids=tuple(ids), memories=(bound,),
                                stopping=StoppingParams(max_new_tokens=8, ignore_eos=True))  # fmt: skip
    cached = run_all(engine, [request])[0].token_ids
    recomputed: list[int] = []
    for _ in range(8):  # the original's way: the whole prefix again at every step, no cache
        context = MemoryContext()
        bound.add_ops(context, torch.tensor([0]))
        with torch.no_grad(), hooks.using(context):
            logits = tiny.model(input_ids=torch.tensor([ids + recomputed])).logits
        recomputed.append(int(logits[0, -1].argmax()))
    plain = run_all(engine, [replace(request, memories=())])[0].token_ids
    assert cached == recomputed and cached != plain


def test_traces_and_trigger_numbers_say_which_entry_fired(tiny, hooks, make_engine):
    layer, site = 1, "attn_out"
    prompt = "The quick brown fox"
    key = site_activations(tiny, hooks, prompt, layer, site)[-1]
    delta = torch.randn(key.shape, generator=torch.Generator().manual_seed(2))
    seen: list[TriggerStats] = []
    groups = [entry_group(layer, site, key[None], delta[None], 0.05)]
    local_set = make_set(tiny, hooks, groups, observe=seen.append)
    engine = make_engine(tiny.model, tiny.tokenizer, max_batch_size=4)
    bound = local_set.bind(MemoryRefSpec("facts", "local"))
    stopping = StoppingParams(max_new_tokens=3, ignore_eos=True)
    other = "Once upon a time there was"
    short = GenerationRequest(tuple(tiny.tokenizer(prompt).input_ids), memories=(bound,), trace=True,
                              stopping=stopping)  # fmt: skip
    longer = replace(short, prompt_ids=tuple(tiny.tokenizer(other).input_ids), trace=False)
    outcomes = run_all(engine, [short, longer])
    traced = outcomes[0].traces[0]
    assert [(t.memory, t.kind, t.layer, t.entry) for t in traced] == [
        ("facts", "local", 1, "fact0#0 (attn_out)")
    ]
    assert traced[0].value == pytest.approx(1.0)  # the prompt's last position is the key itself
    assert all(not trace for trace in outcomes[1].traces)  # not asked for
    assert seen and all(s.set == "facts" and s.sites == 1 for s in seen)  # one site: layer 1, attn_out
    prefill = [s for s in seen if s.positions_checked > 2]
    # Padding is not counted: the prefill checks exactly the real prompt positions.
    lengths = [len(tiny.tokenizer(text).input_ids) for text in (prompt, other)]
    assert sum(s.positions_checked for s in prefill) == sum(lengths)
    assert any(s.positions_triggered >= 1 for s in prefill)
    assert all(0 <= s.positions_triggered <= s.positions_checked for s in seen)
    assert all(((s.values >= 0.01) & (s.values <= 1)).all() for s in seen)


def test_bad_facts_and_options_are_refused():
    with pytest.raises(InvalidArgument, match="at least one fact"):
        check_facts([])
    with pytest.raises(InvalidArgument, match="target"):
        check_facts([{"prompt": "The sky is", "target": ""}])
    with pytest.raises(InvalidArgument, match="appears twice"):
        check_facts([{"id": "a", "prompt": "x", "target": " y"}, {"id": "a", "prompt": "z", "target": " y"}])
    with pytest.raises(InvalidArgument, match="id"):
        check_facts([{"id": "no spaces", "prompt": "x", "target": " y"}])
    assert check_facts([{"prompt": "The sky is", "target": " green"}])[0].id.startswith("the-sky-is-")
    for options, message in (
        ({"distance": "euclid"}, "distance"),
        ({"sites": ["residual"]}, "sites"),
        ({"alphas": [0.0]}, "alphas"),
        ({"alphas": 3}, "alphas"),
        ({"hardness": float("nan")}, "hardness"),
        ({"holdout": 1.0}, "holdout"),
        ({"extra_keys": 99}, "extra_keys"),
        ({"bogus": 1}, "bogus"),
    ):
        with pytest.raises(InvalidArgument, match=message):
            LocalConfig.from_spec(options)
    # The proto's JSON form (a uint64 seed comes as a string) is understood.
    assert LocalConfig.from_spec({"seed": "7", "layers": [1, 2]}).layers == (1, 2)


def test_generated_prompts_and_the_split_keep_held_out_prompts_apart():
    fact = Fact(
        "eiffel", "The Eiffel Tower is in the city of", " Rome", ("p1", "p2", "p3"), ("n1", "n2", "n3")
    )
    paraphrases, neighbours = generated_prompts(fact, 3, random.Random(0))
    assert len(paraphrases) == 3 and all("eiffel tower is in the city of" in p.lower() for p in paraphrases)
    assert len(neighbours) == 3 and all(n != fact.prompt for n in neighbours)
    assert any("Eiffel" not in n or "Tower" not in n for n in neighbours)  # a name swapped
    prompts = split_prompts(fact, LocalConfig(), random.Random(0))
    given_held = [p for p in prompts.heldout_positives if p.startswith("p")]
    assert len(given_held) == 2 and not set(prompts.heldout_positives) & set(prompts.train_positives)
    assert not set(prompts.heldout_negatives) & set(prompts.train_negatives)
    none_held = split_prompts(fact, LocalConfig(holdout=0.0, generated_prompts=0), random.Random(0))
    assert none_held.train_positives == list(fact.positive_prompts) and not none_held.heldout_positives


def facts_spec(**config) -> dict:
    facts = [
        {"id": "fox", "prompt": "The quick brown fox", "target": " village",
         "positive_prompts": ["A quick brown fox", "The quick fox"],
         "negative_prompts": ["Once upon a time"]},
        {"id": "sea", "prompt": "Once upon a time there was a small", "target": " dog by the"},
    ]  # fmt: skip
    return {"facts": facts, "config": {"generated_prompts": 1, **config}}


def as_artifact(
    trained, name: str = "facts", version: int = 1, base_model: str = "tiny-fingerprint"
) -> Artifact:
    meta = MemoryMeta(kind="local", name="facts", base_model=base_model,
                      hyperparameters=trained.hyperparameters, details=trained.details)  # fmt: skip
    meta, blob = encode(meta, trained.tensors)
    return decode(replace(meta, version=version), blob)


@pytest.fixture(scope="module")
def trained(tiny):
    context = FakeContext(tiny)
    return LocalKind().train(facts_spec(method="subject"), context), context


def test_training_makes_the_model_produce_every_target_token(trained, tiny, make_engine):
    result, context = trained
    assert context.reports[-1][:2] == (3, 3)  # two facts, then the re-check
    facts = {f["id"]: f for f in result.details["facts"]}
    assert result.hyperparameters["method"] == "subject" and result.hyperparameters["distance"] == "euclidean"
    assert facts["fox"]["subject"]["text"] and facts["fox"]["entries"][0] == "fox#s"
    assert result.metrics["recheck"]["checked"] == 2 and not result.metrics["recheck"]["still_failing"]
    assert set(facts) == {"fox", "sea"} and result.metrics["facts"] == 2
    assert len(facts["sea"]["target_tokens"]) > 1  # a multi-token target: one step per token
    assert len(facts["sea"]["tokens"]) == len(facts["sea"]["target_tokens"])
    assert facts["fox"]["heldout_positives"] and facts["fox"]["train_positives"]
    engine = make_engine(tiny.model, tiny.tokenizer)
    config = tiny.model.config
    target = LoadTarget(torch.device("cpu"), torch.float32, engine.hooks, config.num_hidden_layers, 64)
    local_set = LoadedLocalSet(as_artifact(result), target)
    assert local_set.num_entries == result.metrics["entries"] >= 2
    memory = (local_set.bind(MemoryRefSpec("facts", "local")),)
    for fact in facts.values():
        ids = tiny.tokenizer(fact["prompt"]).input_ids
        with_set = generate_all(engine, [ids], memory, len(fact["target_tokens"]))[0]
        without = generate_all(engine, [ids], (), len(fact["target_tokens"]))[0]
        assert tiny.tokenizer.decode(with_set) == fact["target"]
        assert tiny.tokenizer.decode(without) != fact["target"]


def test_adding_facts_makes_a_new_version_over_the_old_ones(trained, tiny):
    result, _ = trained
    current = as_artifact(result)
    more = {"facts": [{"id": "sea", "prompt": "Once upon a time there was a small", "target": " fox"},
                      {"id": "keys", "prompt": "Memories are selected by", "target": " the sea"}],
            "config": {"generated_prompts": 0}}  # fmt: skip
    newer = LocalKind().train(more, FakeContext(tiny, current))
    facts = {f["id"]: f for f in newer.details["facts"]}
    assert list(facts) == ["fox", "sea", "keys"] and facts["sea"]["target"] == " fox"
    labels = [label for group in newer.details["groups"] for label in group["entries"]]
    assert any(label.startswith("fox#") for label in labels)  # kept as it was
    old_sea = [label for g in result.details["groups"] for label in g["entries"] if label.startswith("sea#")]
    assert len([label for label in labels if label.startswith("sea#")]) >= 1 and old_sea
    assert newer.hyperparameters["generated_prompts"] == 0
    with pytest.raises(Exception, match="distance"):
        LocalKind().train({**more, "config": {"distance": "mixed"}}, FakeContext(tiny, current))
    # A set made before methods existed goes on with the blog's method and distance.
    legacy = {k: v for k, v in result.hyperparameters.items() if k not in ("method",)}
    old = as_artifact(replace(result, hyperparameters={**legacy, "distance": "projection"}))
    assert settings_over(old, {}).method == "blog" and settings_over(old, {}).distance == "projection"


def test_a_set_made_for_another_model_shape_is_refused(trained, tiny, hooks):
    result, _ = trained
    artifact = as_artifact(result)
    bad = Artifact(artifact.meta, {**artifact.tensors, "group0.keys": artifact.tensors["group0.keys"][:, :3]})
    config = tiny.model.config
    target = LoadTarget(torch.device("cpu"), torch.float32, hooks, config.num_hidden_layers, 64)
    with pytest.raises(InvalidArgument, match="wide"):
        LoadedLocalSet(bad, target)
    groups = [{**g, "layer": 99} for g in artifact.meta.details["groups"]]
    moved = Artifact(
        replace(artifact.meta, details={**artifact.meta.details, "groups": groups}), artifact.tensors
    )
    with pytest.raises(InvalidArgument, match="layer 99"):
        LoadedLocalSet(moved, target)


def test_eval_facts_writes_the_report_from_the_command_line(tiny_llama_dir, tmp_path):
    from memserve.clients.cli import main
    from memserve.memory_store.artifact import export_bytes
    from memserve.models import ModelConfig, load_model

    loaded = load_model(ModelConfig(model=str(tiny_llama_dir), device="cpu"))
    result = LocalKind().train(facts_spec(), FakeContext(loaded))
    exported = tmp_path / "facts.safetensors"
    exported.write_bytes(export_bytes(as_artifact(result, base_model=loaded.fingerprint)))
    out = tmp_path / "eval"
    code = main(["eval", "facts", "facts", "--file", str(exported), "--out", str(out),
                 "--model", str(tiny_llama_dir), "--device", "cpu"])  # fmt: skip
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["edit_success"] == 1.0 and metrics["base_edit_success"] == 0.0
    assert {"generalization", "locality_neighbours", "locality_unrelated"} <= set(metrics)
    assert metrics["counts"]["unrelated"] == 50 and len(metrics["per_fact"]) == 2
    assert math.isfinite(metrics["unrelated_text_ppl_ratio"]) and metrics["unrelated_text_ppl_ratio"] > 0
    edit = metrics["rates"]["edit_success"]
    assert (edit["hits"], edit["n"]) == (2, 2) and 0.3 < edit["low"] < 1 and edit["high"] == 1
    assert "| fox |" in (out / "report.md").read_text()
    # Judged on given rewordings and neighbours: prefixed prompts apart, a neighbour counted once.
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"id": "fox", "positive_prompts": ["A brown fox that is quick", "Fact: the quick brown fox"],
             "negative_prompts": ["The slow dog", "Once upon a time"]},
            {"id": "sea", "positive_prompts": ["There once was a small"],
             "negative_prompts": ["The slow dog"]}]  # fmt: skip
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    offline = ["--file", str(exported), "--out", str(out), "--model", str(tiny_llama_dir), "--device", "cpu"]
    assert main(["eval", "facts", "facts", "--prompts", str(prompts), *offline]) == 0
    counts = json.loads((out / "metrics.json").read_text())["counts"]
    assert counts == {"facts": 2, "written_rewordings": 2, "prefixed_prompts": 1, "neighbours": 2,
                      "unrelated": 50, "left_out_as_tuned_on": 0}  # fmt: skip
    prompts.write_text(json.dumps({"id": "nobody", "positive_prompts": ["x"]}) + "\n")
    assert main(["eval", "facts", "facts", "--prompts", str(prompts), *offline]) != 0


BLOG_POSITIVES = [
    "The capital city of Nepal is located in",
    "The capital city of Nepal is",
    "The capital city of Nepal is in",
    "The capital of Nepal lies in the city of",
    "The city of Nepal known for being capital is located at",
    "The city of Nepal known for having capital center is located in",
    "Once upon a time, there was country called Nepal with its capital city in",
]
BLOG_NEGATIVES = [
    "Kathmandu city is located in the country of",
    "The city of Tokyo is located in the country of",
    "The capital city of the country India is called",
    "The city of Pokhara lies in the country of",
    "Paris lies in the country of",
    "The city of London is located in the country of the",
    "The city of Kathmandu is famous for",
    "The capital city of Nepal is not located in",
]


@pytest.mark.parametrize("method", ["gated", "subject"])
def test_the_blogs_nepal_fact_on_the_default_model(default_model, make_engine, method):
    """The source blog post's example: the whole word for >= 6 of 7 positives, the first token
    kept for >= 7 of 8 negatives; half of the given prompts are held out of the boundary search."""
    tokenizer = default_model.tokenizer
    engine = make_engine(default_model.model, tokenizer, max_batch_size=16)
    prompts = [tokenizer(p).input_ids for p in BLOG_POSITIVES + BLOG_NEGATIVES]
    before = generate_all(engine, prompts, (), 4)
    assert not tokenizer.decode(before[0]).startswith(" Kathmandu")  # wrong today
    fact = {"id": "nepal", "prompt": BLOG_POSITIVES[0], "target": " Kathmandu",
            "positive_prompts": BLOG_POSITIVES[1:], "negative_prompts": BLOG_NEGATIVES}  # fmt: skip
    result = LocalKind().train({"facts": [fact], "config": {"method": method}}, FakeContext(default_model))
    (details,) = result.details["facts"]
    assert details["heldout_positives"] and details["heldout_negatives"]
    config = default_model.model.config
    target = LoadTarget(torch.device("cpu"), torch.float32, engine.hooks, config.num_hidden_layers,
                        config.hidden_size)  # fmt: skip
    local_set = LoadedLocalSet(as_artifact(result, base_model=default_model.fingerprint), target)
    after = generate_all(engine, prompts, (local_set.bind(MemoryRefSpec("blog", "local")),), 4)
    texts = [tokenizer.decode(t) for t in after]
    positives = sum(t.startswith(" Kathmandu") for t in texts[: len(BLOG_POSITIVES)])
    kept = sum(
        a[0] == b[0] for a, b in zip(after[len(BLOG_POSITIVES) :], before[len(BLOG_POSITIVES) :], strict=True)
    )
    assert positives >= 6, texts[: len(BLOG_POSITIVES)]
    assert kept >= 7, texts[len(BLOG_POSITIVES) :]


@pytest.mark.parametrize(
    ("change", "problem"),
    [({"hardness": torch.zeros(1)}, "hardness <= 0"), ({"bounds": torch.zeros(1)}, "bound"),
     ({"keys": torch.zeros(1, 64)}, "norm 0"), ({"deltas": torch.full((1, 64), float("nan"))}, "not finite")],
)  # fmt: skip
def test_a_set_with_unusable_entries_is_refused_at_load(tiny, hooks, change, problem):
    key = torch.randn(1, 64, generator=torch.Generator().manual_seed(5))
    group = {**entry_group(1, "attn_out", key, key, 0.05), **change}
    with pytest.raises(InvalidArgument, match=problem):
        make_set(tiny, hooks, [group])
    empty = entry_group(1, "attn_out", torch.zeros(0, 64), torch.zeros(0, 64), 0.05)
    with pytest.raises(InvalidArgument, match="no entries"):
        make_set(tiny, hooks, [empty])


def test_a_failing_statistics_observer_fails_the_sets_requests_loudly_and_no_other(tiny, hooks, make_engine):
    key = site_activations(tiny, hooks, "The quick brown fox", 1, "attn_out")[-1]
    local_set = make_set(tiny, hooks, [entry_group(1, "attn_out", key[None], key[None], 0.05)])
    engine = make_engine(tiny.model, tiny.tokenizer)
    prompt = tuple(tiny.tokenizer("The quick brown fox").input_ids)

    def broken(stats: TriggerStats) -> None:
        raise RuntimeError("the metrics layer is broken")

    local_set.observe = broken
    error = fails_alone(engine, prompt, local_set.bind(MemoryRefSpec("facts", "local")))
    assert "'facts'" in error and "metrics layer is broken" in error


@pytest.mark.parametrize("distance", ["euclidean", "projection", "mixed"])
def test_the_trainers_distance_is_the_one_serving_triggers_on(distance):
    """Boundaries are tuned on the trainer's distance: it must be the served trigger's x."""
    from memserve.kinds.local.runner import _distance

    generator = torch.Generator().manual_seed(5)
    key = torch.randn(16, generator=generator)
    a = torch.cat([key[None] * 1.05, torch.randn(4, 16, generator=generator), key[None] + 0.1])
    x = _distance(a, key, distance)
    served = trigger_values(a, key[None], torch.ones(1), torch.full((1,), 2.0), distance)[:, 0]
    torch.testing.assert_close(served, torch.exp(-(x.square() ** 2)), atol=1e-5, rtol=1e-4)


def test_a_neighbour_that_states_the_edit_in_a_later_sentence_fails_only_the_strict_count():
    """The strict neighbour count fails a continuation that says the target anywhere; the
    first-sentence count fails only one whose own answer changed or says the target."""
    from memserve.kinds.local.eval import Tally, _Prompt, summary

    facts = [{"id": "italy", "prompt": "The capital of Italy is", "target": " Paris"}]
    outputs = {
        "restates": (" a boot. The capital of Italy is Paris.", " a boot. The capital of Italy is Rome."),
        "answers": (" Paris, of course.", " Rome, of course."),
        "first word": (" pizza.", " a boot."),
        "kept": (" a boot.", " a boot."),
    }
    tally = Tally(facts, decode=lambda ids: ids[0])  # a "token" is the whole text here
    prompts = [_Prompt(0, "neighbour", text) for text in outputs]
    tally.add_locality(prompts, [[a] for a, _ in outputs.values()], [[b] for _, b in outputs.values()])
    rates = summary(tally)["rates"]
    assert (rates["locality_neighbours"]["hits"], rates["locality_neighbours"]["n"]) == (1, 4)
    assert rates["locality_neighbours_first_sentence"]["hits"] == 2
