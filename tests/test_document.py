"""Document memories on tiny random models: the module's math, the trainer, serving."""

from __future__ import annotations

import json
import math

import pytest
import torch

from memserve.engine.requests import GenerationRequest, StoppingParams
from memserve.engine.sampling import SamplingParams
from memserve.errors import FailedPrecondition, InvalidArgument, NotFound
from memserve.kinds.document import DocumentKind
from memserve.kinds.document.config import DocumentConfig
from memserve.kinds.document.module import BankShape, DocumentBank, LoadedDocumentBank, spread_docreps
from memserve.kinds.document.train import split_windows, windows
from memserve.memory.kind import LoadTarget, MemoryKey, MemoryObserver, MemoryRefSpec
from memserve.memory_store.artifact import Artifact, MemoryMeta, decode, encode
from memserve.models import LoadedModel
from memserve.training.frozen import logits_after, residual_at, token_losses
from tests.conftest import FakeContext, build_tiny_model, run_all

TEXTS = {
    "fox": "The quick brown fox jumps over the lazy dog. " * 6,
    "sea": "Once upon a time there was a small village by the sea. " * 5,
    "keys": "Memories are selected by document keys and fire only where they belong. " * 4,
}


def spec(texts: dict[str, str], **config) -> dict:
    documents = [{"id": doc_id, "title": doc_id.title(), "text": text} for doc_id, text in texts.items()]
    defaults = {"epochs": 30, "learning_rate": 1e-2, "window_words": 16, "window_stride": 8, "max_windows": 4,
                "key_dim": 2}  # fmt: skip
    return {"documents": documents, "config": {**defaults, **config}}


def as_artifact(trained, version: int = 1) -> Artifact:
    meta = MemoryMeta(kind="document", name="bank", base_model="tiny-fingerprint",
                      hyperparameters=trained.hyperparameters, details=trained.details)  # fmt: skip
    meta, blob = encode(meta, trained.tensors)
    from dataclasses import replace

    return decode(replace(meta, version=version), blob)


def target(model, observe: MemoryObserver | None = None) -> LoadTarget:
    config = model.config
    return LoadTarget(
        torch.device("cpu"), torch.float32, None, config.num_hidden_layers, config.hidden_size, observe
    )


def test_an_untrained_bank_changes_nothing_and_the_update_is_the_papers_formula():
    torch.manual_seed(0)
    bank = DocumentBank(BankShape(hidden_size=8, memory_dim=4, key_dim=2, token_activation="gelu"))
    hidden = torch.randn(3, 5, 8)
    keys = torch.randn(3, 2)
    assert torch.equal(bank(hidden, bank.selection(keys)), torch.zeros(3, 5, 8))  # V starts at zero
    torch.nn.init.normal_(bank.value.weight)
    torch.nn.init.normal_(bank.value.bias)
    selection = torch.tanh(keys @ bank.key[0].weight.T + bank.key[0].bias)
    tokens = torch.nn.functional.gelu(hidden @ bank.token_proj.weight.T + bank.token_proj.bias)
    expected = (tokens * selection[:, None, :]) @ bank.value.weight.T + bank.value.bias
    torch.testing.assert_close(bank(hidden, bank.selection(keys)), expected)
    assert bank(hidden, None).shape == hidden.shape  # no DocRep: every entry on


@pytest.mark.parametrize("depth", [1, 4])
def test_the_mlp_key_module_has_the_asked_depth(depth):
    bank = DocumentBank(BankShape(hidden_size=8, memory_dim=4, key_dim=2, key_module="mlp", key_depth=depth))
    assert sum(isinstance(m, torch.nn.ReLU) for m in bank.key) == depth
    assert bank.selection(torch.zeros(2, 2)).shape == (2, 4)


def test_windows_keep_the_tail_and_respect_the_limit():
    text = " ".join(str(i) for i in range(300))
    got = windows(text, 128, 64, 10)
    assert [w.split()[0] for w in got] == ["0", "64", "128", "172"]  # the tail window ends at word 299
    assert all(len(w.split()) == 128 for w in got) and got[-1].split()[-1] == "299"
    assert len(windows(text, 128, 64, 2)) == 2
    assert windows("a few words", 128, 64, 10) == ["a few words"]
    config = DocumentConfig(window_words=128, window_stride=64, max_windows=10, holdout_windows=1)
    train, held = split_windows(text, config)
    assert held == [" ".join(str(i) for i in range(172, 300))]
    assert train[-1].split()[-1] == "171" and len(train) == 2  # no held-out word is trained on
    assert split_windows(" ".join(["w"] * 200), config)[1] == []  # too short to spare a window


def test_spread_docreps_are_apart_and_inside_the_box():
    reps = spread_docreps(10, 2, None, seed=0)
    assert reps.shape == (10, 2) and reps.abs().max() <= 1
    assert torch.pdist(reps).min() > 0.3
    more = spread_docreps(5, 2, reps, seed=1)
    assert torch.cdist(more, reps).min() > 0.2


@pytest.mark.parametrize("architecture", ["llama", "gpt_neox"])
def test_running_a_slice_of_the_model_gives_the_full_models_logits(tiny_tokenizer, architecture):
    model = build_tiny_model(architecture, len(tiny_tokenizer))
    prompts = ["The quick brown fox jumps over", "Once upon"]
    encoded = [tiny_tokenizer(p).input_ids for p in prompts]
    width = max(len(e) for e in encoded)
    ids = torch.tensor([e + [0] * (width - len(e)) for e in encoded])
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded])
    full = model(input_ids=ids, attention_mask=mask).logits
    for layer in range(model.config.num_hidden_layers):
        hidden = residual_at(model, layer, ids, mask)
        sliced = logits_after(model, layer, hidden, mask).float()
        torch.testing.assert_close(sliced * mask[..., None], full * mask[..., None], atol=0.05, rtol=0.05)


def test_bad_specs_are_refused():
    kind = DocumentKind()
    for bad, match in [
        ({"documents": []}, "at least one document"),
        (spec({"a": "x", "b": ""}), "no text"),
        ({"documents": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]}, "twice"),
        ({"documents": [{"id": "bad id", "text": "x"}]}, "not valid"),
        (spec({"a": "x"}, loss="mse"), "loss"),
        (spec({"a": "x"}, key_depth=9), "key_depth"),
        (spec({"a": "x"}, tau=float("nan")), "tau"),
        (spec({"a": "x"}, bogus=1), "unknown"),
        ({"documents": [{"id": "a", "text": "x", "docrep": {"values": [1.0]}}]}, "16 finite values"),
    ]:
        with pytest.raises(InvalidArgument, match=match):
            kind.validate_spec(bad)


@pytest.fixture(scope="module")
def trained(tiny):
    context = FakeContext(tiny)
    result = DocumentKind().train(spec(TEXTS), context)
    return result, context


def test_training_separates_documents_by_their_docrep(trained, tiny):
    result, context = trained
    assert context.reports[-1][0] == context.reports[-1][1] > 0
    assert result.metrics["final_ce_positive"] < result.metrics["final_ce_negative"]
    assert [d["id"] for d in result.details["documents"]] == ["fox", "sea", "keys"]
    loaded = LoadedDocumentBank(as_artifact(result), target(tiny.model))
    # Each document's text is more likely with its own DocRep than with another's.
    for doc_id, text in TEXTS.items():
        own = _loss(tiny, loaded, text, MemoryKey(document_id=doc_id))
        others = [_loss(tiny, loaded, text, MemoryKey(document_id=o)) for o in TEXTS if o != doc_id]
        assert own < min(others), (doc_id, own, others)


def _loss(tiny: LoadedModel, loaded: LoadedDocumentBank, text: str, key: MemoryKey) -> float:
    ids = torch.tensor([tiny.tokenizer(" ".join(text.split()[:16])).input_ids])
    mask = torch.ones_like(ids)
    hidden = residual_at(tiny.model, loaded.layer, ids, mask)
    bound = loaded.bind(MemoryRefSpec("bank", "document", key=key))
    with torch.no_grad():
        hidden = hidden + loaded.bank(hidden, bound.selection[None])
        logits = logits_after(tiny.model, loaded.layer, hidden, mask).float()
    return float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]))


def test_adding_documents_trains_a_new_version_over_old_and_new(trained, tiny):
    result, _ = trained
    first = as_artifact(result)
    extra = {"extra": "Numbers like 0123456789 and marks !? are here. " * 4}
    more = DocumentKind().train(spec(extra, epochs=2), FakeContext(tiny, current=first))
    ids = [d["id"] for d in more.details["documents"]]
    assert ids == ["fox", "sea", "keys", "extra"]
    old = {d["id"]: d["docrep"] for d in result.details["documents"]}
    new = {d["id"]: d["docrep"] for d in more.details["documents"]}
    assert all(new[i] == old[i] for i in old)  # old documents keep their DocReps
    offsets = more.tensors["text_offsets"].tolist()
    texts = more.tensors["texts_utf8"].numpy().tobytes()
    assert texts[offsets[0] : offsets[1]].decode() == TEXTS["fox"]


def test_references_resolve_to_keys_and_bad_ones_are_refused(trained, tiny):
    loaded = LoadedDocumentBank(as_artifact(trained[0]), target(tiny.model))
    fox, sea = loaded.docrep_of("fox"), loaded.docrep_of("sea")
    mix = loaded.key_for(MemoryRefSpec("bank", "document", key=MemoryKey(mix=(("fox", 3.0), ("sea", 1.0)))))
    torch.testing.assert_close(mix, 0.75 * fox + 0.25 * sea)
    explicit = loaded.key_for(MemoryRefSpec("bank", "document", key=MemoryKey(docrep=(0.5, -0.5))))
    assert explicit.tolist() == [0.5, -0.5]
    with pytest.raises(InvalidArgument, match="2 values"):
        loaded.bind(MemoryRefSpec("bank", "document", key=MemoryKey(docrep=(1.0, 2.0, 3.0))))
    with pytest.raises(NotFound, match="no document 'nope'"):
        loaded.bind(MemoryRefSpec("bank", "document", key=MemoryKey(document_id="nope")))


def test_requests_with_different_documents_share_a_batch_and_match_running_alone(trained, tiny, make_engine):
    loaded = LoadedDocumentBank(as_artifact(trained[0]), target(tiny.model))
    engine = make_engine(tiny.model, tiny.tokenizer, max_batch_size=8)
    prompt = tuple(tiny.tokenizer("The quick brown").input_ids)

    def request(doc_id: str | None) -> GenerationRequest:
        memories = (
            () if doc_id is None else (loaded.bind(MemoryRefSpec("bank", "document", key=MemoryKey(doc_id))),)
        )
        return GenerationRequest(prompt_ids=prompt, sampling=SamplingParams(), memories=memories,
                                 stopping=StoppingParams(max_new_tokens=8, ignore_eos=True))  # fmt: skip

    plan = ["fox", "sea", None, "keys", "fox"]
    alone = [run_all(engine, [request(d)])[0].token_ids for d in plan]
    together = [o.token_ids for o in run_all(engine, [request(d) for d in plan])]
    assert together == alone
    assert len({tuple(t) for t in alone}) > 1  # the documents do change the output


def test_the_evaluation_writes_the_report_metrics_and_plots(trained, tiny, tmp_path):
    from memserve.kinds.document.eval import evaluate_bank
    from memserve.memory.evaluation import offline_context

    result, _ = trained
    artifact = as_artifact(result)
    with offline_context(tiny, artifact, tmp_path) as context:
        metrics = evaluate_bank(context, artifact, grid=3)
    assert set(metrics["documents"]) == set(TEXTS)
    keys = {"ppl_own", "ce_own", "ppl_nearest_other", "ppl_other", "ppl_random", "ppl_none", "ppl_base",
            "identification_accuracy", "recall_own", "recall_nearest_other", "recall_short_own",
            "nearest_other", "compared_with"}  # fmt: skip
    for doc_id, values in metrics["documents"].items():
        assert keys <= set(values)
        assert values["ppl_own"] <= values["ppl_nearest_other"] <= values["ppl_other"]
        assert values["nearest_other"] in set(TEXTS) - {doc_id}
        assert 0 <= values["identification_accuracy"] <= 1 and 0 <= values["recall_own"] <= 1
        assert math.isclose(values["ce_own"], math.log(values["ppl_own"]))
    assert metrics["summary"]["documents"] == len(TEXTS)
    assert metrics["unrelated_ppl_ratio"] > 0
    assert {"l0", "l2", "pairwise", "normalized_pairwise", "dead_entries"} <= set(metrics["selection"])
    assert "size_length_correlation" in metrics
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["documents"].keys() == metrics["documents"].keys()
    assert (tmp_path / "selection_heatmap.png").stat().st_size > 1000
    assert (tmp_path / "ppl_landscape.png").stat().st_size > 1000
    assert "| fox |" in (tmp_path / "report.md").read_text()


def test_a_large_bank_compares_each_document_with_its_nearest_docreps(trained, tiny, tmp_path):
    from memserve.kinds.document.eval import BankEvaluation, evaluate_bank
    from memserve.memory.evaluation import offline_context

    artifact = as_artifact(trained[0])
    with offline_context(tiny, artifact, tmp_path) as context:
        evaluation = BankEvaluation(context, artifact)
        selections = evaluation.selections.float()
        for index in range(len(TEXTS)):
            assert evaluation.compared_keys(index, 0) == ([j for j in range(len(TEXTS)) if j != index],) * 2
            distances = {j: float((selections[j] - selections[index]).norm()) for j in range(len(TEXTS))}
            nearest = min((j for j in distances if j != index), key=distances.__getitem__)
            assert evaluation.compared_keys(index, 1) == ([nearest], [])
        metrics = evaluate_bank(context, artifact, grid=2, compare_with=1)
    assert metrics["summary"]["compared_with_min"] == 1
    assert all(m["compared_with"] == 1 for m in metrics["documents"].values())
    assert "1 other DocReps" in (tmp_path / "report.md").read_text()


def test_eval_docs_from_the_command_line_on_an_export_file(trained, tiny_llama_dir, tmp_path):
    from memserve.clients.cli import main
    from memserve.memory_store.artifact import export_bytes
    from memserve.models import ModelConfig, load_model

    # A bank trained for the tiny Llama saved as a model folder (its fingerprint is that model's).
    loaded = load_model(ModelConfig(model=str(tiny_llama_dir), device="cpu"))
    result = DocumentKind().train(spec(TEXTS, epochs=3), FakeContext(loaded))
    artifact = as_artifact(result)
    from dataclasses import replace

    artifact = Artifact(replace(artifact.meta, base_model=loaded.fingerprint), artifact.tensors)
    exported = tmp_path / "bank.safetensors"
    exported.write_bytes(export_bytes(artifact))
    out = tmp_path / "eval"
    code = main(["eval", "docs", "bank", "--file", str(exported), "--out", str(out), "--grid", "2",
                 "--model", str(tiny_llama_dir), "--device", "cpu"])  # fmt: skip
    assert code == 0
    assert set(json.loads((out / "metrics.json").read_text())["documents"]) == set(TEXTS)
    # Served by another model (the default one): refused, in one line.
    assert main(["eval", "docs", "bank", "--file", str(exported), "--out", str(out), "--device", "cpu"]) == 1


def test_each_forward_reports_selection_numbers_per_bank(trained, tiny, make_engine):
    from memserve.kinds.document.module import SelectionStats

    seen: list[SelectionStats] = []
    loaded = LoadedDocumentBank(as_artifact(trained[0]), target(tiny.model, seen.append))
    engine = make_engine(tiny.model, tiny.tokenizer)
    memories = (loaded.bind(MemoryRefSpec("bank", "document", key=MemoryKey("fox"))),)
    request = GenerationRequest(
        prompt_ids=tuple(tiny.tokenizer("The quick").input_ids),
        sampling=SamplingParams(),
        memories=memories,
        stopping=StoppingParams(max_new_tokens=3, ignore_eos=True),
    )
    run_all(engine, [request, request])
    assert seen and all(s.bank == "bank" for s in seen)
    assert max(s.rows for s in seen) == 2  # both requests' rows in one op
    assert all(0 <= s.selected_entries <= loaded.bank.shape.memory_dim and s.selection_mass > 0 for s in seen)


def test_token_losses_ignore_padding():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, 3, -100, -100], [1, 2, 3, 4, 5]])
    short = token_losses(logits[:1, :3], labels[:1, :3])
    torch.testing.assert_close(token_losses(logits, labels)[0], short[0])


@pytest.mark.parametrize("loss", ["abs", "capped_sq"])
@pytest.mark.parametrize("negatives", ["other", "random", "zero", "perturb"])
def test_every_loss_and_negative_trains(tiny, loss, negatives):
    result = DocumentKind().train(spec(TEXTS, epochs=2, loss=loss, negatives=negatives), FakeContext(tiny))
    assert math.isfinite(result.metrics["final_ce_positive"]) and result.hyperparameters["loss"] == loss


def test_guidance_loss_formulas(tiny):
    from memserve.kinds.document.train import GuidanceTrainer, SourceDocument, _docreps

    documents = [SourceDocument(k, k, v) for k, v in TEXTS.items()]
    for loss, expected in [
        ("abs", lambda p, n: p + 0.5 * abs(4.0 - n)),
        ("capped_sq", lambda p, n: p + 0.5 * min((n - 4.0) ** 2, p)),
    ]:
        config = DocumentConfig(
            loss=loss,
            tau=4.0,
            alpha=0.5,
            window_words=16,
            window_stride=8,
            negative_share=1.0,
            background_windows=0,
        )
        trainer = GuidanceTrainer(
            tiny.model, tiny.tokenizer, 1, config, _docreps(documents, config), documents
        )
        hidden, base = trainer._frozen_pass(trainer.windows)
        total, positive, negative = trainer.step_loss(
            hidden, trainer.windows.attention_mask, trainer.windows.labels, trainer.windows.documents, base
        )
        total, positive, negative = total.detach(), positive.detach(), negative.detach()
        assert float(total) == pytest.approx(expected(float(positive), float(negative)), rel=1e-5)


def test_a_relative_tau_pushes_each_negative_window_to_its_base_model_loss(tiny):
    from memserve.kinds.document.train import GuidanceTrainer, SourceDocument, _docreps
    from memserve.training.frozen import logits_after, token_losses

    documents = [SourceDocument(k, k, v) for k, v in TEXTS.items()]
    config = DocumentConfig(
        tau=0.0, tau_margin=0.25, alpha=0.5, negatives="zero", window_words=16, window_stride=8,
        negative_share=0.5, memory_dim=8, background_windows=0,
    )  # fmt: skip
    trainer = GuidanceTrainer(tiny.model, tiny.tokenizer, 1, config, _docreps(documents, config), documents)
    with torch.no_grad():
        trainer.bank.value.weight.normal_()  # a bank that changes the text, so that CE⁻ ≠ base,
        trainer.bank.key[0].bias.normal_()  # even with the zero DocRep
    hidden, base = trainer._frozen_pass(trainer.windows)
    mask, labels = trainer.windows.attention_mask, trainer.windows.labels
    losses = trainer.step_loss(hidden, mask, labels, trainer.windows.documents, base)
    total, positive, _ = (t.detach() for t in losses)
    # The negative rows are the batch's first half, with the zero DocRep.
    half = round(len(hidden) * 0.5)
    with torch.no_grad():
        selection = trainer.bank.selection(torch.zeros(half, config.key_dim))
        changed = hidden[:half] + trainer.bank(hidden[:half], selection)
        negative = token_losses(logits_after(tiny.model, 1, changed, mask[:half]), labels[:half])
    expected = float(positive) + 0.5 * float((base[:half] + 0.25 - negative).abs().mean())
    assert float(total) == pytest.approx(expected, rel=1e-4)
    assert not torch.allclose(negative, base[:half])


def test_the_paper_preset_reproduces_its_configuration_under_given_options():
    paper = DocumentConfig.from_spec({"preset": "paper", "alpha": 0.5})
    assert (paper.memory_dim, paper.tau, paper.epochs, paper.learning_rate) == (32, 4.5, 500, 1e-3)
    assert (paper.window_stride, paper.max_windows, paper.schedule, paper.alpha) == (64, 10, "constant", 0.5)
    assert DocumentConfig.from_spec({}).tau == 0.0  # ours: relative to the base model


def test_a_long_document_keeps_its_tail_under_the_window_cap():
    from memserve.kinds.document.train import windows

    words = [f"w{i}" for i in range(2000)]
    capped = windows(" ".join(words), 128, 64, 10)
    assert len(capped) == 10
    assert capped[0].split()[0] == "w0" and capped[-1].split()[-1] == "w1999"
    starts = [int(w.split()[0][1:]) for w in capped]
    assert starts == sorted(starts) and len(set(starts)) == 10
    # Under the cap: every stride, then one window that ends at the last word.
    under = windows(" ".join(words[:300]), 128, 64, 10)
    assert [w.split()[0] for w in under] == ["w0", "w64", "w128", "w172"]


def test_adding_documents_keeps_the_banks_settings(tiny):
    first = as_artifact(DocumentKind().train(spec({"fox": TEXTS["fox"]}, epochs=1, memory_dim=8, key_dim=3),
                                             FakeContext(tiny)))  # fmt: skip
    added = DocumentKind().train(
        {"documents": [{"id": "sea", "text": TEXTS["sea"]}]}, FakeContext(tiny, first)
    )
    assert added.hyperparameters["memory_dim"] == 8 and added.hyperparameters["key_dim"] == 3
    assert len(added.details["documents"][1]["docrep"]) == 3
    with pytest.raises(FailedPrecondition, match="cannot change key_dim"):
        DocumentKind().train({"documents": [{"id": "x", "text": "words"}], "config": {"key_dim": 2}},
                             FakeContext(tiny, first))  # fmt: skip


def test_a_request_using_two_banks_gets_the_same_output_in_any_batch(trained, tiny, make_engine):
    first = LoadedDocumentBank(as_artifact(trained[0]), target(tiny.model))
    other = DocumentKind().train(spec(TEXTS, epochs=5, seed=1), FakeContext(tiny))
    second = LoadedDocumentBank(as_artifact(other), target(tiny.model))
    second.name = "second"
    engine = make_engine(tiny.model, tiny.tokenizer, max_batch_size=8)
    prompt = tuple(tiny.tokenizer("Once upon").input_ids)

    def request(*pairs: tuple[LoadedDocumentBank, str]) -> GenerationRequest:
        memories = tuple(b.bind(MemoryRefSpec(b.name, "document", key=MemoryKey(d))) for b, d in pairs)
        return GenerationRequest(prompt_ids=prompt, sampling=SamplingParams(), memories=memories,
                                 stopping=StoppingParams(max_new_tokens=6, ignore_eos=True))  # fmt: skip

    a = request((first, "fox"), (second, "sea"))
    b = request((second, "keys"), (first, "sea"))
    alone = [run_all(engine, [r])[0].token_ids for r in (a, b)]
    assert [o.token_ids for o in run_all(engine, [a, b])] == alone
    assert [o.token_ids for o in run_all(engine, [b, a])] == alone[::-1]


def test_a_job_too_big_for_memory_is_refused_before_it_starts(tiny, monkeypatch):
    import memserve.training.frozen as training

    monkeypatch.setattr(training, "MAX_STEP_LOGIT_BYTES", 10_000)
    with pytest.raises(InvalidArgument, match="lower batch_size or max_length"):
        DocumentKind().train(spec(TEXTS, epochs=1), FakeContext(tiny))
    monkeypatch.setattr(training, "MAX_RESIDUAL_BYTES", 10_000)
    with pytest.raises(InvalidArgument, match="cached activations"):
        DocumentKind().train(spec(TEXTS, epochs=1), FakeContext(tiny))


def test_the_locality_term_is_zero_for_an_untrained_bank_and_grows_when_it_changes_text(tiny):
    from memserve.kinds.document.train import GuidanceTrainer, SourceDocument, _docreps, background_windows

    documents = [SourceDocument(k, k, v) for k, v in TEXTS.items()]
    config = DocumentConfig(window_words=16, window_stride=8, memory_dim=8, background_windows=4)
    trainer = GuidanceTrainer(tiny.model, tiny.tokenizer, 1, config, _docreps(documents, config), documents)
    assert trainer.background is not None and len(trainer.background) == 4
    assert int(trainer.background.attention_mask.sum()) > 4  # the model wrote text
    owners = torch.tensor([0, 1, 2])
    assert float(trainer.locality_loss(owners).detach()) == pytest.approx(0.0, abs=1e-5)  # V = 0: the base
    with torch.no_grad():
        trainer.bank.value.weight.normal_()
    assert float(trainer.locality_loss(owners).detach()) > 0.01
    again = background_windows(tiny.model, tiny.tokenizer, 4, 16, config.seed)
    assert torch.equal(again.input_ids, trainer.background.input_ids)  # seeded: the same text


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"compare_with": -3}, r"options\.compare_with must be in \[0, 100000\], got -3"),
        ({"compare_with": "x"}, r"options\.compare_with has the wrong type: 'x'"),
        ({"compare_wth": 3}, r"unknown document evaluation options: \['compare_wth'\]"),
    ],
)
def test_bad_evaluation_options_are_named_where_the_request_carries_them(options, match):
    from memserve.kinds.document.config import DocumentEvalOptions
    from memserve.memory.options import options_from_spec

    with pytest.raises(InvalidArgument, match=match):
        options_from_spec(DocumentEvalOptions, options, "document evaluation")
    # Training options live in a spec's `config`, and their messages say so.
    with pytest.raises(InvalidArgument, match=r"config\.memory_dim must be in"):
        DocumentConfig.from_spec({"memory_dim": 0})
