"""A Llama decoder layer's decode step in two kernel calls instead of about forty ops.

At batch 1 a packed decode step spent more time in the layer's small ops (norms, views, the
rotary embedding, attention's reshapes, residual adds; each a Python call and an aten dispatch)
than in reading the weights. `FastDecoderLayer` stands in for a layer's `forward` and, at a
decode step, runs `attention_in` (norm, q/k/v, rotary embedding), lets the model's KV cache
store the new keys and values as it always does, and runs `attention_out` (attention, output
projection, residual, norm, gate/up, SiLU * up, down, residual). Anywhere else it calls the
layer's own forward.

Memories are kept: the block's own hooks (the residual site) run around this forward as before,
and a layer whose inner modules carry a hook that would act in this forward (a local memory at
the attention-output or MLP-down site) runs its own forward, where those hooks run. A hook
declares itself idle for a forward with an `idle()` attribute (memserve's memory hooks do);
any other hook makes the layer run its own forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as nn_module

from memserve.packed import FusedCodes, PackedLinear, takes_codes
from memserve.packed.kernel import PackedKernel

# Layers whose forward is exactly norm -> attention (rotary, GQA, no biases) -> residual ->
# norm -> SiLU-gated MLP -> residual.
LLAMA_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer")


def _weight(layer: PackedLinear | FusedCodes) -> list[torch.Tensor]:
    codes = layer.codes if isinstance(layer, FusedCodes) else layer.codes_call
    parts = [codes.codes, codes.scales]
    return parts if codes.offsets is None else [*parts, codes.offsets]


def _hook_idle(hook: Callable[..., Any]) -> bool:
    idle = getattr(hook, "idle", None)
    return idle is not None and bool(idle())


class FastDecoderLayer:
    """A decoder layer's `forward` on a packed model: two kernel calls at decode steps."""

    def __init__(self, layer: nn.Module, kernel: PackedKernel) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.own = type(layer).forward.__get__(layer)
        self.layer_idx: int = attn.layer_idx
        self.hidden = layer.input_layernorm.weight.numel()
        inner = (
            attn, attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp, mlp.gate_proj, mlp.up_proj,
            mlp.down_proj, layer.input_layernorm, layer.post_attention_layernorm,
        )  # fmt: skip
        # The modules' hook dicts (each module keeps its own for life): one emptiness test a step.
        self.hook_dicts = tuple(h for m in inner for h in (m._forward_pre_hooks, m._forward_hooks))
        qkv, gate_up = attn.q_proj.fused, mlp.gate_proj.fused
        assert qkv is not None and gate_up is not None
        self.native = kernel.DecodeLayer(
            layer.input_layernorm.weight,
            float(layer.input_layernorm.variance_epsilon),
            layer.post_attention_layernorm.weight,
            float(layer.post_attention_layernorm.variance_epsilon),
            _weight(qkv),
            _weight(attn.o_proj),
            _weight(gate_up),
            _weight(mlp.down_proj),
            attn.config.num_attention_heads,
            attn.config.num_key_value_heads,
            attn.head_dim,
            float(attn.scaling),
        )

    def __call__(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        mask = self._decode_step_mask(hidden_states, attention_mask, past_key_values, position_embeddings)
        if mask is False:
            return self.own(
                hidden_states,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        assert position_embeddings is not None
        rows = hidden_states.shape[0]
        x = hidden_states.reshape(rows, self.hidden)
        cos, sin = position_embeddings
        if cos.shape[0] != rows or not cos.is_contiguous():  # (1, 1, hd) when the rows share it
            cos, sin = (e.expand(rows, 1, -1).contiguous() for e in position_embeddings)
        q, k, v = self.native.attention_in(x, cos, sin)
        keys, values = past_key_values.update(k, v, self.layer_idx)
        out = self.native.attention_out(x, q, keys, values, mask)
        return out.view(rows, 1, self.hidden)

    def _decode_step_mask(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Any,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor | bool | None:
        """The (B, L) bool mask (None: attend to everything) when this call is a decode step the
        kernel takes; False when the layer's own forward must run."""
        if (
            hidden.dim() != 3
            or hidden.shape[1] != 1
            or not takes_codes(hidden, hidden.shape[0])
            or cache is None
            or position_embeddings is None
            or position_embeddings[0].dtype != torch.float32
            or nn_module._global_forward_hooks
            or nn_module._global_forward_pre_hooks
        ):
            return False
        if any(self.hook_dicts):
            for hooks in self.hook_dicts:
                if hooks and not all(_hook_idle(hook) for hook in hooks.values()):
                    return False
        if attention_mask is None:
            return None
        # sdpa's decode-step mask: (B, 1, 1, L) bool; others (e.g. eager's additive floats, a mask
        # shared by the rows) fall back
        if (
            attention_mask.dtype != torch.bool
            or attention_mask.dim() != 4
            or attention_mask.shape[:3] != (hidden.shape[0], 1, 1)
        ):
            return False
        return attention_mask.reshape(hidden.shape[0], -1).contiguous()


def fast_layers(model: nn.Module, kernel: PackedKernel) -> int:
    """Gives each packed Llama-style decoder layer the two-call decode step; returns how many."""
    count = 0
    for layer in model.modules():
        if type(layer).__name__ not in LLAMA_LAYERS or not _fits(layer):
            continue
        layer.forward = FastDecoderLayer(layer, kernel)
        count += 1
    return count


def _fits(layer: nn.Module) -> bool:
    """Whether the layer is the plain Llama layer the kernel computes, on packed weights."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None:
        return False
    projections = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    projections += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, PackedLinear) and p.bias is None for p in projections):
        return False
    q_proj, gate_proj = projections[0], projections[4]
    assert isinstance(q_proj, PackedLinear) and isinstance(gate_proj, PackedLinear)
    config = getattr(attn, "config", None)
    norms = (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
    return (
        q_proj.fused is not None
        and len(q_proj.fused.bounds) == 3
        and gate_proj.fused is not None
        and len(gate_proj.fused.bounds) == 2
        and config is not None
        and getattr(config, "hidden_act", None) == "silu"
        and all(
            n is not None and hasattr(n, "variance_epsilon") and n.weight.dtype == torch.float32
            for n in norms
        )
        and hasattr(attn, "scaling")
        and hasattr(attn, "head_dim")
    )
