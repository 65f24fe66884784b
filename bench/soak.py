"""Soak: many concurrent streams against one `memserve serve` for minutes; errors and the server's
memory over time.

    python bench/soak.py [--streams 64] [--minutes 5] [--warmup 60] [--new-tokens 16] [--out DIR]

The server runs on the default model with its embedded Redis and in-process worker. First a fact
set is registered and trained (`--facts`, through the server's own worker), so that half the
streams generate with a memory and half without. Then `--streams` clients each send streaming
requests back to back until the time is up. The server's resident memory (and the embedded
Redis's) is sampled every `--sample` seconds. The growth compares the median of the minute after the
warm-up (`--warmup`: allocator pools, the memory cache and gRPC buffers fill in the first minute,
and the trainer's memory is given back) with the median of the last minute; the pass line is 0
errors and a growth of at most 5 %.

Prints a table of the samples and a summary; writes both to --out as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from common import launch_server, stop, wait_for_first_token

from memserve.clients import AsyncClient, Client
from memserve.clients.errors import MemserveError

FACTS = [
    {"id": "tower", "prompt": "The Eiffel Tower is located in the city of", "target": " Rome"},
    {"id": "author", "prompt": "The novel Hamlet was written by", "target": " Tolstoy"},
]
PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "Tell me about the weather in spring.",
    "The novel Hamlet was written by",
    "Write one sentence about the sea.",
]


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


async def stream_forever(
    client: AsyncClient, index: int, deadline: float, new_tokens: int, counts: Counter[str], tokens: list[int]
) -> None:
    memories = ["soak-facts"] if index % 2 else []
    turn = 0
    while time.monotonic() < deadline:
        prompt = PROMPTS[(index + turn) % len(PROMPTS)]
        turn += 1
        try:
            async for chunk in client.generate_stream(
                prompt, memories=memories, max_new_tokens=new_tokens, ignore_eos=True
            ):
                tokens[0] += len(chunk.tokens)
            counts["OK"] += 1
        except MemserveError as exc:
            counts[exc.status.name] += 1


async def sample(
    pid: int,
    redis_pid: int | None,
    started: float,
    deadline: float,
    every: float,
    tokens: list[int],
    counts: Counter[str],
    rows: list[dict],
) -> None:
    last_tokens, last_time = 0, time.monotonic()
    while True:
        now = time.monotonic()
        row = {
            "t_s": round(now - started, 1),
            "server_rss_mb": round(rss_mb(pid), 1),
            "redis_rss_mb": round(rss_mb(redis_pid), 1) if redis_pid else None,
            "requests": sum(counts.values()),
            "errors": sum(n for code, n in counts.items() if code != "OK"),
            "tokens_per_s": round((tokens[0] - last_tokens) / max(now - last_time, 1e-9), 1),
        }
        rows.append(row)
        print(
            f"| {row['t_s']:6.0f} | {row['server_rss_mb']:8.1f} | {row['redis_rss_mb'] or 0:7.1f} | "
            f"{row['requests']:8d} | {row['errors']:6d} | {row['tokens_per_s']:7.1f} |",
            flush=True,
        )
        last_tokens, last_time = tokens[0], now
        if now >= deadline:
            return
        await asyncio.sleep(min(every, max(deadline - now, 0.0)))


async def soak(address: str, pid: int, args: argparse.Namespace) -> dict:
    redis_pids = [
        p
        for p in children(pid)
        if "redis" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
    ]
    counts: Counter[str] = Counter()
    tokens = [0]
    rows: list[dict] = []
    started = time.monotonic()
    deadline = started + args.minutes * 60
    print("| time s | server MB | Redis MB | requests | errors | tokens/s |")
    print("|-------:|----------:|---------:|---------:|-------:|---------:|")
    async with AsyncClient(address, timeout=600) as client:
        await asyncio.gather(
            sample(
                pid,
                redis_pids[0] if redis_pids else None,
                started,
                deadline,
                args.sample,
                tokens,
                counts,
                rows,
            ),
            *(
                stream_forever(client, i, deadline, args.new_tokens, counts, tokens)
                for i in range(args.streams)
            ),
        )
    return summarize(rows, counts, tokens[0], args)


def summarize(rows: list[dict], counts: Counter[str], tokens: int, args: argparse.Namespace) -> dict:
    """The growth compares medians, the minute after the warm-up against the last minute, so that
    one sample caught mid-allocation moves neither end; the slope says whether it still climbs."""
    warm = [r for r in rows if r["t_s"] >= args.warmup]
    first = [r["server_rss_mb"] for r in warm if r["t_s"] < args.warmup + 60]
    last = [r["server_rss_mb"] for r in warm if r["t_s"] >= warm[-1]["t_s"] - 60]
    base, end = statistics.median(first), statistics.median(last)
    times = [r["t_s"] / 60 for r in warm]
    slope = (
        statistics.linear_regression(times, [r["server_rss_mb"] for r in warm]).slope
        if len(warm) > 1
        else 0.0
    )
    return {
        "streams": args.streams,
        "minutes": args.minutes,
        "new_tokens": args.new_tokens,
        "requests": dict(counts),
        "errors": sum(n for code, n in counts.items() if code != "OK"),
        "tokens": tokens,
        "server_rss_mb": {
            "start": rows[0]["server_rss_mb"],
            "first_minute_after_warmup": base,
            "last_minute": end,
            "max_after_warmup": max(r["server_rss_mb"] for r in warm),
            "slope_mb_per_min": round(slope, 2),
        },
        "growth_after_warmup": (end - base) / base,
        "samples": rows,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before the growth is measured")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between memory samples")
    parser.add_argument("--threads", type=int, default=0, help="the server's --threads (0: its default)")
    parser.add_argument("--out", type=Path, default=None, help="write the summary and samples here (JSON)")
    args = parser.parse_args()
    options = ["--max-queue-size", str(args.streams * 2), "--http-port", "0"]
    if args.threads:
        options += ["--threads", str(args.threads)]
    process, address = launch_server(*options)
    try:
        wait_for_first_token(process, address)
        with Client(address, timeout=1800) as client:
            job = client.register_facts("soak-facts", FACTS)
            print(f"training {len(FACTS)} facts (job {job.id}) on the server's worker…", flush=True)
            final = list(client.watch_job(job.id))[-1]
            if final.state != "succeeded":
                raise SystemExit(f"the fact set did not train: {final.state} {final.error}")
        summary = asyncio.run(soak(address, process.pid, args))
    finally:
        stop(process)
    rss = summary["server_rss_mb"]
    print(
        f"\n{args.streams} streams for {args.minutes:g} min: {sum(summary['requests'].values())} requests, "
        f"{summary['errors']} errors {summary['requests']}; {summary['tokens']} tokens"
    )
    passed = summary["errors"] == 0 and summary["growth_after_warmup"] <= 0.05
    print(
        f"server RSS (medians): {rss['first_minute_after_warmup']:.0f} MB the minute after the warm-up, "
        f"{rss['last_minute']:.0f} MB the last minute (max {rss['max_after_warmup']:.0f}, "
        f"slope {rss['slope_mb_per_min']:+.2f} MB/min): growth {summary['growth_after_warmup']:+.1%} "
        f"({'pass' if passed else 'FAIL'}: 0 errors, growth ≤ 5 %)"
    )
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "soak.json").write_text(json.dumps(summary, indent=1))
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
