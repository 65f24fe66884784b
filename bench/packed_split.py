"""Where a packed decode step's time goes: the kernel's calls against everything else.

    python bench/packed_split.py [--steps 40]

Times each packed kernel call (`memserve.packed.Codes`) inside the model's forward step at
batch 1 and 8 (64-token context, KV cache, last token's logits only), and prints the step, the
kernel's share, the bytes it read and the rate it read them at, beside the machine's read bound
(as bench/bench_decode.py measures it).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_decode import read_bandwidth, weight_bytes
from bench_serving import machine
from transformers import DynamicCache

import memserve.packed as packed
from memserve.models import ModelConfig, load_model


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
    print(f"machine: {machine()}; read bound {bandwidth / 1e9:.1f} GB/s")
    print(f"a step reads {step_bytes / 1e6:.0f} MB of packed weights\n")
    print("| batch | step ms | in the kernel ms | kernel's share | kernel's read rate | of bound |")
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
