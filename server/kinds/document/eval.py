"""`memserve eval docs`: how well a document bank memorises, and how it selects.

For every document, on its training windows and, when the bank kept some out
(`holdout_windows`), on the held-out ones: the perplexity with its own DocRep, with the
*nearest* other DocRep (the other document's key that explains this text best: the
honest baseline), the mean over the other DocReps, random DocReps, the bank attached
with every entry on, and the base model; `ce_own`; the identification accuracy (the share
of windows whose own DocRep beats every other document's); and recall (prompted with a
window's first tokens, how much of the document's next tokens the model says greedily,
through the serving engine) with the own and the nearest other DocRep. For the bank, the
perplexity of text that no document contains, with each DocRep over the base model's
(`unrelated_ppl_ratio`: a memory must not damage other text). Then the selection
statistics of the paper (L0, L2, pairwise and normalised pairwise distances, dead
entries), the correlation of memory size with document length, the perplexity landscape
over a grid of 2-D DocReps, and the selection heatmap.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memserve.engine.offline import generate_each
from memserve.errors import InvalidArgument
from memserve.kinds.document.config import DocumentConfig, DocumentEvalOptions
from memserve.kinds.document.module import SELECTED_ABOVE, BoundDocument, LoadedDocumentBank
from memserve.kinds.document.train import previous_documents, split_windows
from memserve.kinds.document.unrelated import UNRELATED_TEXT
from memserve.memory.evaluation import EvalContext
from memserve.memory.kind import MemoryKey, MemoryRefSpec
from memserve.memory.options import options_from_spec
from memserve.memory_store.artifact import Artifact
from memserve.training.frozen import logits_after, residual_at, token_losses, tokenize_windows

RANDOM_KEYS = 4
# Recall: prompted with a window's first RECALL_PROMPT tokens, the share of the next
# RECALL_TOKENS that greedy decoding gets right, position by position.
RECALL_PROMPT = 32
RECALL_TOKENS = 16
# The same from a window's first 8 tokens: a short prompt, as a user types one, gives the bank
# little context to recognise its text by (a bank taught to leave other text alone may stay quiet).
RECALL_SHORT_PROMPT = 8
MIN_RECALL_PROMPT = 4
# The paper clipped at 9 (its own-DocRep perplexities were 2.4-3.0); a log scale up to 100
# shows the basin whatever the model's perplexity level.
LANDSCAPE_CLIP = 100.0


@dataclass
class _Windows:
    ids: torch.Tensor
    hidden: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor

    @property
    def tokens(self) -> torch.Tensor:
        """Each window's count of predicted tokens."""
        return (self.labels[:, 1:] != -100).sum(1).float()


class BankEvaluation:
    def __init__(self, context: EvalContext, artifact: Artifact, seed: int = 0) -> None:
        self.context = context
        self.model = context.model.model
        self.bank = LoadedDocumentBank(artifact, context.target)
        self.documents = previous_documents(artifact)
        hyper = artifact.meta.hyperparameters
        known = DocumentConfig.__dataclass_fields__
        self.config = DocumentConfig.from_spec(
            {k: v for k, v in hyper.items() if k in known and k not in ("layer", "preset")}
        )
        self.tokenizer = context.model.tokenizer
        self.generator = torch.Generator().manual_seed(seed)
        self.train: list[_Windows] = []
        self.held: list[_Windows | None] = []
        for doc in self.documents:
            train, held = split_windows(doc.text, self.config)
            self.train.append(self._prepare(train))
            self.held.append(self._prepare(held) if held else None)
        self.selections = torch.stack([self.selection(k) for k in self.bank.docreps])

    def _prepare(self, texts: list[str]) -> _Windows:
        windows = tokenize_windows(self.tokenizer, texts, [0] * len(texts), self.config.max_length)
        device = self.bank.device
        ids, mask = windows.input_ids.to(device), windows.attention_mask.to(device)
        hidden = residual_at(self.model, self.bank.layer, ids, mask)
        return _Windows(ids, hidden, mask, windows.labels.to(device))

    @torch.no_grad()
    def window_losses(
        self, windows: _Windows, selection: torch.Tensor | None, attached: bool = True
    ) -> torch.Tensor:
        """Each window's summed CE (W,); `selection` (m,), None = every entry on."""
        hidden = windows.hidden
        if attached:
            chosen = None if selection is None else selection[None].expand(hidden.shape[0], -1)
            hidden = hidden + self.bank.bank(hidden, chosen)
        logits = logits_after(self.model, self.bank.layer, hidden, windows.mask)
        return token_losses(logits, windows.labels).float() * windows.tokens

    def perplexity(self, windows: _Windows, selection: torch.Tensor | None, attached: bool = True) -> float:
        """exp(mean CE) over the windows' real tokens."""
        return math.exp(float(self.window_losses(windows, selection, attached).sum() / windows.tokens.sum()))

    def selection(self, docrep: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.bank.bank.selection(docrep[None].to(self.bank.device, self.bank.dtype))[0]

    def compared_keys(self, index: int, limit: int) -> tuple[list[int], list[int]]:
        """(the other documents whose DocReps `index` is compared with, the random part of them).

        All the others up to `limit` (0 = no limit). Over it, the two thirds whose selections
        are nearest the document's own (the bank's update is linear in the selection, so these
        are the DocReps likeliest to explain its text as well) and one third drawn at random, an
        unbiased sample for the mean over the others."""
        others = [j for j in range(len(self.documents)) if j != index]
        if not limit or len(others) <= limit:
            return others, others
        distance = (self.selections.float() - self.selections[index].float()).norm(dim=1)
        distance[index] = math.inf
        nearest = distance.argsort()[: limit - limit // 3].tolist()
        rest = [j for j in others if j not in set(nearest)]
        drawn = torch.randperm(len(rest), generator=self.generator)[: limit // 3].tolist()
        sampled = [rest[i] for i in drawn]
        return nearest + sampled, sampled

    def document_metrics(
        self, index: int, windows: _Windows, others: list[int], sampled: list[int]
    ) -> tuple[dict[str, float], int]:
        """The document's perplexities and identification accuracy on `windows` against the
        DocReps of `others`, and the index of its nearest other document (the one whose DocRep
        gives the lowest perplexity); `ppl_other` is the mean over `sampled`."""
        keys = [index, *others]
        per_key = torch.stack([self.window_losses(windows, self.selections[j]) for j in keys], 1)  # (W, K)
        tokens = windows.tokens
        ppl = dict(zip(keys, torch.exp(per_key.sum(0) / tokens.sum()).tolist(), strict=True))
        nearest = min(others, key=lambda j: ppl[j]) if others else index
        identified = (per_key / tokens[:, None]).argmin(1) == 0
        key_dim = self.bank.key_dim
        randoms = [
            self.perplexity(windows, self.selection(torch.rand(key_dim, generator=self.generator) * 2 - 1))
            for _ in range(RANDOM_KEYS)
        ]
        own = ppl[index]
        return {
            "ppl_own": own,
            "ce_own": math.log(own),
            "ppl_nearest_other": ppl[nearest] if others else float("nan"),
            "ppl_other": statistics.mean(ppl[j] for j in sampled) if sampled else float("nan"),
            "identification_accuracy": float(identified.float().mean()),
            "compared_with": len(others),
            "ppl_random": statistics.mean(randoms),
            "ppl_none": self.perplexity(windows, None),
            "ppl_base": self.perplexity(windows, None, attached=False),
            "windows": len(tokens),
        }, nearest

    def recall(self, requests: list[tuple[int, int, int]]) -> list[float]:
        """For (document, key document, prompt tokens) triples: the share of the document's next
        tokens that greedy decoding says with the key document's DocRep after a window's first
        tokens, over its training windows long enough to test, through the serving engine."""
        jobs: list[tuple[list[int], tuple[BoundDocument, ...]]] = []
        owners: list[tuple[int, list[int]]] = []
        for pair, (index, key, prompt_tokens) in enumerate(requests):
            bound = self.bank.bind(
                MemoryRefSpec(self.bank.name, "document", key=MemoryKey(document_id=self.documents[key].id))
            )
            windows = self.train[index]
            for row, length in enumerate(windows.mask.sum(1).tolist()):
                # A window shorter than prompt + continuation is prompted with all but its end.
                prompt = min(prompt_tokens, length - RECALL_TOKENS)
                if prompt >= MIN_RECALL_PROMPT:
                    ids = windows.ids[row].tolist()
                    jobs.append((ids[:prompt], (bound,)))
                    owners.append((pair, ids[prompt : prompt + RECALL_TOKENS]))
        outputs = generate_each(self.context.engine, jobs, RECALL_TOKENS)
        hits: list[list[float]] = [[] for _ in requests]
        for (pair, expected), said in zip(owners, outputs, strict=True):
            hits[pair].append(sum(a == b for a, b in zip(said, expected, strict=False)) / RECALL_TOKENS)
        return [statistics.mean(h) if h else float("nan") for h in hits]

    def unrelated_ratios(self) -> list[float]:
        """Perplexity of text no document contains, with each DocRep, over the base model's."""
        windows = self._prepare([UNRELATED_TEXT])
        base = self.perplexity(windows, None, attached=False)
        return [self.perplexity(windows, s) / base for s in self.selections]

    def selection_metrics(self) -> dict[str, float]:
        selections = self.selections.float().cpu()
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
        }

    def landscape(self, index: int, grid: int, extent: float) -> torch.Tensor:
        """Perplexity of the document's first training window over a grid of 2-D DocReps."""
        first = self.train[index]
        window = _Windows(first.ids[:1], first.hidden[:1], first.mask[:1], first.labels[:1])
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
    evaluate_bank(context, context.artifact, grid=given.grid, compare_with=given.compare_with)


def evaluate_bank(
    context: EvalContext, artifact: Artifact, grid: int = 7, compare_with: int = 24
) -> dict[str, Any]:
    """Writes metrics.json, report.md and the plots into `context.out`; returns the metrics.

    Each document is compared with every other DocRep, or with `compare_with` of them in a
    large bank (`BankEvaluation.compared_keys`): the cost is one pass of the model's last
    layers per window and compared DocRep."""
    out = context.out
    out.mkdir(parents=True, exist_ok=True)
    evaluation = BankEvaluation(context, artifact)
    documents: dict[str, Any] = {}
    held_out: dict[str, Any] = {}
    nearest: list[int] = []
    steps = len(evaluation.documents) + 1
    for i, doc in enumerate(evaluation.documents):
        others, sampled = evaluation.compared_keys(i, compare_with)
        documents[doc.id], closest = evaluation.document_metrics(i, evaluation.train[i], others, sampled)
        nearest.append(closest)
        held = evaluation.held[i]
        if held is not None:
            held_out[doc.id] = evaluation.document_metrics(i, held, others, sampled)[0]
        context.progress(i + 1, steps, doc.id)
    count = len(evaluation.documents)
    recalls = evaluation.recall(
        [(i, i, RECALL_PROMPT) for i in range(count)]
        + [(i, nearest[i], RECALL_PROMPT) for i in range(count)]
        + [(i, i, RECALL_SHORT_PROMPT) for i in range(count)]
    )
    for i, doc in enumerate(evaluation.documents):
        documents[doc.id]["recall_own"] = recalls[i]
        documents[doc.id]["recall_nearest_other"] = recalls[count + i] if count > 1 else float("nan")
        documents[doc.id]["recall_short_own"] = recalls[2 * count + i]
        documents[doc.id]["nearest_other"] = evaluation.documents[nearest[i]].id if count > 1 else ""
    context.progress(steps, steps, "recall")
    unrelated = evaluation.unrelated_ratios()
    lengths = [len(d.text.split()) for d in evaluation.documents]
    sizes = evaluation.selections.float().abs().sum(1).tolist()
    metrics: dict[str, Any] = {
        "bank": artifact.meta.name,
        "version": artifact.meta.version,
        "summary": _summary(documents),
        "unrelated_ppl_ratio": statistics.mean(unrelated),
        "unrelated_ppl_ratio_max": max(unrelated),
        "documents": documents,
        "held_out": held_out,
        "selection": evaluation.selection_metrics(),
        "size_length_correlation": _pearson(sizes, lengths),
        "hyperparameters": artifact.meta.hyperparameters,
        "training": artifact.meta.metrics,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=True))
    plots = _plots(evaluation, out, grid)
    (out / "report.md").write_text(_report(metrics, plots))
    return metrics


def _summary(documents: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The weakest and the mean figures over the documents: what a bank is judged by."""
    rows = list(documents.values())

    def values(key: str) -> list[float]:
        return [float(m[key]) for m in rows if not math.isnan(float(m[key]))]

    ratios = [m["ppl_nearest_other"] / m["ppl_own"] for m in rows if not math.isnan(m["ppl_nearest_other"])]
    return {
        "documents": len(rows),
        "compared_with_min": min(int(m["compared_with"]) for m in rows),
        "ce_own_mean": statistics.mean(values("ce_own")),
        "ce_own_max": max(values("ce_own")),
        "nearest_other_over_own_min": min(ratios) if ratios else float("nan"),
        "identification_accuracy_mean": statistics.mean(values("identification_accuracy")),
        "identification_accuracy_min": min(values("identification_accuracy")),
        "recall_own_mean": _mean(values("recall_own")),
        "recall_short_own_mean": _mean(values("recall_short_own")),
        "recall_nearest_other_mean": _mean(values("recall_nearest_other")),
    }


def _mean(values: list[float]) -> float:
    """NaN where nothing was measured (e.g. no window long enough for a recall prompt)."""
    return statistics.mean(values) if values else float("nan")


def _pearson(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 2 or statistics.pstdev(xs) == 0 or statistics.pstdev(ys) == 0:
        return float("nan")
    return float(statistics.correlation(xs, ys))


def _plots(evaluation: BankEvaluation, out: Path, grid: int) -> list[str]:
    """The selection heatmap and, with 2-D DocReps, the perplexity landscapes: their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = [d.id for d in evaluation.documents]
    made = [_selection_heatmap(plt, ids, evaluation.selections.float().cpu(), out)]
    if evaluation.bank.key_dim == 2:
        made.append(_landscapes(plt, evaluation, ids, out, grid))
    return made


def _selection_heatmap(plt: Any, ids: list[str], selections: torch.Tensor, out: Path) -> str:
    width = min(20, max(6, selections.shape[1] / 4))
    figure, axes = plt.subplots(figsize=(width, min(30, max(2, len(ids) / 2.5))))
    image = axes.imshow(selections.numpy(), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1)
    axes.set_yticks(range(len(ids)), ids)
    axes.set_xlabel("memory entry")
    axes.set_title("selection σ_doc(Key_Doc(K)) per document")
    figure.colorbar(image)
    figure.tight_layout()
    # A large bank's heatmap is noise at full resolution: half the dots keep it a few hundred KB.
    figure.savefig(out / "selection_heatmap.png", dpi=110 if len(ids) <= 40 else 55)
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
    summary = metrics["summary"]
    lines = [
        f"# Document bank `{metrics['bank']}` version {metrics['version']}",
        "",
        f"Over {summary['documents']} documents, each compared with {_compared(summary)}, the "
        "weakest figures first: nearest-other/own "
        f"perplexity at least {summary['nearest_other_over_own_min']:.2f}; identification accuracy "
        f"at least {summary['identification_accuracy_min']:.2f} (mean "
        f"{summary['identification_accuracy_mean']:.2f}); CE own at most {summary['ce_own_max']:.3f} "
        f"(mean {summary['ce_own_mean']:.3f}); recall {summary['recall_own_mean']:.2f} with the own "
        f"DocRep ({summary['recall_short_own_mean']:.2f} from {RECALL_SHORT_PROMPT} tokens), "
        f"{summary['recall_nearest_other_mean']:.2f} with the nearest other. Text that no "
        f"document contains: perplexity × {metrics['unrelated_ppl_ratio']:.2f} of the base model's "
        f"(worst DocRep × {metrics['unrelated_ppl_ratio_max']:.2f}).",
        "",
        "Perplexity of each document's training windows (lower is better). `own`: its DocRep; "
        "`nearest`: the other document's DocRep that gives the lowest perplexity; `other`: the mean "
        "over the other documents' DocReps; `random`: the mean over random DocReps in [-1, 1]^k; "
        "`base`: the model alone. `ident`: the share of windows whose own DocRep beats every other. "
        f"Recall: prompted with a window's first {RECALL_PROMPT} tokens, the share of the next "
        f"{RECALL_TOKENS} said greedily; `short`: the same from its first {RECALL_SHORT_PROMPT} tokens.",
        "",
        "| document | own | nearest | other | random | base | nearest/own | ident | recall own | "
        "recall nearest | recall short |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for doc_id, m in metrics["documents"].items():
        lines.append(
            f"| {doc_id} | {m['ppl_own']:.2f} | {m['ppl_nearest_other']:.2f} | {m['ppl_other']:.2f} | "
            f"{m['ppl_random']:.2f} | {m['ppl_base']:.2f} | {m['ppl_nearest_other'] / m['ppl_own']:.2f} | "
            f"{m['identification_accuracy']:.2f} | {m['recall_own']:.2f} | {m['recall_nearest_other']:.2f} | "
            f"{m['recall_short_own']:.2f} |"
        )
    lines += _held_out_table(metrics["held_out"])
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


def _compared(summary: dict[str, Any]) -> str:
    count = int(summary["compared_with_min"])
    if count == summary["documents"] - 1:
        return "every other document's DocRep"
    return (
        f"{count} other DocReps (the nearest by selection, two thirds, and a random third, whose "
        "mean is `other`)"
    )


def _held_out_table(held_out: dict[str, dict[str, Any]]) -> list[str]:
    if not held_out:
        return []
    lines = ["", "Held-out windows (never trained on), as they are:", ""]
    lines += ["| document | own | nearest | base | ident |", "|---|---:|---:|---:|---:|"]
    for doc_id, m in held_out.items():
        lines.append(
            f"| {doc_id} | {m['ppl_own']:.2f} | {m['ppl_nearest_other']:.2f} | {m['ppl_base']:.2f} | "
            f"{m['identification_accuracy']:.2f} |"
        )
    return lines
