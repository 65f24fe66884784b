"""References to memories, for `generate(memories=[...])`: by name, or a document, DocRep or mix of a bank.

client.generate("The", memories=["story@2", document_ref("stories", "fox"),
                                 mix_ref("stories", {"fox": 0.7, "sea": 0.3}, scale=0.5)])
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from memserve.v1 import memory_ref_pb2

MAX_VERSION = (1 << 32) - 1  # versions are uint32 on the wire

MemoryRef = memory_ref_pb2.MemoryRef
"""A reference as the wire carries it; build one with the helpers below."""

MemorySpec = str | tuple[str, int] | memory_ref_pb2.MemoryRef
"""A memory a request uses: "name", "name@version", (name, version) or a MemoryRef."""


def parse_memory_version(text: str) -> tuple[str, int]:
    """Splits "name@version" into (name, version); a bare name gives version 0, the current one."""
    name, at, version = text.partition("@")  # memory names cannot contain '@'
    if not name:
        raise ValueError(f"{text!r} names no memory: write NAME or NAME@VERSION")
    if not at:
        return name, 0
    if not version.isdigit() or not 1 <= int(version) <= MAX_VERSION:
        raise ValueError(
            f"{text!r} has no valid version after '@': write NAME@VERSION with VERSION a positive "
            "integer, or NAME alone for the current version"
        )
    return name, int(version)


def memory_ref(memory: MemorySpec) -> MemoryRef:
    """A by-name reference from "name", "name@version" or (name, version); a MemoryRef passes as is."""
    if isinstance(memory, memory_ref_pb2.MemoryRef):
        return memory
    name, version = parse_memory_version(memory) if isinstance(memory, str) else memory
    return memory_ref_pb2.MemoryRef(name=name, version=version)


def _with_options(ref: MemoryRef, scale: float | None, version: int | None) -> MemoryRef:
    if scale is not None:
        ref.scale = scale
    if version:
        if not 0 < version <= MAX_VERSION:
            raise ValueError(f"version must be a positive integer (0 or None = current), got {version}")
        ref.version = version
    return ref


def document_ref(
    bank: str, document_id: str, *, scale: float | None = None, version: int | None = None
) -> MemoryRef:
    """A document of a bank, by id (it brings its own DocRep). For `memories=`.

    `scale` multiplies the memory's contribution (None = 1); `version` pins one (None or 0 = current).
    """
    document = memory_ref_pb2.DocumentRef(bank=bank, document_id=document_id)
    return _with_options(memory_ref_pb2.MemoryRef(document=document), scale, version)


def docrep_ref(
    bank: str, values: Iterable[float], *, scale: float | None = None, version: int | None = None
) -> MemoryRef:
    """An explicit DocRep of a bank (as many values as the bank's key_dim). For `memories=`."""
    docrep = memory_ref_pb2.DocRep(values=[float(v) for v in values])
    if not docrep.values:
        raise ValueError("a DocRep needs at least one value")
    document = memory_ref_pb2.DocumentRef(bank=bank, docrep=docrep)
    return _with_options(memory_ref_pb2.MemoryRef(document=document), scale, version)


def mix_ref(
    bank: str,
    weights: Mapping[str, float] | Iterable[tuple[str, float]],
    *,
    scale: float | None = None,
    version: int | None = None,
) -> MemoryRef:
    """A weighted mix of documents of one bank, {document_id: weight}: their DocReps averaged with
    these weights (>= 0, normalised by the server). For `memories=`."""
    pairs = list(weights.items() if isinstance(weights, Mapping) else weights)
    if not pairs:
        raise ValueError("a mix needs at least one document")
    for document_id, weight in pairs:
        if not weight >= 0:  # NaN fails too
            raise ValueError(f"the weight of {document_id!r} in a mix must be >= 0, got {weight}")
    mix = memory_ref_pb2.DocumentMix(
        documents=[memory_ref_pb2.WeightedDocument(document_id=d, weight=float(w)) for d, w in pairs]
    )
    document = memory_ref_pb2.DocumentRef(bank=bank, mix=mix)
    return _with_options(memory_ref_pb2.MemoryRef(document=document), scale, version)


def local_ref(memory_set: str, *, scale: float | None = None, version: int | None = None) -> MemoryRef:
    """A reference to a local memory set."""
    local = memory_ref_pb2.LocalMemoryRef(set=memory_set)
    return _with_options(memory_ref_pb2.MemoryRef(local=local), scale, version)


def adapter_ref(name: str, *, scale: float | None = None, version: int | None = None) -> MemoryRef:
    """A reference to an adapter memory."""
    adapter = memory_ref_pb2.AdapterRef(name=name)
    return _with_options(memory_ref_pb2.MemoryRef(adapter=adapter), scale, version)
