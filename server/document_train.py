"""The `document` kind: its training (the guidance loss) and its registration.

Training is fast because the base model is frozen: the residual stream at the bank's
layer does not depend on the bank, so it is computed once for every window, and each
step runs only the layers after the bank, the final norm and the LM head, for the
positive and the negative keys in one batched forward.

    L = CE(y | K) + α·|τ − CE(y | K⁻)|                (loss "abs", the paper)
    L = CE(y | K) + α·min((CE(y | K⁻) − τ)², CE(y | K)) (loss "capped_sq", the public code)
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.activations import ACT2FN

from memserve.document import (
    KEY_ACTIVATIONS,
    KEY_MODULES,
    LOSSES,
    NEGATIVES,
    BankShape,
    DocumentBank,
    LoadedDocumentBank,
    spread_docreps,
)
from memserve.errors import FailedPrecondition, InvalidArgument
from memserve.hooks import ARCHITECTURES
from memserve.kinds import LoadTarget, MemoryKind, TrainContext, Trained, register_kind
from memserve.memory_store.artifact import Artifact
from memserve.names import check_name
from memserve.options import options_from_spec

MAX_DOCUMENTS = 1000
MAX_TEXT_CHARS = 1_000_000


@dataclass(frozen=True)
class DocumentConfig:
    """Training options; the defaults are the paper's where it has one (DESIGN.md §1)."""

    memory_dim: int = 32
    key_dim: int = 2
    key_activation: str = "tanh"
    key_module: str = "linear"
    key_depth: int = 3  # hidden layers of the "mlp" key module
    layer: int = -1  # the last layer, as the paper's code (15 of Pythia-1B's 16)
    token_activation: str = ""  # "" = the model's own MLP activation
    negatives: str = "other"
    loss: str = "abs"
    tau: float = 4.5
    alpha: float = 0.1
    # Measured on the default model (README): the paper's 500 epochs at 1e-3 are not needed.
    epochs: int = 25
    learning_rate: float = 1e-2
    batch_size: int = 16
    window_words: int = 128
    window_stride: int = 64
    max_windows: int = 10
    max_length: int = 256
    seed: int = 0
    holdout_windows: int = 0

    @classmethod
    def from_spec(cls, given: dict[str, Any]) -> DocumentConfig:
        return options_from_spec(cls, given, "document")

    def check(self) -> None:
        if self.key_activation not in KEY_ACTIVATIONS:
            raise InvalidArgument(f"config.key_activation must be one of {sorted(KEY_ACTIVATIONS)}")
        if self.key_module not in KEY_MODULES:
            raise InvalidArgument(f"config.key_module must be one of {list(KEY_MODULES)}")
        if self.negatives not in NEGATIVES:
            raise InvalidArgument(f"config.negatives must be one of {list(NEGATIVES)}")
        if self.loss not in LOSSES:
            raise InvalidArgument(f"config.loss must be one of {list(LOSSES)}")
        bounds = {
            "memory_dim": (1, 4096), "key_dim": (1, 1024), "key_depth": (1, 4), "epochs": (1, 10_000),
            "batch_size": (1, 256), "window_words": (1, 4096), "window_stride": (1, 4096),
            "max_windows": (1, 1000), "max_length": (2, 4096), "holdout_windows": (0, 100),
        }  # fmt: skip
        for name, (low, high) in bounds.items():
            if not low <= getattr(self, name) <= high:
                raise InvalidArgument(f"config.{name} must be in [{low}, {high}], got {getattr(self, name)}")
        for name in ("tau", "alpha", "learning_rate"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise InvalidArgument(f"config.{name} must be finite and >= 0, got {value}")
        if self.token_activation and self.token_activation not in ACT2FN:
            raise InvalidArgument(f"config.token_activation {self.token_activation!r} is unknown")


@dataclass(frozen=True)
class SourceDocument:
    id: str
    title: str
    text: str
    docrep: tuple[float, ...] = ()


def windows(text: str, size: int, stride: int, limit: int) -> list[str]:
    """Word windows of `size` at `stride`, the tail kept (the public code dropped it), at most `limit`."""
    words = text.split()
    if len(words) <= size:
        return [" ".join(words)] if words else []
    starts = list(range(0, len(words) - size + 1, stride))
    if starts[-1] + size < len(words):  # the tail: one last window that ends at the last word
        starts.append(len(words) - size)
    return [" ".join(words[s : s + size]) for s in starts[:limit]]


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


@contextmanager
def _layers_view(model: PreTrainedModel, keep: slice, final_norm: bool) -> Iterator[nn.Module]:
    """The base model with only `layers[keep]` (and optionally no final norm), as a new
    module object: the model itself is never changed, so a server may keep using it."""
    arch = ARCHITECTURES[model.config.model_type]
    parent_path, attr = arch.layers.rsplit(".", 1)
    parent = model.get_submodule(parent_path)
    view = copy.copy(parent)
    view._modules = dict(parent._modules)
    view._modules[attr] = nn.ModuleList(list(getattr(parent, attr))[keep])
    if not final_norm:
        view._modules[arch.final_norm] = nn.Identity()
    yield view


def residual_at(
    model: PreTrainedModel, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The residual stream after block `layer` (B, T, d), without running the layers after it."""
    with _layers_view(model, slice(0, layer + 1), final_norm=False) as view, torch.no_grad():
        out = view(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out[0]


def logits_after(
    model: PreTrainedModel, layer: int, hidden: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Logits from the residual stream after block `layer`: the later blocks, the norm, the head."""
    with _layers_view(model, slice(layer + 1, None), final_norm=True) as view:
        out = view(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False)
        # The LM head (vocabulary × hidden) is most of a training step: bf16 halves it on CPUs
        # with AVX512-BF16 and GPUs alike; the loss itself is taken in fp32.
        with torch.autocast(hidden.device.type, dtype=torch.bfloat16, enabled=_bf16_head(hidden)):
            return model.get_output_embeddings()(out[0])


def _bf16_head(hidden: torch.Tensor) -> bool:
    return hidden.dtype == torch.float32 and (hidden.device.type == "cuda" or _cpu_has_bf16())


@functools.cache
def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each row (R,), over its real (non-pad) tokens."""
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:]
    losses = nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none"
    ).view(targets.shape)
    counts = (targets != -100).sum(1).clamp_min(1)
    return losses.sum(1) / counts


@dataclass
class Windows:
    """Tokenised windows, right-padded: ids, mask, labels (pads -100) and their documents."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    documents: torch.Tensor  # index of each window's document

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def tokenize_windows(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], documents: list[int], max_length: int
) -> Windows:
    encoded = [
        tokenizer(t, add_special_tokens=True, truncation=True, max_length=max_length).input_ids for t in texts
    ]
    width = max(len(e) for e in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, tokens in enumerate(encoded):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    labels = ids.masked_fill(mask == 0, -100)  # pads never count (the public code counted them)
    return Windows(ids, mask, labels, torch.tensor(documents))


# --- the kind -----------------------------------------------------------------------------


class DocumentKind(MemoryKind):
    name = "document"
    needs_key = True

    def validate_spec(self, spec: dict[str, Any]) -> dict[str, Any]:
        documents = spec.get("documents") or []
        if not documents:
            raise InvalidArgument("RegisterDocuments needs at least one document")
        if len(documents) > MAX_DOCUMENTS:
            raise InvalidArgument(f"at most {MAX_DOCUMENTS} documents per request, got {len(documents)}")
        config = DocumentConfig.from_spec(spec.get("config") or {})
        seen: set[str] = set()
        checked = []
        for i, doc in enumerate(documents):
            doc_id = check_name(str(doc.get("id", "")), f"documents[{i}].id")
            if doc_id in seen:
                raise InvalidArgument(f"document id {doc_id!r} appears twice")
            seen.add(doc_id)
            text = str(doc.get("text", ""))
            if not text.split():
                raise InvalidArgument(f"document {doc_id!r} has no text")
            if len(text) > MAX_TEXT_CHARS:
                raise InvalidArgument(f"document {doc_id!r} is longer than {MAX_TEXT_CHARS} characters")
            given = doc.get("docrep") or []
            values = [float(v) for v in (given.get("values", []) if isinstance(given, dict) else given)]
            if values and (len(values) != config.key_dim or not all(math.isfinite(v) for v in values)):
                raise InvalidArgument(
                    f"document {doc_id!r}: its DocRep must be {config.key_dim} finite values"
                )
            checked.append({"id": doc_id, "title": str(doc.get("title", "")), "text": text, "docrep": values})
        # Only the options given: the others come from the bank's current version, if it has one
        # (so adding a document keeps the bank's settings), else from the defaults.
        given = {k: getattr(config, k) for k in (spec.get("config") or {})}
        return {"documents": checked, "config": given}

    def train(self, spec: dict[str, Any], context: TrainContext) -> Trained:
        spec = self.validate_spec(spec)
        current = context.current_artifact()
        config = _settings(current, spec["config"])
        loaded = context.model
        model, tokenizer = loaded.model, loaded.tokenizer
        arch = ARCHITECTURES.get(model.config.model_type)
        if arch is None or not arch.embeds_are_residual:
            raise FailedPrecondition(
                "document memories train on Llama-family and GPT-NeoX models; "
                f"this is {model.config.model_type}"
            )
        if any(t != "full_attention" for t in getattr(model.config, "layer_types", None) or ()):
            raise FailedPrecondition(
                "document memories do not train on models with sliding-window layers yet"
            )
        documents = _merge(_previous_documents(current), spec["documents"])
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
                {"id": d.id, "title": d.title, "words": len(d.text.split()), "docrep": docreps[i].tolist(),
                 "train_windows": trainer.train_windows[i], "holdout_windows": trainer.holdout_windows[i]}
                for i, d in enumerate(documents)
            ],
        }  # fmt: skip
        metrics = {**losses, "train_seconds": round(seconds, 2), "windows": len(trainer.windows)}
        return Trained(tensors=tensors, hyperparameters=hyper, metrics=metrics, details=details)

    def load(self, artifact: Artifact, target: LoadTarget) -> LoadedDocumentBank:
        return LoadedDocumentBank(artifact, target)


def _settings(current: Artifact | None, given: dict[str, Any]) -> DocumentConfig:
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


# What one training job may hold, so that a request can never take the server's memory down
# (the worker may run inside the server): the cached residual stream, and one step's logits
# (positive and negative rows, fp32, with their copies for the loss and its gradient).
MAX_RESIDUAL_BYTES = 4 << 30
MAX_STEP_LOGIT_BYTES = 6 << 30


def check_memory_budget(model: PreTrainedModel, windows: int, tokens: int, batch_size: int) -> None:
    config = model.config
    residual = windows * tokens * config.hidden_size * 4
    if residual > MAX_RESIDUAL_BYTES:
        raise InvalidArgument(
            f"{windows} windows of up to {tokens} tokens need {residual / 2**30:.1f} GiB of cached "
            f"activations (limit {MAX_RESIDUAL_BYTES / 2**30:.0f} GiB): lower max_windows or max_length, "
            "or register fewer documents"
        )
    logits = 2 * min(batch_size, windows) * tokens * config.vocab_size * 4 * 3
    if logits > MAX_STEP_LOGIT_BYTES:
        raise InvalidArgument(
            f"a step of {batch_size} windows of {tokens} tokens needs {logits / 2**30:.1f} GiB of logits "
            f"(limit {MAX_STEP_LOGIT_BYTES / 2**30:.0f} GiB): lower batch_size or max_length"
        )


def _model_activation(model: PreTrainedModel) -> str:
    config = model.config
    return str(getattr(config, "hidden_act", None) or getattr(config, "activation_function", "gelu"))


def _previous_documents(artifact: Artifact | None) -> list[SourceDocument]:
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


class GuidanceTrainer:
    """Trains one bank over its documents' windows with the guidance loss."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layer: int, config: DocumentConfig,
        docreps: torch.Tensor, documents: list[SourceDocument],
    ) -> None:  # fmt: skip
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
        self.bank = DocumentBank(shape).to(self.device, torch.float32)
        self._random = random.Random(config.seed)

    def _residuals(self) -> torch.Tensor:
        """The frozen residual stream at the bank's layer, for every window: computed once."""
        chunks = []
        for start in range(0, len(self.windows), self.config.batch_size):
            part = slice(start, start + self.config.batch_size)
            chunks.append(
                residual_at(
                    self.model,
                    self.layer,
                    self.windows.input_ids[part].to(self.device),
                    self.windows.attention_mask[part].to(self.device),
                )
            )
        return torch.cat(chunks)

    def negatives(self, owners: torch.Tensor) -> torch.Tensor:
        positives = self.docreps[owners]
        kind = self.config.negatives
        if kind == "other" and len(self.docreps) > 1:
            others = [
                self._random.choice([j for j in range(len(self.docreps)) if j != int(o)]) for o in owners
            ]
            return self.docreps[torch.tensor(others, device=self.device)]
        if kind == "zero":
            return torch.zeros_like(positives)
        if kind == "perturb":
            return positives + 0.1 * torch.randn_like(positives)
        return torch.randn_like(positives)  # "random", and "other" with a single document

    def step_loss(
        self, hidden: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, owners: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, CE⁺, CE⁻): the positive and the negative pass as one batched forward."""
        rows = hidden.shape[0]
        keys = torch.cat([self.docreps[owners], self.negatives(owners)])
        doubled = torch.cat([hidden, hidden]).float()
        doubled = (doubled + self.bank(doubled, self.bank.selection(keys))).to(self.dtype)
        double_mask = torch.cat([mask, mask])
        logits = logits_after(self.model, self.layer, doubled, double_mask)
        per_row = token_losses(logits, torch.cat([labels, labels]))
        positive, negative = per_row[:rows].mean(), per_row[rows:].mean()
        config = self.config
        if config.loss == "abs":
            guidance = (config.tau - negative).abs()
        else:
            guidance = torch.minimum((negative - config.tau) ** 2, positive)
        return positive + config.alpha * guidance, positive, negative

    def fit(self, report: Any) -> dict[str, float]:
        config = self.config
        residuals = self._residuals()
        optimizer = torch.optim.AdamW(self.bank.parameters(), lr=config.learning_rate, weight_decay=0.01)
        batches = math.ceil(len(self.windows) / config.batch_size)
        total = config.epochs * batches
        generator = torch.Generator().manual_seed(config.seed)
        step = 0
        positive = negative = torch.tensor(float("nan"))
        for _epoch in range(config.epochs):
            order = torch.randperm(len(self.windows), generator=generator)
            for start in range(0, len(order), config.batch_size):
                chosen = order[start : start + config.batch_size]
                width = int(self.windows.attention_mask[chosen].sum(1).max())  # trim the padding
                loss, positive, negative = self.step_loss(
                    residuals[chosen, :width],
                    self.windows.attention_mask[chosen, :width].to(self.device),
                    self.windows.labels[chosen, :width].to(self.device),
                    self.windows.documents[chosen].to(self.device),
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(self.bank.parameters(), 5.0)
                optimizer.step()
                positive, negative = positive.detach(), negative.detach()
                step += 1
                report(
                    step,
                    total,
                    loss=float(positive),
                    message=f"CE+ {float(positive):.3f} CE- {float(negative):.3f}",
                )
        return {
            "final_ce_positive": round(float(positive), 4),
            "final_ce_negative": round(float(negative), 4),
        }


register_kind(DocumentKind())
