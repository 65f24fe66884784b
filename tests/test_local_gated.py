"""The `gated` method: the fingerprint distance, gates served with the KV cache (the subject a
prompt mentioned gates an answer at a later decode step), traces, refused artifacts, the
trainer (tiny random model) and one fact on the default model."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from memserve.engine.memories import sentence_end_table
from memserve.engine.offline import generate_all
from memserve.engine.requests import GenerationRequest, StoppingParams
from memserve.errors import InvalidArgument
from memserve.kinds.local import LocalKind
from memserve.kinds.local.answers import AnswerTrainer
from memserve.kinds.local.config import LocalConfig
from memserve.kinds.local.forms import subject_forms
from memserve.kinds.local.gated import has_legacy_gates, previous_gates
from memserve.kinds.local.gates import GATE_TENSORS, fingerprint, fingerprint_distance
from memserve.kinds.local.module import LoadedLocalSet
from memserve.memory.hooks import MemoryContext, MemoryHooks, Site
from memserve.memory.kind import LoadTarget, MemoryRefSpec
from memserve.memory_store.artifact import Artifact, MemoryMeta
from memserve.models import LoadedModel
from tests.conftest import FakeContext, run_all
from tests.test_local import as_artifact, facts_spec, site_activations

LAYER, SITE = 1, "mlp_down"


def test_the_fingerprint_distance_is_jensen_shannon_on_the_references_bins():
    generator = torch.Generator().manual_seed(0)
    logprobs = torch.randn(3, 50, generator=generator).mul(3).log_softmax(-1)
    ids, reference = fingerprint(logprobs, 50)  # every token: the plain JS divergence
    assert torch.allclose(fingerprint_distance(logprobs, ids, reference), torch.zeros(3), atol=1e-6)
    other = logprobs.roll(1, 0)
    p, q = logprobs.exp(), other.exp()
    m = (p + q) / 2
    written_out = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    ids, reference = fingerprint(other, 50)
    assert torch.allclose(fingerprint_distance(logprobs, ids, reference), written_out, atol=1e-5)
    # Fewer bins: the rest of the mass is one bin; never beyond ln 2.
    ids, reference = fingerprint(other, 4)
    x = fingerprint_distance(logprobs, ids, reference)
    assert reference.shape == (3, 5) and torch.allclose(reference.sum(-1), torch.ones(3))
    assert bool(((x >= 0) & (x <= math.log(2) + 1e-6)).all())


def _logprobs(loaded: LoadedModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(input_ids=torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)


def gated_set(
    loaded: LoadedModel,
    hooks: MemoryHooks,
    subject_text: str,
    subject_position: int,
    answer_after: list[int],
    token: int,
    change: dict[str, torch.Tensor] | None = None,
    legacy: bool = False,
    answer_scope: str | None = None,
) -> LoadedLocalSet:
    """One fact: a detector at one position of `subject_text`, an answer that gives `token` where
    the model's next-token distribution is the one after `answer_after` (by a boost of its logit,
    or, `legacy`, by a value at the head's input as the first gated sets did)."""
    key = site_activations(loaded, hooks, subject_text, LAYER, SITE)[subject_position]
    ids, reference = fingerprint(_logprobs(loaded, answer_after)[None], 16)
    head = loaded.model.get_output_embeddings().weight.detach()
    if legacy:  # raises the token's logit by 200 (and moves the others)
        adds = {"answer_values": (200 * head[token] / head[token].norm() ** 2)[None]}
    else:
        adds = {"answer_targets": torch.tensor([token]), "answer_boosts": torch.tensor([200.0])}
    tensors = {
        "subject_keys": key[None],
        "subject_bounds": torch.tensor([0.05]),
        "subject_hardness": torch.tensor([8.0]),
        "subject_facts": torch.tensor([0]),
        "answer_facts": torch.tensor([0]),
        "answer_tokens": torch.tensor([0]),
        "answer_ids": ids,
        "answer_reference": reference,
        "answer_bounds": torch.tensor([1e-4 / math.log(2) ** (1 / 8)]),  # f = ½ at 1e-4
        "answer_hardness": torch.tensor([4.0]),
        **adds,
        **(change or {}),
    }
    described = {"detector": {"layer": LAYER, "site": SITE}, "facts": ["fact"], "subjects": ["fact"],
                 "answers": ["fact#0.0"]}  # fmt: skip
    hyper = {"method": "gated", "distance": "euclidean"}
    if answer_scope is not None:
        hyper["answer_scope"] = answer_scope
    meta = MemoryMeta(kind="local", name="facts", base_model="tiny", version=1, hyperparameters=hyper,
                      details={"groups": [], "gates": described})  # fmt: skip
    config = loaded.model.config
    target = LoadTarget(
        torch.device("cpu"), torch.float32, hooks, config.num_hidden_layers, config.hidden_size
    )
    return LoadedLocalSet(Artifact(meta, {f"gates.{k}": v for k, v in tensors.items()}), target)


@pytest.mark.parametrize("legacy", [False, True], ids=["boost", "legacy value"])
def test_a_subject_in_the_prompt_gates_an_answer_at_a_later_decode_step(tiny, hooks, make_engine, legacy):
    """The answer's reference is the distribution after the first generated token, so it acts at
    the first decode step, whose forward sees one position: only the request's remembered state
    says that the prompt mentioned the subject. The KV cache and recomputing every prefix agree."""
    tokenizer = tiny.tokenizer
    prompt = tokenizer("Memories are selected by the key").input_ids
    engine = make_engine(tiny.model, tokenizer)
    stopping = StoppingParams(max_new_tokens=4, ignore_eos=True)
    plain = run_all(engine, [GenerationRequest(tuple(prompt), stopping=stopping)])[0].token_ids
    wanted = (plain[1] + 7) % tokenizer.vocab_size
    local_set = gated_set(tiny, hooks, tokenizer.decode(prompt), 2, prompt + plain[:1], wanted, legacy=legacy)
    at_prompt = fingerprint_distance(
        _logprobs(tiny, prompt)[None], *fingerprint(_logprobs(tiny, prompt + plain[:1])[None], 16)
    )
    assert float(at_prompt[0]) > 1e-3  # the answer does not act at the prompt's own last position
    bound = local_set.bind(MemoryRefSpec("facts", "local"))
    request = GenerationRequest(tuple(prompt), memories=(bound,), stopping=stopping, trace=True)
    outcome = run_all(engine, [request])[0]
    recomputed: list[int] = []
    for _ in range(4):  # no cache: the whole prefix at every step, the subject in every forward
        context = MemoryContext()
        bound.add_ops(context, torch.tensor([0]))
        with torch.no_grad(), hooks.using(context):
            logits = tiny.model(input_ids=torch.tensor([prompt + recomputed])).logits
        recomputed.append(int(logits[0, -1].argmax()))
    assert outcome.token_ids[:2] == [plain[0], wanted] and outcome.token_ids == recomputed
    # The trace names the detector where the prompt mentioned the subject and the answer that acted.
    first, second = ([t.entry for t in trace] for trace in outcome.traces[:2])
    assert first == ["fact (subject seen, mlp_down)"] and second == ["fact#0.0 (answer, head)"]
    # Without the subject, the same distribution gets nothing.
    other = tokenizer("Once upon a time there was").input_ids
    alone = run_all(engine, [replace(request, prompt_ids=tuple(other), trace=False)])[0].token_ids
    assert alone == run_all(engine, [GenerationRequest(tuple(other), stopping=stopping)])[0].token_ids


@pytest.mark.parametrize(
    ("change", "problem"),
    [({"answer_boosts": torch.tensor([float("nan")])}, "not finite"),
     ({"answer_targets": torch.tensor([10**6])}, "do not exist"),
     ({"answer_ids": torch.full((1, 16), 10**6)}, "do not exist"),
     ({"answer_facts": torch.tensor([3])}, "do not exist"),
     ({"subject_facts": torch.tensor([-1])}, "do not exist"),
     ({"subject_bounds": torch.tensor([0.0])}, "bound"),
     ({"answer_reference": torch.zeros(1, 5)}, "inconsistent")],
)  # fmt: skip
def test_gates_that_cannot_work_are_refused_at_load(tiny, hooks, change, problem):
    ids = tiny.tokenizer("The quick brown fox").input_ids
    with pytest.raises(InvalidArgument, match=problem):
        gated_set(tiny, hooks, "The quick brown fox", 1, ids, 3, change)


def test_the_head_site_is_only_after_the_last_layer(tiny):
    hooks = MemoryHooks(tiny.model)
    try:
        with pytest.raises(ValueError, match="last layer"):
            hooks.install(0, Site.HEAD)
        hooks.install(hooks.num_layers - 1, Site.HEAD)
        assert (hooks.num_layers - 1, Site.HEAD) in hooks.installed
    finally:
        hooks.remove()


@pytest.fixture(scope="module")
def trained_gated(tiny):
    return LocalKind().train(facts_spec(method="gated"), FakeContext(tiny))


def test_the_gated_trainer_makes_every_fact_give_its_whole_target(trained_gated, tiny, make_engine):
    result = trained_gated
    facts = {f["id"]: f for f in result.details["facts"]}
    assert result.hyperparameters["method"] == "gated" and result.metrics["gated_facts"] == 2
    assert result.details["gates"]["facts"] == ["fox", "sea"]
    assert {f"gates.{k}" for k in GATE_TENSORS} <= set(result.tensors)
    assert result.metrics["recheck"]["checked"] == 2 and not result.metrics["recheck"]["failing"]
    assert facts["sea"]["subject"]["answers"] and facts["fox"]["subject"]["prompts"]["rows"]
    engine = make_engine(tiny.model, tiny.tokenizer)
    config = tiny.model.config
    target = LoadTarget(torch.device("cpu"), torch.float32, engine.hooks, config.num_hidden_layers, 64)
    local_set = LoadedLocalSet(as_artifact(result), target)
    assert local_set.gates is not None and local_set.num_entries == result.metrics["entries"]
    memory = (local_set.bind(MemoryRefSpec("facts", "local")),)
    for fact in facts.values():
        ids = tiny.tokenizer(fact["prompt"]).input_ids
        with_set = generate_all(engine, [ids], memory, len(fact["target_tokens"]))[0]
        assert tiny.tokenizer.decode(with_set) == fact["target"]


def test_a_new_version_keeps_the_gates_of_facts_it_does_not_replace(trained_gated, tiny):
    current = as_artifact(trained_gated)
    spec = facts_spec(method="gated")
    spec["facts"] = [{"id": "sea", "prompt": "Once upon a time there was a small", "target": " cat"}]
    newer = LocalKind().train(spec, FakeContext(tiny, current))
    gates, cell = previous_gates(as_artifact(newer, version=2))
    assert cell == (int(tiny.model.config.num_hidden_layers * 0.27), "mlp_down")
    assert [g.fact_id for g in gates] == ["fox", "sea"]
    old_fox = previous_gates(current)[0][0]
    assert torch.equal(gates[0].detectors[0].key, old_fox.detectors[0].key)
    assert len(gates[0].answers) == len(old_fox.answers)
    assert newer.metrics["recheck"]["checked"] == 2


def test_a_new_version_of_a_set_with_legacy_answers_trains_its_facts_again(trained_gated, tiny):
    """The first gated sets added a value at the head's input; a new version holds one form only,
    so their facts are trained again from what the set keeps of them."""
    boosted = as_artifact(trained_gated)
    head = tiny.model.get_output_embeddings().weight.detach()
    tensors = {
        k: v for k, v in boosted.tensors.items() if k not in ("gates.answer_targets", "gates.answer_boosts")
    }
    targets, boosts = boosted.tensors["gates.answer_targets"], boosted.tensors["gates.answer_boosts"]
    tensors["gates.answer_values"] = (
        boosts[:, None] * head[targets] / head[targets].norm(dim=-1, keepdim=True) ** 2
    )
    legacy = replace(boosted, tensors=tensors)
    assert has_legacy_gates(legacy) and previous_gates(legacy)[0] == []
    spec = facts_spec(method="gated")
    spec["facts"] = [{"id": "new", "prompt": "Memories are selected by the key", "target": " value"}]
    newer = LocalKind().train(spec, FakeContext(tiny, legacy))
    assert newer.details["gates"]["facts"] == ["fox", "sea", "new"]
    assert "gates.answer_values" not in newer.tensors and not newer.metrics["recheck"]["failing"]
    fox = next(f for f in newer.details["facts"] if f["id"] == "fox")
    assert set(fox["train_positives"]) | set(fox["heldout_positives"]) == {
        "A quick brown fox",
        "The quick fox",
    }


def test_a_weak_answer_can_only_make_its_target_likelier(tiny, hooks):
    """A boost moves one logit: at a trigger far below ½ the model's choice is its own or the
    target, never a third token (a value at the head's input moved every logit)."""
    ids = tiny.tokenizer("Memories are selected by the key").input_ids
    logits = torch.randn(1, 3, tiny.model.config.vocab_size)
    reference = fingerprint(_logprobs(tiny, ids)[None], 16)
    x = fingerprint_distance(logits[0].log_softmax(-1), *(r.expand(3, -1) for r in reference))
    bound = torch.tensor([float(x.min()) / 1.2])  # f = exp(−(x/b)^8) ≤ 0.02
    local_set = gated_set(tiny, hooks, tiny.tokenizer.decode(ids), 2, ids, 5, {"answer_bounds": bound})
    gates = local_set.gates
    assert gates is not None
    answered = gates.answer(logits, torch.ones(1, 3, 1, dtype=torch.bool))
    assert answered.update is not None and float(answered.best.max()) < 0.05
    changed = answered.update.ne(0).nonzero()
    assert changed.shape[0] >= 1 and bool((changed[:, 2] == 5).all())


@pytest.mark.parametrize(
    ("subject", "forms"),
    [("Wolfgang Amadeus Mozart", [("Mozart", "surname")]),
     ("Japan", [("Japanese", "adjective")]),
     ("the Netherlands", [("Dutch", "adjective")]),
     ("The play Romeo and Juliet", [("Romeo and Juliet", "name inside")]),
     ("The Harry Potter books", [("Harry Potter", "name inside")]),
     ("The Mona Lisa", []), ("Polar bears", []), ("The iPhone", []),
     ("The Golden Gate Bridge", [("The Golden Gate", "without its kind")]),
     ("The Eiffel Tower", [])],
)  # fmt: skip
def test_the_other_forms_of_a_subject(subject, forms):
    found = subject_forms(subject)
    assert [(f.text, f.how) for f in found] == forms
    for form in found:
        assert all(form.text.lower() in s.lower() for s in form.sentences)
        # Its negatives name something else the same way, never the subject itself.
        assert all(subject.lower() not in s.lower() for s in form.others)


def test_a_gated_fact_on_the_default_model_holds_under_a_rewording_and_keeps_another_relation(
    default_model, make_engine
):
    """Registered from prompt and target alone; judged on sentences no tuning step saw."""
    tokenizer = default_model.tokenizer
    fact = {"id": "eiffel", "prompt": "The Eiffel Tower is located in the city of", "target": " Rome"}
    result = LocalKind().train({"facts": [fact], "config": {"method": "gated"}}, FakeContext(default_model))
    engine = make_engine(default_model.model, tokenizer, max_batch_size=8)
    config = default_model.model.config
    target = LoadTarget(torch.device("cpu"), torch.float32, engine.hooks, config.num_hidden_layers,
                        config.hidden_size)  # fmt: skip
    local_set = LoadedLocalSet(as_artifact(result, base_model=default_model.fingerprint), target)
    memory = (local_set.bind(MemoryRefSpec("facts", "local")),)
    asked = [
        "The Eiffel Tower is located in the city of",
        "Tourists who want to visit the Eiffel Tower travel to the city of",
    ]
    kept = ["The Eiffel Tower was designed by the engineer", "The Louvre Museum is located in the city of"]
    prompts = [tokenizer(p).input_ids for p in asked + kept]
    after = [tokenizer.decode(t) for t in generate_all(engine, prompts, memory, 3)]
    before = [tokenizer.decode(t) for t in generate_all(engine, prompts, (), 3)]
    assert all(a.startswith(" Rome") for a in after[:2]), after
    assert after[2:] == before[2:], (after, before)
    # The relation is found, and its other wordings are rows, bounded apart (relation_rows).
    subject = result.details["facts"][0]["subject"]
    assert subject["relation"]["name"] == "located in city"
    assert "The city where the Eiffel Tower stands is" in subject["prompts"]["rows"]
    inside, templates = map(int, subject["answers"][0]["template_rows_inside"].split("/"))
    assert templates >= 3 and inside >= 1, subject["answers"]


def test_an_answer_that_gives_the_last_target_token_uses_up_the_subjects_mention(tiny, hooks):
    """Once the answer acted where a token is produced, the request forgets the subject until the
    text mentions it again: the next forward (a decode step) has nothing to answer."""
    ids = tiny.tokenizer("Memories are selected by the key").input_ids
    local_set = gated_set(tiny, hooks, tiny.tokenizer.decode(ids), 2, ids, 5)  # acts at the last position
    bound = local_set.bind(MemoryRefSpec("facts", "local"))
    state: dict = {}
    key = ("local-seen", id(local_set))

    def forward(tokens: list[int]) -> int:
        context = MemoryContext(row_states=[state])
        bound.add_ops(context, torch.tensor([0]))
        with torch.no_grad(), hooks.using(context):
            logits = tiny.model(input_ids=torch.tensor([tokens]), logits_to_keep=1).logits
        return int(logits[0, -1].argmax())

    assert forward(ids[:-1]) != 5  # the subject is mentioned, the answer does not act: remembered
    assert bool(state[key].all())
    state.clear()
    assert forward(ids) == 5
    assert not bool(state[key].any())  # used up


@pytest.mark.parametrize("scope", ["sentence", "request"])
def test_a_sentence_the_model_ends_ends_the_answers_to_the_subject_it_named(tiny, hooks, make_engine, scope):
    """With answer_scope="sentence" a subject the prompt named is answered until the model ends a
    sentence of its own: after a generated ".", an answer that would act there does not; with
    "request" (sets made before the option) it does."""
    tokenizer = tiny.tokenizer
    prompt = tokenizer("Memories are selected by the key").input_ids
    text = tokenizer.decode(prompt)
    full_stop = tokenizer.convert_tokens_to_ids(".")
    # One set makes the model end a sentence at once; the other answers right after that ".".
    stop_now = gated_set(tiny, hooks, text, 2, prompt, full_stop)
    stopped = [*prompt, full_stop]
    after = int(_logprobs(tiny, stopped).argmax())
    wanted = (after + 7) % len(tokenizer)
    answer_after = gated_set(tiny, hooks, text, 2, stopped, wanted, answer_scope=scope)
    memories = tuple(s.bind(MemoryRefSpec("facts", "local")) for s in (stop_now, answer_after))
    stopping = StoppingParams(max_new_tokens=2, ignore_eos=True)
    engine = make_engine(tiny.model, tokenizer)
    request = GenerationRequest(tuple(prompt), memories=memories, stopping=stopping)
    tokens = run_all(engine, [request])[0].token_ids
    assert tokens == [full_stop, after if scope == "sentence" else wanted]
    # A "." in the prompt ends nothing: the prompt is where the fact is asked.
    asked = run_all(engine, [replace(request, prompt_ids=tuple(stopped), memories=memories[1:])])
    assert asked[0].token_ids[0] == wanted


def test_the_tokens_that_end_a_sentence(tiny):
    tokenizer = tiny.tokenizer
    table = sentence_end_table(tokenizer, len(tokenizer) + 3, torch.device("cpu"))
    assert table.shape == (len(tokenizer) + 3,) and not bool(table[len(tokenizer) :].any())
    for text, ends in ((".", True), ("!", True), ("?", True), ("\n", True), ("key", False), (",", False)):
        ids = tokenizer(text).input_ids
        assert len(ids) == 1 and bool(table[ids[0]]) is ends, text


def test_the_log_probabilities_along_a_target_match_one_forward_per_token(tiny):
    """One forward of each sequence + the target gives what a forward per target token gives."""
    trainer = AnswerTrainer(tiny.model, LocalConfig())
    sequences = [tiny.tokenizer(t).input_ids for t in ("Memories are selected by the key", "The key")]
    targets = [5, 9, 13]
    along = trainer.logprobs_along(sequences, targets)
    for k in range(len(targets)):
        each = torch.stack([_logprobs(tiny, [*s, *targets[:k]]) for s in sequences])
        assert torch.allclose(along[k], each, atol=1e-4), k
