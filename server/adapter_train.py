"""The `adapter` kind: training a residual adapter with the causal-LM loss, and its registration.

Data (the FEVER study's three variants, DESIGN.md §1 "adapter"):
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
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memserve.adapter import MAX_HIDDEN_SIZE, Adapter, LoadedAdapter, adapter_tensors
from memserve.document_train import (
    MAX_TEXT_CHARS,
    Windows,
    check_memory_budget,
    logits_after,
    residual_at,
)
from memserve.errors import FailedPrecondition, InvalidArgument
from memserve.hooks import ARCHITECTURES
from memserve.kinds import LoadTarget, MemoryKind, TrainContext, Trained, register_kind
from memserve.memory_store.artifact import Artifact
from memserve.names import check_name
from memserve.options import options_from_spec

MAX_DOCUMENTS = 1000
MAX_TEMPLATES = 100_000
MAX_TEMPLATE_CHARS = 20_000
MAX_EXAMPLES = 50_000


def default_layer(num_layers: int) -> int:
    """~75 % depth, counting blocks from 0: the study's layer 24 of Llama-2-7B's 32, and block 22
    of the default model's 30."""
    return max(0, min(num_layers - 1, int(0.75 * num_layers)))


@dataclass(frozen=True)
class AdapterConfig:
    """Training options; the defaults are the study's (batch 4, lr 1e-3, 25 epochs, wd 0.05, clip 10)."""

    layer: int | None = None  # None: ~75 % depth; negative: from the end
    hidden_size: int = 128
    epochs: int = 25
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_ratio: float = 0.1
    max_grad_norm: float = 10.0
    batch_size: int = 4
    max_length: int = 256
    seed: int = 0

    @classmethod
    def from_spec(cls, given: dict[str, Any]) -> AdapterConfig:
        def convert(name: str, value: Any) -> Any:  # `layer` defaults to None (~75 % depth)
            return (int if name == "layer" else type(getattr(cls, name)))(value)

        return options_from_spec(cls, given, "adapter", convert)

    def check(self) -> None:
        bounds = {
            "hidden_size": (1, MAX_HIDDEN_SIZE), "epochs": (1, 10_000), "batch_size": (1, 256),
            "max_length": (8, 4096), "seed": (0, 2**63 - 1),
        }  # fmt: skip
        for name, (low, high) in bounds.items():
            if not low <= getattr(self, name) <= high:
                raise InvalidArgument(f"config.{name} must be in [{low}, {high}], got {getattr(self, name)}")
        for name, high in (("learning_rate", 1.0), ("weight_decay", 10.0), ("max_grad_norm", 1e6)):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value <= high):
                raise InvalidArgument(f"config.{name} must be in [0, {high}], got {value}")
        if not (math.isfinite(self.warmup_ratio) and 0 <= self.warmup_ratio < 1):
            raise InvalidArgument(f"config.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.layer is not None and not -4096 <= self.layer < 4096:
            raise InvalidArgument(f"config.layer {self.layer} is out of range")

    def resolved_layer(self, num_layers: int) -> int:
        layer = default_layer(num_layers) if self.layer is None else self.layer
        layer = layer + num_layers if layer < 0 else layer
        if not 0 <= layer < num_layers:
            raise InvalidArgument(f"config.layer {self.layer} is outside the model's {num_layers} layers")
        return layer


def template_text(question: str, answer: str) -> str:
    """The training text of a question/answer pair: joined by a space unless either side has one."""
    if not answer or question.endswith((" ", "\n")) or answer.startswith((" ", "\n")):
        return question + answer
    return f"{question} {answer}"


def examples(
    tokenizer: PreTrainedTokenizerBase, documents: list[dict[str, str]], templates: list[dict[str, str]],
    max_length: int,
) -> Windows:  # fmt: skip
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
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return Windows(input_ids, mask, input_ids.masked_fill(mask == 0, -100), torch.tensor(owners))


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


def _check_data(spec: dict[str, Any]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    documents = spec.get("documents") or []
    templates = spec.get("templates") or []
    if not isinstance(documents, list) or not isinstance(templates, list):
        raise InvalidArgument("documents and templates must be lists")
    if not documents and not templates:
        raise InvalidArgument("an adapter needs documents, templates, or both to train on")
    if len(documents) > MAX_DOCUMENTS:
        raise InvalidArgument(f"at most {MAX_DOCUMENTS} documents per adapter, got {len(documents)}")
    if len(templates) > MAX_TEMPLATES:
        raise InvalidArgument(f"at most {MAX_TEMPLATES} templates per adapter, got {len(templates)}")
    checked_docs, seen = [], set()
    for i, doc in enumerate(documents):
        if not isinstance(doc, dict):
            raise InvalidArgument(f"documents[{i}] must be an object with id, title and text")
        doc_id = check_name(str(doc.get("id") or f"doc{i}"), f"documents[{i}].id")
        if doc_id in seen:
            raise InvalidArgument(f"document id {doc_id!r} appears twice")
        seen.add(doc_id)
        text = doc.get("text", "")
        if not isinstance(text, str) or not text.split():
            raise InvalidArgument(f"document {doc_id!r} has no text")
        if len(text) > MAX_TEXT_CHARS:
            raise InvalidArgument(f"document {doc_id!r} is longer than {MAX_TEXT_CHARS} characters")
        checked_docs.append({"id": doc_id, "title": str(doc.get("title", "")), "text": text})
    checked_templates = []
    for i, template in enumerate(templates):
        if not isinstance(template, dict):
            raise InvalidArgument(f"templates[{i}] must be an object with question and answer")
        question, answer = template.get("question", ""), template.get("answer", "")
        if not (
            isinstance(question, str) and isinstance(answer, str) and question.strip() and answer.strip()
        ):
            raise InvalidArgument(f"templates[{i}] needs a question and an answer")
        if len(question) + len(answer) > MAX_TEMPLATE_CHARS:
            raise InvalidArgument(f"templates[{i}] is longer than {MAX_TEMPLATE_CHARS} characters")
        checked_templates.append({"question": question, "answer": answer})
    return checked_docs, checked_templates


class AdapterKind(MemoryKind):
    name = "adapter"

    def validate_spec(self, spec: dict[str, Any]) -> dict[str, Any]:
        documents, templates = _check_data(spec)
        raw = spec.get("config") or {}
        config = AdapterConfig.from_spec(raw)
        given = {k: getattr(config, k) for k in raw}
        return {"documents": documents, "templates": templates, "config": given}

    def train(self, spec: dict[str, Any], context: TrainContext) -> Trained:
        spec = self.validate_spec(spec)
        config = AdapterConfig.from_spec(spec["config"])
        loaded = context.model
        model, tokenizer = loaded.model, loaded.tokenizer
        arch = ARCHITECTURES.get(model.config.model_type)
        if arch is None or not arch.embeds_are_residual:
            raise FailedPrecondition(
                f"adapters train on Llama-family and GPT-NeoX models; this is {model.config.model_type}"
            )
        if any(t != "full_attention" for t in getattr(model.config, "layer_types", None) or ()):
            raise FailedPrecondition("adapters do not train on models with sliding-window layers yet")
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

    def load(self, artifact: Artifact, target: LoadTarget) -> LoadedAdapter:
        return LoadedAdapter(artifact, target)


register_kind(AdapterKind())
