"""A prototype of the fast path issue 18 asks for, measured before it is built into the server:
weights stored in bf16, the residual stream (block outputs, norms, attention, the memories' hooks)
kept in fp32. Each linear layer takes its fp32 input in bf16 and gives its output back in fp32,
so the weights are read at half the bytes while sums along the residual stream keep fp32's
precision.

`bf16_weights(model)` converts a loaded fp32 model in place (the embedding stays fp32; the tied
LM head gets its own bf16 copy). Used by `bench_decode.py` and `bench_facts.py dtypes` as the
dtype "bf16w".
"""

from __future__ import annotations

import torch
from torch import nn

from memserve.models import LoadedModel, ModelConfig, load_model


class Bf16WeightLinear(nn.Module):
    """nn.Linear with bf16 weights between fp32 activations."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().to(torch.bfloat16), requires_grad=False)
        bias = linear.bias
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().to(torch.bfloat16), requires_grad=False)
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden.to(torch.bfloat16), self.weight, self.bias).to(hidden.dtype)


def bf16_weights(model: nn.Module) -> nn.Module:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Bf16WeightLinear(child))
    return model


def load(dtype: str) -> LoadedModel:
    """The default model as served: fp32 (dense), packed (fp32, the GGUF's codes), bf16, or the
    prototype bf16w."""
    if dtype in ("fp32", "packed"):
        weights = "dense" if dtype == "fp32" else "packed"
        return load_model(ModelConfig(device="cpu", dtype="fp32", weights=weights))
    if dtype != "bf16w":
        return load_model(ModelConfig(device="cpu", dtype=dtype))
    loaded = load_model(ModelConfig(device="cpu", dtype="fp32", weights="dense"))
    bf16_weights(loaded.model)
    return loaded
