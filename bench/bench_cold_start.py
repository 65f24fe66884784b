"""Cold start of `memserve serve`: from launching the process to the first served token.

    python bench/bench_cold_start.py [--later-runs 3]

The first run starts with an empty cache directory, so it converts the default
model's GGUF to safetensors and builds the packed-weight kernel; later runs load the converted
folder and the built kernel, with packed weights (the default) and with `--weights dense`,
alternating.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

from common import launch_server, stop, wait_for_first_token


def time_to_first_token(cache_dir: str, weights: str = "auto") -> float:
    started = time.perf_counter()
    server, address = launch_server("--cache-dir", cache_dir, "--weights", weights)
    try:
        wait_for_first_token(server, address)
        return time.perf_counter() - started
    finally:
        stop(server)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--later-runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="memserve-cold-") as cache_dir:
        first = time_to_first_token(cache_dir)
        later: dict[str, list[float]] = {"packed": [], "dense": []}
        for _ in range(args.later_runs):
            for weights, times in later.items():
                times.append(time_to_first_token(cache_dir, weights))
    print("| start | launch → first token (s) |")
    print("|---|---:|")
    print(f"| first run (converts the GGUF, builds the packed kernel) | {first:.1f} |")
    for weights, times in later.items():
        print(f"| later runs, {weights} weights, median of {len(times)} | {statistics.median(times):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
