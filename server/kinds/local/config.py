"""The `local` kind's options and fact checks, defined once: the RPC, CLI and trainer read them."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from memserve.errors import FailedPrecondition, InvalidArgument
from memserve.memory.options import (
    check_options,
    option,
    options_from_spec,
    spec_object,
    spec_text,
    spec_texts,
)
from memserve.names import NAME_PATTERN

if TYPE_CHECKING:
    from memserve.memory_store.artifact import Artifact

DISTANCES = ("euclidean", "projection", "mixed")
METHODS = ("gated", "subject", "blog")
# The distance each method uses unless told: the blog's is one-sided, as the blog wrote it.
METHOD_DISTANCES = {"gated": "euclidean", "subject": "euclidean", "blog": "projection"}
COMBINATIONS = ("top1", "sum")
# How long a gated set can answer a subject once it is named (LocalConfig.answer_scope).
ANSWER_SCOPES = ("sentence", "request")
LOCAL_SITES = ("attn_out", "mlp_down")  # memserve.memory.hooks.Site values
MAX_FACTS = 1000


MAX_PROMPT_CHARS = 2000
MAX_TARGET_CHARS = 200


MAX_PROMPTS_PER_FACT = 64
MAX_ALPHAS = 32


@dataclass(frozen=True)
class LocalConfig:
    """Training options of a local memory set (LocalTrainingConfig in the API)."""

    method: str = option(
        "gated",
        "How entries are made: 'gated' (a subject detector, and answers at the LM head that act "
        "where the subject was seen and the model expects the kind of answer the prompt asks for), "
        "'subject' (a key at the subject's last token, a value optimised over several steps with a "
        "KL term, last-token entries only where it falls short) or 'blog' (keys at the prompt's last "
        "token, one gradient step: the source blog's method)",
        choices=METHODS,
    )
    answer_top_k: int = option(
        32,
        "Gated answers: tokens of the reference distribution compared (the rest is one bin)",
        low=1,
        high=1024,
    )
    answer_margin: float = option(
        0.9,
        "Gated answers: the threshold is at most this share of the divergence of the subject's "
        "nearest other relation",
        low=0.05,
        high=1,
    )
    answer_hardness: float = option(
        4.0, "Gated answers: hardness h of the answers' trigger", low=0.5, high=20
    )
    subject_layer: int = option(
        -1, "Layer of the subject entries and detectors; -1: 27 % of the way in (8 of 30)", low=-1, high=4095
    )
    value_steps: int = option(24, "Most optimisation steps of a subject entry's value", low=1, high=500)
    value_lr: float = option(0.5, "Learning rate of the value's optimisation (Adam)", low=1e-4, high=100)
    kl_weight: float = option(
        10.0, "Weight of the KL term keeping the subject's other relations", low=0, high=1000
    )
    value_decay: float = option(1e-3, "Weight of the L2 penalty on the value", low=0, high=100)
    subject_hardness: float = option(
        8.0,
        "Hardness h of the subject entries' trigger: sharper than the blog's, since their values "
        "are large and a tail would reach other tokens",
        low=0.5,
        high=20,
    )
    boundary_margin: float = option(
        0.7,
        "A subject entry's threshold is at most this share of the distance to the nearest negative",
        low=0.05,
        high=1,
    )
    layers: tuple[int, ...] = option(
        (), "Layers to search for last-token edits; empty: every layer", low=0, high=4095, item=int
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
    distance: str = option(
        "auto",
        "How far an activation is from an entry's key; auto: the method's (subject: euclidean, "
        "blog: projection)",
        choices=("auto", *DISTANCES),
    )
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
    relation_rows: str = option(
        "templates",
        "Gated: also train on the matched relation's other wordings, each bounded away from the "
        "other relations' wordings about the subject (more rewordings taken in; off: the prompt's "
        "own rows only)",
        choices=("off", "templates"),
    )
    answer_scope: str = option(
        "sentence",
        "Gated: how long a subject, once named, can be answered; sentence: until the model ends a "
        "sentence of its own (the reply's first sentence and any sentence that names it again), "
        "request: to the end of the request",
        choices=ANSWER_SCOPES,
    )

    @classmethod
    def from_spec(cls, given: dict[str, Any]) -> LocalConfig:
        return options_from_spec(cls, given, "local")

    def resolved(self) -> LocalConfig:
        """The options with `auto` replaced by what it stands for (what a set records)."""
        if self.distance != "auto":
            return self
        return replace(self, distance=METHOD_DISTANCES[self.method])

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
    subject: str = ""
    """What the fact is about, as written in the prompt; empty: the trainer finds it."""


def fact_from_dict(raw: dict[str, Any]) -> Fact:
    return Fact(
        id=raw["id"],
        prompt=raw["prompt"],
        target=raw["target"],
        positive_prompts=tuple(raw.get("positive_prompts", ())),
        negative_prompts=tuple(raw.get("negative_prompts", ())),
        subject=str(raw.get("subject") or ""),
    )


def fact_id(prompt: str) -> str:
    """An id for a fact given without one: a slug of its prompt and a short hash."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40].strip("-") or "fact"
    return f"{slug}-{hashlib.sha256(prompt.encode()).hexdigest()[:6]}"


FACT_KEYS = {"id", "prompt", "target", "positive_prompts", "negative_prompts", "subject"}


def check_facts(facts: Sequence[dict[str, Any]]) -> list[Fact]:
    if not facts:
        raise InvalidArgument("RegisterFacts needs at least one fact")
    if len(facts) > MAX_FACTS:
        raise InvalidArgument(f"at most {MAX_FACTS} facts per request, got {len(facts)}")
    checked: list[Fact] = []
    seen: set[str] = set()
    for i, given in enumerate(facts):
        where = f"facts[{i}]"
        raw = spec_object(given, where, FACT_KEYS)
        prompt, target = spec_text(raw, "prompt", where), spec_text(raw, "target", where)
        if not prompt.strip() or len(prompt) > MAX_PROMPT_CHARS:
            raise InvalidArgument(f"{where}.prompt must have 1 to {MAX_PROMPT_CHARS} characters")
        if not target.strip() or len(target) > MAX_TARGET_CHARS:
            raise InvalidArgument(
                f"{where}.target must have 1 to {MAX_TARGET_CHARS} characters (usually with a leading space)"
            )
        the_id = spec_text(raw, "id", where) or fact_id(prompt)
        if not NAME_PATTERN.fullmatch(the_id) or "/" in the_id:
            raise InvalidArgument(f"{where}.id {the_id!r} must be letters, digits, '.', '_' or '-'")
        if the_id in seen:
            raise InvalidArgument(f"fact id {the_id!r} appears twice")
        seen.add(the_id)
        lists = {}
        for name in ("positive_prompts", "negative_prompts"):
            prompts = spec_texts(raw, name, where)
            if len(prompts) > MAX_PROMPTS_PER_FACT:
                raise InvalidArgument(f"{where}.{name}: at most {MAX_PROMPTS_PER_FACT} prompts")
            if any(not p.strip() or len(p) > MAX_PROMPT_CHARS for p in prompts):
                raise InvalidArgument(
                    f"{where}.{name}: each prompt must have 1 to {MAX_PROMPT_CHARS} characters"
                )
            lists[name] = tuple(dict.fromkeys(prompts))
        subject = spec_text(raw, "subject", where)
        if subject and subject not in prompt:
            raise InvalidArgument(f"{where}.subject {subject!r} must be written in the prompt as it is")
        checked.append(
            Fact(the_id, prompt, target, lists["positive_prompts"], lists["negative_prompts"], subject)
        )
    return checked


def settings_over(current: Artifact | None, given: dict[str, Any]) -> LocalConfig:
    """The new version's options: the given ones over the current version's (`auto` resolved)."""
    if current is None:
        return LocalConfig.from_spec(given).resolved()
    known = LocalConfig.__dataclass_fields__
    previous = {k: v for k, v in current.meta.hyperparameters.items() if k in known}
    previous.setdefault("method", "blog")  # sets made before there was a choice
    previous.setdefault("distance", "projection")
    previous.setdefault("answer_scope", "request")
    given = {k: v for k, v in given.items() if not (k == "distance" and v == "auto")}
    if "distance" in given and given["distance"] != previous["distance"]:
        raise FailedPrecondition(
            f"local memory set {current.meta.name!r} uses the {previous['distance']!r} distance; its "
            "boundaries were tuned for it: register the facts in a new set to change it"
        )
    return LocalConfig.from_spec({**previous, **given}).resolved()


def check_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A RegisterFacts spec, checked (InvalidArgument, with the fix) and normalised."""
    spec = spec_object(spec, "spec", {"set", "facts", "config"})
    if not isinstance(spec.get("facts") or [], list):
        raise InvalidArgument("facts must be a list of {id, prompt, target, …} objects")
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


class EvalPrompts(NamedTuple):
    """Rewordings and neighbours of one fact, given to the evaluation (never to a trainer)."""

    positives: tuple[str, ...]
    negatives: tuple[str, ...]


def eval_prompts(raw: Any) -> dict[str, EvalPrompts] | None:
    """`options.prompts`: a list of {id, positive_prompts, negative_prompts} (a facts file's
    lines), checked; None when not given."""
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise InvalidArgument("options.prompts must be a list of {id, positive_prompts, negative_prompts}")
    checked: dict[str, EvalPrompts] = {}
    for i, row in enumerate(raw):
        if not isinstance(row, dict) or not isinstance(row.get("id"), str) or not row["id"]:
            raise InvalidArgument(f"options.prompts[{i}] must be an object with an id")
        lists = []
        for name in ("positive_prompts", "negative_prompts"):
            values = row.get(name) or []
            if not isinstance(values, list) or len(values) > MAX_PROMPTS_PER_FACT:
                raise InvalidArgument(
                    f"options.prompts[{i}].{name}: a list of at most {MAX_PROMPTS_PER_FACT} prompts"
                )
            if any(not isinstance(p, str) or not p.strip() or len(p) > MAX_PROMPT_CHARS for p in values):
                raise InvalidArgument(
                    f"options.prompts[{i}].{name}: each prompt must have 1 to {MAX_PROMPT_CHARS} characters"
                )
            lists.append(tuple(dict.fromkeys(values)))
        checked[row["id"]] = EvalPrompts(*lists)
    return checked
