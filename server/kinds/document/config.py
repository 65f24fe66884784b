"""The `document` kind's options, defined once: the RPC, the CLI and the trainer all read them here."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from memserve.errors import FailedPrecondition, InvalidArgument
from memserve.memory.options import check_options, option, options_from_spec, spec_object, spec_text
from memserve.names import check_name

if TYPE_CHECKING:
    from memserve.memory_store.artifact import Artifact

KEY_ACTIVATION_NAMES = ("tanh", "relu", "sigmoid")
KEY_MODULES = ("linear", "mlp")
NEGATIVES = ("other", "nearest", "random", "zero", "perturb")
LOSSES = ("abs", "capped_sq")
SCHEDULES = ("cosine", "constant")
PRESETS = ("", "paper")
# The paper's configuration (Park & Choi, IJCAI 2024, its released configs), as a preset that
# reproduces it: a small bank, a fixed τ, 500 epochs at 1e-3 over overlapping windows.
PAPER_PRESET: dict[str, Any] = {
    "memory_dim": 32,
    "key_dim": 2,
    "key_init": 0.0,
    "tau": 4.5,
    "alpha": 0.1,
    "epochs": 500,
    "learning_rate": 1e-3,
    "schedule": "constant",
    "target_ce": 0.0,
    "negative_share": 1.0,
    "window_stride": 64,
    "max_windows": 10,
}
MAX_DOCUMENTS = 1000
MAX_TEXT_CHARS = 1_000_000


@dataclass(frozen=True)
class DocumentConfig:
    """Training options: defaults measured on the default model (docs/benchmarks.md); the preset
    "paper" gives the paper's configuration (docs/design.md)."""

    preset: str = option(
        "", 'A named set of defaults: "paper" reproduces the paper\'s configuration', choices=PRESETS
    )
    memory_dim: int = option(1024, "Memory entries m of the bank", low=1, high=4096)
    key_dim: int = option(16, "Values k of a DocRep", low=1, high=1024)
    key_activation: str = option("tanh", "The selection's activation σ_doc", choices=KEY_ACTIVATION_NAMES)
    key_module: str = option("linear", "How a DocRep maps to a selection", choices=KEY_MODULES)
    key_depth: int = option(3, 'Hidden layers of the "mlp" key module', low=1, high=4)
    key_init: float = option(
        4.0,
        "Scale of the linear key module's random-feature start (sharp, nearly disjoint "
        "selections per document); 0: orthogonal, as the paper",
        low=0,
        high=100,
    )
    layer: int = option(
        -1, "The block the bank sits after; negative counts from the end", low=-4096, high=4095
    )
    token_activation: str = option("", "The token activation σ_tok; empty: the model's own MLP activation")
    negatives: str = option("other", "The negative DocReps of the guidance loss", choices=NEGATIVES)
    loss: str = option(
        "abs", 'The guidance loss: the paper\'s "abs" or the public code\'s "capped_sq"', choices=LOSSES
    )
    tau: float = option(
        0.0,
        "τ, the cross-entropy the negatives are pushed towards; 0: each window's own base-model "
        "cross-entropy plus tau_margin (a wrong DocRep then reads like no memory)",
        low=0,
    )
    tau_margin: float = option(0.0, "Added to the base model's cross-entropy when tau is 0", low=-10, high=10)
    alpha: float = option(0.1, "α, the weight of the negative term", low=0)
    background_windows: int = option(
        0,
        "Windows of text the base model writes itself, which the bank learns to leave as they "
        "are (0: no locality term; 16 measured in docs/benchmarks.md)",
        low=0,
        high=256,
    )
    locality_weight: float = option(
        0.5,
        "The weight of the locality term: |CE − CE_base| on those windows, with the batch's DocReps",
        low=0,
    )
    epochs: int = option(60, "Passes over the training windows, at most", low=1, high=10_000)
    target_ce: float = option(
        0.05, "Stop once an epoch's mean CE⁺ (own DocRep) is at most this; 0: run every epoch", low=0
    )
    learning_rate: float = option(
        1e-2, "AdamW's peak learning rate (weight decay 0.01, clipping at 5)", low=0
    )
    schedule: str = option("cosine", "The learning rate over the epochs", choices=SCHEDULES)
    negative_share: float = option(
        0.25, "Share of each batch's windows also run with a negative DocRep", low=0.01, high=1
    )
    batch_size: int = option(16, "Windows per step", low=1, high=256)
    window_words: int = option(128, "Words per training window", low=1, high=4096)
    window_stride: int = option(128, "Words between the starts of two windows", low=1, high=4096)
    max_windows: int = option(
        64,
        "Training windows per document, at most (spread over the document, first and last kept)",
        low=1,
        high=1000,
    )
    max_length: int = option(256, "Tokens per window, at most", low=2, high=4096)
    seed: int = option(0, "Seed of the initialisation, the DocReps and the batches", low=0, high=2**63 - 1)
    holdout_windows: int = option(
        0, "Windows of each document's end kept out of training, for the evaluation", low=0, high=100
    )

    @classmethod
    def from_spec(cls, given: dict[str, Any]) -> DocumentConfig:
        """The options given, over their preset's values (if any), over the defaults."""
        preset = PAPER_PRESET if isinstance(given, dict) and given.get("preset") == "paper" else {}
        return options_from_spec(cls, {**preset, **given}, "document")

    def check(self) -> None:
        check_options(self)
        if self.token_activation and not re.fullmatch(r"[a-z_0-9]{1,32}", self.token_activation):
            raise InvalidArgument(f"config.token_activation {self.token_activation!r} is no activation name")


def settings_over(current: Artifact | None, given: dict[str, Any]) -> DocumentConfig:
    """The new version's training options: the given ones over the current version's."""
    if current is None:
        return DocumentConfig.from_spec(given)
    known = DocumentConfig.__dataclass_fields__
    previous = {k: v for k, v in current.meta.hyperparameters.items() if k in known}
    if "key_dim" in given and int(given["key_dim"]) != int(previous.get("key_dim", given["key_dim"])):
        raise FailedPrecondition(
            f"bank {current.meta.name!r} has DocReps of {previous['key_dim']} values; a new version cannot "
            "change key_dim (clients hold those DocReps): register a new bank"
        )
    return DocumentConfig.from_spec({**previous, **given})


def check_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A RegisterDocuments spec, checked (InvalidArgument, with the fix) and normalised."""
    spec = spec_object(spec, "spec", {"bank", "documents", "config"})
    documents = spec.get("documents") or []
    if not isinstance(documents, list):
        raise InvalidArgument("documents must be a list of {id, title, text, docrep} objects")
    if not documents:
        raise InvalidArgument("RegisterDocuments needs at least one document")
    if len(documents) > MAX_DOCUMENTS:
        raise InvalidArgument(f"at most {MAX_DOCUMENTS} documents per request, got {len(documents)}")
    config = DocumentConfig.from_spec(spec.get("config") or {})
    seen: set[str] = set()
    checked = []
    for i, given in enumerate(documents):
        where = f"documents[{i}]"
        doc = spec_object(given, where, {"id", "title", "text", "docrep"})
        doc_id = check_name(spec_text(doc, "id", where), f"{where}.id")
        if doc_id in seen:
            raise InvalidArgument(f"document id {doc_id!r} appears twice")
        seen.add(doc_id)
        text = spec_text(doc, "text", where)
        if not text.split():
            raise InvalidArgument(f"document {doc_id!r} has no text")
        if len(text) > MAX_TEXT_CHARS:
            raise InvalidArgument(f"document {doc_id!r} is longer than {MAX_TEXT_CHARS} characters")
        given = doc.get("docrep") or []
        values = [float(v) for v in (given.get("values", []) if isinstance(given, dict) else given)]
        if values and (len(values) != config.key_dim or not all(math.isfinite(v) for v in values)):
            raise InvalidArgument(f"document {doc_id!r}: its DocRep must be {config.key_dim} finite values")
        checked.append(
            {"id": doc_id, "title": spec_text(doc, "title", where), "text": text, "docrep": values}
        )
    # Only the options given: the others come from the bank's current version, if it has one
    # (so adding a document keeps the bank's settings), else from the defaults.
    given = {k: getattr(config, k) for k in (spec.get("config") or {})}
    return {"documents": checked, "config": given}


@dataclass(frozen=True)
class DocumentEvalOptions:
    """Options of a bank's evaluation (`memserve eval docs`)."""

    section: ClassVar[str] = "options"  # EvaluateRequest.options, for error messages

    grid: int = option(7, "Points per side of the perplexity landscape over 2-D DocReps", low=2, high=101)
    compare_with: int = option(
        24,
        "Other DocReps each document is compared with, when the bank has more: two thirds whose "
        "selections are nearest its own, one third at random (their mean is `ppl_other`); 0 = all",
        low=0,
        high=100_000,
    )

    def check(self) -> None:
        check_options(self)
