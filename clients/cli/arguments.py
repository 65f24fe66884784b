"""Argument types: NAME[@VERSION], and the memory references of `generate` (--doc, --docrep, --mix,
--facts, --adapter). A malformed argument is a usage error, refused before any call."""

from __future__ import annotations

import argparse
import math

from memserve.clients.refs import (
    MAX_VERSION,
    MemoryRef,
    adapter_ref,
    docrep_ref,
    document_ref,
    local_ref,
    mix_ref,
    parse_memory_version,
)
from memserve.names import NAME_PATTERN

NAME_RULE = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
DOC_FORM = "write BANK/DOC or BANK@VERSION/DOC, like news/storm"
DOCREP_FORM = "write BANK=X,Y,... or BANK@VERSION=X,Y,..., like news=0.5,-0.2"
MIX_FORM = "write BANK/DOC=WEIGHT,BANK/DOC=WEIGHT,..., like news/storm=0.7,news/flood=0.3"


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):  # NaN fails the first test
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def memory_argument(text: str) -> tuple[str, int]:
    """NAME or NAME@VERSION (version 0: the current one)."""
    try:
        return parse_memory_version(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def doc_argument(text: str) -> MemoryRef:
    """BANK[@VERSION]/DOC for --doc."""
    bank, version, doc_id = _bank_and_document(text, text, DOC_FORM)
    return document_ref(bank, doc_id, version=version)


def facts_argument(text: str) -> MemoryRef:
    """SET[@VERSION] for --facts."""
    name, version = memory_argument(text)
    return local_ref(name, version=version)


def adapter_argument(text: str) -> MemoryRef:
    """NAME[@VERSION] for --adapter."""
    name, version = memory_argument(text)
    return adapter_ref(name, version=version)


def docrep_argument(text: str) -> MemoryRef:
    """BANK[@VERSION]=X,Y,... for --docrep."""
    head, equals, values = text.partition("=")
    if not equals:
        raise _usage(text, "has no '=' after the bank", DOCREP_FORM)
    bank, version = _bank(head, text, DOCREP_FORM)
    parsed = [_finite(value, text, "value", DOCREP_FORM) for value in values.split(",")]
    return docrep_ref(bank, parsed, version=version)


def mix_argument(text: str) -> MemoryRef:
    """BANK[@VERSION]/A=W,BANK/B=W,... for --mix: documents of one bank, any pins agreeing."""
    parts = [_mix_part(part, text) for part in text.split(",")]
    banks = sorted({bank for bank, _, _, _ in parts})
    versions = {version for _, version, _, _ in parts if version}
    weights: dict[str, float] = {}
    for _, _, doc_id, weight in parts:
        if doc_id in weights:
            raise _usage(text, f"names document {doc_id!r} twice", MIX_FORM)
        weights[doc_id] = weight
    if len(banks) > 1:
        raise _usage(text, f"mixes documents of banks {', '.join(banks)}; one --mix is of one bank", MIX_FORM)
    if len(versions) > 1:
        raise _usage(text, f"pins different versions of {banks[0]}; pin one", MIX_FORM)
    if not sum(weights.values()) > 0:
        raise _usage(text, "has weights that sum to 0; give one a positive weight", MIX_FORM)
    return mix_ref(banks[0], weights, version=versions.pop() if versions else None)


def _mix_part(part: str, whole: str) -> tuple[str, int, str, float]:
    """(bank, version, document, weight) of one BANK[@VERSION]/DOC=WEIGHT of a --mix."""
    head, equals, weight = part.partition("=")
    if not equals:
        problem = "has no '=WEIGHT'" if part == whole else f"has {part!r} without '=WEIGHT'"
        raise _usage(whole, problem, MIX_FORM)
    bank, version, doc_id = _bank_and_document(head, whole, MIX_FORM)
    value = _finite(weight, whole, "weight", MIX_FORM)
    if value < 0:
        raise _usage(whole, f"gives {doc_id!r} a negative weight; weights are >= 0", MIX_FORM)
    return bank, version, doc_id, value


def _bank_and_document(text: str, whole: str, form: str) -> tuple[str, int, str]:
    """BANK[@VERSION]/DOC, part of the argument `whole`."""
    head, slash, doc_id = text.partition("/")
    if not slash:
        raise _usage(whole, "has no '/' between the bank and the document", form)
    bank, version = _bank(head, whole, form)
    if not NAME_PATTERN.fullmatch(doc_id):
        raise _usage(whole, f"has an invalid document id {doc_id!r} ({NAME_RULE})", form)
    return bank, version, doc_id


def _bank(text: str, whole: str, form: str) -> tuple[str, int]:
    """BANK or BANK@VERSION, part of the argument `whole`."""
    bank, at, version = text.partition("@")
    if not bank:
        raise _usage(whole, "names no bank", form)
    if at and not (version.isdigit() and 1 <= int(version) <= MAX_VERSION):
        raise _usage(whole, f"has no valid version after '@' ({version!r}: a positive integer)", form)
    if not NAME_PATTERN.fullmatch(bank):
        raise _usage(whole, f"has an invalid bank name {bank!r} ({NAME_RULE})", form)
    return bank, int(version) if at else 0


def _finite(text: str, whole: str, what: str, form: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise _usage(whole, f"has {what} {text!r}, not a finite number", form)
    return value


def _usage(text: str, problem: str, form: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"{text!r} {problem}: {form}")
