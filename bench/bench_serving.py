"""Serving throughput of memserve against Hugging Face `generate`, measured side by side.

    python bench/bench_serving.py [--new-tokens 64] [--rounds 3] [--device cpu] [--dtype fp32]

Rows (all on the same model, prompts and machine, in one run):
  (a) HF generate, one request at a time
  (b) HF generate, one batch of 8
  (c) memserve, 8 concurrent gRPC streams (a `memserve serve` subprocess)
  (d) memserve, 1 gRPC stream at a time
and time to first token (p50/p95) of (c). Every request generates exactly
--new-tokens tokens (EOS is ignored), greedily. Each row's figure is the median
over --rounds rounds; the rounds interleave the rows so drift hits all alike.
A second table compares a decode step with no hooks (what a server whose batch
has never used a memory runs: hooks are installed on a site's first use) and
with hooks on all three sites of every layer, reading an empty context.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import launch_server, stop, wait_for_first_token
from transformers import DynamicCache

from memserve.clients import AsyncClient
from memserve.memory.hooks import MemoryHooks
from memserve.models import ModelConfig, load_model
from memserve.packed import packed_weights

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a young shepherd who",
    "Write a short poem about the sea:",
    "def fibonacci(n):",
    "The three laws of thermodynamics state that",
    "My favourite recipe for a quick weeknight dinner is",
    "In the year 1492, Christopher Columbus",
    "Photosynthesis is the process by which green plants use sunlight to",
]


def hf_sequential(loaded, new_tokens: int) -> float:
    """(a): tokens/s of HF generate, one prompt at a time."""
    started = time.perf_counter()
    for prompt in PROMPTS:
        inputs = loaded.tokenizer(prompt, return_tensors="pt").to(loaded.device)
        loaded.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return len(PROMPTS) * new_tokens / (time.perf_counter() - started)


def hf_batch(loaded, new_tokens: int) -> float:
    """(b): tokens/s of HF generate on one left-padded batch of all prompts."""
    tokenizer = loaded.tokenizer
    tokenizer.padding_side = "left"
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True).to(loaded.device)
    started = time.perf_counter()
    loaded.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return len(PROMPTS) * new_tokens / (time.perf_counter() - started)


async def _stream(client: AsyncClient, prompt: str, new_tokens: int) -> tuple[float, float, int]:
    """Returns (time to first token, end time, tokens) of one streamed request."""
    started = time.perf_counter()
    first, count = None, 0
    async for chunk in client.generate_stream(prompt, max_new_tokens=new_tokens, ignore_eos=True):
        if first is None and chunk.tokens:
            first = time.perf_counter() - started
        count += len(chunk.tokens)
    return first or 0.0, time.perf_counter(), count


async def memserve_concurrent(address: str, new_tokens: int) -> tuple[float, list[float]]:
    """(c): tokens/s of 8 concurrent streams, and each stream's time to first token."""
    async with AsyncClient(address) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(_stream(client, p, new_tokens) for p in PROMPTS))
    tokens = sum(r[2] for r in results)
    assert tokens == len(PROMPTS) * new_tokens, f"expected {len(PROMPTS) * new_tokens} tokens, got {tokens}"
    return tokens / (max(r[1] for r in results) - started), [r[0] for r in results]


async def memserve_sequential(address: str, new_tokens: int) -> float:
    """(d): tokens/s of one stream at a time."""
    async with AsyncClient(address) as client:
        started = time.perf_counter()
        tokens = 0
        for prompt in PROMPTS:
            tokens += (await _stream(client, prompt, new_tokens))[2]
    return tokens / (time.perf_counter() - started)


def hook_overhead(loaded, steps: int = 200) -> tuple[float, float]:
    """Median decode-step time (batch 8, 64-token context) without hooks and with empty hooks."""
    model = loaded.model
    ids = torch.randint(100, 1000, (8, 64), device=loaded.device)

    def timed() -> float:
        with torch.inference_mode():
            cache = DynamicCache()
            model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            times = []
            token = ids[:, -1:]
            for _ in range(steps):
                started = time.perf_counter()
                model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
                times.append(time.perf_counter() - started)
                cache.crop(-1)  # keep the context length fixed
        return statistics.median(times)

    bare, hooked = [], []
    for _ in range(3):
        bare.append(timed())
        hooks = MemoryHooks(model)
        hooks.install_all()  # the worst case: every site of every layer hooked
        with hooks.using(None):
            hooked.append(timed())
        hooks.remove()
    return statistics.median(bare), statistics.median(hooked)


def percentile(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]
    )


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    if torch.cuda.is_available():
        cpu += f"; GPU {torch.cuda.get_device_name()}"
    return f"{cpu}; {os.cpu_count()} cores; torch {torch.__version__}, {torch.get_num_threads()} threads"


def median_of(rounds: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--weights", default="auto", choices=["auto", "packed", "dense"])
    args = parser.parse_args()

    loaded = load_model(ModelConfig(device=args.device, dtype=args.dtype, weights=args.weights))
    server, address = launch_server("--device", args.device, "--dtype", args.dtype, "--weights", args.weights)
    wait_for_first_token(server, address)
    # HF's loop runs on the same weights as the server's (only packed layers heed this).
    with packed_weights():
        try:
            rows: dict[str, Callable[[], float]] = {
                "a": lambda: hf_sequential(loaded, args.new_tokens),
                "b": lambda: hf_batch(loaded, args.new_tokens),
                "d": lambda: asyncio.run(memserve_sequential(address, args.new_tokens)),
            }
            ttfts: list[float] = []
            hf_batch(loaded, 4)  # warm-up
            asyncio.run(memserve_concurrent(address, 4))
            rounds = []
            for number in range(args.rounds):
                measured = {key: run() for key, run in rows.items()}
                measured["c"], round_ttfts = asyncio.run(memserve_concurrent(address, args.new_tokens))
                ttfts.extend(round_ttfts)
                rounds.append(measured)
                print(
                    f"round {number + 1}/{args.rounds}: "
                    + ", ".join(f"{k} {v:.1f}" for k, v in sorted(measured.items())),
                    file=sys.stderr,
                )
        finally:
            stop(server)
        bare, hooked = hook_overhead(loaded)

    a, b, c, d = (median_of(rounds, k) for k in "abcd")
    print(f"\nmachine: {machine()}")
    print(
        f"model: default (SmolLM2-135M-Instruct), {args.dtype} on {args.device}, {loaded.weights}; "
        f"{args.new_tokens} new tokens "
        f"per request, greedy; 8 prompts; median of {args.rounds} rounds\n"
    )
    print("| row | what | tokens/s | ratio | target |")
    print("|---|---|---:|---|---|")
    print(f"| a | HF generate, 1 request at a time | {a:.1f} | 1.00× a | |")
    print(f"| b | HF generate, batch of 8 | {b:.1f} | {b / a:.2f}× a | |")
    print(
        f"| c | memserve, 8 concurrent gRPC streams | {c:.1f} | {c / b:.2f}× b, {c / a:.2f}× a "
        f"| ≥ 0.9× b, ≥ 4× a |"
    )
    print(f"| d | memserve, 1 gRPC stream | {d:.1f} | {d / a:.2f}× a | ≥ 0.9× a |")
    print(
        f"\ntime to first token, (c): p50 {percentile(ttfts, 50) * 1e3:.0f} ms, "
        f"p95 {percentile(ttfts, 95) * 1e3:.0f} ms over {len(ttfts)} streams"
    )
    print("\n| decode step, batch 8, context 64 | ms | ratio |")
    print("|---|---:|---|")
    print(f"| no hooks (as served until a memory uses a site) | {bare * 1e3:.2f} | 1.000 |")
    print(f"| hooks on every site of every layer, empty context | {hooked * 1e3:.2f} | {hooked / bare:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
