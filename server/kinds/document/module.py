"""Document memories (Park & Choi, IJCAI 2024): a bank of m entries at one layer, selected per
document by its DocRep, trained with the guidance loss. docs/design.md, "document".

    h ← h + V( σ_tok(W_tok h + b_tok) ⊙ σ_doc(Key_Doc(K)) ) + b_v

V starts at zero, so an untrained bank changes nothing; the base model stays frozen.
Any K ∈ R^k is a valid key: a document's own DocRep, an explicit vector, or a
weighted mix of documents' DocReps. Requests that use one bank share one op per
forward pass, whatever their keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.activations import ACT2FN

from memserve.errors import InvalidArgument, NotFound
from memserve.kinds.document.config import KEY_ACTIVATION_NAMES, KEY_MODULES, DocumentConfig
from memserve.memory.group import GroupOp, add_rows, residual_key, rows_of
from memserve.memory.hooks import MemoryContext, TraceRecord
from memserve.memory.kind import LoadedMemory, LoadTarget, MemoryRefSpec, RowMemory
from memserve.memory_store.artifact import Artifact

KEY_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    name: getattr(torch, name) for name in KEY_ACTIVATION_NAMES
}
# A selection entry counts as selected above this magnitude (the metrics' "entries selected").
SELECTED_ABOVE = 0.1


@dataclass(frozen=True)
class BankShape:
    """What fixes a bank's parameters (the rest of the training options do not)."""

    hidden_size: int
    memory_dim: int = DocumentConfig.memory_dim
    key_dim: int = DocumentConfig.key_dim
    key_activation: str = DocumentConfig.key_activation
    key_module: str = DocumentConfig.key_module
    key_depth: int = DocumentConfig.key_depth
    token_activation: str = "silu"  # resolved: the config's "" is the model's own activation

    def check(self) -> None:
        if self.key_activation not in KEY_ACTIVATIONS:
            raise InvalidArgument(f"key_activation must be one of {sorted(KEY_ACTIVATIONS)}")
        if self.key_module not in KEY_MODULES:
            raise InvalidArgument(f"key_module must be one of {list(KEY_MODULES)}")
        if self.key_module == "mlp" and not 1 <= self.key_depth <= 4:
            raise InvalidArgument("key_depth (hidden layers of the mlp key module) must be 1 to 4")
        if not 1 <= self.memory_dim <= 4096 or not 1 <= self.key_dim <= 1024:
            raise InvalidArgument("memory_dim must be 1 to 4096 and key_dim 1 to 1024")
        if self.token_activation not in ACT2FN:
            raise InvalidArgument(f"token_activation {self.token_activation!r} is unknown")


class DocumentBank(nn.Module):
    """The bank's parameters and its two halves: selection (from K) and the residual update."""

    def __init__(self, shape: BankShape, key_init: float = 0.0) -> None:
        super().__init__()
        shape.check()
        self.shape = shape
        m, k = shape.memory_dim, shape.key_dim
        self.token_proj = nn.Linear(shape.hidden_size, m)
        if shape.key_module == "linear":
            self.key = nn.Sequential(nn.Linear(k, m))
        else:  # `key_depth` hidden ReLU layers of width m, then the output layer
            layers: list[nn.Module] = []
            width = k
            for _ in range(shape.key_depth):
                layers += [nn.Linear(width, m), nn.ReLU()]
                width = m
            self.key = nn.Sequential(*layers, nn.Linear(m, m))
        self.value = nn.Linear(m, shape.hidden_size)
        self._token_activation = ACT2FN[shape.token_activation]
        self._key_activation = KEY_ACTIVATIONS[shape.key_activation]
        self.reset_parameters(key_init)

    def reset_parameters(self, key_init: float = 0.0) -> None:
        """Orthogonal weights and zero biases, V = 0; with `key_init` > 0, a linear key module
        starts as random features instead: weights N(0, key_init²/k) and biases uniform in
        ±key_init/2, so that each entry is on for one random half of the DocRep space, sharply,
        and documents a little apart start with nearly disjoint selections (an orthogonal k → m
        map with k ≪ m starts almost linear and tiny: every key then selects a scaled copy of
        the same memory)."""
        for module in (self.token_proj, *[m for m in self.key if isinstance(m, nn.Linear)]):
            nn.init.orthogonal_(module.weight)
            nn.init.zeros_(module.bias)
        if key_init > 0 and self.shape.key_module == "linear":
            first = self.key[0]
            assert isinstance(first, nn.Linear)
            nn.init.normal_(first.weight, std=key_init / math.sqrt(self.shape.key_dim))
            nn.init.uniform_(first.bias, -key_init / 2, key_init / 2)
        # V = 0: an untrained bank is the identity, and training starts from the base model.
        nn.init.zeros_(self.value.weight)
        nn.init.zeros_(self.value.bias)

    def selection(self, docreps: torch.Tensor) -> torch.Tensor:
        """σ_doc(Key_Doc(K)): (R, k) → (R, m), which entries each key selects and how much."""
        return self._key_activation(self.key(docreps))

    def forward(self, hidden: torch.Tensor, selection: torch.Tensor | None) -> torch.Tensor:
        """The update for `hidden` (R, T, d); `selection` (R, m), or None for every entry fully on."""
        tokens = self._token_activation(self.token_proj(hidden))
        if selection is not None:
            tokens = tokens * selection[:, None, :]
        return self.value(tokens)


def shape_from(hyperparameters: dict[str, Any], hidden_size: int) -> BankShape:
    return BankShape(
        hidden_size=hidden_size,
        memory_dim=int(hyperparameters["memory_dim"]),
        key_dim=int(hyperparameters["key_dim"]),
        key_activation=str(hyperparameters["key_activation"]),
        key_module=str(hyperparameters["key_module"]),
        key_depth=int(hyperparameters["key_depth"]),
        token_activation=str(hyperparameters["token_activation"]),
    )


@dataclass
class SelectionStats:
    """Per forward and bank: what the metrics layer reads (entries selected per token, mass)."""

    bank: str
    rows: int
    tokens: int
    selected_entries: float  # mean over rows of entries with |selection| > SELECTED_ABOVE
    selection_mass: float  # mean over rows of Σ|selection| / memory_dim


class LoadedDocumentBank(LoadedMemory):
    """A bank on the model's device, with its documents' DocReps."""

    def __init__(self, artifact: Artifact, target: LoadTarget) -> None:
        meta = artifact.meta
        self.observe = target.observe
        self.name = meta.name
        self.version = meta.version
        hyper = meta.hyperparameters
        layer = int(hyper["layer"])
        self.layer = layer if layer >= 0 else target.num_layers + layer
        if not 0 <= self.layer < target.num_layers:
            raise InvalidArgument(
                f"bank {meta.name!r} is at layer {layer}; the model has {target.num_layers}"
            )
        self.bank = DocumentBank(shape_from(hyper, target.hidden_size))
        state = {k[len("bank.") :]: v for k, v in artifact.tensors.items() if k.startswith("bank.")}
        self.bank.load_state_dict(state)
        self.bank.to(target.device, target.dtype).eval().requires_grad_(False)
        self.device, self.dtype = target.device, target.dtype
        self.docreps = artifact.tensors["docreps"].to(target.device, target.dtype)
        self.document_ids = [d["id"] for d in meta.details["documents"]]
        self._index = {doc_id: i for i, doc_id in enumerate(self.document_ids)}

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.bank.parameters()) + self.docreps.nbytes

    @property
    def key_dim(self) -> int:
        return self.bank.shape.key_dim

    def docrep_of(self, document_id: str) -> torch.Tensor:
        index = self._index.get(document_id)
        if index is None:
            raise NotFound(f"bank {self.name!r} has no document {document_id!r}")
        return self.docreps[index]

    def key_for(self, ref: MemoryRefSpec) -> torch.Tensor:
        """The DocRep a reference asks for: a document's own, an explicit one, or a mix."""
        key = ref.key
        if key is None:
            raise InvalidArgument(f"bank {self.name!r} needs a key: a document id, a DocRep or a mix")
        if key.document_id:
            return self.docrep_of(key.document_id)
        if key.docrep:
            if len(key.docrep) != self.key_dim:
                raise InvalidArgument(
                    f"bank {self.name!r} takes DocReps of {self.key_dim} values; got {len(key.docrep)}"
                )
            return torch.tensor(key.docrep, device=self.device, dtype=self.dtype)
        total = sum(w for _, w in key.mix)  # in float64: a sum of large weights must not overflow
        weights = torch.tensor([w / total for _, w in key.mix], device=self.device, dtype=torch.float32)
        docreps = torch.stack([self.docrep_of(doc_id).float() for doc_id, _ in key.mix])
        return (weights[:, None] * docreps).sum(0).to(self.dtype)

    def bind(self, ref: MemoryRefSpec) -> BoundDocument:
        with torch.no_grad():
            selection = self.bank.selection(self.key_for(ref)[None])[0]
        return BoundDocument(self.name, self, selection, ref.scale, _key_label(ref))


@dataclass(eq=False)
class BoundDocument(RowMemory):
    """One request's view of a bank: its selection and scale."""

    name: str
    bank: LoadedDocumentBank
    selection: torch.Tensor  # (m,)
    scale: float
    label: str = ""  # what the key was, for traces: a document id, "docrep" or the mix
    apply_order: ClassVar[int] = 10  # before adapters at the same layer

    @property
    def loaded(self) -> LoadedDocumentBank:
        return self.bank

    def add_ops(self, context: MemoryContext, rows: torch.Tensor) -> None:
        _LayerGroup.join(context, residual_key("document", self.bank.layer), self, rows)


class _LayerGroup(GroupOp[BoundDocument]):
    """Every row of one forward that uses a bank at one layer: one op per bank, whatever the
    rows' keys."""

    def op(self, hidden: torch.Tensor) -> torch.Tensor:
        for member, row in self.traced():
            mass = float(member.selection.abs().float().mean()) * member.scale
            self.context.record(
                row, TraceRecord(member.name, "document", member.bank.layer, member.label, mass)
            )
        out = hidden
        for pairs in self.by_memory():
            bank = pairs[0][0].bank
            rows, scales = rows_of(pairs, hidden.dtype)
            selection = torch.cat([m.selection.expand(len(r), -1) for m, r in pairs])
            if bank.observe is not None:
                bank.observe(_stats(bank, selection, hidden.shape[1]))
            out = add_rows(out, rows, bank.bank(hidden[rows], selection), scales)
        return out


def _key_label(ref: MemoryRefSpec) -> str:
    key = ref.key
    if key is None or key.document_id:
        return key.document_id if key else ""
    if key.docrep:
        return (
            "docrep("
            + ", ".join(f"{v:.3g}" for v in key.docrep[:4])
            + (", …)" if len(key.docrep) > 4 else ")")
        )
    return "mix(" + ", ".join(f"{doc}={w:.3g}" for doc, w in key.mix) + ")"


def _stats(bank: LoadedDocumentBank, selection: torch.Tensor, tokens: int) -> SelectionStats:
    magnitude = selection.abs().float()
    return SelectionStats(
        bank=bank.name,
        rows=selection.shape[0],
        tokens=tokens * selection.shape[0],
        selected_entries=float((magnitude > SELECTED_ABOVE).sum(1).float().mean()),
        selection_mass=float(magnitude.mean()),
    )


def spread_docreps(count: int, key_dim: int, existing: torch.Tensor | None, seed: int) -> torch.Tensor:
    """`count` new DocReps in [-1, 1]^k, far from each other and from `existing` (farthest-point
    sampling from a seeded pool), so that documents start well apart."""
    generator = torch.Generator().manual_seed(seed)
    pool = torch.rand(max(64 * (count + 1), 256), key_dim, generator=generator) * 2 - 1
    chosen = [] if existing is None else list(existing.float())
    picked: list[torch.Tensor] = []
    for _ in range(count):
        if chosen:
            distance = torch.cdist(pool, torch.stack(chosen)).min(1).values
            best = int(distance.argmax())
        else:
            best = int(pool.norm(dim=1).argmax())
        picked.append(pool[best])
        chosen.append(pool[best])
        pool = torch.cat([pool[:best], pool[best + 1 :]])
    return torch.stack(picked) if picked else torch.zeros(0, key_dim)
