"""Decode-step weights kept in their quantised form, exactly the fp32 weights served.

The default model comes from a GGUF whose linear layers are Q4_1 (each group of 32 weights is
d*q + m, q in 0..15, d and m fp16) and whose tied embedding is Q8_0 (d*q, q in -127..127).
De-quantised to fp32 they take 4 bytes per weight; a decode step at small batches is bound by
reading them. `pack_model` finds, layer by layer, the weights that are exactly such groups,
recovers their codes, checks that rebuilding them gives every fp32 weight back bit-for-bit, and
swaps the layer for a `PackedLinear` that reads the codes (0.625 or 1.0625 bytes per weight)
whenever a step is small. The weights are not approximated: a layer that does not rebuild
exactly stays dense, and the dense weights stay too, for training, long prefills and anything
that reads `.weight`. The products differ from a dense fp32 matmul by rounding only (packed.cpp
says how; about 1e-6 of the output).

Which path a call takes:
- the packed kernel: inside `packed_weights()` (this thread), no autograd, an fp32 CPU input of
  at most `PACKED_MAX_ROWS` (64) rows: decode steps and short prefills;
- otherwise `F.linear` on the dense weights, exactly as before packing.

The engine's thread and the evaluation RPC serve inside `packed_weights()`; the trainer does not,
so a memory is trained exactly as on the dense model, and served on the same weights' codes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from memserve.packed.kernel import PackedKernel, load_kernel

log = logging.getLogger(__name__)

GROUP = 32
FAST_SIMD = ("avx512-vnni", "avx512", "avx2")  # the kernel's vector builds; "scalar" is correct but slow
BLOCK = 16  # output rows the kernel stores side by side
# Rows past which a call uses the dense weights. `python bench/packed_split.py` on a 2-core AMD
# EPYC (AVX-512 VNNI), every layer of the default model, packed against dense fp32: 1 row 5.0
# against 44.2 ms, 16 rows 31 against 69, 64 rows 116 against 134, 128 rows 254 against 248
# (parity), 512 rows 1091 against 782. Past 64 (prefills), dense.
PACKED_MAX_ROWS = 64

_packed = threading.local()


@contextlib.contextmanager
def packed_weights() -> Iterator[None]:
    """Within this block (this thread only), packed layers read their codes at small batches."""
    before = getattr(_packed, "on", False)
    _packed.on = True
    try:
        yield
    finally:
        _packed.on = before


def takes_codes(x: torch.Tensor, rows: int) -> bool:
    """Whether a call on `x` (`rows` rows) takes the packed path: inside `packed_weights()` (this
    thread), autograd off, fp32 on CPU, at most `PACKED_MAX_ROWS` rows. The one rule for packed
    layers, norms and fused decoder layers."""
    return (
        getattr(_packed, "on", False)
        and not torch.is_grad_enabled()
        and rows <= PACKED_MAX_ROWS
        and x.dtype == torch.float32
        and x.device.type == "cpu"
    )


@dataclass(frozen=True)
class Packed:
    """A weight's codes: `kind` "q4" (codes uint8 (N, K/2), offsets fp16) or "q8" (int8 (N, K))."""

    kind: str
    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        parts = (self.codes, self.scales, self.offsets)
        return sum(p.numel() * p.element_size() for p in parts if p is not None)

    def unpack(self) -> torch.Tensor:
        """The fp32 weights the codes stand for (as the GGUF reader rebuilt them)."""
        scales = _rows(self.scales).float().repeat_interleave(GROUP, 1)
        if self.kind == "q8":
            return scales * _rows(self.codes).float()
        assert self.offsets is not None
        codes = _rows(self.codes, words=True)
        q = torch.stack([codes & 0xF, codes >> 4], -1).reshape(codes.shape[0], -1)
        return scales * q.float() + _rows(self.offsets).float().repeat_interleave(GROUP, 1)


def _blocks(rows: torch.Tensor, words: bool = False) -> torch.Tensor:
    """(N, X) -> (N/16, X, 16): the kernel's layout, 16 output rows side by side, one value of
    each, or with `words` (q4 codes, X = K/2 bytes) 4 bytes of each (8 codes as a 32-bit word)."""
    n, x = rows.shape
    if words:
        return rows.reshape(n // BLOCK, BLOCK, x // 4, 4).transpose(1, 2).reshape(n // BLOCK, x, BLOCK)
    return rows.reshape(n // BLOCK, BLOCK, x).transpose(1, 2).contiguous()


def _rows(blocks: torch.Tensor, words: bool = False) -> torch.Tensor:
    """(N/16, X, 16) -> (N, X), the inverse of `_blocks`."""
    b, x, _ = blocks.shape
    if words:
        return blocks.reshape(b, x // 4, BLOCK, 4).transpose(1, 2).reshape(b * BLOCK, x)
    return blocks.transpose(1, 2).reshape(b * BLOCK, x)


def pack_q4(weight: torch.Tensor) -> Packed | None:
    """`weight`'s Q4_1 codes, or None unless every group of 32 is exactly d*q + m
    (and the rows come in blocks of 16)."""
    rows, width = weight.shape
    if width % GROUP or rows % BLOCK or weight.dtype != torch.float32:
        return None
    groups = weight.detach().reshape(rows, width // GROUP, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    offsets = low.half()
    if not torch.equal(offsets.float(), low):
        return None
    estimate = ((high - low) / 15).half()
    scales = estimate.clone()
    found = torch.zeros_like(low, dtype=torch.bool)
    codes = torch.zeros_like(groups, dtype=torch.uint8)
    # fl(15 d + m) may round d's estimate one fp16 step off either way.
    for step in (0, 1, -1):
        candidate = _fp16_neighbour(estimate, step)
        d = candidate.float()[..., None]
        q = torch.where(d > 0, ((groups - low[..., None]) / d.clamp_min(1e-30)).round(), 0).clamp(0, 15)
        exact = ((d * q + low[..., None]) == groups).all(-1) & ~found
        scales[exact] = candidate[exact]
        codes[exact] = q[exact].to(torch.uint8)
        found |= exact
        if bool(found.all()):
            break
    if not bool(found.all()):
        return None
    # Inputs k (low nibble) and k + 1 (high) share a byte; 4 bytes (8 inputs) make a word.
    pairs = codes.reshape(rows, width // 2, 2)
    packed_codes = pairs[..., 0] | (pairs[..., 1] << 4)
    return Packed("q4", _blocks(packed_codes, words=True), _blocks(scales), _blocks(offsets))


def pack_q8(weight: torch.Tensor) -> Packed | None:
    """`weight`'s Q8_0 codes, or None unless every group of 32 is exactly d*q, |q| <= 127."""
    rows, width = weight.shape
    if width % GROUP or rows % BLOCK or weight.dtype != torch.float32:
        return None
    groups = weight.detach().reshape(rows, width // GROUP, GROUP)
    scales = (groups.abs().amax(-1) / 127).half()
    d = scales.float()[..., None]
    q = torch.where(d > 0, groups / d.clamp_min(1e-30), 0).round().clamp(-127, 127)
    if not bool(torch.isfinite(d).all()) or not torch.equal(d * q, groups):
        return None
    return Packed("q8", _blocks(q.to(torch.int8).reshape(rows, width)), _blocks(scales), None)


def _fp16_neighbour(values: torch.Tensor, step: int) -> torch.Tensor:
    if step == 0:
        return values
    bits = values.view(torch.int16) + step  # positive fp16: the next bit pattern is the next value
    return torch.where(values > 0, bits, values.view(torch.int16)).view(torch.float16)


# Sibling layers that read the same input: packed as one weight, so a step makes one kernel call
# for them instead of three (or two), each reading a bigger, better-streamed block.
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class Codes:
    """A weight's codes and the kernel call that reads them (plain attributes: a decode step
    calls this ~120 times, and nn.Module's attribute lookups cost)."""

    __slots__ = ("codes", "kernel", "kind", "offsets", "scales")

    def __init__(self, kernel: PackedKernel, kind: str, codes: torch.Tensor, scales: torch.Tensor,
                 offsets: torch.Tensor | None) -> None:  # fmt: skip
        self.kernel, self.kind, self.codes, self.scales, self.offsets = kernel, kind, codes, scales, offsets

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        if self.offsets is not None:
            return self.kernel.q4_linear(flat, self.codes, self.scales, self.offsets)
        return self.kernel.q8_linear(flat, self.codes, self.scales)


class FusedCodes:
    """One packed weight for sibling layers called one after another on the same input.

    The first sibling computes all of their outputs and keeps them (per thread) for the others;
    a sibling called on another input, or out of order, computes its own rows alone."""

    def __init__(self, members: list[PackedLinear]) -> None:
        first = members[0]
        offsets = None if first.offsets is None else torch.cat([m.offsets for m in members])
        self.codes = Codes(
            first.codes_call.kernel,
            first.kind,
            torch.cat([m.codes for m in members]),
            torch.cat([m.scales for m in members]),
            offsets,
        )
        self.bounds: list[tuple[int, int]] = []
        start = 0
        for index, member in enumerate(members):
            end = start + member.out_features
            blocks = slice(start // BLOCK, end // BLOCK)
            # The members' codes become views of the fused ones: nothing is stored twice.
            member.set_codes(
                self.codes.codes[blocks],
                self.codes.scales[blocks],
                None if offsets is None else offsets[blocks],
            )
            member.fused, member.fused_index = self, index
            self.bounds.append((start, end))
            start = end
        self._last = threading.local()

    def compute(self, x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """The first member's output for `x`; the others' are kept for them."""
        last = self._last
        last.input, last.output, last.next = x, self.codes(flat), 1
        return last.output[:, : self.bounds[0][1]]

    def taken(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """Member `index`'s kept output for `x`; None if `x` is not what the first member saw."""
        last = self._last
        if getattr(last, "input", None) is not x or last.next != index:
            return None
        last.next += 1
        start, end = self.bounds[index]
        out = last.output[:, start:end]
        if index == len(self.bounds) - 1:
            last.input = last.output = None  # nothing held past the last sibling
        return out


class PackedLinear(nn.Module):
    """A linear layer that reads packed codes at small batches and its dense weights otherwise.

    `weight` and `bias` are the original parameters (a tied LM head stays tied), so code that
    reads them, trains through them or moves them sees the layer as it was."""

    def __init__(self, linear: nn.Linear, packed: Packed, kernel: PackedKernel) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.kind = packed.kind
        self.codes_call = Codes(kernel, packed.kind, packed.codes, packed.scales, packed.offsets)
        self.set_codes(packed.codes, packed.scales, packed.offsets)
        self.fused: FusedCodes | None = None
        self.fused_index = 0

    def set_codes(self, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None) -> None:
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("offsets", offsets, persistent=False)
        call = self.codes_call
        call.codes, call.scales, call.offsets = codes, scales, offsets

    def packed(self) -> Packed:
        return Packed(self.kind, self.codes, self.scales, self.offsets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features if self.in_features else 0
        if not takes_codes(x, rows):
            return F.linear(x, self.weight, self.bias)
        fused, index = self.fused, self.fused_index
        if fused is not None and index:
            out = fused.taken(index, x)
            if out is not None:
                return out.view(*x.shape[:-1], self.out_features)
        flat = x.reshape(rows, self.in_features).contiguous()
        out = fused.compute(x, flat) if fused is not None and not index else self.codes_call(flat)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed={self.kind}"


@dataclass(frozen=True)
class PackReport:
    """What `pack_model` did: layers packed per kind, the bytes a step reads, and why not."""

    packed: dict[str, int]
    dense_layers: int
    step_bytes: int
    dense_step_bytes: int
    seconds: float
    reason: str = ""
    simd: str = ""  # the kernel's build: avx512-vnni, avx512, avx2, scalar
    fused_layers: int = 0  # decoder layers whose decode step is two kernel calls

    @property
    def any(self) -> bool:
        return sum(self.packed.values()) > 0

    def describe(self) -> str:
        if not self.any:
            return f"dense weights ({self.reason})"
        kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(self.packed.items()))
        return (
            f"packed weights: {kinds} layer(s) ({self.dense_layers} dense), a decode step reads "
            f"{self.step_bytes / 1e6:.0f} MB instead of {self.dense_step_bytes / 1e6:.0f} MB; "
            f"kernel {self.simd}, {self.fused_layers} decoder layer(s) fused at decode steps"
        )


def packable_layers(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) for every nn.Linear of the model, the LM head included."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                found.append((parent, name, child))
    return found


def pack_model(model: nn.Module, *, required: bool = False, cache_dir: Path | None = None) -> PackReport:
    """Swaps every linear layer whose weights are exact Q4_1 or Q8_0 groups for a PackedLinear.

    With `required`, raises when nothing can be packed or the kernel cannot be built; otherwise
    leaves the model dense and says why in the report."""
    started = time.perf_counter()
    layers = packable_layers(model)
    dense_bytes = sum(layer.weight.numel() * layer.weight.element_size() for _, _, layer in layers)

    def dense(reason: str) -> PackReport:
        if required:
            raise ValueError(f"--weights packed: {reason}")
        return PackReport({}, len(layers), dense_bytes, dense_bytes, time.perf_counter() - started, reason)

    if not layers:
        return dense("the model has no linear layers")
    if next(model.parameters()).device.type != "cpu":
        return dense("packed weights are a CPU path")
    plan = []
    for parent, name, layer in layers:
        packed = pack_q4(layer.weight) or pack_q8(layer.weight)
        plan.append((parent, name, layer, packed))
    if all(packed is None for *_, packed in plan):
        return dense("no layer's weights are exact 4- or 8-bit groups")
    kernel = load_kernel(cache_dir)
    if kernel is None:
        return dense("the packed kernel could not be built here (see the log)")
    if kernel.simd() not in FAST_SIMD and not required:
        # The portable build is correct but slower than a dense matmul: not worth choosing.
        return dense("this CPU has neither AVX-512 nor AVX2 with FMA and F16C")
    counts: dict[str, int] = {}
    step_bytes = 0
    for parent, name, layer, packed in plan:
        if packed is None:
            step_bytes += layer.weight.numel() * layer.weight.element_size()
            continue
        setattr(parent, name, PackedLinear(layer, packed, kernel))
        counts[packed.kind] = counts.get(packed.kind, 0) + 1
        step_bytes += packed.nbytes
    dense_layers = sum(1 for *_, packed in plan if packed is None)
    fuse_siblings(model)
    fast_norms(model, kernel)
    from memserve.packed.decode import fast_layers  # it builds on this module's classes

    fused = fast_layers(model, kernel)
    seconds = time.perf_counter() - started
    return PackReport(
        counts, dense_layers, step_bytes, dense_bytes, seconds, simd=kernel.simd(), fused_layers=fused
    )


def fuse_siblings(model: nn.Module) -> int:
    """Fuses the packed q/k/v and gate/up projections of each block; returns the groups fused."""
    fused = 0
    for parent in model.modules():
        for names in FUSED_SIBLINGS:
            members = [getattr(parent, name, None) for name in names]
            if not all(isinstance(m, PackedLinear) for m in members):
                continue
            layers = [m for m in members if isinstance(m, PackedLinear)]
            first = layers[0]
            same = all(m.kind == first.kind and m.in_features == first.in_features for m in layers)
            if same and all(m.bias is None for m in layers):
                FusedCodes(layers)
                fused += 1
    return fused


# RMSNorms that compute exactly `weight * (x * rsqrt(mean(x^2) + eps))` in fp32: the kernel's
# one-call version stands in for their six ops at decode steps.
LLAMA_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")


class FastRMSNorm:
    """A norm's `forward` on a packed model: the kernel's where `PackedLinear` would read codes,
    the norm's own elsewhere."""

    def __init__(self, norm: nn.Module, kernel: PackedKernel) -> None:
        self.own = type(norm).forward.__get__(norm)
        self.weight: torch.Tensor = norm.weight
        self.eps = float(norm.variance_epsilon)
        self.kernel = kernel

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if not takes_codes(x, rows) or self.weight.dtype != torch.float32 or not x.is_contiguous():
            return self.own(x)
        return self.kernel.rms_norm(x, self.weight, self.eps)


def fast_norms(model: nn.Module, kernel: PackedKernel) -> int:
    """Gives the model's Llama-style RMSNorms the kernel's decode-step version; returns how many."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in LLAMA_NORMS and hasattr(module, "variance_epsilon"):
            module.forward = FastRMSNorm(module, kernel)
            count += 1
    return count
