"""Document memories on the default model: the paper's central effect, linear vs MLP keys.

    python bench/bench_documents.py train --out DIR [--key-module linear|mlp] [--epochs N] ...
    python bench/bench_documents.py throughput [--bank FILE]

`train` trains a bank over the ten fictional articles in tests/fixtures/documents (the
base model cannot know them), keeping each document's last window out of training,
writes the bank as an export file (`bank.safetensors`) and the evaluation
(`report.md`, `metrics.json`, plots) into DIR, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from memserve.document_eval import evaluate_bank  # noqa: E402
from memserve.document_train import DocumentKind  # noqa: E402
from memserve.kinds import TrainContext  # noqa: E402
from memserve.memory_store.artifact import Artifact, MemoryMeta, decode, encode, export_bytes  # noqa: E402
from memserve.models import LoadedModel, ModelConfig, load_model  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures" / "documents"


def fixture_documents() -> list[dict[str, str]]:
    documents = []
    for path in sorted(FIXTURES.glob("*.txt")):
        title, _, text = path.read_text().partition("\n")
        documents.append({"id": path.stem, "title": title.removeprefix("# ").strip(), "text": text.strip()})
    return documents


class _Context(TrainContext):
    job_id = "bench"
    tenant = "default"
    memory_name = "articles"

    def __init__(self, loaded: LoadedModel) -> None:
        self._loaded = loaded
        self.started = time.monotonic()

    @property
    def model(self) -> LoadedModel:
        return self._loaded

    def report(self, step: int, total: int, loss: float | None = None, message: str = "") -> None:
        if step % 10 == 0 or step == total:
            elapsed = time.monotonic() - self.started
            print(f"  step {step}/{total} {message} ({elapsed:.0f} s)", file=sys.stderr, flush=True)

    def current_artifact(self) -> Artifact | None:
        return None


def train(args: argparse.Namespace) -> int:
    loaded = load_model(ModelConfig(device="cpu", dtype="fp32"))
    config = {
        "epochs": args.epochs, "key_module": args.key_module, "learning_rate": args.learning_rate,
        "holdout_windows": args.holdout_windows, "seed": args.seed,
    }  # fmt: skip
    started = time.monotonic()
    trained = DocumentKind().train({"documents": fixture_documents(), "config": config}, _Context(loaded))
    seconds = time.monotonic() - started
    meta = MemoryMeta(
        kind="document",
        name="articles",
        base_model=loaded.fingerprint,
        hyperparameters=trained.hyperparameters,
        metrics=trained.metrics,
        details=trained.details,
    )
    meta, blob = encode(meta, trained.tensors)
    from dataclasses import replace

    artifact = decode(replace(meta, version=1), blob)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bank.safetensors").write_bytes(export_bytes(artifact))
    metrics = evaluate_bank(loaded, artifact, args.out)
    metrics["wall_seconds"] = seconds
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print((args.out / "report.md").read_text())
    print(f"trained in {seconds:.0f} s ({trained.metrics})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("train")
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--key-module", default="linear", choices=["linear", "mlp"])
    run.add_argument("--epochs", type=int, default=60)
    run.add_argument("--learning-rate", type=float, default=3e-3)
    run.add_argument("--holdout-windows", type=int, default=1)
    run.add_argument("--seed", type=int, default=0)
    run.set_defaults(run=train)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
