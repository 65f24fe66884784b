"""Hook sites on tiny random Llama, GPT-NeoX and GPT-2 models."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from memserve.errors import MemoryHookError
from memserve.memory.hooks import LAYER_SITES, MemoryContext, MemoryHooks, Site, find_sites
from tests.conftest import build_tiny_model


@dataclass(frozen=True)
class Named:
    name: str


EXPECTED_PROJECTIONS = {
    # model_type: (attention output projection, MLP down projection) as named in the model
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "gpt_neox": ("attention.dense", "mlp.dense_4h_to_h"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
}


def _inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (3, 7), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _add_to_rows(rows: list[int], amount: float):
    def op(hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.clone()
        hidden[rows] += amount
        return hidden

    return op


def test_sites_are_found_for_every_layer(tiny_model):
    sites = find_sites(tiny_model)
    assert len(sites) == tiny_model.config.num_hidden_layers
    attn_name, mlp_name = EXPECTED_PROJECTIONS[tiny_model.config.model_type]
    for layer in sites:
        assert layer.attn_out_proj is layer.block.get_submodule(attn_name)
        assert layer.mlp_down_proj is layer.block.get_submodule(mlp_name)


def test_the_attention_site_sees_the_concatenated_heads_and_the_mlp_site_the_activation(tiny_model):
    hidden = tiny_model.config.hidden_size
    seen: dict[Site, int] = {}

    def record(site: Site):
        def op(activation: torch.Tensor) -> torch.Tensor:
            seen[site] = activation.shape[-1]
            return activation

        return op

    hooks = MemoryHooks(tiny_model)
    context = MemoryContext()
    for site in LAYER_SITES:
        context.add(0, site, Named("probe"), record(site))
    context.add(hooks.num_layers - 1, Site.HEAD, Named("probe"), record(Site.HEAD))
    try:
        with hooks.using(context):
            tiny_model(**_inputs(tiny_model))
    finally:
        hooks.remove()
    assert seen[Site.ATTN_OUT] == hidden  # heads × head_dim, before W_out
    assert seen[Site.MLP_DOWN] > hidden  # the MLP's inner width, after the activation
    assert seen[Site.RESIDUAL] == hidden
    assert seen[Site.HEAD] == tiny_model.config.vocab_size  # the LM head's output, the logits


def test_no_site_carries_a_hook_until_a_memory_uses_it(tiny_model):
    hooks = MemoryHooks(tiny_model)
    context = MemoryContext()
    context.add(1, Site.MLP_DOWN, Named("probe"), lambda hidden: hidden)
    try:
        assert hooks.installed == frozenset()
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny_model.modules())
        with hooks.using(context):
            tiny_model(**_inputs(tiny_model))
        assert hooks.installed == {(1, Site.MLP_DOWN)}
    finally:
        hooks.remove()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny_model.modules())


def test_installed_hooks_with_no_context_leave_the_output_bit_identical(tiny_model):
    inputs = _inputs(tiny_model)
    before = tiny_model(**inputs).logits
    hooks = MemoryHooks(tiny_model)
    hooks.install_all()
    try:
        with hooks.using(MemoryContext()):
            empty = tiny_model(**inputs).logits
        plain = tiny_model(**inputs).logits
    finally:
        hooks.remove()
    assert torch.equal(before, empty) and torch.equal(before, plain)


@pytest.mark.parametrize("site", list(Site))
def test_an_op_changes_only_the_rows_it_was_given(tiny_model, site):
    inputs = _inputs(tiny_model)
    before = tiny_model(**inputs).logits
    hooks = MemoryHooks(tiny_model)
    context = MemoryContext()
    layer = hooks.num_layers - 1 if site is Site.HEAD else 1
    context.add(layer, site, Named("shift"), _add_to_rows([1], 0.5))
    try:
        with hooks.using(context):
            after = tiny_model(**inputs).logits
    finally:
        hooks.remove()
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    assert not torch.allclose(after[1], before[1])


def test_a_failing_op_raises_with_the_memory_name_and_leaves_no_routing_behind(tiny_model):
    inputs = _inputs(tiny_model)
    before = tiny_model(**inputs).logits
    hooks = MemoryHooks(tiny_model)

    def broken(hidden: torch.Tensor) -> torch.Tensor:
        raise ValueError("shape mismatch")

    context = MemoryContext()
    context.add(2, Site.MLP_DOWN, Named("facts-v3"), broken)
    try:
        with (
            pytest.raises(
                MemoryHookError, match=r"'facts-v3' failed at layer 2 \(mlp_down\).*shape mismatch"
            ),
            hooks.using(context),
        ):
            tiny_model(**inputs)
        assert torch.equal(tiny_model(**inputs).logits, before)
    finally:
        hooks.remove()


def test_an_unknown_architecture_is_refused_with_the_supported_list():
    model = build_tiny_model("llama", 64)
    model.config.model_type = "mamba"
    with pytest.raises(ValueError, match=r"no hook sites known for model_type 'mamba'.*gpt2"):
        find_sites(model)


def test_a_site_given_by_name_is_the_same_site(tiny_model):
    widths: list[int] = []
    hooks = MemoryHooks(tiny_model)
    context = MemoryContext()
    context.add(0, "residual", Named("probe"), lambda hidden: widths.append(hidden.shape[-1]) or hidden)
    try:
        with hooks.using(context):
            tiny_model(**_inputs(tiny_model))
    finally:
        hooks.remove()
    assert widths == [tiny_model.config.hidden_size]


def test_a_memory_at_a_layer_that_does_not_exist_is_blamed(tiny_model):
    hooks = MemoryHooks(tiny_model)
    context = MemoryContext()
    context.add(999, Site.RESIDUAL, Named("too-deep"), lambda hidden: hidden)
    expected = r"'too-deep' failed at layer 999.*does not exist"
    with pytest.raises(MemoryHookError, match=expected), hooks.using(context):
        pass
