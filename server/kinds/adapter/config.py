"""The `adapter` kind's options and data checks, defined once: the RPC, CLI and trainer read them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from memserve.errors import InvalidArgument
from memserve.memory.options import check_options, option, options_from_spec, spec_object, spec_text
from memserve.names import check_name

MAX_TEXT_CHARS = 1_000_000
MAX_HIDDEN_SIZE = 8192


MAX_DOCUMENTS = 1000
MAX_TEMPLATES = 100_000


MAX_TEMPLATE_CHARS = 20_000


def default_layer(num_layers: int) -> int:
    """~75 % depth, counting blocks from 0: the study's layer 24 of Llama-2-7B's 32, and block 22
    of the default model's 30."""
    return max(0, min(num_layers - 1, int(0.75 * num_layers)))


@dataclass(frozen=True)
class AdapterConfig:
    """Training options; the defaults are the study's (batch 4, lr 1e-3, 25 epochs, wd 0.05, clip 10)."""

    layer: int | None = option(
        None,
        "The block the adapter sits after; unset: ~75 % depth; negative counts from the end",
        low=-4096,
        high=4095,
        kind=int,
    )
    hidden_size: int = option(128, "Width of the adapter's hidden layer", low=1, high=MAX_HIDDEN_SIZE)
    epochs: int = option(25, "Passes over the training examples", low=1, high=10_000)
    learning_rate: float = option(1e-3, "AdamW's peak learning rate", low=0, high=1)
    weight_decay: float = option(
        0.05, "AdamW's weight decay, to keep the memory's influence small", low=0, high=10
    )
    warmup_ratio: float = option(
        0.1, "Share of the steps with a linear warmup, before the cosine decay", low=0, high=0.99
    )
    max_grad_norm: float = option(10.0, "Gradient clipping norm", low=0, high=1e6)
    batch_size: int = option(4, "Examples per step", low=1, high=256)
    max_length: int = option(
        256, "Tokens per example, at most (documents are cut into chunks)", low=8, high=4096
    )
    seed: int = option(0, "Seed of the initialisation and the batches", low=0, high=2**63 - 1)

    @classmethod
    def from_spec(cls, given: dict[str, Any]) -> AdapterConfig:
        return options_from_spec(cls, given, "adapter")

    def check(self) -> None:
        check_options(self)

    def resolved_layer(self, num_layers: int) -> int:
        layer = default_layer(num_layers) if self.layer is None else self.layer
        layer = layer + num_layers if layer < 0 else layer
        if not 0 <= layer < num_layers:
            raise InvalidArgument(f"config.layer {self.layer} is outside the model's {num_layers} layers")
        return layer


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
        where = f"documents[{i}]"
        spec_object(doc, where, {"id", "title", "text", "docrep"})
        doc_id = check_name(spec_text(doc, "id", where) or f"doc{i}", f"{where}.id")
        if doc_id in seen:
            raise InvalidArgument(f"document id {doc_id!r} appears twice")
        seen.add(doc_id)
        text = doc.get("text", "")
        if not isinstance(text, str) or not text.split():
            raise InvalidArgument(f"document {doc_id!r} has no text")
        if len(text) > MAX_TEXT_CHARS:
            raise InvalidArgument(f"document {doc_id!r} is longer than {MAX_TEXT_CHARS} characters")
        checked_docs.append({"id": doc_id, "title": spec_text(doc, "title", where), "text": text})
    checked_templates = []
    for i, template in enumerate(templates):
        spec_object(template, f"templates[{i}]", {"question", "answer"})
        question, answer = template.get("question", ""), template.get("answer", "")
        if not (
            isinstance(question, str) and isinstance(answer, str) and question.strip() and answer.strip()
        ):
            raise InvalidArgument(f"templates[{i}] needs a question and an answer")
        if len(question) + len(answer) > MAX_TEMPLATE_CHARS:
            raise InvalidArgument(f"templates[{i}] is longer than {MAX_TEMPLATE_CHARS} characters")
        checked_templates.append({"question": question, "answer": answer})
    return checked_docs, checked_templates


def check_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A RegisterAdapter spec, checked (InvalidArgument, with the fix) and normalised."""
    spec = spec_object(spec, "spec", {"name", "documents", "templates", "config"})
    documents, templates = _check_data(spec)
    raw = spec.get("config") or {}
    config = AdapterConfig.from_spec(raw)
    given = {k: getattr(config, k) for k in raw}
    return {"documents": documents, "templates": templates, "config": given}


@dataclass(frozen=True)
class FactualityOptions:
    """Options of the few-shot factuality evaluation (`memserve eval factuality`); the claims
    travel beside them."""

    section: ClassVar[str] = "options"  # EvaluateRequest.options, for error messages

    shots: tuple[int, ...] = option((0, 1, 2, 3), "Numbers of shots k to evaluate", low=0, high=5, item=int)
    seed: int = option(0, "Seed of the shots' choice and order", low=0, high=2**63 - 1)

    def check(self) -> None:
        check_options(self)
        if not self.shots:
            raise InvalidArgument("config.shots needs at least one number of shots")
