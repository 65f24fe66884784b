"""Packed weights: codes recovered exactly, the kernel equal to a dense matmul, the switch rules.

The kernel is built once per machine (about 40 s on 2 cores) into the user cache dir; the
default model's tests reuse it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memserve.engine.kv_cache import new_cache
from memserve.engine.offline import generate_all
from memserve.engine.scheduler import Engine
from memserve.memory.hooks import MemoryContext, MemoryHooks, Site
from memserve.models import LoadedModel, ModelConfig, load_model
from memserve.packed import (
    PACKED_MAX_ROWS,
    FastRMSNorm,
    PackedLinear,
    pack_model,
    pack_q4,
    pack_q8,
    packed_weights,
)
from memserve.packed.decode import FastDecoderLayer
from memserve.packed.kernel import load_kernel


def q4_weight(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    """Weights as a Q4_1 GGUF de-quantises them: fp32(d) * q + fp32(m), d and m fp16."""
    g = torch.Generator().manual_seed(seed)
    groups = width // 32
    q = torch.randint(0, 16, (rows, groups, 32), generator=g).float()
    d = (torch.rand(rows, groups, 1, generator=g) * 0.02).half().float()
    m = (-torch.rand(rows, groups, 1, generator=g) * 0.1).half().float()
    q[..., 0], q[..., 1] = 0, 15  # the quantiser puts each group's min at 0 and max at 15
    return (d * q + m).reshape(rows, width)


def q8_weight(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    groups = width // 32
    q = torch.randint(-127, 128, (rows, groups, 32), generator=g).float()
    q[..., 0] = 127
    d = (torch.rand(rows, groups, 1, generator=g) * 0.01).half().float()
    return (d * q).reshape(rows, width)


def test_q4_codes_rebuild_every_weight_bit_for_bit() -> None:
    weight = q4_weight(48, 96)
    weight[3, :32] = 0.25  # a constant group: d = 0
    packed = pack_q4(weight)
    assert packed is not None and packed.kind == "q4"
    assert torch.equal(packed.unpack(), weight)
    assert packed.nbytes == 48 * 96 // 2 + 2 * 2 * 48 * 3


def test_q8_codes_rebuild_every_weight_bit_for_bit() -> None:
    weight = q8_weight(32, 64)
    packed = pack_q8(weight)
    assert packed is not None and packed.kind == "q8"
    assert torch.equal(packed.unpack(), weight)
    assert pack_q4(weight) is None  # 255 levels are not 16


@pytest.mark.parametrize(
    "weight",
    [
        torch.randn(32, 64),  # trained fp32 weights
        q4_weight(30, 64),  # rows not in blocks of 16
        q4_weight(32, 96)[:, :80].contiguous(),  # width not in groups of 32
        q4_weight(32, 64).bfloat16(),
    ],
    ids=["random", "rows", "width", "bf16"],
)
def test_weights_that_are_not_exact_groups_are_not_packed(weight: torch.Tensor) -> None:
    assert pack_q4(weight) is None and pack_q8(weight) is None


def test_one_changed_weight_makes_a_layer_unpackable() -> None:
    weight = q4_weight(32, 64)
    weight[5, 7] = torch.nextafter(weight[5, 7], torch.tensor(1.0))
    assert pack_q4(weight) is None


@pytest.fixture(scope="module")
def kernel() -> object:
    built = load_kernel()
    assert built is not None, "the packed kernel did not build (see the log)"
    return built


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 11])
def test_kernel_equals_a_dense_matmul(kernel: object, rows: int) -> None:
    x = torch.randn(rows, 96)
    # 5 blocks of 16 rows: the kernels' passes over several blocks at once, and what is left
    for weight, packed in ((w := q4_weight(80, 96), pack_q4(w)), (w8 := q8_weight(80, 96), pack_q8(w8))):
        assert packed is not None
        if packed.kind == "q4":
            out = kernel.q4_linear(x, packed.codes, packed.scales, packed.offsets)  # type: ignore[attr-defined]
        else:
            out = kernel.q8_linear(x, packed.codes, packed.scales)  # type: ignore[attr-defined]
        torch.testing.assert_close(out, x @ weight.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("variant", "simd"), [("avx512", "avx512"), ("avx2", "avx2"), ("portable", "scalar")]
)
def test_the_builds_for_other_cpus_give_the_same_products(variant: str, simd: str) -> None:
    """What other CPUs run: AVX-512 without VNNI (fp32 products), AVX2 vectors, or (forced with
    --weights packed) the plain loops."""
    built = load_kernel(variant=variant)
    assert built is not None and built.simd() == simd
    q4, q8 = q4_weight(32, 96), q8_weight(16, 96)
    p4, p8 = pack_q4(q4), pack_q8(q8)
    assert p4 is not None and p8 is not None
    for rows in (1, 2, 9):
        x = torch.randn(rows, 96)
        out4 = built.q4_linear(x, p4.codes, p4.scales, p4.offsets)
        torch.testing.assert_close(out4, x @ q4.T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(built.q8_linear(x, p8.codes, p8.scales), x @ q8.T, rtol=1e-5, atol=1e-5)


def test_kernel_refuses_a_wrong_input(kernel: object) -> None:
    packed = pack_q4(q4_weight(16, 64))
    assert packed is not None
    with pytest.raises(RuntimeError, match="columns"):
        kernel.q4_linear(torch.randn(1, 32), packed.codes, packed.scales, packed.offsets)  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="fp32"):
        kernel.q4_linear(torch.randn(1, 64).double(), packed.codes, packed.scales, packed.offsets)  # type: ignore[attr-defined]


class Counting:
    """Stands in for a layer's kernel call, counting the calls."""

    def __init__(self, call: object) -> None:
        self.call, self.calls = call, 0

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.call(flat)  # type: ignore[operator]


def test_the_packed_path_only_inside_packed_weights_without_autograd(kernel: object) -> None:
    linear = nn.Linear(64, 32, bias=True)
    linear.weight.data = q4_weight(32, 64)
    packed = pack_q4(linear.weight)
    assert packed is not None
    layer = PackedLinear(linear, packed, kernel)  # type: ignore[arg-type]
    counted = layer.codes_call = Counting(layer.codes_call)  # type: ignore[assignment]
    x = torch.randn(2, 3, 64)
    expected = F.linear(x, linear.weight, linear.bias)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)
        assert counted.calls == 0  # outside packed_weights(): dense
        with packed_weights():
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
            assert counted.calls == 1
            layer(torch.randn(PACKED_MAX_ROWS + 1, 64))  # a long prefill: dense
            assert counted.calls == 1
    with packed_weights():
        out = layer(x.requires_grad_())  # training: dense, with gradients
        out.sum().backward()
        assert counted.calls == 1 and x.grad is not None


def test_pack_model_keeps_dense_a_model_with_trained_weights(tiny: LoadedModel) -> None:
    report = pack_model(tiny.model)
    assert not report.any and "no layer" in report.describe()
    with pytest.raises(ValueError, match="--weights packed: no layer"):
        pack_model(tiny.model, required=True)


def test_weights_flag_is_checked() -> None:
    with pytest.raises(ValueError, match="weights must be one of"):
        load_model(ModelConfig(device="cpu", weights="int3"))
    with pytest.raises(ValueError, match="fp32 CPU path"):
        load_model(ModelConfig(device="cpu", dtype="bf16", weights="packed"))


def test_default_model_packs_whole_and_decodes_as_dense(default_model: LoadedModel) -> None:
    """Every layer of the default model is exact Q4_1 / Q8_0; a packed decode step's logits are
    the dense step's up to the order of fp32 sums, at batch 1 and 8."""
    model = default_model.model
    assert "packed weights: 210 q4, 1 q8 layer(s) (0 dense)" in default_model.weights
    assert "30 decoder layer(s) fused at decode steps" in default_model.weights
    assert isinstance(model.get_output_embeddings(), PackedLinear)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
    for batch in (1, 8):
        ids = torch.randint(100, 5000, (batch, 1), generator=torch.Generator().manual_seed(batch))
        with torch.inference_mode():
            dense = model(input_ids=ids).logits
            with packed_weights():
                packed = model(input_ids=ids).logits
        torch.testing.assert_close(packed, dense, rtol=1e-4, atol=1e-3)  # logits of size ~20
        assert torch.equal(packed.argmax(-1), dense.argmax(-1))


class Siblings(nn.Module):
    """q/k/v projections as a Llama attention block names them."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (
            nn.Linear(64, 48, bias=False),
            nn.Linear(64, 16, bias=False),
            nn.Linear(64, 16, bias=False),
        )
        for seed, layer in enumerate((self.q_proj, self.k_proj, self.v_proj)):
            layer.weight.data = q4_weight(layer.out_features, 64, seed)


def test_siblings_on_one_input_make_one_call_and_store_nothing_twice(kernel: object) -> None:
    model = Siblings()
    dense = [layer.weight.clone() for layer in (model.q_proj, model.k_proj, model.v_proj)]
    report = pack_model(model)
    assert report.packed == {"q4": 3}
    q, k, v = model.q_proj, model.k_proj, model.v_proj
    assert isinstance(q, PackedLinear) and q.fused is not None and k.fused is q.fused is v.fused
    assert k.codes.data_ptr() == q.fused.codes.codes[48 // 16].data_ptr()  # a view into the fused codes
    x, other = torch.randn(1, 64), torch.randn(1, 64)
    with torch.no_grad(), packed_weights():
        outs = [q(x), k(x), v(x)]
        alone = [v(other), k(other)]  # another input, out of order: each computes its own rows
    for out, weight in zip(outs, dense, strict=True):
        torch.testing.assert_close(out, x @ weight.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone[0], other @ dense[2].T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone[1], other @ dense[1].T, rtol=1e-5, atol=1e-5)


def test_norms_of_a_packed_model_take_the_one_call_version(default_model: LoadedModel) -> None:
    norm = default_model.model.model.layers[0].input_layernorm
    assert isinstance(norm.forward, FastRMSNorm)
    x = torch.randn(2, 1, 576)
    with torch.inference_mode():
        own = type(norm).forward(norm, x)
        with packed_weights():
            fast = norm(x)
            long_prefill = norm(torch.randn(1, PACKED_MAX_ROWS + 1, 576))  # the norm's own ops
    torch.testing.assert_close(fast, own, rtol=1e-6, atol=1e-6)
    assert long_prefill.shape == (1, PACKED_MAX_ROWS + 1, 576)


def test_the_engine_serves_packed_weights_with_the_dense_greedy_text(
    default_model: LoadedModel, make_engine: Callable[..., Engine]
) -> None:
    """End to end: the engine (which serves inside packed_weights()) continues prompts, batched,
    exactly as Hugging Face's loop on the dense weights does."""
    tokenizer = default_model.tokenizer
    prompts = ["The capital of France is", "Water boils at", "def fibonacci(n):", "Once upon a time"]
    engine = make_engine(default_model.model, tokenizer, max_batch_size=4)
    served = generate_all(engine, [tokenizer(p).input_ids for p in prompts], (), 16)
    for prompt, tokens in zip(prompts, served, strict=True):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        dense = default_model.model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        assert tokens == dense[0, ids.shape[1] :].tolist(), prompt


class CountingLayer:
    """Stands in for a FastDecoderLayer's native half, counting its decode steps."""

    def __init__(self, native: object) -> None:
        self.native, self.steps = native, 0

    def attention_in(self, *args: torch.Tensor) -> list[torch.Tensor]:
        self.steps += 1
        return self.native.attention_in(*args)  # type: ignore[attr-defined]

    def attention_out(self, *args: torch.Tensor | None) -> torch.Tensor:
        return self.native.attention_out(*args)  # type: ignore[attr-defined]


@pytest.fixture
def counted_layers(default_model: LoadedModel) -> Iterator[list[CountingLayer]]:
    layers = [layer.forward for layer in default_model.model.model.layers]
    assert all(isinstance(layer, FastDecoderLayer) for layer in layers)
    counted = [CountingLayer(layer.native) for layer in layers]
    for layer, counting in zip(layers, counted, strict=True):
        layer.native = counting  # type: ignore[assignment]
    yield counted
    for layer, counting in zip(layers, counted, strict=True):
        layer.native = counting.native  # type: ignore[assignment]


def decode_logits(model: nn.Module, prompts: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Each step's last logits (steps, B, V): a prefill, then greedy decode steps on a KV cache."""
    cache = new_cache()
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(
        input_ids=prompts, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
    )
    logits = [out.logits[:, -1]]
    for _ in range(steps):
        mask = torch.cat([mask, mask.new_ones((len(mask), 1))], 1)
        positions = positions[:, -1:] + 1
        token = logits[-1].argmax(-1, keepdim=True)
        out = model(
            input_ids=token,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        logits.append(out.logits[:, -1])
    return torch.stack(logits)


def test_decode_steps_run_each_layer_in_two_calls_as_the_layer_computes(
    default_model: LoadedModel, counted_layers: list[CountingLayer]
) -> None:
    """Left-padded rows of unequal length, a KV cache: the packed model's decode steps go through
    the fused layer and give the dense model's logits; the prefill takes the layer's own ops."""
    model = default_model.model
    prompts = torch.randint(100, 5000, (3, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(prompts)
    mask[1, :4] = 0  # a shorter prompt, left-padded
    mask[2, :1] = 0
    with torch.inference_mode():
        dense = decode_logits(model, prompts, mask, steps=4)
        assert counted_layers[0].steps == 0  # outside packed_weights(): the layer's own forward
        with packed_weights():
            fused = decode_logits(model, prompts, mask, steps=4)
    assert all(layer.steps == 4 for layer in counted_layers)  # the 4 decode steps, not the prefill
    torch.testing.assert_close(fused, dense, rtol=1e-4, atol=1e-3)  # logits of size ~20
    assert torch.equal(fused.argmax(-1), dense.argmax(-1))


def test_a_hook_inside_a_layer_runs_it_whole_unless_it_says_it_is_idle(
    default_model: LoadedModel, counted_layers: list[CountingLayer]
) -> None:
    """A hook on a module the fused step skips (here attention's output projection) makes the
    layer run its own forward, where the hook runs; memserve's memory hooks say when they would
    do nothing, and then the fused step runs."""
    model = default_model.model
    layer = model.model.layers[2]
    seen: list[torch.Tensor] = []
    handle = layer.self_attn.o_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    ids = torch.randint(100, 5000, (1, 3), generator=torch.Generator().manual_seed(1))
    try:
        with torch.inference_mode(), packed_weights():
            decode_logits(model, ids, torch.ones_like(ids), steps=2)
    finally:
        handle.remove()
    assert len(seen) == 3  # the prefill and both decode steps: the hook always ran
    assert counted_layers[2].steps == 0 and counted_layers[1].steps == 2

    hooks = MemoryHooks(model)
    hooks.install(2, Site.ATTN_OUT)
    ran: list[int] = []

    def op(hidden: torch.Tensor) -> torch.Tensor:
        ran.append(hidden.shape[1])
        return hidden

    active = MemoryContext()
    active.add(2, Site.ATTN_OUT, SimpleNamespace(name="m"), op)
    try:
        with torch.inference_mode(), packed_weights():
            with hooks.using(None):  # installed, idle: the fused step
                decode_logits(model, ids, torch.ones_like(ids), steps=2)
            assert counted_layers[2].steps == 2 and not ran
            with hooks.using(active):  # a memory acts inside layer 2: its own forward
                decode_logits(model, ids, torch.ones_like(ids), steps=2)
    finally:
        hooks.remove()
    assert counted_layers[2].steps == 2 and ran == [3, 1, 1]
    assert counted_layers[1].steps == 6  # the other layers stay fused
