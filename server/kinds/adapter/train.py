"""The `adapter` kind's training: a residual adapter with the causal-LM loss.

Data (the FEVER study's three variants, docs/design.md, "adapter"):
- **documents** ("Doc"): each document's text, cut into chunks of `max_length` tokens;
- **templates** ("Temp"): question/answer pairs, each trained as the text question + answer;
- both ("DocTemp").

The loss is the mean next-token cross-entropy over every real token (pads never count).
AdamW with weight decay (0.05, "to keep the memory's influence small"), a linear warmup
over `warmup_ratio` of the steps then a cosine decay to 0, gradient clipping at
`max_grad_norm`. The base model is frozen, so the residual stream at the adapter's layer
is computed once for every example and each step runs only the later layers, the norm and
the LM head (as the document trainer does).

A new version of an adapter is trained afresh on what its request gives.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memserve.errors import InvalidArgument
from memserve.kinds.adapter.config import AdapterConfig, check_spec
from memserve.kinds.adapter.module import Adapter, adapter_tensors
from memserve.memory.kind import TrainContext, Trained
from memserve.padding import pad_token_id
from memserve.training.frozen import Windows, check_memory_budget, check_trainable, logits_after, residual_at

MAX_EXAMPLES = 50_000


def template_text(question: str, answer: str) -> str:
    """The training text of a question/answer pair: joined by a space unless either side has one."""
    if not answer or question.endswith((" ", "\n")) or answer.startswith((" ", "\n")):
        return question + answer
    return f"{question} {answer}"


def examples(
    tokenizer: PreTrainedTokenizerBase,
    documents: list[dict[str, str]],
    templates: list[dict[str, str]],
    max_length: int,
) -> Windows:
    """Token chunks of every document and every template, right-padded, pads labelled -100.
    A document longer than `max_length` tokens becomes several chunks (the tail kept); a
    template longer than that loses the start of its question."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows: list[list[int]] = []
    owners: list[int] = []
    for index, doc in enumerate(documents):
        ids = tokenizer(doc["text"], add_special_tokens=False).input_ids
        size = max_length - len(bos)
        for start in range(0, len(ids), size):
            chunk = ids[start : start + size]
            if len(chunk) > 1 or start == 0:
                rows.append(bos + chunk)
                owners.append(index)
    for template in templates:
        ids = tokenizer(template_text(template["question"], template["answer"]), add_special_tokens=False)
        # Too long: the question loses its start, never the answer (what the template teaches).
        rows.append(bos + ids.input_ids[-(max_length - len(bos)) :])
        owners.append(-1)
    if len(rows) > MAX_EXAMPLES:
        raise InvalidArgument(
            f"the data make {len(rows)} examples of up to {max_length} tokens; at most {MAX_EXAMPLES}"
        )
    return Windows.of(rows, owners, pad_token_id(tokenizer))


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1 over `warmup` steps, then a cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class AdapterTrainer:
    """Trains one adapter on the frozen model's cached residual stream at its layer."""

    def __init__(self, model: PreTrainedModel, layer: int, config: AdapterConfig, data: Windows) -> None:
        self.model, self.layer, self.config, self.data = model, layer, config, data
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        check_memory_budget(model, len(data), data.input_ids.shape[1], config.batch_size)
        torch.manual_seed(config.seed)
        # fp32 whatever the model's dtype: AdamW's small steps would round away in bf16.
        self.adapter = Adapter(model.config.hidden_size, config.hidden_size).to(self.device, torch.float32)

    def _residuals(self) -> torch.Tensor:
        chunks = []
        for start in range(0, len(self.data), 16):
            part = slice(start, start + 16)
            ids, mask = self.data.input_ids[part], self.data.attention_mask[part]
            chunks.append(residual_at(self.model, self.layer, ids.to(self.device), mask.to(self.device)))
        return torch.cat(chunks)

    def _loss(self, hidden: torch.Tensor, chosen: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(mean CE over the real tokens of the rows, their count)."""
        width = int(self.data.attention_mask[chosen].sum(1).max())  # trim the padding
        hidden = hidden[:, :width]
        mask = self.data.attention_mask[chosen, :width].to(self.device)
        labels = self.data.labels[chosen, :width].to(self.device)
        adapted = (hidden.float() + self.adapter(hidden.float())).to(self.dtype)
        logits = logits_after(self.model, self.layer, adapted, mask)
        targets = labels[:, 1:]
        loss = nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
        )
        return loss, int((targets != -100).sum())

    def evaluate(self, residuals: torch.Tensor) -> float:
        """Mean CE per token over every example, with the adapter as it is now."""
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(self.data), self.config.batch_size):
                chosen = torch.arange(start, min(start + self.config.batch_size, len(self.data)))
                loss, tokens = self._loss(residuals[chosen], chosen)
                total, count = total + float(loss) * tokens, count + tokens
        return total / max(1, count)

    def fit(self, report: Any) -> dict[str, Any]:
        config = self.config
        residuals = self._residuals()
        base_loss = self.evaluate(residuals)  # the gate starts at 0: the base model's loss
        optimizer = torch.optim.AdamW(
            self.adapter.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        batches = math.ceil(len(self.data) / config.batch_size)
        total = config.epochs * batches
        warmup = round(config.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, warmup, total))
        generator = torch.Generator().manual_seed(config.seed)
        epoch_losses: list[float] = []
        step = 0
        for _epoch in range(config.epochs):
            order = torch.randperm(len(self.data), generator=generator)
            seen, summed = 0, 0.0
            for start in range(0, len(order), config.batch_size):
                chosen = order[start : start + config.batch_size]
                loss, tokens = self._loss(residuals[chosen], chosen)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.max_grad_norm > 0:
                    nn.utils.clip_grad_norm_(self.adapter.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                step += 1
                value = float(loss.detach())
                seen, summed = seen + tokens, summed + value * tokens
                report(step, total, loss=value, message=f"epoch {_epoch + 1}/{config.epochs}")
            epoch_losses.append(round(summed / max(1, seen), 4))
        return {
            "base_loss": round(base_loss, 4),
            "final_loss": round(self.evaluate(residuals), 4),
            "epoch_losses": epoch_losses,
            "gate": round(float(self.adapter.gate.detach()), 6),
            "steps": step,
        }


def train_adapter(spec: dict[str, Any], context: TrainContext) -> Trained:
    """Trains a new version of the adapter, afresh, on what the spec gives."""
    spec = check_spec(spec)
    config = AdapterConfig.from_spec(spec["config"])
    loaded = context.model
    model, tokenizer = loaded.model, loaded.tokenizer
    check_trainable(model, "adapters")
    layer = config.resolved_layer(model.config.num_hidden_layers)
    data = examples(tokenizer, spec["documents"], spec["templates"], config.max_length)
    started = time.monotonic()
    trainer = AdapterTrainer(model, layer, config, data)
    results = trainer.fit(context.report)
    seconds = time.monotonic() - started
    tokens = int((data.labels[:, 1:] != -100).sum())
    metrics = {
        **results,
        "examples": len(data),
        "document_examples": int((data.documents >= 0).sum()),
        "template_examples": int((data.documents < 0).sum()),
        "tokens": tokens,
        "train_seconds": round(seconds, 2),
    }
    documents, templates = spec["documents"], spec["templates"]
    described = [{"id": d["id"], "title": d["title"], "words": len(d["text"].split())} for d in documents]
    data_kinds = [name for name, given in (("documents", documents), ("templates", templates)) if given]
    details = {"documents": described, "templates": len(templates), "data": "+".join(data_kinds)}
    hyperparameters = {**asdict(config), "layer": layer}
    return Trained(adapter_tensors(trainer.adapter), hyperparameters, metrics, details)
