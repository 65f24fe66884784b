"""The `local` kind's options and fact checks, defined once: the RPC, CLI and trainer read them."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from memserve.errors import FailedPrecondition, InvalidArgument
from memserve.memory.options import check_options, option, options_from_spec
from memserve.names import NAME_PATTERN

if TYPE_CHECKING:
    from memserve.memory_store.artifact import Artifact

DISTANCES = ("projection", "mixed")
COMBINATIONS = ("top1", "sum")
LOCAL_SITES = ("attn_out", "mlp_down")  # memserve.memory.hooks.Site values
DISTANCES = ("projection", "mixed")


COMBINATIONS = ("top1", "sum")
LOCAL_SITES = ("attn_out", "mlp_down")  # memserve.memory.hooks.Site values
MAX_FACTS = 1000


MAX_PROMPT_CHARS = 2000
MAX_TARGET_CHARS = 200


MAX_PROMPTS_PER_FACT = 64
MAX_ALPHAS = 32


@dataclass(frozen=True)
class LocalConfig:
    """Training options of a local memory set (LocalTrainingConfig in the API)."""

    layers: tuple[int, ...] = option(
        (), "Layers to search for edits; empty: every layer", low=0, high=4095, item=int
    )
    sites: tuple[str, ...] = option(LOCAL_SITES, "Sites to search for edits", choices=LOCAL_SITES, item=str)
    alphas: tuple[float, ...] = option(
        (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0),
        "Edit step sizes α to search",
        low=0,
        high=1e4,
        item=float,
    )
    hardness: float = option(3.0, "Hardness h of the trigger exp(-(x²/b²)^h)", low=0.5, high=20)
    distance: str = option("projection", "How far an activation is from an entry's key", choices=DISTANCES)
    combination: str = option(
        "top1", "Entries that fire at a position: the best one, or all", choices=COMBINATIONS
    )
    seed: int = option(0, "Seed of the prompt splits and the generated prompts", low=0, high=2**63 - 1)
    holdout: float = option(
        0.5, "Share of each fact's positive and negative prompts kept for the evaluation", low=0, high=0.9
    )
    generated_prompts: int = option(
        3, "Paraphrases and neighbours generated per fact (0: none)", low=0, high=16
    )
    candidates: int = option(
        4, "Cells checked with real forward passes in the boundary search", low=1, high=16
    )
    extra_keys: int = option(
        3, "More keys per target token, for training positives the first misses", low=0, high=16
    )

    @classmethod
    def from_spec(cls, given: dict[str, Any]) -> LocalConfig:
        return options_from_spec(cls, given, "local")

    def check(self) -> None:
        check_options(self)
        if not 1 <= len(self.alphas) <= MAX_ALPHAS or not all(a > 0 for a in self.alphas):
            raise InvalidArgument(f"config.alphas takes 1 to {MAX_ALPHAS} step sizes in (0, 1e4]")


@dataclass(frozen=True)
class Fact:
    id: str
    prompt: str
    target: str
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()


def fact_from_dict(raw: dict[str, Any]) -> Fact:
    return Fact(
        id=raw["id"],
        prompt=raw["prompt"],
        target=raw["target"],
        positive_prompts=tuple(raw.get("positive_prompts", ())),
        negative_prompts=tuple(raw.get("negative_prompts", ())),
    )


def fact_id(prompt: str) -> str:
    """An id for a fact given without one: a slug of its prompt and a short hash."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40].strip("-") or "fact"
    return f"{slug}-{hashlib.sha256(prompt.encode()).hexdigest()[:6]}"


def check_facts(facts: Sequence[dict[str, Any]]) -> list[Fact]:
    if not facts:
        raise InvalidArgument("RegisterFacts needs at least one fact")
    if len(facts) > MAX_FACTS:
        raise InvalidArgument(f"at most {MAX_FACTS} facts per request, got {len(facts)}")
    checked: list[Fact] = []
    seen: set[str] = set()
    for i, raw in enumerate(facts):
        prompt, target = str(raw.get("prompt", "")), str(raw.get("target", ""))
        where = f"facts[{i}]"
        if not prompt.strip() or len(prompt) > MAX_PROMPT_CHARS:
            raise InvalidArgument(f"{where}.prompt must have 1 to {MAX_PROMPT_CHARS} characters")
        if not target.strip() or len(target) > MAX_TARGET_CHARS:
            raise InvalidArgument(
                f"{where}.target must have 1 to {MAX_TARGET_CHARS} characters (usually with a leading space)"
            )
        the_id = str(raw.get("id", "")) or fact_id(prompt)
        if not NAME_PATTERN.fullmatch(the_id) or "/" in the_id:
            raise InvalidArgument(f"{where}.id {the_id!r} must be letters, digits, '.', '_' or '-'")
        if the_id in seen:
            raise InvalidArgument(f"fact id {the_id!r} appears twice")
        seen.add(the_id)
        lists = {}
        for name in ("positive_prompts", "negative_prompts"):
            prompts = [str(p) for p in raw.get(name) or ()]
            if len(prompts) > MAX_PROMPTS_PER_FACT:
                raise InvalidArgument(f"{where}.{name}: at most {MAX_PROMPTS_PER_FACT} prompts")
            if any(not p.strip() or len(p) > MAX_PROMPT_CHARS for p in prompts):
                raise InvalidArgument(
                    f"{where}.{name}: each prompt must have 1 to {MAX_PROMPT_CHARS} characters"
                )
            lists[name] = tuple(dict.fromkeys(prompts))
        checked.append(Fact(the_id, prompt, target, lists["positive_prompts"], lists["negative_prompts"]))
    return checked


def settings_over(current: Artifact | None, given: dict[str, Any]) -> LocalConfig:
    """The new version's options: the given ones over the current version's."""
    if current is None:
        return LocalConfig.from_spec(given)
    known = LocalConfig.__dataclass_fields__
    previous = {k: v for k, v in current.meta.hyperparameters.items() if k in known}
    if "distance" in given and given["distance"] != previous.get("distance", given["distance"]):
        raise FailedPrecondition(
            f"local memory set {current.meta.name!r} uses the {previous['distance']!r} distance; its "
            "boundaries were tuned for it: register the facts in a new set to change it"
        )
    return LocalConfig.from_spec({**previous, **given})


def check_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A RegisterFacts spec, checked (InvalidArgument, with the fix) and normalised."""
    facts = check_facts(spec.get("facts") or [])
    config = LocalConfig.from_spec(spec.get("config") or {})
    given = {k: getattr(config, k) for k in (spec.get("config") or {})}
    return {"facts": [asdict(f) for f in facts], "config": given}


@dataclass(frozen=True)
class LocalEvalOptions:
    """Options of a set's evaluation (`memserve eval facts`)."""

    section: ClassVar[str] = "options"  # EvaluateRequest.options, for error messages

    continuation_tokens: int = option(
        16, "Greedy tokens compared with and without the set, for locality", low=1, high=256
    )

    def check(self) -> None:
        check_options(self)
