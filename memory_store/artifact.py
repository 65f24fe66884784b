"""Memory artifacts: tensors as safetensors, metadata as JSON, and the export file.

An artifact is immutable once published. Its tensor blob is a safetensors file
(never a pickle); its sha256 is taken over that blob and checked on every load,
so a corrupted blob is refused instead of applied. The export file is a single
safetensors file whose header also carries the metadata, so one file describes
itself and any safetensors reader can open it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from memserve.errors import DataLoss, FailedPrecondition, InvalidArgument, MemserveError
from memserve.names import DEFAULT_TENANT

FORMAT_VERSION = 1
EXPORT_METADATA_KEY = "memserve.meta"


@dataclass(frozen=True)
class MemoryMeta:
    """What the store keeps beside a memory's tensors (JSON, never pickled)."""

    kind: str
    name: str
    base_model: str
    tenant: str = DEFAULT_TENANT
    version: int = 0  # assigned when published
    sha256: str = ""  # of the tensor blob, set by `encode`
    size_bytes: int = 0
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    source_job: str = ""
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, allow_nan=False)

    def check_base_model(self, fingerprint: str) -> None:
        """FAILED_PRECONDITION unless this memory was trained for the model `fingerprint` names:
        a memory's tensors only mean something on the model they were trained on."""
        if self.base_model != fingerprint:
            raise FailedPrecondition(
                f"memory {self.name!r} version {self.version} was trained for another base model "
                f"({self.base_model[:16]}…); this server runs {fingerprint[:16]}…: train it again "
                "for this model"
            )

    @classmethod
    def from_json(cls, text: str | bytes, error: type[MemserveError] = DataLoss) -> MemoryMeta:
        """Parses and type-checks metadata; `error` says whose fault a bad one is (stored: DATA_LOSS)."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise error(f"memory metadata is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise error("memory metadata must be a JSON object")
        fields = {k: v for k, v in data.items() if k in _FIELD_TYPES}
        for name, value in fields.items():
            if not isinstance(value, _FIELD_TYPES[name]) or isinstance(value, bool):
                raise error(f"memory metadata field {name!r} has the wrong type: {type(value).__name__}")
        for name in ("kind", "name", "base_model"):
            if not fields.get(name):
                raise error(f"memory metadata lacks {name!r}")
        created = fields.get("created_at", 0.0)
        if not (math.isfinite(created) and 0 <= created <= LATEST_CREATED_AT):
            raise error(f"memory metadata's created_at {created!r} is not a time between 1970 and 2100")
        for name in ("version", "size_bytes", "format_version"):
            if fields.get(name, 0) < 0:
                raise error(f"memory metadata's {name} is negative")
        for name in ("hyperparameters", "metrics", "details"):
            if _depth(fields.get(name, {})) > MAX_META_DEPTH:
                raise error(f"memory metadata's {name} is nested more than {MAX_META_DEPTH} deep")
        return cls(**fields)


LATEST_CREATED_AT = 4_102_444_800.0  # 2100-01-01: later is a mistake, and breaks Timestamp
MAX_META_DEPTH = 8
"""How deep a memory's hyperparameters, metrics and details may nest (every kind needs 3)."""


def _depth(value: Any) -> int:
    """How deep dicts and lists nest in `value` (without recursion: any depth is measured)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "kind": str,
    "name": str,
    "base_model": str,
    "tenant": str,
    "version": int,
    "sha256": str,
    "size_bytes": int,
    "hyperparameters": dict,
    "metrics": dict,
    "details": dict,
    "created_at": (int, float),
    "source_job": str,
    "format_version": int,
}


@dataclass(frozen=True)
class Artifact:
    """One memory version: metadata and its tensors (on the CPU, as stored)."""

    meta: MemoryMeta
    tensors: dict[str, torch.Tensor]


def encode(meta: MemoryMeta, tensors: dict[str, torch.Tensor]) -> tuple[MemoryMeta, bytes]:
    """Serialises the tensors; returns the metadata completed with sha256, size and time."""
    if not tensors:
        raise InvalidArgument("a memory needs at least one tensor")
    blob = save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    meta = replace(
        meta,
        sha256=hashlib.sha256(blob).hexdigest(),
        size_bytes=len(blob),
        created_at=meta.created_at or time.time(),
    )
    return meta, blob


def decode(meta: MemoryMeta, blob: bytes) -> Artifact:
    """Checks the blob against the metadata's sha256, then reads it (DATA_LOSS if either fails)."""
    digest = hashlib.sha256(blob).hexdigest()
    if digest != meta.sha256:
        raise DataLoss(
            f"memory {meta.name!r} version {meta.version} is corrupted: its blob has sha256 "
            f"{digest[:12]}…, its metadata says {meta.sha256[:12]}…; it was not applied"
        )
    try:
        tensors = load_safetensors(blob)
    except (SafetensorError, ValueError) as exc:
        raise DataLoss(
            f"memory {meta.name!r} version {meta.version} is not a valid safetensors blob"
        ) from exc
    return Artifact(meta, tensors)


def export_bytes(artifact: Artifact) -> bytes:
    """One self-describing file: the tensors, with the metadata in the safetensors header."""
    metadata = {EXPORT_METADATA_KEY: artifact.meta.to_json()}
    return save_safetensors(dict(artifact.tensors), metadata=metadata)


def export_header(meta: MemoryMeta, blob_header: bytes) -> bytes:
    """The start of an export file made from a stored blob's header (its first 8 + n bytes): the
    same header with the metadata added. The blob's tensor data follows it unchanged, so an
    export can be streamed from the store without reading the tensors into memory."""
    try:
        header = json.loads(blob_header[8:])
    except ValueError as exc:
        raise DataLoss(f"memory {meta.name!r} version {meta.version} has a corrupted blob header") from exc
    header["__metadata__"] = {**header.get("__metadata__", {}), EXPORT_METADATA_KEY: meta.to_json()}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors keeps the data 8-byte aligned
    return len(encoded).to_bytes(8, "little") + encoded


def import_bytes(data: bytes) -> Artifact:
    """Reads an export file; the tensors are checked against the sha256 the file carries."""
    try:
        header_size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_size])
        meta = MemoryMeta.from_json(header["__metadata__"][EXPORT_METADATA_KEY], error=InvalidArgument)
        tensors = load_safetensors(data)
    except InvalidArgument:
        raise
    except (SafetensorError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise InvalidArgument(
            f"not a memserve export file (a safetensors file with memserve metadata in its header): {exc}"
        ) from exc
    checked, _ = encode(meta, tensors)
    if checked.sha256 != meta.sha256:
        raise DataLoss(
            f"the export file of {meta.name!r} is corrupted: its tensors do not match the sha256 it carries"
        )
    return Artifact(meta, tensors)
