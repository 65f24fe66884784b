"""Where a packed decode step's time goes: the kernel's calls against everything else.

    python bench/packed_split.py [--steps 40]

Times each call into the C++ kernel inside the model's forward step at batch 1 and 8 (64-token
context, KV cache, last token's logits only): the products (`memserve.packed.Codes`: the LM
head, and any layer not fused) and the fused decoder layers' two calls (`attention_in`,
`attention_out`: their products, plus norms, attention and the rest of the layer). It prints the
step, the share spent in those calls, and the rate at which they read the step's bytes (a lower
bound on the products' own rate), beside the machine's read bound (as bench/bench_decode.py
measures it). Then, for the row counts a call may get (decode steps, then prefills), every
layer's product on the packed codes against the dense fp32 weights (best of 3): where the packed
path stops paying (`memserve.packed.PACKED_MAX_ROWS`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_decode import read_bandwidth, weight_bytes
from bench_serving import machine
from transformers import DynamicCache

import memserve.packed as packed
from memserve.models import ModelConfig, load_model
from memserve.packed.decode import FastDecoderLayer


class Timed:
    """Stands in for a fused layer's native half, adding its calls' time to `spent`."""

    def __init__(self, native: object, spent: list[float]) -> None:
        self.native, self.spent = native, spent

    def attention_in(self, *args: torch.Tensor) -> list[torch.Tensor]:
        started = time.perf_counter()
        out = self.native.attention_in(*args)  # type: ignore[attr-defined]
        self.spent[0] += time.perf_counter() - started
        return out

    def attention_out(self, *args: torch.Tensor | None) -> torch.Tensor:
        started = time.perf_counter()
        out = self.native.attention_out(*args)  # type: ignore[attr-defined]
        self.spent[0] += time.perf_counter() - started
        return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    bandwidth = read_bandwidth()
    model = load_model(ModelConfig(device="cpu", dtype="fp32", weights="packed")).model
    step_bytes = weight_bytes(model)
    in_kernel = [0.0]
    call = packed.Codes.__call__

    def timed(self: packed.Codes, flat: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        out = call(self, flat)
        in_kernel[0] += time.perf_counter() - started
        return out

    packed.Codes.__call__ = timed  # type: ignore[method-assign]
    fused = [m.forward for m in model.modules() if isinstance(getattr(m, "forward", None), FastDecoderLayer)]
    for layer in fused:
        layer.native = Timed(layer.native, in_kernel)  # type: ignore[assignment]
    print(f"machine: {machine()}; read bound {bandwidth / 1e9:.1f} GB/s")
    print(f"a step reads {step_bytes / 1e6:.0f} MB of packed weights; {len(fused)} fused decoder layers\n")
    print("| batch | step ms | in the kernel's calls ms | their share | their read rate | of bound |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch in (1, 8):
        ids = torch.randint(100, 1000, (batch, 64))
        steps, kernel = [], []
        with torch.inference_mode(), packed.packed_weights():
            cache = DynamicCache()
            model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = ids[:, -1:]
            for index in range(args.steps + 5):
                in_kernel[0] = 0.0
                started = time.perf_counter()
                model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
                if index >= 5:  # warm-up
                    steps.append(time.perf_counter() - started)
                    kernel.append(in_kernel[0])
                cache.crop(-1)
        step, inside = statistics.median(steps), statistics.median(kernel)
        rate = step_bytes / inside
        print(
            f"| {batch} | {step * 1e3:.1f} | {inside * 1e3:.1f} | {inside / step:.0%} | "
            f"{rate / 1e9:.1f} GB/s | {rate / bandwidth:.0%} |"
        )
    print("\n| rows | every layer, packed ms | every layer, dense fp32 ms | dense / packed |")
    print("|---:|---:|---:|---:|")
    layers = [m for m in model.modules() if isinstance(m, packed.PackedLinear)]
    for rows in (1, 8, 16, 64, 128, 256, 512):
        inputs = {width: torch.randn(rows, width) for width in {m.in_features for m in layers}}
        with torch.inference_mode():
            ours = best_of(lambda inputs=inputs: [m.codes_call(inputs[m.in_features]) for m in layers])
            dense = best_of(lambda inputs=inputs: [F.linear(inputs[m.in_features], m.weight) for m in layers])
        print(f"| {rows} | {ours * 1e3:.1f} | {dense * 1e3:.1f} | {dense / ours:.2f}× |")
    return 0


def best_of(call: Callable[[], object], repeats: int = 3) -> float:
    call()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best


if __name__ == "__main__":
    raise SystemExit(main())
