"""Why training jobs run in a thread of their own (memserve/threads.py), measured.

python bench/bench_threads.py

The engine's decode step (default model, batch 1) alone; after a training-like job in a thread
that ends with the job (what memserve does); and after the same job in a thread that lives on
(what the in-process worker did before): its OpenMP team slows every small op of the engine's.
"""

from __future__ import annotations

import statistics
import threading
import time

import torch
from bench_facts import PROMPT, step_times

from memserve.engine.scheduler import Engine, EngineConfig
from memserve.engine.threads import run_in_compute_thread
from memserve.models import ModelConfig, load_model


def main() -> None:
    torch.set_num_threads(1)  # this thread only loads and waits
    loaded = load_model(ModelConfig())
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(max_batch_size=16))
    engine.start()
    ids = tuple(loaded.tokenizer(PROMPT).input_ids)

    def step() -> float:
        return statistics.median(step_times(engine, ids, (), 1, 24)) * 1e3

    def training_like() -> None:
        weights = torch.randn(1500, 1500)
        for _ in range(20):
            weights @ weights

    try:
        step()  # warm-up
        alone = step()
        run_in_compute_thread(training_like, "job")
        after_ended = step()
        stay = threading.Event()

        def long_lived() -> None:
            torch.set_num_threads(2)
            training_like()
            stay.wait()

        thread = threading.Thread(target=long_lived, daemon=True)
        thread.start()
        time.sleep(3)
        after_lingering = step()
        stay.set()
        thread.join()
    finally:
        engine.stop()
    print("| engine decode step, batch 1 | ms/step | ratio |")
    print("|---|---:|---:|")
    for name, value in [("alone", alone), ("after a job in a thread that ended (memserve)", after_ended),
                        ("after a job in a thread that lives on (before)", after_lingering)]:  # fmt: skip
        print(f"| {name} | {value:.1f} | {value / alone:.2f}× |")


if __name__ == "__main__":
    main()
