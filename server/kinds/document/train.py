"""The `document` kind's training: the guidance loss over the frozen model.

Training is fast because the base model is frozen: the residual stream at the bank's
layer does not depend on the bank, so it is computed once for every window, and each
step runs only the layers after the bank, the final norm and the LM head, for the
positive and the negative keys in one batched forward.

    L = CE(y | K) + α·|τ − CE(y | K⁻)|                (loss "abs", the paper)
    L = CE(y | K) + α·min((CE(y | K⁻) − τ)², CE(y | K)) (loss "capped_sq", the public code)
"""

from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memserve.errors import InvalidArgument
from memserve.kinds.document.config import DocumentConfig, check_spec, settings_over
from memserve.kinds.document.module import BankShape, DocumentBank, spread_docreps
from memserve.memory.kind import TrainContext, Trained
from memserve.memory_store.artifact import Artifact
from memserve.padding import pad_token_id
from memserve.training.frozen import (
    Windows,
    check_memory_budget,
    check_trainable,
    logits_after,
    residual_at,
    token_losses,
    tokenize_windows,
)


@dataclass(frozen=True)
class SourceDocument:
    id: str
    title: str
    text: str
    docrep: tuple[float, ...] = ()


def windows(text: str, size: int, stride: int, limit: int) -> list[str]:
    """Word windows of `size` at `stride`, the tail kept (the public code dropped it).

    Over `limit` windows, `limit` starts are spread evenly from the first word to the last
    window's, so that a long document keeps its beginning and its end (cutting the list
    would drop the tail again)."""
    words = text.split()
    if len(words) <= size:
        return [" ".join(words)] if words else []
    last = len(words) - size
    starts = list(range(0, last + 1, stride))
    if starts[-1] < last:  # the tail: one last window that ends at the last word
        starts.append(last)
    if len(starts) > limit:
        starts = [round(i * last / (limit - 1)) for i in range(limit)] if limit > 1 else [0]
    return [" ".join(words[s : s + size]) for s in starts]


def split_windows(text: str, config: DocumentConfig) -> tuple[list[str], list[str]]:
    """(training windows, held-out windows) of one document.

    The held-out part is the document's last `holdout_windows × window_words` words, cut
    before windowing, so that no held-out word is ever in a training window; it is kept
    only if at least as many words remain for training.
    """
    words = text.split()
    held_words = config.holdout_windows * config.window_words
    if not held_words or len(words) < 2 * held_words:
        return windows(text, config.window_words, config.window_stride, config.max_windows), []
    train = " ".join(words[:-held_words])
    held = " ".join(words[-held_words:])
    return (
        windows(train, config.window_words, config.window_stride, config.max_windows),
        windows(held, config.window_words, config.window_words, config.holdout_windows),
    )


# --- running a slice of the frozen model -----------------------------------------------


def _model_activation(model: PreTrainedModel) -> str:
    config = model.config
    return str(getattr(config, "hidden_act", None) or getattr(config, "activation_function", "gelu"))


def previous_documents(artifact: Artifact | None) -> list[SourceDocument]:
    """The documents of the bank's current version, so adding documents keeps the old ones."""
    if artifact is None:
        return []
    offsets = artifact.tensors["text_offsets"].tolist()
    data = artifact.tensors["texts_utf8"].numpy().tobytes()
    return [
        SourceDocument(
            d["id"], d.get("title", ""), data[offsets[i] : offsets[i + 1]].decode(), tuple(d["docrep"])
        )
        for i, d in enumerate(artifact.meta.details["documents"])
    ]


def _merge(old: list[SourceDocument], new: list[dict[str, Any]]) -> list[SourceDocument]:
    """Old documents, then new ones; a new document with an old id replaces its text (and keeps
    its DocRep unless it brings one)."""
    merged = {d.id: d for d in old}
    for doc in new:
        previous = merged.get(doc["id"])
        docrep = tuple(doc["docrep"]) or (previous.docrep if previous else ())
        merged[doc["id"]] = SourceDocument(doc["id"], doc["title"], doc["text"], docrep)
    return list(merged.values())


def _docreps(documents: list[SourceDocument], config: DocumentConfig) -> torch.Tensor:
    """Given DocReps as they are (if their dimension fits); the others drawn far from them."""
    given = [torch.tensor(d.docrep) for d in documents if len(d.docrep) == config.key_dim]
    existing = torch.stack(given) if given else None
    missing = [i for i, d in enumerate(documents) if len(d.docrep) != config.key_dim]
    drawn = iter(spread_docreps(len(missing), config.key_dim, existing, config.seed))
    return torch.stack(
        [next(drawn) if i in missing else torch.tensor(d.docrep) for i, d in enumerate(documents)]
    ).float()


def background_windows(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, count: int, tokens: int, seed: int
) -> Windows:
    """`count` windows of `tokens` tokens of text the base model writes itself (sampled from its
    start token, top-k 50, seeded): text that is in no document and that the model reads well,
    for the locality term. Made by the model, so no evaluation text is ever seen in training."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pad = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    prompt = torch.full((count, 1), int(start), device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=True,
            top_k=50,
            max_new_tokens=tokens,
            pad_token_id=pad,
        )
    rows = []
    for row in out.tolist():
        ends = [i for i, token in enumerate(row[1:], 1) if token == tokenizer.eos_token_id]
        rows.append(row[: ends[0]] if ends else row)  # up to the first end of text
    return Windows.of(rows, [-1] * len(rows), pad)


class GuidanceTrainer:
    """Trains one bank over its documents' windows with the guidance loss."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        layer: int,
        config: DocumentConfig,
        docreps: torch.Tensor,
        documents: list[SourceDocument],
    ) -> None:
        self.model, self.layer, self.config = model, layer, config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        texts, owners, held_texts, held_owners = [], [], [], []
        self.train_windows: list[int] = []
        self.holdout_windows: list[int] = []
        for index, doc in enumerate(documents):
            train, held = split_windows(doc.text, config)
            texts += train
            owners += [index] * len(train)
            held_texts += held
            held_owners += [index] * len(held)
            self.train_windows.append(len(train))
            self.holdout_windows.append(len(held))
        if not texts:
            raise InvalidArgument("the documents give no training windows")
        self.windows = tokenize_windows(tokenizer, texts, owners, config.max_length)
        check_memory_budget(model, len(self.windows), self.windows.input_ids.shape[1], config.batch_size)
        # As long as a training window in words, in tokens: text of about the same length.
        tokens = min(config.window_words, config.max_length)
        self.background = (
            background_windows(model, tokenizer, config.background_windows, tokens, config.seed)
            if config.background_windows
            else None
        )
        self._background_pass: tuple[torch.Tensor, torch.Tensor] | None = None
        # The bank trains in fp32 whatever the model's dtype: AdamW's small steps would round
        # away in bf16. (On an fp32 model this changes nothing.)
        self.docreps = docreps.to(self.device, torch.float32)
        shape = BankShape(
            hidden_size=model.config.hidden_size,
            memory_dim=config.memory_dim,
            key_dim=config.key_dim,
            key_activation=config.key_activation,
            key_module=config.key_module,
            key_depth=config.key_depth,
            token_activation=config.token_activation or _model_activation(model),
        )
        torch.manual_seed(config.seed)
        self.bank = DocumentBank(shape, config.key_init).to(self.device, torch.float32)
        self._random = random.Random(config.seed)
        self._generator = torch.Generator().manual_seed(config.seed)
        distances = torch.cdist(self.docreps, self.docreps).fill_diagonal_(float("inf"))
        self._nearest = distances.argmin(1)  # each document's nearest other DocRep

    def _frozen_pass(self, windows: Windows) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen residual stream at the bank's layer for every window (computed once, as
        it does not depend on the bank), and each window's base-model cross-entropy (the τ of
        its negatives when `tau` is 0)."""
        residuals, base = [], []
        with torch.no_grad():
            for start in range(0, len(windows), self.config.batch_size):
                part = slice(start, start + self.config.batch_size)
                mask = windows.attention_mask[part].to(self.device)
                hidden = residual_at(self.model, self.layer, windows.input_ids[part].to(self.device), mask)
                logits = logits_after(self.model, self.layer, hidden, mask)
                base.append(token_losses(logits, windows.labels[part].to(self.device)))
                residuals.append(hidden)
        return torch.cat(residuals), torch.cat(base).float()

    def locality_loss(self, owners: torch.Tensor) -> torch.Tensor:
        """How far text from no document reads from the base model with these owners' DocReps:
        the mean |CE − CE_base| over as many background windows, drawn at random."""
        if self.background is None or not self.config.locality_weight:
            return torch.zeros((), device=self.device)
        if self._background_pass is None:  # computed once, as the windows' own
            self._background_pass = self._frozen_pass(self.background)
        residuals, base = self._background_pass
        chosen = torch.tensor([self._random.randrange(len(base)) for _ in owners])
        mask = self.background.attention_mask[chosen].to(self.device)
        hidden = residuals[chosen].float()
        hidden = (hidden + self.bank(hidden, self.bank.selection(self.docreps[owners]))).to(self.dtype)
        logits = logits_after(self.model, self.layer, hidden, mask)
        losses = token_losses(logits, self.background.labels[chosen].to(self.device))
        return (losses - base[chosen]).abs().mean()

    def negatives(self, owners: torch.Tensor) -> torch.Tensor:
        positives = self.docreps[owners]
        kind = self.config.negatives
        count = len(self.docreps)
        if kind == "nearest" and count > 1:
            # Half the rows against the owner's nearest other DocRep (the one most easily
            # confused with it), the others against any other document's.
            hard = torch.rand(len(owners), generator=self._generator) < 0.5
            uniform = self._other_than(owners)
            return self.docreps[torch.where(hard.to(self.device), self._nearest[owners], uniform)]
        if kind == "other" and count > 1:
            return self.docreps[self._other_than(owners)]
        if kind == "zero":
            return torch.zeros_like(positives)
        if kind == "perturb":
            return positives + 0.1 * torch.randn_like(positives)
        return torch.randn_like(positives)  # "random", and "other" with a single document

    def _other_than(self, owners: torch.Tensor) -> torch.Tensor:
        """For each owner, another document uniformly: a draw from N - 1, shifted past the owner."""
        draws = torch.tensor(
            [self._random.randrange(len(self.docreps) - 1) for _ in owners], device=self.device
        )
        return draws + (draws >= owners).long()

    def step_loss(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        labels: torch.Tensor,
        owners: torch.Tensor,
        base_ce: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, CE⁺, CE⁻) of one batch: every window with its own DocRep and the first
        `negative_share` of them with a negative one, in one batched forward."""
        config = self.config
        rows = hidden.shape[0]
        negatives = max(1, round(rows * config.negative_share))
        keys = torch.cat([self.docreps[owners], self.negatives(owners[:negatives])])
        stacked = torch.cat([hidden, hidden[:negatives]]).float()
        stacked = (stacked + self.bank(stacked, self.bank.selection(keys))).to(self.dtype)
        logits = logits_after(self.model, self.layer, stacked, torch.cat([mask, mask[:negatives]]))
        per_row = token_losses(logits, torch.cat([labels, labels[:negatives]]))
        positive, negative_rows = per_row[:rows].mean(), per_row[rows:]
        if config.tau:  # the paper: one τ for the batch's mean CE⁻
            reached, target = negative_rows.mean(), torch.tensor(config.tau, device=self.device)
        else:  # each window's negative pushed to read like the base model on it
            reached, target = negative_rows, base_ce[:negatives] + config.tau_margin
        if config.loss == "abs":
            guidance = (target - reached).abs().mean()
        else:
            guidance = torch.minimum((reached - target) ** 2, positive).mean()
        locality = config.locality_weight * self.locality_loss(owners[:negatives])
        return positive + config.alpha * guidance + locality, positive, negative_rows.mean()

    def fit(self, report: Any) -> dict[str, float]:
        """Trains until an epoch's mean CE⁺ reaches `target_ce`, or for `epochs` epochs."""
        config = self.config
        residuals, base_ce = self._frozen_pass(self.windows)
        optimizer = torch.optim.AdamW(self.bank.parameters(), lr=config.learning_rate, weight_decay=0.01)
        total = config.epochs * math.ceil(len(self.windows) / config.batch_size)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config.schedule, total))
        generator = torch.Generator().manual_seed(config.seed)
        progress = _Progress(report, total)
        positive = negative = float("nan")
        epochs = 0
        while epochs < config.epochs:
            epochs += 1
            order = torch.randperm(len(self.windows), generator=generator)
            positive, negative = self._epoch(order, residuals, base_ce, optimizer, schedule, progress)
            if positive <= config.target_ce:
                report(total, total, loss=positive, message=f"CE+ {positive:.3f}: target reached")
                break
        return {
            "final_ce_positive": round(positive, 4),
            "final_ce_negative": round(negative, 4),
            "base_ce": round(float(base_ce.mean()), 4),
            "epochs_run": epochs,
            "steps": progress.step,
        }

    def _epoch(
        self,
        order: torch.Tensor,
        residuals: torch.Tensor,
        base_ce: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        schedule: torch.optim.lr_scheduler.LRScheduler,
        progress: _Progress,
    ) -> tuple[float, float]:
        """One pass over the windows in `order`: the epoch's mean (CE⁺, CE⁻)."""
        sums = torch.zeros(2)
        for start in range(0, len(order), self.config.batch_size):
            chosen = order[start : start + self.config.batch_size]
            width = int(self.windows.attention_mask[chosen].sum(1).max())  # trim the padding
            loss, positive, negative = self.step_loss(
                residuals[chosen, :width],
                self.windows.attention_mask[chosen, :width].to(self.device),
                self.windows.labels[chosen, :width].to(self.device),
                self.windows.documents[chosen].to(self.device),
                base_ce[chosen],
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(self.bank.parameters(), 5.0)
            optimizer.step()
            schedule.step()
            batch = torch.tensor([float(positive.detach()), float(negative.detach())])
            sums += batch * len(chosen)
            progress(*batch.tolist())
        first, second = (sums / len(order)).tolist()
        return first, second


@dataclass
class _Progress:
    """Reports each step's CE⁺ and CE⁻ to the job."""

    report: Any
    total: int
    step: int = 0

    def __call__(self, positive: float, negative: float) -> None:
        self.step += 1
        self.report(self.step, self.total, loss=positive, message=f"CE+ {positive:.3f} CE- {negative:.3f}")


def _schedule(name: str, total: int) -> Any:
    """The learning-rate factor per step: constant, or a 5 % linear warm-up and a cosine decay
    to a tenth of the peak (a few hundred steps at one rate either stall or overshoot)."""
    if name == "constant":
        return lambda step: 1.0
    warmup = max(1, total // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    return factor


def train_bank(spec: dict[str, Any], context: TrainContext) -> Trained:
    """Trains a new version of the bank: its current documents and the given ones."""
    spec = check_spec(spec)
    current = context.current_artifact()
    config = settings_over(current, spec["config"])
    loaded = context.model
    model, tokenizer = loaded.model, loaded.tokenizer
    check_trainable(model, "document memories")
    documents = _merge(previous_documents(current), spec["documents"])
    num_layers = model.config.num_hidden_layers
    layer = config.layer if config.layer >= 0 else num_layers + config.layer
    if not 0 <= layer < num_layers:
        raise InvalidArgument(f"config.layer {config.layer} is outside the model's {num_layers} layers")
    docreps = _docreps(documents, config)
    trainer = GuidanceTrainer(model, tokenizer, layer, config, docreps, documents)
    started = time.monotonic()
    losses = trainer.fit(context.report)
    seconds = time.monotonic() - started
    token_activation = config.token_activation or _model_activation(model)
    hyper = {**asdict(config), "layer": layer, "token_activation": token_activation}
    tensors = {f"bank.{k}": v for k, v in trainer.bank.state_dict().items()}
    tensors["docreps"] = docreps
    texts = [d.text.encode() for d in documents]
    tensors["texts_utf8"] = torch.frombuffer(bytearray(b"".join(texts)), dtype=torch.uint8).clone()
    tensors["text_offsets"] = torch.tensor([0, *itertools.accumulate(len(t) for t in texts)])
    details = {
        "documents": [
            {
                "id": d.id,
                "title": d.title,
                "words": len(d.text.split()),
                "docrep": docreps[i].tolist(),
                "train_windows": trainer.train_windows[i],
                "holdout_windows": trainer.holdout_windows[i],
            }
            for i, d in enumerate(documents)
        ],
    }
    metrics = {**losses, "train_seconds": round(seconds, 2), "windows": len(trainer.windows)}
    return Trained(tensors=tensors, hyperparameters=hyper, metrics=metrics, details=details)
