"""How close a decode step comes to the machine's memory-read limit, per dtype, in one run.

    python bench/bench_decode.py [--dtypes fp32,packed,bf16] [--new-tokens 32] [--rounds 3]

A decode step reads every weight once (the LM head reads the tied embedding matrix whole), so
at small batches its speed is bounded by how fast the cores can stream memory. This script
measures that bound (`sum` over a 2 GB tensor, best of 5, all threads) and, for each way of
serving (fp32: dense fp32 weights, as before packing; packed: fp32 compute on the GGUF's 4- and
8-bit codes, `--weights packed`; bf16; bf16w: the prototype in bench/mixed_precision.py):

- the model's forward step at batch 1 and 8 (64-token context, KV cache, last token's logits
  only), and the fraction of the read bound it reaches, counting the bytes of the dtype served;
- Hugging Face `generate` (greedy, `--new-tokens` tokens each, 8 prompts one at a time and as one
  batch), tokens/s;
- memserve (a `memserve serve` subprocess serving that way), 1 stream at a time and 8
  concurrent, tokens/s (not for bf16w, which no server serves), against fp32 memserve, against
  HF `generate` on the same model object (for packed: HF's loop over our packed layers), and
  against stock HF `generate` in fp32;
- greedy agreement with fp32: of the 50 prompts of the local kind's locality check (generic
  questions and openings), how many give the same first `--agree-tokens` tokens (and where the
  others part).

Every row is the median of `--rounds` rounds. llama.cpp is named in the table when
`llama_cpp` imports (`pip install llama-cpp-python`); otherwise the table says it was not run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import statistics
import time

import torch
from bench_serving import PROMPTS, hf_batch, hf_sequential, machine, memserve_concurrent, memserve_sequential
from common import launch_server, stop, wait_for_first_token
from mixed_precision import load
from transformers import DynamicCache

from memserve.kinds.local.unrelated import UNRELATED_PROMPTS
from memserve.packed import PackedLinear, packed_weights

SERVE_FLAGS = {
    "fp32": ("--dtype", "fp32", "--weights", "dense"),
    "packed": ("--dtype", "fp32", "--weights", "packed"),
    "bf16": ("--dtype", "bf16"),
}

BANDWIDTH_BYTES = 2 << 30


def read_bandwidth(repeats: int = 5) -> float:
    """Bytes per second that `sum` reads from a tensor far larger than the caches; the best of
    `repeats` (the figure is a bound: the best the machine showed)."""
    data = torch.ones(BANDWIDTH_BYTES // 4, dtype=torch.float32)
    data.sum()  # pages touched
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    del data
    gc.collect()
    return BANDWIDTH_BYTES / best


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a step reads: each parameter once in the dtype it is stored in (tied embeddings once,
    by the LM head), less an input embedding the head does not share (a step reads a row of it);
    a packed layer's codes instead of its dense weights."""
    looked_up = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    seen = {m.weight.data_ptr() for m in packed}
    total = sum(m.packed().nbytes for m in packed)
    for parameter in model.parameters():
        untied_lookup = parameter is looked_up and parameter.data_ptr() not in (head.data_ptr(), *seen)
        if parameter.data_ptr() not in seen and not untied_lookup:
            seen.add(parameter.data_ptr())
            total += parameter.numel() * parameter.element_size()
    return total


def decode_step(model: torch.nn.Module, batch: int, steps: int = 100, context: int = 64) -> float:
    """Median seconds of one forward step of `batch` tokens on a `context`-token KV cache."""
    ids = torch.randint(100, 1000, (batch, context))
    with torch.inference_mode():
        cache = DynamicCache()
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = ids[:, -1:]
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - started)
            cache.crop(-1)  # the context stays the same length
    return statistics.median(times)


def greedy_tokens(loaded, prompts: list[str], tokens: int) -> list[list[int]]:
    """Each prompt's first `tokens` greedy tokens (fewer where the model ends), one at a time."""
    outputs = []
    for prompt in prompts:
        inputs = loaded.tokenizer(prompt, return_tensors="pt")
        generated = loaded.model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
        outputs.append(generated[0, inputs["input_ids"].shape[1] :].tolist())
    return outputs


def measure_dtype(
    dtype: str, new_tokens: int, rounds: int, bandwidth: float, agree_tokens: int
) -> tuple[dict[str, float], list[list[int]]]:
    loaded = load(dtype)
    flags = SERVE_FLAGS.get(dtype)
    server, address = launch_server("--device", "cpu", *flags) if flags else (None, "")
    # In-process runs read packed layers' codes, as the engine does (only packed layers heed it).
    with packed_weights():
        try:
            greedy = greedy_tokens(loaded, list(UNRELATED_PROMPTS), agree_tokens)
            if server is not None:
                wait_for_first_token(server, address)
                asyncio.run(memserve_concurrent(address, 4))
            hf_batch(loaded, 4)  # warm-up
            measured: list[dict[str, float]] = []
            for _ in range(rounds):
                row = {
                    "step_1": decode_step(loaded.model, 1),
                    "step_8": decode_step(loaded.model, 8),
                    "hf_1": hf_sequential(loaded, new_tokens),
                    "hf_8": hf_batch(loaded, new_tokens),
                    "memserve_1": float("nan"),
                    "memserve_8": float("nan"),
                }
                if server is not None:
                    row["memserve_1"] = asyncio.run(memserve_sequential(address, new_tokens))
                    row["memserve_8"] = asyncio.run(memserve_concurrent(address, new_tokens))[0]
                measured.append(row)
        finally:
            if server is not None:
                stop(server)
    result = {key: statistics.median(m[key] for m in measured) for key in measured[0]}
    result["bytes"] = weight_bytes(loaded.model)
    result["fraction_1"] = result["bytes"] / result["step_1"] / bandwidth
    result["fraction_8"] = result["bytes"] / result["step_8"] / bandwidth
    del loaded
    gc.collect()
    return result, greedy


def _rate(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.1f}"


def _ratio(value: float, base: float) -> str:
    return "—" if math.isnan(value) else f"{value / base:.2f}×"


def _parting(reference: list[int], other: list[int]) -> int | None:
    """The first position where two greedy outputs differ; None when they are the same."""
    for index, (a, b) in enumerate(zip(reference, other, strict=False)):
        if a != b:
            return index
    return None if len(reference) == len(other) else min(len(reference), len(other))


def llama_cpp_note() -> str:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return (
            "llama.cpp: not run (`llama_cpp` does not import here; `pip install llama-cpp-python` builds it)"
        )
    return "llama.cpp: importable, but this script does not drive it yet"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dtypes",
        default="fp32,packed,bf16",
        help="fp32 (dense), packed (--weights packed), bf16, bf16w (bf16 weights, fp32 residual: "
        "bench/mixed_precision.py)",
    )
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--agree-tokens", type=int, default=32)
    args = parser.parse_args()
    bandwidth = read_bandwidth()
    results, greedy = {}, {}
    for dtype in args.dtypes.split(","):
        results[dtype], greedy[dtype] = measure_dtype(
            dtype, args.new_tokens, args.rounds, bandwidth, args.agree_tokens
        )
    at_end = read_bandwidth()
    if at_end > bandwidth:  # the bound is the best the machine showed: the fractions follow it
        for r in results.values():
            r["fraction_1"] *= bandwidth / at_end
            r["fraction_8"] *= bandwidth / at_end
    start_bandwidth, bandwidth = bandwidth, max(bandwidth, at_end)
    base = results.get("fp32") or next(iter(results.values()))
    print(f"\nmachine: {machine()}")
    print(
        f"read bandwidth (sum over {BANDWIDTH_BYTES >> 30} GiB, best of 5): {start_bandwidth / 1e9:.1f} GB/s "
        f"at the start, {at_end / 1e9:.1f} GB/s at the end; the bound: {bandwidth / 1e9:.1f} GB/s"
    )
    print(
        f"model: default (SmolLM2-135M-Instruct); {args.new_tokens} new tokens per request, greedy; "
        f"median of {args.rounds} rounds\n"
    )
    print(
        "| dtype | MB read per step | step b1 ms | of bound b1 | step b8 ms | of bound b8 | HF 1 tok/s "
        "| HF 8 tok/s | memserve 1 tok/s | memserve 8 tok/s | memserve 1 vs fp32 | memserve 8 vs fp32 "
        "| memserve 1 vs HF 1 | memserve 8 vs HF 8 | memserve 1 vs HF fp32 1 | memserve 8 vs HF fp32 8 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for dtype, r in results.items():
        served = [_rate(r[k]) for k in ("memserve_1", "memserve_8")]
        ratios = [_ratio(r[k], base[k]) for k in ("memserve_1", "memserve_8")]
        ratios += [_ratio(r[f"memserve_{n}"], r[f"hf_{n}"]) for n in (1, 8)]
        ratios += [_ratio(r[f"memserve_{n}"], base[f"hf_{n}"]) for n in (1, 8)]
        print(
            f"| {dtype} | {r['bytes'] / 1e6:.0f} | {r['step_1'] * 1e3:.1f} | {r['fraction_1']:.0%} "
            f"| {r['step_8'] * 1e3:.1f} | {r['fraction_8']:.0%} | {r['hf_1']:.1f} | {r['hf_8']:.1f} "
            f"| {served[0]} | {served[1]} | {' | '.join(ratios)} |"
        )
    if "fp32" in greedy:
        print(
            f"\ngreedy agreement with fp32, first {args.agree_tokens} tokens "
            f"of {len(UNRELATED_PROMPTS)} prompts:"
        )
        for dtype, outputs in greedy.items():
            if dtype == "fp32":
                continue
            parted = [_parting(a, b) for a, b in zip(greedy["fp32"], outputs, strict=True)]
            same = sum(p is None for p in parted)
            where = sorted(p for p in parted if p is not None)
            print(f"  {dtype}: {same}/{len(parted)} identical; the others part at token {where}")
    print(f"\n{llama_cpp_note()}")
    print(f"(8 prompts: {', '.join(repr(p[:24]) for p in PROMPTS[:2])}, …)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
