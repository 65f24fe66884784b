"""Streaming chat over the OpenAI-compatible HTTP API against the same over gRPC, side by side.

    python bench/bench_http.py [--new-tokens 64] [--rounds 5] [--concurrency 8] [--device cpu]

One `memserve serve` subprocess (default model) serves both protocols. Each round sends
--concurrency streaming chat requests at once over HTTP (the `openai` SDK's AsyncOpenAI,
`chat.completions.create(stream=True)`) and the same requests over gRPC (AsyncClient's
`generate_stream(messages=...)`); the order of the two alternates from round to round. Every
request generates exactly --new-tokens tokens (EOS ignored), greedily. Tokens/s is all tokens of
the round over its wall time; the table gives the median over rounds and the HTTP/gRPC ratio, and
time to first token (the first streamed chunk with text) p50/p95 over every stream.

With --pin the server runs with one compute thread on CPU 0 and this script (the clients) on
CPU 1, so the clients' own work (the SDK's parsing of each chunk, gRPC's) does not slow the
engine: what is left between the protocols is the server's cost of each. Without it, clients and
server share every core, as on a machine that runs both.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import openai
from common import launch_server, stop, wait_for_first_token

from memserve.clients import AsyncClient

QUESTIONS = [
    "What is the capital of France?",
    "Tell me a short story about a young shepherd.",
    "Write a short poem about the sea.",
    "How do I write a fibonacci function in Python?",
    "What do the three laws of thermodynamics say?",
    "Suggest a quick weeknight dinner.",
    "What happened in 1492?",
    "How does photosynthesis work?",
]


def chats(count: int) -> list[list[dict[str, str]]]:
    return [
        [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        for i in range(count)
    ]  # fmt: skip


async def http_stream(
    client: openai.AsyncOpenAI, model: str, messages: list[dict[str, str]], new_tokens: int
) -> tuple[float, float, int]:
    """(time to first token, end time, tokens) of one streamed chat completion over HTTP."""
    started = time.perf_counter()
    first, tokens = None, 0
    stream = await client.chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=new_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return first or 0.0, time.perf_counter(), tokens


async def grpc_stream(
    client: AsyncClient, messages: list[dict[str, str]], new_tokens: int
) -> tuple[float, float, int]:
    """The same over gRPC."""
    started = time.perf_counter()
    first, tokens = None, 0
    async for chunk in client.generate_stream(
        messages=messages, max_new_tokens=new_tokens, ignore_eos=True, temperature=0
    ):
        if first is None and chunk.text:
            first = time.perf_counter() - started
        tokens += len(chunk.tokens)
    return first or 0.0, time.perf_counter(), tokens


async def one_round(
    protocol: str, grpc_address: str, http_url: str, model: str, concurrency: int, new_tokens: int
) -> tuple[float, list[float]]:
    """Tokens/s of `concurrency` concurrent streams over `protocol`, and each one's first-token time."""
    conversations = chats(concurrency)
    started = time.perf_counter()
    if protocol == "http":
        async with openai.AsyncOpenAI(base_url=f"{http_url}/v1", api_key="unused", max_retries=0) as client:
            started = time.perf_counter()
            results = await asyncio.gather(
                *(http_stream(client, model, m, new_tokens) for m in conversations)
            )
    else:
        async with AsyncClient(grpc_address) as client:
            started = time.perf_counter()
            results = await asyncio.gather(*(grpc_stream(client, m, new_tokens) for m in conversations))
    tokens = sum(r[2] for r in results)
    expected = concurrency * new_tokens
    assert tokens == expected, f"{protocol}: expected {expected} tokens, got {tokens}"
    return tokens / (max(r[1] for r in results) - started), [r[0] for r in results]


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.exists():
        names = [
            line.split(":", 1)[1].strip()
            for line in info.read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return f"{cpu}; {os.cpu_count()} cores"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--pin", action="store_true", help="server on CPU 0 (1 thread), clients on CPU 1")
    args = parser.parse_args()

    http_port = free_port()
    options = ["--device", args.device, "--dtype", args.dtype, "--http-port", str(http_port)]
    if args.pin:
        options += ["--threads", "1"]
    server, address = launch_server(*options)
    if args.pin:
        os.sched_setaffinity(server.pid, {0})
        os.sched_setaffinity(0, {1})
    http_url = f"http://127.0.0.1:{http_port}"
    wait_for_first_token(server, address)
    speed: dict[str, list[float]] = {"http": [], "grpc": []}
    first_token: dict[str, list[float]] = {"http": [], "grpc": []}
    try:
        model = asyncio.run(_model(http_url))
        for protocol in ("http", "grpc"):  # warm-up: connections, the chat template, the allocator
            asyncio.run(one_round(protocol, address, http_url, model, args.concurrency, 4))
        for number in range(args.rounds):
            order = ("http", "grpc") if number % 2 == 0 else ("grpc", "http")
            for protocol in order:
                rate, ttfts = asyncio.run(
                    one_round(protocol, address, http_url, model, args.concurrency, args.new_tokens)
                )
                speed[protocol].append(rate)
                first_token[protocol].extend(ttfts)
            print(
                f"round {number + 1}/{args.rounds}: http {speed['http'][-1]:.1f}, "
                f"grpc {speed['grpc'][-1]:.1f} tokens/s",
                file=sys.stderr,
            )
    finally:
        stop(server)

    http, grpc_rate = statistics.median(speed["http"]), statistics.median(speed["grpc"])
    print(f"\nmachine: {machine()}")
    print(
        f"model: default (SmolLM2-135M-Instruct), {args.dtype} on {args.device}; "
        f"{args.concurrency} concurrent streaming chat requests (system + user turn), "
        f"{args.new_tokens} new tokens each, greedy; "
        f"median of {args.rounds} rounds"
        + (
            "; server on CPU 0 with 1 thread, clients on CPU 1\n"
            if args.pin
            else "; clients and server share the cores\n"
        )
    )
    print("| protocol | tokens/s | ratio | time to first token p50 | p95 |")
    print("|---|---:|---:|---:|---:|")
    for name, label, rate in (
        ("grpc", "gRPC, AsyncClient", grpc_rate),
        ("http", "HTTP, openai AsyncOpenAI", http),
    ):
        ttfts = first_token[name]
        print(
            f"| {label} | {rate:.1f} | {rate / grpc_rate:.3f} | {percentile(ttfts, 50) * 1e3:.0f} ms "
            f"| {percentile(ttfts, 95) * 1e3:.0f} ms |"
        )
    print(f"\nHTTP / gRPC tokens/s: {http / grpc_rate:.3f} (target ≥ 0.95); first-token times over "
          f"{len(first_token['http'])} streams each")  # fmt: skip
    return 0


async def _model(http_url: str) -> str:
    async with openai.AsyncOpenAI(base_url=f"{http_url}/v1", api_key="unused") as client:
        return (await client.models.list()).data[0].id


if __name__ == "__main__":
    sys.exit(main())
