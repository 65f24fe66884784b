"""The FEVER study's table on our fixture: base / Doc / Temp / DocTemp, k = 0..3 shots.

python bench/bench_factuality.py [--out DIR] [--shots 0 1 2 3] [--epochs 25] [--learning-rate 1e-3]

Trains three adapters on the default model, as `memserve adapters add` would (the `adapter`
kind's trainer, default options unless given): **Doc** on the fixture's eight fictional
documents, **Temp** on its 48 training claims in the few-shot template, **DocTemp** on both.
Then evaluates the base model and each adapter on the 48 test claims with k shots through
the serving engine (`memserve eval factuality`'s code), and prints accuracy / micro-F1 /
macro-F1 per k, with what each adapter took to train. Reports land in DIR/<variant>/.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from memserve.engine.threads import run_in_compute_thread
from memserve.kinds.adapter.claims import LABELS, about_claims, read_claims, template_for
from memserve.kinds.adapter.config import AdapterConfig
from memserve.kinds.adapter.eval import evaluate_model, write_report
from memserve.kinds.adapter.module import adapter_tensors
from memserve.kinds.adapter.train import AdapterTrainer, examples
from memserve.memory.evaluation import offline_context
from memserve.memory_store.artifact import Artifact, MemoryMeta, encode, export_bytes, import_bytes
from memserve.models import ModelConfig, load_model

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "factuality"


def read_documents() -> list[dict[str, str]]:
    documents = []
    for path in sorted((FIXTURE / "documents").glob("*.md")):
        heading, _, text = path.read_text().partition("\n")
        documents.append({"id": path.stem, "title": heading.removeprefix("# ").strip(), "text": text.strip()})
    return documents


def print_shots_table(
    title: str, table: dict[str, dict[str, Any]], shots: list[int], cell: Callable[[dict[str, Any]], str]
) -> None:
    """A Markdown table after `title`: a row per shot count, a column per variant of `table`."""
    print()
    print(title)
    print()
    print("| shots | " + " | ".join(table) + " |")
    print("|---:|" + "---|" * len(table))
    for k in map(str, shots):
        print(f"| {k} | " + " | ".join(cell(t[k]) for t in table.values()) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("eval-factuality"))
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="evaluate the adapters DIR/<variant>/adapter.safetensors of a past run",
    )
    args = parser.parse_args()
    # This thread loads and waits; training runs in a thread of its own and the evaluation in
    # the engine's, so that one OpenMP team computes at a time (memserve/threads.py).
    torch.set_num_threads(1)
    loaded = load_model(ModelConfig())
    claims = read_claims(FIXTURE / "claims.jsonl")
    documents = read_documents()
    templates = [template_for(c) for c in claims if c.split == "train"]
    given = {
        k: v for k, v in (("epochs", args.epochs), ("learning_rate", args.learning_rate)) if v is not None
    }
    config = AdapterConfig.from_spec(given)
    layer = config.resolved_layer(loaded.model.config.num_hidden_layers)
    variants: dict[str, tuple[list[dict[str, str]], list[dict[str, str]]]] = {
        "Doc": (documents, []),
        "Temp": ([], templates),
        "DocTemp": (documents, templates),
    }
    trained: dict[str, dict[str, Any]] = {}
    artifacts: dict[str, Artifact | None] = {"base": None}
    for name, (docs, temps) in variants.items():
        saved = args.out / name / "adapter.safetensors"
        if args.reuse:
            artifacts[name] = import_bytes(saved.read_bytes())
            trained[name] = json.loads((args.out / "summary.json").read_text())["trained"][name]
            continue
        data = examples(loaded.tokenizer, docs, temps, config.max_length)
        started = time.monotonic()

        def train(data: Any = data, name: str = name) -> tuple[AdapterTrainer, dict[str, Any]]:
            trainer = AdapterTrainer(loaded.model, layer, config, data)
            last = [0.0]

            def report(step: int, total: int, loss: float | None = None, message: str = "") -> None:
                if time.monotonic() - last[0] > 5 or step == total:
                    last[0] = time.monotonic()
                    print(f"\r{name}: step {step}/{total}, loss {loss:.3f}", end="", flush=True)

            return trainer, trainer.fit(report)

        trainer, results = run_in_compute_thread(train, name=f"train-{name}")
        seconds = time.monotonic() - started
        print()
        tokens = int((data.labels[:, 1:] != -100).sum())
        trained[name] = {**results, "examples": len(data), "tokens": tokens, "seconds": round(seconds, 1)}
        hyper = {**config.__dict__, "layer": layer}
        meta = MemoryMeta(kind="adapter", name=f"fever-{name.lower()}", base_model=loaded.fingerprint,
                          version=1, hyperparameters=hyper, metrics=results)  # fmt: skip
        meta, _ = encode(meta, adapter_tensors(trainer.adapter))
        artifacts[name] = Artifact(meta, adapter_tensors(trainer.adapter))
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_bytes(export_bytes(artifacts[name]))
    table: dict[str, dict[str, Any]] = {}
    for name, artifact in artifacts.items():
        started = time.monotonic()
        with offline_context(loaded, artifact, args.out / name) as context:
            results = evaluate_model(context, claims, args.shots)
        about = {"variant": name, "model": loaded.name, **about_claims(claims), **trained.get(name, {})}
        write_report(args.out / name, f"Factuality, {name}", results, about)
        table[name] = {k: {**{m: r[m] for m in ("accuracy", "micro_f1", "macro_f1", "invalid_rate")},
                           "likely_accuracy": r["by_likelihood"]["accuracy"],
                           "likely_macro_f1": r["by_likelihood"]["macro_f1"]}
                       for k, r in results.items()}  # fmt: skip
        print(f"{name}: evaluated in {time.monotonic() - started:.0f} s")
    (args.out / "summary.json").write_text(json.dumps({"trained": trained, "table": table}, indent=2) + "\n")
    labels = about_claims(claims)["test_labels"]
    print()
    print(f"default model, adapter at layer {layer}, hidden {config.hidden_size}, {config.epochs} epochs at "
          f"lr {config.learning_rate}, wd {config.weight_decay}; 48 test claims ({labels}); "
          f"chance = {max(labels.values()) / 48:.3f} (majority), 1/{len(LABELS)} (uniform)")  # fmt: skip
    print_shots_table(
        "accuracy / micro-F1 / macro-F1 (invalid answers)",
        table,
        args.shots,
        lambda r: (
            f"{r['accuracy']:.3f} / {r['micro_f1']:.3f} / {r['macro_f1']:.3f} ({r['invalid_rate']:.2f})"
        ),
    )
    print_shots_table(
        "by likelihood (the most likely of the three answers): accuracy / macro-F1",
        table,
        args.shots,
        lambda r: f"{r['likely_accuracy']:.3f} / {r['likely_macro_f1']:.3f}",
    )
    print()
    print("| adapter | examples | tokens | steps | training | loss base → final | gate |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, t in trained.items():
        print(f"| {name} | {t['examples']} | {t['tokens']} | {t['steps']} | {t['seconds']:.0f} s | "
              f"{t['base_loss']:.3f} → {t['final_loss']:.3f} | {t['gate']:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
