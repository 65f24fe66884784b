"""Document memories on the default model: the paper's central effect, linear vs MLP keys.

    python bench/bench_documents.py train --out DIR [--config '{"key_module": "mlp"}'] [--seed N]
                                          [--articles 100] [--compare-with 24] [--exact-sample 5]
    python bench/bench_documents.py evaluate --out DIR [--weights packed --into DIR2]
    python bench/bench_documents.py keys --out DIR [--seeds 3] [--config '{"epochs": 30}']
    python bench/bench_documents.py throughput [--bank FILE]

`train` trains a bank over the ten fictional articles in tests/fixtures/documents (the
base model cannot know them), keeping each document's last window out of training,
writes the bank as an export file (`bank.safetensors`) and the evaluation
(`report.md`, `metrics.json`, plots) into DIR, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from articles import articles  # noqa: E402

from memserve.kinds.document import DocumentKind  # noqa: E402
from memserve.kinds.document.eval import evaluate_bank  # noqa: E402
from memserve.memory.evaluation import offline_context  # noqa: E402
from memserve.memory.kind import TrainContext  # noqa: E402
from memserve.memory_store.artifact import Artifact, MemoryMeta, decode, encode, export_bytes, import_bytes  # noqa: E402
from memserve.models import LoadedModel, ModelConfig, load_model  # noqa: E402
from memserve.packed import packed_weights  # noqa: E402

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
    config = {"holdout_windows": args.holdout_windows, "seed": args.seed, **json.loads(args.config)}
    documents = articles(args.articles) if args.articles else fixture_documents()
    _train(loaded, documents, config, args)
    return 0


# The paper's study of nonlinear keys (its appendix): ReLU selections, α = 1, random negatives.
PAPER_KEY_STUDY = {"key_activation": "relu", "alpha": 1.0, "negatives": "random"}
KEY_FIGURES = (
    ("ce_own_mean", "CE own, mean"),
    ("nearest_other_over_own_min", "nearest/own, min"),
    ("identification_accuracy_mean", "identification, mean"),
    ("recall_own_mean", "recall own"),
    ("recall_nearest_other_mean", "recall nearest"),
)


def keys(args: argparse.Namespace) -> int:
    """Linear against MLP keys over several seeds, as the paper compared them; mean ± sd."""
    import statistics

    loaded = load_model(ModelConfig(device="cpu", dtype="fp32"))
    base = {**PAPER_KEY_STUDY, "holdout_windows": args.holdout_windows, **json.loads(args.config)}
    out = args.out
    figures: dict[str, list[dict[str, float]]] = {}
    for module in ("linear", "mlp"):
        for seed in range(args.seeds):
            args.out = out / f"{module}-seed{seed}"
            metrics = _train(loaded, fixture_documents(), {**base, "key_module": module, "seed": seed}, args)
            row = {**metrics["summary"], "unrelated_ppl_ratio": metrics["unrelated_ppl_ratio"]}
            row.update(
                l0=metrics["selection"]["l0"], normalized_pairwise=metrics["selection"]["normalized_pairwise"]
            )
            figures.setdefault(module, []).append(row)
    (out / "keys.json").write_text(json.dumps({"config": base, "runs": figures}, indent=2))
    names = [*KEY_FIGURES, ("unrelated_ppl_ratio", "unrelated ×"), ("l0", "L0"),
             ("normalized_pairwise", "normalised pairwise")]  # fmt: skip
    print(f"| key ({args.seeds} seeds, mean ± sd) | " + " | ".join(label for _, label in names) + " |")
    print("|---|" + "---:|" * len(names))
    for module, rows in figures.items():
        cells = []
        for name, _ in names:
            values = [r[name] for r in rows]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3g} ± {spread:.2g}")
        print(f"| {module} | " + " | ".join(cells) + " |")
    return 0


def _train(
    loaded: LoadedModel, documents: list[dict[str, str]], config: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Trains a bank of `documents`, writes it into args.out, evaluates it; its metrics."""
    started = time.monotonic()
    trained = DocumentKind().train({"documents": documents, "config": config}, _Context(loaded))
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
    print(f"trained in {seconds:.0f} s ({trained.metrics})", file=sys.stderr)
    return _evaluate(loaded, artifact, args, {"wall_seconds": seconds})


def evaluate(args: argparse.Namespace) -> int:
    """The evaluation alone, of a bank written by `train` (its training time kept), on the model
    served with `--weights` (dense, or packed as `memserve serve` serves by default)."""
    loaded = load_model(ModelConfig(device="cpu", dtype="fp32", weights=args.weights))
    artifact = import_bytes((args.out / "bank.safetensors").read_bytes())
    before = args.out / "metrics.json"
    if args.into is not None:
        args.into.mkdir(parents=True, exist_ok=True)
        args.out = args.into
    kept = (
        {k: v for k, v in json.loads(before.read_text()).items() if k == "wall_seconds"}
        if before.exists()
        else {}
    )
    _evaluate(loaded, artifact, args, kept)
    return 0


def _evaluate(
    loaded: LoadedModel, artifact: Artifact, args: argparse.Namespace, extra: dict[str, Any]
) -> dict[str, Any]:
    """Evaluates into args.out; with `--exact-sample N`, N documents are compared again with every
    other DocRep, to show what comparing with `--compare-with` of them misses."""
    from memserve.kinds.document.eval import BankEvaluation

    started = time.monotonic()
    # As the Evaluate RPC judges: the evaluation's own forward passes read packed codes too.
    with offline_context(loaded, artifact, args.out) as context, packed_weights():
        metrics = evaluate_bank(context, artifact, compare_with=args.compare_with)
        sampled = sorted(random.Random(0).sample(range(len(metrics["documents"])), args.exact_sample))
        if sampled and metrics["summary"]["compared_with_min"] < len(metrics["documents"]) - 1:
            evaluation = BankEvaluation(context, artifact)
            ids = list(metrics["documents"])
            same_nearest = same_identification = 0
            for i in sampled:
                everyone = [j for j in range(len(ids)) if j != i]
                full, nearest = evaluation.document_metrics(i, evaluation.train[i], everyone, everyone)
                same_nearest += ids[nearest] == metrics["documents"][ids[i]]["nearest_other"]
                same_identification += math.isclose(
                    full["identification_accuracy"], metrics["documents"][ids[i]]["identification_accuracy"]
                )
            metrics["exact_check"] = {
                "documents": [ids[i] for i in sampled],
                "same_nearest_other": same_nearest,
                "same_identification_accuracy": same_identification,
            }
    metrics.update(extra, eval_seconds=time.monotonic() - started)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print((args.out / "report.md").read_text())
    if "exact_check" in metrics:
        check = metrics["exact_check"]
        print(
            f"compared with every DocRep, {len(check['documents'])} documents: the same nearest other for "
            f"{check['same_nearest_other']}, the same identification for "
            f"{check['same_identification_accuracy']}"
        )
    return metrics


def reference(args: argparse.Namespace) -> int:
    """Our trainer against a faithful re-run of the public reference loop, same data and config.

    The reference (train_guidance.py L165-216): per batch, two separate forwards of the whole
    model with the bank hooked on its layer (own key, then negative key), the base model's
    gradients computed and thrown away (it is not frozen, only zeroed), fp32 throughout. Both
    use the same windows, loss (abs), pad masking, optimiser, clipping, seed and epochs.
    """
    from memserve.kinds.document.config import DocumentConfig
    from memserve.kinds.document.train import GuidanceTrainer, SourceDocument, _docreps
    from memserve.memory.hooks import find_sites
    from memserve.training.frozen import token_losses

    loaded = load_model(ModelConfig(device="cpu", dtype="fp32"))
    model = loaded.model
    documents = [SourceDocument(d["id"], d["title"], d["text"]) for d in fixture_documents()]
    # The paper's configuration (a fixed τ, every window with a negative, a constant rate), which
    # the reference loop implements, at the epochs and rate given.
    config = DocumentConfig.from_spec(
        {"preset": "paper", "epochs": args.epochs, "learning_rate": args.learning_rate, "holdout_windows": 1}
    )
    layer = model.config.num_hidden_layers - 1
    docreps = _docreps(documents, config)
    rows: list[tuple[str, float, float]] = []

    ours = GuidanceTrainer(model, loaded.tokenizer, layer, config, docreps, documents)
    started = time.perf_counter()
    result = ours.fit(lambda *a, **k: None)
    rows.append(("memserve (cached residuals, one batched forward)", time.perf_counter() - started,
                 result["final_ce_positive"]))  # fmt: skip

    import memserve.training.frozen as frozen

    bf16_head = frozen._bf16_head
    frozen._bf16_head = lambda hidden: False  # what the bf16 LM head alone contributes
    fp32 = GuidanceTrainer(model, loaded.tokenizer, layer, config, docreps, documents)
    started = time.perf_counter()
    result = fp32.fit(lambda *a, **k: None)
    frozen._bf16_head = bf16_head
    rows.append(("memserve, fp32 LM head", time.perf_counter() - started, result["final_ce_positive"]))

    theirs = GuidanceTrainer(model, loaded.tokenizer, layer, config, docreps, documents)  # same init
    bank = theirs.bank
    selection: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
        hidden = output[0] if isinstance(output, tuple) else output
        return hidden + bank(hidden, selection[0])

    handle = find_sites(model)[layer].block.register_forward_hook(hook)
    model.requires_grad_(True)  # as the public code: the base is not frozen, its gradients are zeroed
    optimizer = torch.optim.AdamW(bank.parameters(), lr=config.learning_rate, weight_decay=0.01)
    generator = torch.Generator().manual_seed(config.seed)
    windows = theirs.windows
    started = time.perf_counter()
    positive = torch.tensor(0.0)
    try:
        for _ in range(config.epochs):
            order = torch.randperm(len(windows), generator=generator)
            for start in range(0, len(order), config.batch_size):
                chosen = order[start : start + config.batch_size]
                ids, mask, labels = (
                    windows.input_ids[chosen],
                    windows.attention_mask[chosen],
                    windows.labels[chosen],
                )
                owners = windows.documents[chosen]
                selection[:] = [bank.selection(theirs.docreps[owners])]
                positive = token_losses(model(input_ids=ids, attention_mask=mask).logits, labels).mean()
                selection[:] = [bank.selection(theirs.negatives(owners))]
                negative = token_losses(model(input_ids=ids, attention_mask=mask).logits, labels).mean()
                loss = positive + config.alpha * (config.tau - negative).abs()
                optimizer.zero_grad()
                model.zero_grad()
                loss.backward()
                model.zero_grad()  # the base gradients, computed and thrown away
                torch.nn.utils.clip_grad_norm_(bank.parameters(), 5.0)
                optimizer.step()
    finally:
        handle.remove()
        model.requires_grad_(False)
    rows.append(("public reference loop (two full forwards, base grads)", time.perf_counter() - started,
                 float(positive.detach())))  # fmt: skip
    epochs = config.epochs
    print(f"| trainer | s/epoch | ratio | CE+ after {epochs} epochs |")
    print("|---|---:|---:|---:|")
    for name, seconds, ce in rows:
        print(f"| {name} | {seconds / epochs:.1f} | {seconds / rows[0][1]:.2f}x | {ce:.3f} |")
    return 0


PROMPTS = [
    "The history of the town begins", "In the spring of that year", "According to the records,",
    "The most famous part of it is", "Critics at the time wrote that", "Its design was unusual because",
    "Visitors today can still see", "The first written account says",
]  # fmt: skip


def throughput(args: argparse.Namespace) -> int:
    """8 concurrent streams, each with a different document of one bank, against 8 with no memory,
    rounds interleaved (which goes first alternates); greedy, EOS ignored. Through a `memserve
    serve` subprocess and its gRPC API, or (`--in-process`) straight into an engine, which
    leaves out the RPC noise."""
    import statistics

    measure = _engine_rounds if args.in_process else _server_rounds
    plain, memory = measure(args)
    p, m = statistics.median(plain), statistics.median(memory)
    paired = statistics.median(b / a for a, b in zip(plain, memory, strict=True))
    where = "in one engine" if args.in_process else "over gRPC"
    title = f"8 concurrent streams {where}, {args.new_tokens} new tokens each"
    print(f"| {title} | tokens/s (median of {args.rounds}) | ratio | median ratio within a round |")
    print("|---|---:|---:|---:|")
    print(f"| no memory | {p:.1f} | 1.00x | |")
    print(f"| each with a different document of one bank | {m:.1f} | {m / p:.3f}x | {paired:.3f}x |")
    return 0


def _engine_rounds(args: argparse.Namespace) -> tuple[list[float], list[float]]:
    from memserve.engine.offline import generate_each
    from memserve.kinds.document.module import LoadedDocumentBank
    from memserve.memory.kind import MemoryKey, MemoryRefSpec

    loaded = load_model(ModelConfig(device="cpu", dtype="fp32"))
    artifact = import_bytes(args.bank.read_bytes())
    prompts = [loaded.tokenizer(p).input_ids for p in PROMPTS]
    with tempfile.TemporaryDirectory() as out, offline_context(loaded, artifact, Path(out)) as context:
        bank = LoadedDocumentBank(artifact, context.target)
        every = [d["id"] for d in artifact.meta.details["documents"]]
        ids = [every[i % len(every)] for i in range(len(PROMPTS))]
        bound = [
            (bank.bind(MemoryRefSpec("articles", "document", key=MemoryKey(document_id=i))),) for i in ids
        ]

        def rate(memories: list[tuple[Any, ...]]) -> float:
            started = time.perf_counter()
            generate_each(context.engine, list(zip(prompts, memories, strict=True)), args.new_tokens)
            return len(prompts) * args.new_tokens / (time.perf_counter() - started)

        rate(bound), rate([()] * 8)  # warm
        plain, memory = [], []
        for turn in range(args.rounds):
            for with_bank in _order(turn):
                (memory if with_bank else plain).append(rate(bound if with_bank else [()] * 8))
    return plain, memory


def _order(turn: int) -> tuple[bool, bool]:
    """Which runs first in a round (with the bank: True): alternated, so that a drift over a
    round (a cache warming, another process waking) does not always favour one side."""
    return (False, True) if turn % 2 == 0 else (True, False)


def _server_rounds(args: argparse.Namespace) -> tuple[list[float], list[float]]:
    import asyncio

    sys.path.insert(0, str(REPO / "bench"))
    from common import launch_server, stop, wait_for_first_token

    from memserve.clients.client import AsyncClient, Client, document_ref
    from memserve.memory_store.redis_server import RedisServer

    data = args.bank.read_bytes()

    async def streams(address: str, documents: list[str | None]) -> float:
        async with AsyncClient(address, timeout=600) as client:

            async def one(prompt: str, doc: str | None) -> None:
                memories = [document_ref("articles", doc)] if doc else []
                async for _ in client.generate_stream(prompt, max_new_tokens=args.new_tokens, ignore_eos=True,
                                                      memories=memories):  # fmt: skip
                    pass

            started = time.perf_counter()
            await asyncio.gather(*(one(p, d) for p, d in zip(PROMPTS, documents, strict=True)))
            return len(PROMPTS) * args.new_tokens / (time.perf_counter() - started)

    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp)) as redis:
        server, address = launch_server("--redis-url", redis.url, "--workers", "0")
        try:
            wait_for_first_token(server, address)
            with Client(address) as client:
                info = client.put_memory(data, name="articles")
            ids = [d["id"] for d in info.details["documents"]][:8]
            plain, memory = [], []
            asyncio.run(streams(address, list(ids)))  # warm: the bank loads once
            for turn in range(args.rounds):
                for with_bank in _order(turn):
                    documents = list(ids) if with_bank else [None] * 8
                    (memory if with_bank else plain).append(asyncio.run(streams(address, documents)))
        finally:
            stop(server)
    return plain, memory


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("train")
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--config", default="{}", help='training options over the defaults, as JSON: '
                     '\'{"key_module": "mlp"}\', \'{"preset": "paper"}\'')  # fmt: skip
    run.add_argument("--holdout-windows", type=int, default=1)
    run.add_argument("--articles", type=int, default=0, help="train on this many generated articles "
                     "(bench/articles.py), not the fixtures")  # fmt: skip
    run.add_argument("--seed", type=int, default=0)
    run.set_defaults(run=train)
    again = commands.add_parser("evaluate", help="evaluate again the bank that `train` wrote into --out")
    again.add_argument("--out", type=Path, required=True)
    again.add_argument("--weights", choices=["dense", "packed"], default="dense", help="as `serve --weights`")
    again.add_argument("--into", type=Path, help="where the report goes (default: --out)")
    again.set_defaults(run=evaluate)
    study = commands.add_parser("keys", help="linear against MLP keys, several seeds, on the ten fixtures")
    study.add_argument("--out", type=Path, required=True)
    study.add_argument("--seeds", type=int, default=3)
    study.add_argument("--holdout-windows", type=int, default=1)
    study.add_argument("--config", default="{}", help="options over the study's, as JSON")
    study.set_defaults(run=keys)
    for command in (run, again, study):
        command.add_argument("--compare-with", type=int, default=24,
                             help="other DocReps each document is compared with (0 = all)")  # fmt: skip
        command.add_argument("--exact-sample", type=int, default=0,
                             help="documents compared again with every DocRep, as a check")  # fmt: skip
    compare = commands.add_parser("reference", help="trainer speed against the public reference loop")
    compare.add_argument("--epochs", type=int, default=2)
    compare.add_argument("--learning-rate", type=float, default=1e-2)
    compare.set_defaults(run=reference)
    speed = commands.add_parser("throughput", help="8 concurrent requests with 8 documents vs none")
    speed.add_argument("--bank", type=Path, required=True, help="an export file from `train`")
    speed.add_argument("--new-tokens", type=int, default=64)
    speed.add_argument("--rounds", type=int, default=5)
    speed.add_argument("--in-process", action="store_true", help="into an engine, not through a server")
    speed.set_defaults(run=throughput)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
