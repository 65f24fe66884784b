"""PyTorch's own low-precision CPU kernels beside dense fp32, bf16 and ours, per layer shape.

    python bench/stock_kernels.py

Before writing a kernel: what the weight-only kernels already in PyTorch do on this CPU for the
default model's layer shapes, at 1 and 8 rows, with their error against the exact fp32 product
(max |error| / max |product|), beside `memserve.packed`'s kernel on the same weights. Weights
are random Q4_1 groups (group 32), so every method computes with the same numbers; an int8
row-scaled weight is timed for speed only (its error would be its own rounding). Median of 200
calls, weights warm in cache: this compares kernels, not memory reads.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from bench_serving import machine

from memserve.packed import pack_q4
from memserve.packed.kernel import load_kernel

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]
GROUP = 32


def median_us(call: Callable[[], torch.Tensor], repeats: int = 200) -> float:
    for _ in range(10):
        call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def main() -> int:
    kernel = load_kernel()
    assert kernel is not None, "the packed kernel did not build"
    print(f"machine: {machine()}; packed kernel: {kernel.simd()}\n")
    print(
        "| rows | weight (N × K) | fp32 µs | bf16 µs | int4pack, fp32 x µs | int4pack, bf16 x µs (error) "
        "| int8pack, fp32 x µs | packed (ours) µs (error) |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    torch.manual_seed(0)
    for rows in (1, 8):
        for n, k in SHAPES:
            groups = k // GROUP
            q = torch.randint(0, 16, (n, groups, GROUP))
            q[..., 0], q[..., 1] = 0, 15
            d = (torch.rand(n, groups, 1) * 0.01).half().float()
            m = (-torch.rand(n, groups, 1) * 0.05).half().float()
            weight = (d * q + m).reshape(n, k)
            x = torch.randn(rows, k)
            exact = x.double() @ weight.double().T

            def error(out: torch.Tensor, exact: torch.Tensor = exact) -> str:
                return f"{((out.double() - exact).abs().max() / exact.abs().max()).item():.0e}"

            int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(n, k).int(), 1)
            # int4pack rebuilds (q - 8) * scale + zero: zero = m + 8 d.
            scales_zeros = torch.stack([d[..., 0].T, (m + 8 * d)[..., 0].T], -1).contiguous()
            int8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
            row_scales = torch.rand(n)
            packed = pack_q4(weight)
            assert packed is not None
            xb, wb, szb = x.bfloat16(), weight.bfloat16(), scales_zeros.bfloat16()
            ours = kernel.q4_linear(x, packed.codes, packed.scales, packed.offsets)
            stock_bf16 = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, int4, GROUP, szb)
            int4_mm, int8_mm = torch.ops.aten._weight_int4pack_mm_for_cpu, torch.ops.aten._weight_int8pack_mm
            cells = [
                median_us(partial(F.linear, x, weight)),
                median_us(partial(F.linear, xb, wb)),
                median_us(partial(int4_mm, x, int4, GROUP, scales_zeros)),
                median_us(partial(int4_mm, xb, int4, GROUP, szb)),
                median_us(partial(int8_mm, x, int8, row_scales)),
                median_us(partial(kernel.q4_linear, x, packed.codes, packed.scales, packed.offsets)),
            ]
            print(
                f"| {rows} | {n} × {k} | {cells[0]:.0f} | {cells[1]:.0f} | {cells[2]:.0f} "
                f"| {cells[3]:.0f} ({error(stock_bf16)}) | {cells[4]:.0f} | {cells[5]:.0f} ({error(ours)}) |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
