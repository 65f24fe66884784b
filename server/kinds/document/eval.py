"""`memserve eval docs`: how well a document bank memorises, and how it selects.

For every document, the perplexity of its windows with its own DocRep, with the other
documents' DocReps, with random DocReps, with the bank attached but no DocRep (every
entry on), and without the bank (the base model); on the training windows and, when
the bank kept some out (`holdout_windows`), on the held-out ones. Then the selection
statistics of the paper (L0, L2, pairwise and normalised pairwise distances, dead
entries), the correlation of memory size with document length, the perplexity
landscape over a grid of 2-D DocReps, and the selection heatmap.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memserve.errors import InvalidArgument
from memserve.kinds.document.config import DocumentConfig, DocumentEvalOptions
from memserve.kinds.document.module import SELECTED_ABOVE, LoadedDocumentBank
from memserve.kinds.document.train import previous_documents, split_windows
from memserve.memory.evaluation import EvalContext
from memserve.memory.kind import LoadTarget
from memserve.memory.options import options_from_spec
from memserve.memory_store.artifact import Artifact
from memserve.models import LoadedModel
from memserve.training.frozen import logits_after, residual_at, token_losses, tokenize_windows

RANDOM_KEYS = 4
# The paper clipped at 9 (its own-DocRep perplexities were 2.4-3.0); a log scale up to 100
# shows the basin whatever the model's perplexity level.
LANDSCAPE_CLIP = 100.0


@dataclass
class _Windows:
    hidden: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor


class BankEvaluation:
    def __init__(self, loaded_model: LoadedModel, artifact: Artifact, seed: int = 0) -> None:
        self.model = loaded_model.model
        target = LoadTarget.for_model(loaded_model, None)
        self.bank = LoadedDocumentBank(artifact, target)
        self.documents = previous_documents(artifact)
        hyper = artifact.meta.hyperparameters
        known = DocumentConfig.__dataclass_fields__
        self.config = DocumentConfig.from_spec(
            {k: v for k, v in hyper.items() if k in known and k != "layer"}
        )
        self.tokenizer = loaded_model.tokenizer
        self.generator = torch.Generator().manual_seed(seed)
        self.train: list[_Windows] = []
        self.held: list[_Windows] = []
        for doc in self.documents:
            train, held = split_windows(doc.text, self.config)
            self.train.append(self._prepare(train))
            self.held.append(self._prepare(held) if held else None)  # type: ignore[arg-type]

    def _prepare(self, texts: list[str]) -> _Windows:
        windows = tokenize_windows(self.tokenizer, texts, [0] * len(texts), self.config.max_length)
        device = self.bank.device
        ids, mask = windows.input_ids.to(device), windows.attention_mask.to(device)
        hidden = residual_at(self.model, self.bank.layer, ids, mask)
        return _Windows(hidden, mask, windows.labels.to(device))

    @torch.no_grad()
    def perplexity(self, windows: _Windows, selection: torch.Tensor | None, attached: bool = True) -> float:
        """exp(mean CE) over the windows' real tokens; `selection` (m,), None = every entry on."""
        hidden = windows.hidden
        if attached:
            rows = hidden.shape[0]
            chosen = None if selection is None else selection[None].expand(rows, -1)
            hidden = hidden + self.bank.bank(hidden, chosen)
        logits = logits_after(self.model, self.bank.layer, hidden, windows.mask)
        losses = token_losses(logits, windows.labels)
        counts = (windows.labels[:, 1:] != -100).sum(1).float()
        return math.exp(float((losses * counts).sum() / counts.sum()))

    def selection(self, docrep: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.bank.bank.selection(docrep[None].to(self.bank.device, self.bank.dtype))[0]

    def document_metrics(self, index: int, windows: _Windows) -> dict[str, float]:
        own = self.perplexity(windows, self.selection(self.bank.docreps[index]))
        others = [
            self.perplexity(windows, self.selection(self.bank.docreps[j]))
            for j in range(len(self.documents))
            if j != index
        ]
        key_dim = self.bank.key_dim
        randoms = [
            self.perplexity(windows, self.selection(torch.rand(key_dim, generator=self.generator) * 2 - 1))
            for _ in range(RANDOM_KEYS)
        ]
        return {
            "ppl_own": own,
            "ppl_other": statistics.mean(others) if others else float("nan"),
            "ppl_other_min": min(others) if others else float("nan"),
            "ppl_random": statistics.mean(randoms),
            "ppl_none": self.perplexity(windows, None),
            "ppl_base": self.perplexity(windows, None, attached=False),
        }

    def selection_metrics(self) -> tuple[dict[str, float], torch.Tensor]:
        selections = torch.stack([self.selection(k) for k in self.bank.docreps]).float().cpu()
        magnitude = selections.abs()
        l2 = selections.norm(dim=1)
        pairs = torch.pdist(selections) if len(selections) > 1 else torch.zeros(1)
        return {
            "l0": float((magnitude > SELECTED_ABOVE).sum(1).float().mean()),
            "l2": float(l2.mean()),
            "pairwise": float(pairs.mean()),
            "normalized_pairwise": float(pairs.mean() / l2.mean()) if float(l2.mean()) else 0.0,
            "dead_entries": int((magnitude <= SELECTED_ABOVE).all(0).sum()),
            "memory_dim": int(selections.shape[1]),
            "selected_above": SELECTED_ABOVE,
        }, selections

    def landscape(self, index: int, grid: int, extent: float) -> torch.Tensor:
        """Perplexity of the document's first training window over a grid of 2-D DocReps."""
        first = self.train[index]
        window = _Windows(first.hidden[:1], first.mask[:1], first.labels[:1])
        axis = torch.linspace(-extent, extent, grid)
        values = torch.zeros(grid, grid)
        for row, y in enumerate(axis):
            for col, x in enumerate(axis):
                values[row, col] = self.perplexity(window, self.selection(torch.tensor([float(x), float(y)])))
        return values.clamp(max=LANDSCAPE_CLIP)


def run(options: dict[str, Any], context: EvalContext) -> None:
    """The kind's evaluation: `evaluate_bank` with the request's options."""
    given = options_from_spec(DocumentEvalOptions, options, "document evaluation")
    if context.artifact is None:
        raise InvalidArgument("a document evaluation needs a bank")
    evaluate_bank(context.model, context.artifact, context.out, grid=given.grid, progress=context.progress)


def evaluate_bank(
    loaded_model: LoadedModel, artifact: Artifact, out: Path, grid: int = 7, progress: Any = None
) -> dict[str, Any]:
    """Writes metrics.json, report.md and the plots into `out`; returns the metrics."""
    out.mkdir(parents=True, exist_ok=True)
    evaluation = BankEvaluation(loaded_model, artifact)
    documents: dict[str, Any] = {}
    held_out: dict[str, Any] = {}
    steps = len(evaluation.documents)
    for i, doc in enumerate(evaluation.documents):
        documents[doc.id] = evaluation.document_metrics(i, evaluation.train[i])
        if evaluation.held[i] is not None:
            held_out[doc.id] = evaluation.document_metrics(i, evaluation.held[i])
        if progress:
            progress(i + 1, steps, doc.id)
    selection, selections = evaluation.selection_metrics()
    lengths = [len(d.text.split()) for d in evaluation.documents]
    sizes = selections.abs().sum(1).tolist()
    metrics: dict[str, Any] = {
        "bank": artifact.meta.name,
        "version": artifact.meta.version,
        "documents": documents,
        "held_out": held_out,
        "selection": selection,
        "size_length_correlation": _pearson(sizes, lengths),
        "hyperparameters": artifact.meta.hyperparameters,
        "training": artifact.meta.metrics,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=True))
    plots = _plots(evaluation, selections, out, grid)
    (out / "report.md").write_text(_report(metrics, plots))
    return metrics


def _pearson(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 2 or statistics.pstdev(xs) == 0 or statistics.pstdev(ys) == 0:
        return float("nan")
    return float(statistics.correlation(xs, ys))


def _plots(evaluation: BankEvaluation, selections: torch.Tensor, out: Path, grid: int) -> list[str]:
    """The selection heatmap and, with 2-D DocReps, the perplexity landscapes: their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = [d.id for d in evaluation.documents]
    made = [_selection_heatmap(plt, ids, selections, out)]
    if evaluation.bank.key_dim == 2:
        made.append(_landscapes(plt, evaluation, ids, out, grid))
    return made


def _selection_heatmap(plt: Any, ids: list[str], selections: torch.Tensor, out: Path) -> str:
    figure, axes = plt.subplots(figsize=(max(6, selections.shape[1] / 4), max(2, len(ids) / 2.5)))
    image = axes.imshow(selections.numpy(), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1)
    axes.set_yticks(range(len(ids)), ids)
    axes.set_xlabel("memory entry")
    axes.set_title("selection σ_doc(Key_Doc(K)) per document")
    figure.colorbar(image)
    figure.tight_layout()
    figure.savefig(out / "selection_heatmap.png", dpi=110)
    plt.close(figure)
    return "selection_heatmap.png"


def _landscapes(plt: Any, evaluation: BankEvaluation, ids: list[str], out: Path, grid: int) -> str:
    """Each document's first-window perplexity over the plane of 2-D DocReps, its own and the
    others' marked."""
    from matplotlib.colors import LogNorm

    docreps = evaluation.bank.docreps
    extent = max(1.5, float(docreps.abs().max()) * 1.2)
    columns = min(5, len(ids))
    rows = math.ceil(len(ids) / columns)
    figure, axes_grid = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows), squeeze=False)
    for i, doc_id in enumerate(ids):
        axes = axes_grid[i // columns][i % columns]
        values = evaluation.landscape(i, grid, extent).numpy()
        square = (-extent, extent, -extent, extent)
        norm = LogNorm(vmin=1, vmax=LANDSCAPE_CLIP)
        axes.imshow(values, origin="lower", extent=square, cmap="viridis", norm=norm)
        own = docreps[i].float().cpu()
        axes.plot(float(own[0]), float(own[1]), "r*", markersize=12)
        others = torch.cat([docreps[:i], docreps[i + 1 :]]).float().cpu()
        if len(others):
            axes.plot(others[:, 0].numpy(), others[:, 1].numpy(), "w.", markersize=6)
        axes.set_title(doc_id, fontsize=8)
    for j in range(len(ids), rows * columns):
        axes_grid[j // columns][j % columns].axis("off")
    figure.suptitle(
        f"perplexity of the first window over 2-D DocReps (log scale, clipped at "
        f"{LANDSCAPE_CLIP:g}; ★ own DocRep, · the others')"
    )
    figure.tight_layout()
    figure.savefig(out / "ppl_landscape.png", dpi=110)
    plt.close(figure)
    return "ppl_landscape.png"


def _report(metrics: dict[str, Any], plots: list[str]) -> str:
    lines = [
        f"# Document bank `{metrics['bank']}` version {metrics['version']}",
        "",
        "Perplexity of each document's training windows (lower is better). `own`: its DocRep; "
        "`other`: the mean over the other documents' DocReps; `random`: the mean over random DocReps "
        "in [-1, 1]^k; `none`: the bank attached with every entry on; `base`: the model alone.",
        "",
        "| document | own | other | random | none | base | own/other | own/base |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for doc_id, m in metrics["documents"].items():
        lines.append(
            f"| {doc_id} | {m['ppl_own']:.2f} | {m['ppl_other']:.2f} | {m['ppl_random']:.2f} | "
            f"{m['ppl_none']:.2f} | {m['ppl_base']:.2f} | {m['ppl_own'] / m['ppl_other']:.3f} | "
            f"{m['ppl_own'] / m['ppl_base']:.3f} |"
        )
    if metrics["held_out"]:
        lines += ["", "Held-out windows (never trained on):", ""]
        lines += ["| document | own | other | base |", "|---|---:|---:|---:|"]
        for doc_id, m in metrics["held_out"].items():
            lines.append(f"| {doc_id} | {m['ppl_own']:.2f} | {m['ppl_other']:.2f} | {m['ppl_base']:.2f} |")
    s = metrics["selection"]
    lines += [
        "",
        f"Selection (entries with |s| > {s['selected_above']} count as selected, of {s['memory_dim']}): "
        f"L0 {s['l0']:.1f}, L2 {s['l2']:.3f}, pairwise {s['pairwise']:.3f}, "
        f"normalised pairwise {s['normalized_pairwise']:.3f}, dead entries {s['dead_entries']}.",
        "Memory size (Σ|s|) vs document length (words): "
        f"Pearson R = {metrics['size_length_correlation']:.3f}.",
        "",
        f"Training: {json.dumps(metrics['training'])}",
        "",
    ]
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"
