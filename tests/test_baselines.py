"""The benchmark's editing baselines (bench/baselines.py): ROME and GRACE, and greedy decoding and
text NLL through the memory hooks, on the tiny random Llama."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from memserve.kinds.local.runner import _Op
from memserve.memory.hooks import MemoryHooks, Site
from memserve.models import LoadedModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from baselines import GraceCodebook, greedy, rome_edit, text_nll

FOX = {"id": "fox", "prompt": "The quick brown fox is", "target": " jumps", "subject": "The quick brown fox"}
LAYER = 1  # of the tiny model's 3
WIDTH = 128  # the tiny model's MLP width: the mlp_down site's


def test_rome_is_a_rank_one_edit_that_maps_the_key_and_restores_exactly(tiny: LoadedModel) -> None:
    down = tiny.model.model.layers[LAYER].mlp.down_proj
    before = down.weight.detach().clone()
    others = [p.detach().clone() for n, p in tiny.model.named_parameters() if "down_proj" not in n]
    edit = rome_edit(tiny, [FOX], layer=LAYER, covariance_tokens=512)
    try:
        assert edit.weight is down.weight and edit.covariance_tokens == 512
        change = down.weight.detach() - before
        assert int(torch.linalg.matrix_rank(change, rtol=1e-5)) == 1
        fact = edit.facts[0]
        # δ, the optimised change of the MLP's output, is clamped to 4 ‖W k*‖; W' k* = W k* + δ.
        assert float(fact.residual.norm()) <= 4 * float((before @ fact.key).norm()) * (1 + 1e-4)
        with torch.no_grad():
            torch.testing.assert_close(
                down(fact.key), before @ fact.key + fact.residual, rtol=1e-5, atol=1e-4
            )
        assert float(fact.residual.norm()) > 0
        after = [p for n, p in tiny.model.named_parameters() if "down_proj" not in n]
        assert all(torch.equal(a, b) for a, b in zip(after, others, strict=True))
    finally:
        edit()
    assert torch.equal(down.weight, before)


def test_grace_replaces_an_activation_within_a_radius_and_leaves_a_far_one(
    tiny: LoadedModel, hooks: MemoryHooks
) -> None:
    codebook = GraceCodebook(tiny, hooks, layer=LAYER, eps_rel=0.5)
    torch.manual_seed(0)
    key, value = torch.randn(WIDTH), torch.randn(WIDTH)
    assert codebook.add_entry(key, value, " jumps", "a") == "add"
    radius = codebook.entries[0].radius
    assert radius == pytest.approx(0.5 * float(key.norm()))
    direction = torch.randn(WIDTH)
    direction /= direction.norm()
    hidden = torch.stack([key + 0.9 * radius * direction, key + 1.1 * radius * direction, -key])[None]
    (bound,) = codebook.context().ops[(LAYER, Site.MLP_DOWN)]
    out = bound.op(hidden)
    assert torch.equal(out[0, 0], value)  # a hard switch: the value itself, no blending
    assert torch.equal(out[0, 1:], hidden[0, 1:])


def test_grace_splits_radii_for_another_target_and_expands_for_the_same(
    tiny: LoadedModel, hooks: MemoryHooks
) -> None:
    torch.manual_seed(1)
    key, value = torch.randn(WIDTH), torch.randn(WIDTH)
    radius = 0.5 * float(key.norm())
    near = key + 0.3 * radius * torch.nn.functional.normalize(torch.randn(WIDTH), dim=0)
    distance = float((near - key).norm())

    split = GraceCodebook(tiny, hooks, layer=LAYER)
    split.add_entry(key, value, " jumps", "a")
    assert split.add_entry(near, torch.randn(WIDTH), " sleeps", "b") == "split"
    assert [e.label for e in split.entries] == ["a", "b"]
    assert [e.radius for e in split.entries] == pytest.approx([distance / 2] * 2)

    expand = GraceCodebook(tiny, hooks, layer=LAYER)
    expand.add_entry(key, value, " jumps", "a")
    assert expand.add_entry(near, None, " jumps", "b") == "expand"
    assert [e.label for e in expand.entries] == ["a"]
    # The radius grows to take in the new key's own ball.
    assert expand.entries[0].radius == pytest.approx(distance + 0.5 * float(near.norm()))
    assert expand.entries[0].radius > radius

    far = GraceCodebook(tiny, hooks, layer=LAYER)
    far.add_entry(key, value, " jumps", "a")
    assert far.add_entry(-3 * key, value, " sleeps", "b") == "add"
    assert [e.radius for e in far.entries] == pytest.approx([radius, 1.5 * float(key.norm())])


def test_grace_trains_a_value_that_replaces_the_prompts_last_activation(
    tiny: LoadedModel, hooks: MemoryHooks
) -> None:
    codebook = GraceCodebook(tiny, hooks, layer=LAYER)
    found = codebook.add(FOX)
    assert found["action"] == "add" and found["target_nll"] < found["target_nll_before"]
    (entry,) = codebook.entries
    assert entry.radius == pytest.approx(0.5 * float(entry.key.norm()))
    seen: list[torch.Tensor] = []
    context = codebook.context()
    context.add(LAYER, Site.MLP_DOWN, _Op("capture"), lambda h: seen.append(h.detach().clone()) or h)
    ids = tiny.tokenizer(FOX["prompt"]).input_ids
    with torch.no_grad(), hooks.using(context):
        tiny.model(input_ids=torch.tensor([ids]))
    assert torch.equal(seen[0][0, -1], entry.value)
    # The same fact again is the same target at distance 0: the entry expands, nothing is added.
    assert codebook.add(FOX)["action"] == "expand" and len(codebook.entries) == 1


def test_greedy_equals_hugging_face_generate(tiny: LoadedModel, hooks: MemoryHooks) -> None:
    prompts = [
        tiny.tokenizer(p).input_ids
        for p in ("The quick brown fox is", "Once upon a time there was a small village")
    ]
    assert len(prompts[0]) != len(prompts[1])  # one batch, left padded
    expected = [
        tiny.model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, pad_token_id=0)[
            0, len(p) :
        ].tolist()
        for p in prompts
    ]
    assert greedy(tiny, hooks, prompts, 6, stop_at_eos=True) == expected
    assert greedy(tiny, hooks, prompts, 6) == expected  # no EOS among them: ignoring it changes nothing
    # With an op in every forward: the recomputed sequence matches generate's cached one.
    codebook = GraceCodebook(tiny, hooks, layer=LAYER)
    codebook.add(FOX)
    with hooks.using(codebook.context()):
        edited = [
            tiny.model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, pad_token_id=0)[
                0, len(p) :
            ].tolist()
            for p in prompts
        ]
    assert greedy(tiny, hooks, prompts, 6, codebook.context) == edited
    assert edited[0] != expected[0]


def test_text_nll_is_the_models_loss_and_sees_the_edit(tiny: LoadedModel, hooks: MemoryHooks) -> None:
    text = "Once upon a time there was a small village by the sea."
    total, tokens = text_nll(tiny, hooks, [text])
    ids = torch.tensor([tiny.tokenizer(text).input_ids])
    with torch.no_grad():
        loss = tiny.model(input_ids=ids, labels=ids).loss
    assert tokens == ids.shape[1] - 1
    assert total == pytest.approx(float(loss) * tokens, rel=1e-5)
    codebook = GraceCodebook(tiny, hooks, layer=LAYER, eps_rel=100.0)  # a radius that takes in everything
    codebook.add(FOX)
    assert text_nll(tiny, hooks, [text], codebook.context)[0] != pytest.approx(total)
