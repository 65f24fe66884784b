"""`memserve eval docs|facts|factuality`: a memory's evaluation, as a report written into --out.

By default the running server evaluates (the Evaluate RPC, on its own model and engine) and
streams the report back. With --file the memory comes from an export file and the evaluation
runs here, offline: this loads the model in this process, and touches no server and no Redis."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memserve.clients.cli.arguments import memory_argument
from memserve.clients.cli.common import command, connect
from memserve.clients.cli.files import json_file_objects
from memserve.clients.cli.options import add_options, given_options
from memserve.clients.cli.output import print_json
from memserve.clients.cli.progress import EvaluationBar
from memserve.clients.cli.serve import MODEL_DEFAULTS, add_model_flags, model_config
from memserve.clients.types import EvaluationProgress, ReportFile
from memserve.kinds.adapter.claims import claims_from
from memserve.kinds.adapter.config import FactualityOptions
from memserve.kinds.document.config import DocumentEvalOptions
from memserve.kinds.local.config import LocalEvalOptions, eval_prompts
from memserve.memory.options import Options

Summary = Callable[[dict[str, Any]], tuple[str, dict[str, Any]]]
"""metrics.json → (the summary line's figures, the same as JSON)."""
FACT_FIGURES = (
    "edit_success",
    "generalization",
    "locality_neighbours",
    "locality_unrelated",
    "unrelated_text_ppl_ratio",
)
SHOT_FIGURES = ("accuracy", "micro_f1", "macro_f1")


def _docs_summary(metrics: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    summary = {**metrics["summary"], "unrelated_ppl_ratio": metrics["unrelated_ppl_ratio"]}
    shown = (
        f"identification ≥ {summary['identification_accuracy_min']:.2f}, nearest-other/own perplexity "
        f"≥ {summary['nearest_other_over_own_min']:.2f}, CE own ≤ {summary['ce_own_max']:.3f}, recall "
        f"{summary['recall_own_mean']:.2f} own vs {summary['recall_nearest_other_mean']:.2f} nearest other, "
        f"unrelated text ×{summary['unrelated_ppl_ratio']:.1f} the base model's perplexity"
    )
    return shown, summary


def _facts_summary(metrics: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    figures = {key: metrics.get(key) for key in FACT_FIGURES}
    shown = (f"{key} n/a" if value is None else f"{key} {value:.3f}" for key, value in figures.items())
    return ", ".join(shown), figures


def _factuality_summary(metrics: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    shots = {k: {key: result[key] for key in SHOT_FIGURES} for k, result in metrics["shots"].items()}
    shown = (f"{k} shots " + "/".join(f"{r[key]:.3f}" for key in SHOT_FIGURES) for k, r in shots.items())
    return "accuracy/micro-F1/macro-F1: " + ", ".join(shown), {"shots": shots}


@dataclass(frozen=True)
class Evaluation:
    """One `eval` subcommand: the memory kind it evaluates and how its report is summed up."""

    command: str
    kind: str
    what: str
    options: type[Options]
    summary: Summary
    help: str


DOCS = Evaluation(
    command="docs",
    kind="document",
    what="a document bank",
    options=DocumentEvalOptions,
    summary=_docs_summary,
    help="perplexity with own/other/random/no DocRep and without the bank; selection statistics; plots",
)
FACTS = Evaluation(
    command="facts",
    kind="local",
    what="a local memory set",
    options=LocalEvalOptions,
    summary=_facts_summary,
    help="edit success, generalisation and locality of a local memory set, on its held-out prompts",
)
FACTUALITY = Evaluation(
    command="factuality",
    kind="adapter",
    what="an adapter",
    options=FactualityOptions,
    summary=_factuality_summary,
    help="few-shot claim verification (supports / refutes / not enough info), with or without an "
    "adapter: accuracy, micro-F1 and macro-F1 per number of shots",
)


def register(commands: Any) -> None:
    help = "evaluate a memory (report, metrics and plots), on the server or offline (--file)"
    evaluate = commands.add_parser("eval", help=help, description=__doc__)
    kinds = evaluate.add_subparsers(dest="eval_command", required=True, metavar="KIND")
    docs = _parser(kinds, DOCS, run_docs)
    docs.add_argument(
        "bank", metavar="BANK[@VERSION]", type=memory_argument, help="the bank (ignored with --file)"
    )
    facts = _parser(kinds, FACTS, run_facts)
    facts.add_argument(
        "set", metavar="SET[@VERSION]", type=memory_argument, help="the set (ignored with --file)"
    )
    facts.add_argument(
        "--prompts",
        type=Path,
        default=None,
        metavar="FILE",
        help="JSONL of {id, positive_prompts, negative_prompts} (a facts file does): judge each fact "
        "on these rewordings and neighbours instead of its held-out prompts",
    )
    factuality = _parser(kinds, FACTUALITY, run_factuality)
    factuality.add_argument(
        "--claims", type=Path, required=True, help="JSONL of {id, document, claim, label, split}"
    )
    factuality.add_argument(
        "--adapter",
        type=memory_argument,
        default=None,
        metavar="NAME[@VERSION]",
        help="attach this adapter to every prompt (default: the base model alone)",
    )


def _parser(kinds: Any, evaluation: Evaluation, run: Callable[[argparse.Namespace], int]) -> Any:
    parser = command(kinds, evaluation.command, evaluation.help, run)
    parser.add_argument(
        "--out", type=Path, required=True, help="the folder the report's files are written into"
    )
    add_options(parser, evaluation.options, "evaluation options (not given: the default shown)")
    offline = parser.add_argument_group("offline evaluation (in this process, without a server)")
    offline.add_argument(
        "--file",
        type=Path,
        default=None,
        metavar="EXPORT",
        help=(
            f"evaluate {evaluation.what} from this export file (`memserve memories export`) here, "
            "loading the model"
        ),
    )
    add_model_flags(offline, defaults=False)
    return parser


def run_docs(args: argparse.Namespace) -> int:
    return evaluate(args, DOCS, args.bank, given_options(args, DocumentEvalOptions))


def run_facts(args: argparse.Namespace) -> int:
    options = given_options(args, LocalEvalOptions)
    if args.prompts is not None:
        fields = ("id", "positive_prompts", "negative_prompts")
        rows = [row for _, row in json_file_objects(str(args.prompts))]
        options["prompts"] = [{k: row[k] for k in fields if k in row} for row in rows]
        eval_prompts(options["prompts"])  # refused here, before a server or a model is reached
    return evaluate(args, FACTS, args.set, options)


def run_factuality(args: argparse.Namespace) -> int:
    lines = list(json_file_objects(str(args.claims)))
    if args.file:  # a bad file is refused before the model loads (the server checks it itself)
        claims_from(lines, str(args.claims))
    options = {
        "claims": [row for _, row in lines],
        "source": str(args.claims),
        **given_options(args, FactualityOptions),
    }
    return evaluate(args, FACTUALITY, args.adapter or ("", 0), options)


def evaluate(
    args: argparse.Namespace, evaluation: Evaluation, memory: tuple[str, int], options: dict[str, Any]
) -> int:
    """Runs the evaluation (on the server, or here with --file), then prints its summary."""
    if args.file:
        written = offline(args, evaluation, options)
    else:
        _no_model_flags(args)
        written = on_server(args, evaluation, memory, options)
    text, summary = evaluation.summary(json.loads((args.out / "metrics.json").read_text()))
    if args.json:
        print_json({"out": str(args.out), "files": written, "summary": summary})
    else:
        others = ", ".join(name for name in written if name != "report.md")
        print(f"wrote {args.out / 'report.md'} and {others}; {text}")
    return 0


def _no_model_flags(args: argparse.Namespace) -> None:
    if any(getattr(args, name) is not None for name in MODEL_DEFAULTS):
        raise ValueError(
            "--model, --dtype, --device, --weights and --cache-dir go with --file: "
            "the server evaluates on its own model"
        )


def on_server(
    args: argparse.Namespace, evaluation: Evaluation, memory: tuple[str, int], options: dict[str, Any]
) -> list[str]:
    """The server's evaluation, its report's files written into --out as they arrive."""
    args.out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    with connect(args) as client, EvaluationBar(evaluation.command) as bar:
        events = client.evaluate(evaluation.kind, *memory, options=options)
        with contextlib.closing(events):  # leaving early (Ctrl-C) cancels the evaluation
            for event in events:
                if isinstance(event, EvaluationProgress):
                    bar(event.step, event.total, event.message)
                elif isinstance(event, ReportFile):
                    written.append(save(args.out, event))
    return written


def save(out: Path, file: ReportFile) -> str:
    if not file.name or Path(file.name).name != file.name or file.name in (".", ".."):
        raise ValueError(f"the server sent a report file named {file.name!r}, not a plain file name")
    (out / file.name).write_bytes(file.content)
    return file.name


def offline(args: argparse.Namespace, evaluation: Evaluation, options: dict[str, Any]) -> list[str]:
    """The evaluation in this process, of the memory in --file, on the model of --model."""
    from memserve.memory.evaluation import evaluate_offline
    from memserve.memory.registry import get_kind, load_plugins
    from memserve.memory_store.artifact import import_bytes
    from memserve.models import load_model

    load_plugins()
    artifact = import_bytes(args.file.read_bytes())
    if artifact.meta.kind != evaluation.kind:
        raise ValueError(f"{args.file} holds a {artifact.meta.kind} memory, not {evaluation.what}")
    loaded = load_model(model_config(args))
    if loaded.fingerprint != artifact.meta.base_model:
        raise ValueError(
            f"{artifact.meta.name!r} was trained for another base model; pass --model with that model"
        )
    with EvaluationBar(evaluation.command) as bar:
        evaluate_offline(get_kind(evaluation.kind), loaded, artifact, options, args.out, bar)
    return sorted(path.name for path in args.out.iterdir() if path.is_file())
