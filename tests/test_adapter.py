"""Adapter memories: the module, attached vs detached logits, scale and gate, training (tiny
random Llama), artifacts, one request with an adapter, a document bank and a local set, and
the factuality evaluation's prompt, shots, parsing and metrics."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from memserve.engine.requests import GenerationRequest, StoppingParams
from memserve.errors import InvalidArgument
from memserve.kinds.adapter import AdapterKind
from memserve.kinds.adapter.claims import (
    INSTRUCTION,
    Claim,
    parse_answer,
    prompt_for,
    read_claims,
    scores,
    shots_for,
    template_for,
)
from memserve.kinds.adapter.config import AdapterConfig, default_layer
from memserve.kinds.adapter.eval import add_likelihood, evaluate
from memserve.kinds.adapter.module import Adapter, LoadedAdapter, adapter_tensors
from memserve.kinds.adapter.train import examples, template_text
from memserve.kinds.document.module import DocumentBank, LoadedDocumentBank, shape_from
from memserve.memory.hooks import MemoryContext, MemoryHooks
from memserve.memory.kind import LoadTarget, MemoryKey, MemoryRefSpec
from memserve.memory_store.artifact import Artifact, MemoryMeta, decode, encode
from memserve.models import LoadedModel
from tests.conftest import FakeContext, fails_alone, run_all

FIXTURE = Path(__file__).parent / "fixtures" / "factuality"


def target_of(loaded: LoadedModel, hooks: MemoryHooks) -> LoadTarget:
    config = loaded.model.config
    return LoadTarget(torch.device("cpu"), torch.float32, hooks, config.num_hidden_layers, config.hidden_size)


def adapter_artifact(loaded: LoadedModel, layer: int = 1, gate: float = 0.5, seed: int = 0) -> Artifact:
    torch.manual_seed(seed)
    adapter = Adapter(loaded.model.config.hidden_size, 16)
    with torch.no_grad():
        adapter.gate.fill_(gate)
    meta = MemoryMeta(kind="adapter", name="facts-adapter", base_model="tiny-fingerprint", version=1,
                      hyperparameters={"layer": layer, "hidden_size": 16})  # fmt: skip
    return Artifact(meta, adapter_tensors(adapter))


def logits(loaded: LoadedModel, hooks: MemoryHooks, texts: list[str], memories: list) -> torch.Tensor:
    """Last-position logits of each text (one batch), row i using memories[i] (a tuple of bound memories)."""
    encoded = [loaded.tokenizer(t).input_ids for t in texts]
    width = max(len(e) for e in encoded)
    ids = torch.tensor([[0] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    context = MemoryContext()
    for row, bound in enumerate(memories):
        for memory in bound:
            memory.add_ops(context, torch.tensor([row]))
    with torch.no_grad(), hooks.using(context):
        return loaded.model(input_ids=ids, attention_mask=mask).logits[:, -1]


def test_an_untrained_adapter_is_the_identity_and_its_update_is_gated_layer_norm():
    adapter = Adapter(8, 4)
    hidden = torch.randn(2, 3, 8)
    assert float(adapter.gate.detach()) == 0.0 and torch.equal(adapter(hidden), torch.zeros_like(hidden))
    with torch.no_grad():
        adapter.gate.fill_(2.0)
    expected = 2.0 * adapter.norm(adapter.down(torch.nn.functional.gelu(adapter.up(hidden))))
    torch.testing.assert_close(adapter(hidden), expected)
    normalised = (
        adapter(hidden) / 2.0
    )  # LayerNorm with its initial weight 1, bias 0: zero mean, unit variance
    torch.testing.assert_close(normalised.mean(-1), torch.zeros(2, 3), atol=1e-5, rtol=0)


def test_an_attached_adapter_changes_the_logits_and_a_detached_one_does_not(tiny, hooks):
    """The study's published table had adapter variants equal to the baseline to the last digit;
    here attaching must change the logits, and not attaching (or scale 0) must not."""
    loaded = LoadedAdapter(adapter_artifact(tiny), target_of(tiny, hooks))
    attached = (loaded.bind(MemoryRefSpec("facts-adapter", "adapter")),)
    off = (loaded.bind(MemoryRefSpec("facts-adapter", "adapter", scale=0.0)),)
    texts = ["The quick brown fox", "Once upon a time there"]
    base = logits(tiny, hooks, texts, [(), ()])
    with_it = logits(tiny, hooks, texts, [attached, attached])
    assert (with_it - base).abs().max() > 1e-2  # attached: the logits move
    # Detached, in the same batch as a row that uses it, and after it was used: exactly the base.
    mixed = logits(tiny, hooks, texts, [attached, ()])
    torch.testing.assert_close(mixed[1], base[1], atol=0, rtol=0)
    torch.testing.assert_close(mixed[0], with_it[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(tiny, hooks, texts, [(), ()]), base, atol=0, rtol=0)
    torch.testing.assert_close(logits(tiny, hooks, texts, [off, off]), base, atol=0, rtol=0)
    # A gate of 0 (what training starts from) changes nothing either.
    closed = LoadedAdapter(adapter_artifact(tiny, gate=0.0), target_of(tiny, hooks))
    torch.testing.assert_close(
        logits(tiny, hooks, texts, [(closed.bind(MemoryRefSpec("x", "adapter")),)] * 2), base, atol=0, rtol=0
    )


def random_bank(loaded: LoadedModel, target: LoadTarget) -> LoadedDocumentBank:
    """A document bank at layer 1 whose update is not zero (as if trained), with one document."""
    hyper = {"layer": 1, "memory_dim": 8, "key_dim": 2, "key_activation": "tanh", "key_module": "linear",
             "key_depth": 1, "token_activation": "silu"}  # fmt: skip
    torch.manual_seed(1)
    bank = DocumentBank(shape_from(hyper, loaded.model.config.hidden_size))
    with torch.no_grad():
        for parameter in bank.value.parameters():
            parameter.normal_(0, 0.5)
    tensors = {f"bank.{k}": v for k, v in bank.state_dict().items()} | {
        "docreps": torch.tensor([[0.5, -0.5]])
    }
    meta = MemoryMeta(kind="document", name="bank", base_model="tiny-fingerprint", version=1,
                      hyperparameters=hyper, details={"documents": [{"id": "d"}]})  # fmt: skip
    return LoadedDocumentBank(Artifact(meta, tensors), target)


def test_one_request_uses_an_adapter_a_bank_and_a_set_in_any_order(tiny, make_engine):
    from tests.test_local import entry_group, make_set, site_activations

    engine = make_engine(tiny.model, tiny.tokenizer)
    target = target_of(tiny, engine.hooks)
    adapter = LoadedAdapter(adapter_artifact(tiny, layer=1), target).bind(MemoryRefSpec("a", "adapter"))
    bank = random_bank(tiny, target).bind(MemoryRefSpec("bank", "document", key=MemoryKey(document_id="d")))
    key = site_activations(tiny, engine.hooks, "The quick brown fox", 1, "attn_out")[-1]
    local_set = make_set(tiny, engine.hooks, [entry_group(1, "attn_out", key[None], key[None] * 5, 0.05)])
    facts = local_set.bind(MemoryRefSpec("facts", "local"))
    prompt = tuple(tiny.tokenizer("The quick brown fox").input_ids)
    stopping = StoppingParams(max_new_tokens=5, ignore_eos=True)
    orders = [(adapter, bank, facts), (facts, bank, adapter), (bank, facts, adapter), (), (adapter,),
              (bank,), (facts,)]  # fmt: skip
    outcomes = run_all(engine, [GenerationRequest(prompt, stopping=stopping, memories=o) for o in orders])
    together = outcomes[0].token_ids
    assert together == outcomes[1].token_ids == outcomes[2].token_ids  # whatever the order
    alone = [o.token_ids for o in outcomes[3:]]
    assert together not in alone and len({tuple(a) for a in alone}) == 4  # each memory acts


def test_an_adapter_that_fails_fails_its_requests_with_its_name_and_no_other(tiny, make_engine):
    engine = make_engine(tiny.model, tiny.tokenizer)
    loaded = LoadedAdapter(adapter_artifact(tiny), target_of(tiny, engine.hooks))

    def broken(hidden: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the adapter's weights went missing")

    loaded.adapter.forward = broken
    prompt = tuple(tiny.tokenizer("The quick brown fox").input_ids)
    error = fails_alone(engine, prompt, loaded.bind(MemoryRefSpec("bad", "adapter")))
    assert "facts-adapter" in error and "went missing" in error


def test_an_artifact_round_trips_and_bad_ones_are_refused(tiny, hooks):
    artifact = adapter_artifact(tiny)
    again = decode(*encode(artifact.meta, artifact.tensors))
    loaded = LoadedAdapter(again, target_of(tiny, hooks))
    assert loaded.layer == 1 and loaded.gate == pytest.approx(0.5) and loaded.nbytes > 0
    with pytest.raises(InvalidArgument, match="layer 7"):
        far = Artifact(replace(artifact.meta, hyperparameters={"layer": 7}), artifact.tensors)
        LoadedAdapter(far, target_of(tiny, hooks))
    with pytest.raises(InvalidArgument, match="holds"):
        LoadedAdapter(Artifact(artifact.meta, {"adapter.gate": torch.zeros(())}), target_of(tiny, hooks))
    wide = dict(artifact.tensors, **{"adapter.up.weight": torch.zeros(16, 99)})
    with pytest.raises(InvalidArgument, match="99 wide"):
        LoadedAdapter(Artifact(artifact.meta, wide), target_of(tiny, hooks))


def test_training_lowers_the_loss_and_opens_the_gate(tiny):
    kind = AdapterKind()
    text = "The quick brown fox jumps over the lazy dog. " * 6
    spec = kind.validate_spec({
        "documents": [{"id": "fox", "text": text}],
        "templates": [{"question": "What jumps over the dog?", "answer": "The fox."}],
        "config": {"epochs": 40, "learning_rate": 3e-2, "hidden_size": 16, "layer": -1, "batch_size": 1},
    })  # fmt: skip
    context = FakeContext(tiny)
    trained = kind.train(spec, context)
    metrics = trained.metrics
    assert metrics["final_loss"] < metrics["base_loss"] - 0.5, metrics
    assert metrics["gate"] != 0.0 and metrics["examples"] == 2 and metrics["template_examples"] == 1
    assert len(metrics["epoch_losses"]) == 40 and context.reports[-1] == (80, 80)
    assert trained.hyperparameters["layer"] == tiny.model.config.num_hidden_layers - 1
    assert trained.details["data"] == "documents+templates"
    meta = MemoryMeta(kind="adapter", name="a", base_model="tiny-fingerprint", version=1,
                      hyperparameters=trained.hyperparameters)  # fmt: skip
    assert LoadedAdapter(Artifact(meta, trained.tensors), target_of(tiny, MemoryHooks(tiny.model))).gate != 0


def test_training_options_and_data_are_checked():
    kind = AdapterKind()
    with pytest.raises(InvalidArgument, match="documents, templates"):
        kind.validate_spec({})
    with pytest.raises(InvalidArgument, match="question and an answer"):
        kind.validate_spec({"templates": [{"question": "Q", "answer": " "}]})
    with pytest.raises(InvalidArgument, match="no text"):
        kind.validate_spec({"documents": [{"id": "d", "text": " "}]})
    for bad, words in [({"epochs": 0}, "epochs"), ({"warmup_ratio": 1.0}, "warmup_ratio"),
                       ({"learning_rate": math.nan}, "learning_rate"), ({"bogus": 1}, "bogus"),
                       ({"hidden_size": "wide"}, "hidden_size")]:  # fmt: skip
        with pytest.raises(InvalidArgument, match=words):
            kind.validate_spec({"templates": [{"question": "Q", "answer": "A"}], "config": bad})
    for bad, words in [({"documents": 5}, "lists"),
                       ({"templates": [{"question": 1, "answer": "A"}]}, "question"),
                       ({"templates": [{"question": "Q", "answer": "A"}], "config": ["epochs"]}, "object"),
                       ({"templates": [{"question": "Q", "answer": "A"}], "config": {"hidden_size": 128.9}},
                        "hidden_size")]:  # fmt: skip
        with pytest.raises(InvalidArgument, match=words):
            kind.validate_spec(bad)
    assert kind.validate_spec({"templates": [{"question": "Q", "answer": "A"}], "config": {"epochs": 3.0}})
    assert AdapterConfig().resolved_layer(30) == default_layer(30) == 22  # ~75 % of the default model
    with pytest.raises(InvalidArgument, match="outside"):
        AdapterConfig(layer=30).resolved_layer(30)
    assert AdapterConfig(layer=-2).resolved_layer(30) == 28


def test_examples_chunk_long_documents_and_mask_pads(tiny_tokenizer):
    long_text = " ".join(["word"] * 100)
    data = examples(tiny_tokenizer, [{"id": "d", "title": "", "text": long_text}],
                    [{"question": "Q?", "answer": "A."}], max_length=32)  # fmt: skip
    doc_rows = int((data.documents == 0).sum())
    assert doc_rows >= 3 and int((data.documents == -1).sum()) == 1
    assert int(data.attention_mask.sum(1).max()) <= 32
    assert torch.equal(data.labels == -100, data.attention_mask == 0)
    assert template_text("Q?", "A.") == "Q? A." and template_text("Q:", " A") == "Q: A"
    long_question = examples(
        tiny_tokenizer, [], [{"question": "word " * 200 + "Q?", "answer": "The end."}], 16
    )
    ids = long_question.input_ids[0].tolist()
    assert len(ids) == 16 and tiny_tokenizer.decode(ids).endswith("The end.")  # the answer survives


# --- the factuality evaluation -------------------------------------------------------------


def claim(i: int, document: str, label: str, split: str = "train") -> Claim:
    return Claim(f"{document}-{i}", document, f"Claim {i} about {document}.", label, split)


def test_the_prompt_is_the_studys_with_solved_shots():
    test = claim(9, "d", "refutes", "test")
    shots = [claim(1, "d", "supports"), claim(2, "d", "not enough info")]
    assert prompt_for(test, shots) == (
        "Determine the factuality of the following claims\n"
        "Answer candidates: (a) supports, (b) refutes, (c) not enough info\n"
        "Claim: Claim 1 about d.\nA: (a)\n"
        "Claim: Claim 2 about d.\nA: (c)\n"
        "Claim: Claim 9 about d.\nA:"
    )
    assert template_for(shots[0]) == {
        "question": INSTRUCTION + "Claim: Claim 1 about d.\nA:",
        "answer": " (a)",
    }


def test_shots_come_from_the_same_document_one_label_after_another_then_others():
    train = [
        claim(i, "d", label) for i, label in enumerate(["supports", "supports", "refutes", "not enough info"])
    ]
    train += [claim(10 + i, "e", "refutes") for i in range(3)]
    test = claim(99, "d", "supports", "test")
    three = shots_for(test, train, 3)
    assert {s.document for s in three} == {"d"}
    assert {s.label for s in three} == {"supports", "refutes", "not enough info"}
    five = shots_for(test, train, 5)
    assert sorted(s.document for s in five) == ["d"] * 4 + ["e"]
    # The order of the shots (hence of their answer letters) varies from claim to claim.
    orders = {
        tuple(s.label for s in shots_for(claim(i, "d", "supports", "test"), train, 3)) for i in range(20)
    }
    assert len(orders) > 1
    assert shots_for(test, train, 5) == five and shots_for(test, train, 0) == []  # seeded


@pytest.mark.parametrize(
    ("text", "label"),
    [(" (a)", "supports"), (" (b) refutes", "refutes"), ("c) not enough", "not enough info"),
     (" a\n", "supports"), (" Refutes.", "refutes"), (" not enough info", "not enough info"),
     (" (d)", "invalid"), (" about", "invalid"), ("", "invalid"), (" The claim", "invalid"),
     (" A Dunhaven pension fund", "invalid"), (" b.", "refutes"), (" C", "not enough info"),
     (" ab", "invalid")],
)  # fmt: skip
def test_answers_are_parsed_by_the_documented_rule(text, label):
    assert parse_answer(text) == label


def test_scores_count_invalid_answers_as_wrong_and_no_labels_positive():
    gold = ["supports", "refutes", "not enough info", "supports"]
    predicted = ["supports", "supports", "invalid", "supports"]
    result = scores(gold, predicted)
    assert result["accuracy"] == 0.5 and result["invalid_rate"] == 0.25
    # micro: TP 2, FP 1, FN 2 → 4 / 7; it is not the accuracy when an answer is invalid.
    assert result["micro_f1"] == pytest.approx(4 / 7)
    supports_f1 = 2 * 2 / (2 * 2 + 1 + 0)
    assert result["macro_f1"] == pytest.approx(supports_f1 / 3)
    assert result["confusion"]["not enough info"]["invalid"] == 1
    assert scores(gold, gold)["micro_f1"] == scores(gold, gold)["accuracy"] == 1.0


def test_the_likelihood_choice_is_scored_beside_the_generated_answers():
    claims = [claim(i, "d", label, split) for i, (label, split) in
              enumerate([("supports", "train"), ("refutes", "test"), ("supports", "test")])]  # fmt: skip
    results = evaluate(claims, [0, 1], lambda prompts: [" (z)"] * len(prompts))  # every answer invalid
    add_likelihood(results, claims, lambda prompt: "refutes")
    for result in results.values():
        assert result["accuracy"] == 0 and result["invalid_rate"] == 1
        assert result["by_likelihood"]["accuracy"] == 0.5 and all(
            a["likely"] == "refutes" for a in result["answers"]
        )


def test_the_fixture_is_balanced_and_its_templates_file_is_up_to_date():
    claims = read_claims(FIXTURE / "claims.jsonl")
    documents = {p.stem for p in (FIXTURE / "documents").glob("*.md")}
    assert {c.document for c in claims} == documents and len(documents) >= 6
    for document in documents:
        own = [c for c in claims if c.document == document]
        for label in ("supports", "refutes", "not enough info"):
            for split in ("train", "test"):
                assert sum(c.label == label and c.split == split for c in own) >= 2, (document, label, split)
    expected = [template_for(c) for c in claims if c.split == "train"]
    written = [json.loads(line) for line in (FIXTURE / "templates.jsonl").read_text().splitlines()]
    assert written == expected, "regenerate with: python -m memserve.kinds.adapter.eval templates"


def test_bad_claims_files_are_refused_with_the_line(tmp_path):
    path = tmp_path / "claims.jsonl"
    path.write_text('{"id": "a", "document": "d", "claim": "C.", "label": "true", "split": "test"}\n')
    with pytest.raises(ValueError, match="line 1: label 'true'"):
        read_claims(path)
    path.write_text('{"id": "a", "document": "d", "claim": "C.", "label": "supports", "split": "train"}\n')
    with pytest.raises(ValueError, match="no test claims"):
        read_claims(path)
