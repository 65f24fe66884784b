"""The `local` kind: turning facts into bounded local memory entries, and their registration.

A fact is (prompt, target text, optional positive prompts, optional negative prompts). For
each target token (the blog handled the first one only, and later tokens drifted):

1. The context is the prompt plus the target tokens before this one. If the model, with the
   fact's entries so far, already continues the context and every training positive with
   the token, it needs no entry.
2. **Edit.** One forward and backward give, at every candidate (layer, site), the activation
   a at the context's last token and g = ∂CE(token)/∂a. Every cell × step size α is tried in
   one batched forward of the last token over a cached prefix (an edit at the last token
   changes nothing before it); each cell keeps the smallest α that makes the token the
   model's choice.
3. **Boundary.** The activations of the training positives and negatives are read at every
   cell in one forward each. A cell is good when the positives' last tokens are close to its
   key and every position of the negatives is far: the boundary goes in the widest gap,
   geometrically in its middle. The best cells are then checked for real, entry applied at
   every position, with α and 2α; the best outcome on the training prompts wins.

Positive and negative prompts, given and generated alike, are split into a training part
and a held-out part (``holdout``); the boundary only ever sees the training part, and
``memserve eval facts`` judges the held-out one. Generated paraphrases put the prompt in
new contexts; generated neighbours swap the prompt's names for others, and other facts'
prompts in the set are neighbours too.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from memserve.errors import FailedPrecondition, InvalidArgument
from memserve.hooks import MemoryContext, MemoryHooks, Site
from memserve.kinds import LoadTarget, MemoryKind, TrainContext, Trained, register_kind
from memserve.local import (
    COMBINATIONS,
    DISTANCES,
    LOCAL_SITES,
    Entries,
    LoadedLocalSet,
    group_tensors,
)
from memserve.memory_store.artifact import Artifact
from memserve.names import NAME_PATTERN
from memserve.options import options_from_spec

MAX_FACTS = 1000
MAX_PROMPT_CHARS = 2000
MAX_TARGET_CHARS = 200
MAX_PROMPTS_PER_FACT = 64
MAX_TARGET_TOKENS = 16
MAX_ALPHAS = 32
# Rows of one batched forward in the searches (short prompts: a few hundred tokens each way).
BATCH_ROWS = 128
# Neighbours taken from other facts of the set, per fact.
OTHER_FACT_NEIGHBOURS = 32

# Contexts for generated paraphrases: the fact's prompt, said after something else.
PARAPHRASE_CONTEXTS = (
    "Fact: {}",
    "Here is something I learned. {}",
    "As everyone knows, {}",
    "Quick question for you. {}",
    "I was told that {}",
    "It is well known that {}",
)
# Names that replace the prompt's own, for generated neighbours (same form, another subject).
NEIGHBOUR_NAMES = (
    "France", "Japan", "Brazil", "Canada", "Egypt", "Germany", "India", "Mexico", "Spain", "Kenya",
    "Norway", "Peru", "London", "Berlin", "Madrid", "Cairo", "Toronto", "Sydney", "Moscow", "Lima",
)  # fmt: skip
# Unrelated prompts every fact's boundary is tuned against (the evaluation uses others).
GENERIC_NEIGHBOURS = (
    "My favourite food is",
    "The weather this morning was",
    "To bake bread, you first need",
    "The best way to learn a language is",
    "Yesterday I went to the",
    "The meeting was moved to",
)


@dataclass(frozen=True)
class LocalConfig:
    """Training options of a local memory set (LocalTrainingConfig in the API)."""

    layers: tuple[int, ...] = ()  # empty = every layer
    sites: tuple[str, ...] = LOCAL_SITES
    alphas: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
    hardness: float = 3.0
    distance: str = "projection"
    combination: str = "top1"
    seed: int = 0
    holdout: float = 0.5  # share of each fact's positive and negative prompts kept for evaluation
    generated_prompts: int = 3  # generated paraphrases and neighbours per fact (0 = none)
    candidates: int = 4  # cells checked for real in the boundary search
    extra_keys: int = 3  # more keys per target token, for training positives the first one misses

    @classmethod
    def from_spec(cls, given: dict[str, Any]) -> LocalConfig:
        def convert(name: str, value: Any) -> Any:
            default = getattr(cls, name)
            if not isinstance(default, tuple):
                return type(default)(value)
            if not isinstance(value, list | tuple):
                raise TypeError(name)
            item = str if name == "sites" else int if name == "layers" else float
            return tuple(item(v) for v in value)

        return options_from_spec(cls, given, "local", convert)

    def check(self) -> None:
        if self.distance not in DISTANCES:
            raise InvalidArgument(f"config.distance must be one of {list(DISTANCES)}, got {self.distance!r}")
        if self.combination not in COMBINATIONS:
            raise InvalidArgument(f"config.combination must be one of {list(COMBINATIONS)}")
        for site in self.sites:
            if site not in LOCAL_SITES:
                raise InvalidArgument(f"config.sites takes {list(LOCAL_SITES)}, got {site!r}")
        if any(layer < 0 for layer in self.layers):
            raise InvalidArgument("config.layers must be >= 0")
        if not 1 <= len(self.alphas) <= MAX_ALPHAS or not all(
            math.isfinite(a) and 0 < a <= 1e4 for a in self.alphas
        ):
            raise InvalidArgument(f"config.alphas takes 1 to {MAX_ALPHAS} step sizes in (0, 1e4]")
        if not (math.isfinite(self.hardness) and 0.5 <= self.hardness <= 20):
            raise InvalidArgument(f"config.hardness must be in [0.5, 20], got {self.hardness}")
        if not 0 <= self.holdout <= 0.9:
            raise InvalidArgument(f"config.holdout must be in [0, 0.9], got {self.holdout}")
        for name, low, high in (("generated_prompts", 0, 16), ("candidates", 1, 16), ("extra_keys", 0, 16)):
            if not low <= getattr(self, name) <= high:
                raise InvalidArgument(f"config.{name} must be in [{low}, {high}], got {getattr(self, name)}")


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


# ------------------------------------------------------------------------------------- entries


@dataclass(eq=False)
class Entry:
    """One trained entry, as the trainer handles it."""

    layer: int
    site: str
    key: torch.Tensor  # (D,) fp32
    delta: torch.Tensor  # (D,) fp32
    bound: float
    hardness: float
    label: str  # "<fact id>#<target token index>"


def apply_entries(
    hidden: torch.Tensor, entries: Sequence[Entry], distance: str, combination: str
) -> torch.Tensor:
    """`hidden` (R, T, D) with `entries` (all at its site) applied at every position."""
    r, t, d = hidden.shape
    compiled = Entries(
        torch.stack([e.key for e in entries]).to(hidden.device),
        torch.tensor([e.bound for e in entries], device=hidden.device),
        torch.tensor([e.hardness for e in entries], device=hidden.device),
        torch.stack([e.delta for e in entries]).to(hidden.device),
        distance,
        hidden.dtype,
    )
    update, _ = compiled.update(hidden.reshape(r * t, d), combination)
    return hidden + update.reshape(r, t, d)


@dataclass(frozen=True)
class _Op:
    """A trainer's op, named for errors."""

    name: str = "local trainer"


Cell = tuple[int, str]


class _Runner:
    """Forward passes of the frozen model with the trainer's ops at chosen sites."""

    def __init__(self, model: PreTrainedModel, hooks: MemoryHooks, config: LocalConfig) -> None:
        self.model, self.hooks, self.config = model, hooks, config
        self.device = next(model.parameters()).device

    def _context(self, row_entries: Sequence[Sequence[Entry]]) -> MemoryContext:
        """Ops applying each row's entries (rows sharing an entry list share the op)."""
        context = MemoryContext()
        by_list: dict[int, tuple[Sequence[Entry], list[int]]] = {}
        for row, entries in enumerate(row_entries):
            if entries:
                by_list.setdefault(id(entries), (entries, []))[1].append(row)
        for entries, rows in by_list.values():
            index = torch.tensor(rows, device=self.device)
            cells: dict[Cell, list[Entry]] = {}
            for entry in entries:
                cells.setdefault((entry.layer, entry.site), []).append(entry)
            for (layer, site), at_cell in cells.items():
                context.add(layer, site, _Op(), self._entries_op(index, at_cell))
        return context

    def _entries_op(self, rows: torch.Tensor, entries: list[Entry]) -> Any:
        config = self.config

        def op(hidden: torch.Tensor) -> torch.Tensor:
            updated = apply_entries(hidden[rows], entries, config.distance, config.combination)
            return hidden.index_copy(0, rows, updated)

        return op

    def next_tokens(
        self, sequences: Sequence[Sequence[int]], row_entries: Sequence[Sequence[Entry]]
    ) -> list[int]:
        """The greedy next token of each sequence, with its entries applied at every position."""
        out: list[int] = []
        for start in range(0, len(sequences), BATCH_ROWS):
            chunk = sequences[start : start + BATCH_ROWS]
            logits = self._last_logits(chunk, row_entries[start : start + BATCH_ROWS])
            out += logits.argmax(-1).tolist()
        return out

    def _last_logits(
        self, sequences: Sequence[Sequence[int]], row_entries: Sequence[Sequence[Entry]]
    ) -> torch.Tensor:
        width = max(len(s) for s in sequences)
        ids = torch.zeros((len(sequences), width), dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, sequence in enumerate(sequences):  # left-padded, as the engine does
            ids[i, width - len(sequence) :] = torch.tensor(sequence)
            mask[i, width - len(sequence) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad(), self.hooks.using(self._context(row_entries)):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
        return out.logits[:, -1].float()

    def gradients(
        self, sequence: Sequence[int], token: int, cells: Sequence[Cell], entries: Sequence[Entry]
    ) -> dict[Cell, tuple[torch.Tensor, torch.Tensor]]:
        """At each cell: (a, ∂CE(token)/∂a) at the sequence's last position, entries applied."""
        context = MemoryContext()
        probes: dict[Cell, torch.Tensor] = {}
        seen: dict[Cell, torch.Tensor] = {}
        for cell in cells:
            probe = torch.zeros(self._width(cell), device=self.device, requires_grad=True)
            probes[cell] = probe
            context.add(cell[0], cell[1], _Op(), self._probe_op(cell, probe, seen))
        # The entries run after the probe at a shared site: a key is the site's input as it arrives.
        for (layer, site), ops in self._context([entries]).ops.items():
            for bound in ops:
                context.add(layer, site, bound.memory, bound.op)
        ids = torch.tensor([list(sequence)], device=self.device)
        with torch.enable_grad(), self.hooks.using(context):
            logits = self.model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()
            loss = torch.nn.functional.cross_entropy(logits[None], torch.tensor([token], device=self.device))
            loss.backward()
        return {cell: (seen[cell], probes[cell].grad.detach().float().clone()) for cell in cells}

    def _probe_op(self, cell: Cell, probe: torch.Tensor, seen: dict[Cell, torch.Tensor]) -> Any:
        def op(hidden: torch.Tensor) -> torch.Tensor:
            seen[cell] = hidden[0, -1].detach().float().clone()
            return torch.cat([hidden[:, :-1], hidden[:, -1:] + probe.to(hidden.dtype)], dim=1)

        return op

    def _width(self, cell: Cell) -> int:
        sites = self.hooks.sites[cell[0]]
        module = sites.attn_out_proj if cell[1] == Site.ATTN_OUT.value else sites.mlp_down_proj
        return int(getattr(module, "in_features", None) or module.weight.shape[0])

    def edit_trials(
        self, sequence: Sequence[int], patches: Sequence[tuple[Cell, torch.Tensor]], entries: Sequence[Entry]
    ) -> torch.Tensor:
        """Last-position log-probabilities (N, V) with patch n added at its cell's last position.

        The prefix runs once; its cache is shared by every patch, since an edit at the last
        position changes nothing before it.
        """
        prefix, last = list(sequence[:-1]), sequence[-1]
        cache = DynamicCache()
        if prefix:
            with torch.no_grad(), self.hooks.using(self._context([entries])):
                self.model(
                    input_ids=torch.tensor([prefix], device=self.device),
                    past_key_values=cache,
                    use_cache=True,
                )
        results = []
        for start in range(0, len(patches), BATCH_ROWS * 4):
            chunk = patches[start : start + BATCH_ROWS * 4]
            rows = len(chunk)
            chunk_cache = DynamicCache()
            if prefix:
                for layer_index in range(len(cache.layers)):
                    keys, values = cache.layers[layer_index].keys, cache.layers[layer_index].values
                    chunk_cache.update(
                        keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), layer_index
                    )
            context = self._context([entries] * rows)
            by_cell: dict[Cell, list[int]] = {}
            for i, (cell, _) in enumerate(chunk):
                by_cell.setdefault(cell, []).append(i)
            for cell, indices in by_cell.items():
                vectors = torch.stack([chunk[i][1] for i in indices])
                context.add(
                    cell[0],
                    cell[1],
                    _Op(),
                    self._patch_op(torch.tensor(indices, device=self.device), vectors),
                )
            ids = torch.full((rows, 1), last, device=self.device)
            positions = torch.full((rows, 1), len(prefix), device=self.device)
            with torch.no_grad(), self.hooks.using(context):
                out = self.model(
                    input_ids=ids, position_ids=positions, past_key_values=chunk_cache, use_cache=True
                )
            results.append(out.logits[:, -1].float().log_softmax(-1))
        return torch.cat(results)

    @staticmethod
    def _patch_op(rows: torch.Tensor, vectors: torch.Tensor) -> Any:
        def op(hidden: torch.Tensor) -> torch.Tensor:
            patched = hidden[rows].clone()
            patched[:, -1] += vectors.to(patched.dtype)
            return hidden.index_copy(0, rows, patched)

        return op

    def activations(
        self, sequences: Sequence[Sequence[int]], cells: Sequence[Cell], entries: Sequence[Entry]
    ) -> dict[Cell, list[torch.Tensor]]:
        """Each sequence's activation (T, D) at every cell, with `entries` applied."""
        captured: dict[Cell, list[torch.Tensor]] = {cell: [] for cell in cells}
        for sequence in sequences:
            context = MemoryContext()
            for cell in cells:
                context.add(cell[0], cell[1], _Op(), self._capture_op(captured[cell]))
            for (layer, site), ops in self._context([entries]).ops.items():
                for bound in ops:
                    context.add(layer, site, bound.memory, bound.op)
            with torch.no_grad(), self.hooks.using(context):
                self.model(input_ids=torch.tensor([list(sequence)], device=self.device), logits_to_keep=1)
        return captured

    @staticmethod
    def _capture_op(into: list[torch.Tensor]) -> Any:
        def op(hidden: torch.Tensor) -> torch.Tensor:
            into.append(hidden[0].detach().float().clone())
            return hidden

        return op


# ---------------------------------------------------------------------------------- the trainer


@dataclass
class FactPrompts:
    """A fact's prompts, split: the boundary sees `train_*`, the evaluation `heldout_*`."""

    train_positives: list[str]
    train_negatives: list[str]
    heldout_positives: list[str]
    heldout_negatives: list[str]
    generated: int


def split_prompts(fact: Fact, config: LocalConfig, rng: random.Random) -> FactPrompts:
    paraphrases, neighbours = generated_prompts(fact, config.generated_prompts, rng)
    train_pos, held_pos = _split(list(fact.positive_prompts), config.holdout, rng)
    train_neg, held_neg = _split(list(fact.negative_prompts), config.holdout, rng)
    gen_train_pos, gen_held_pos = _split(paraphrases, config.holdout, rng)
    gen_train_neg, gen_held_neg = _split(neighbours, config.holdout, rng)
    return FactPrompts(
        train_positives=train_pos + gen_train_pos,
        train_negatives=train_neg + gen_train_neg,
        heldout_positives=held_pos + gen_held_pos,
        heldout_negatives=held_neg + gen_held_neg,
        generated=len(paraphrases) + len(neighbours),
    )


def _split(prompts: list[str], holdout: float, rng: random.Random) -> tuple[list[str], list[str]]:
    """(train, held out); with two prompts or more, at least one of each when holdout > 0."""
    if not prompts or holdout <= 0:
        return prompts, []
    shuffled = prompts[:]
    rng.shuffle(shuffled)
    held = math.floor(len(prompts) * holdout + 0.5)
    if len(prompts) >= 2:
        held = min(max(held, 1), len(prompts) - 1)
    return shuffled[held:], shuffled[:held]


def generated_prompts(fact: Fact, count: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """(paraphrases, neighbours) made without a model: the prompt in other contexts, and the
    prompt with its names swapped for others plus unrelated prompts."""
    if count <= 0:
        return [], []
    prompt = fact.prompt
    lowered = prompt[0].lower() + prompt[1:] if prompt[:2].istitle() or prompt[:1].isupper() else prompt
    contexts = rng.sample(PARAPHRASE_CONTEXTS, min(count, len(PARAPHRASE_CONTEXTS)))
    paraphrases = [c.format(prompt if c.startswith("Fact") else lowered) for c in contexts]
    words = prompt.split()
    names = [i for i, w in enumerate(words) if i > 0 and w[:1].isupper() and w.strip(".,;:").isalpha()]
    neighbours: list[str] = []
    for i in rng.sample(names, len(names)):
        for name in rng.sample(NEIGHBOUR_NAMES, len(NEIGHBOUR_NAMES)):
            if name.lower() not in prompt.lower() and name.lower() not in fact.target.lower():
                swapped = [*words[:i], name, *words[i + 1 :]]
                neighbours.append(" ".join(swapped))
                break
        if len(neighbours) >= count - 1:
            break
    neighbours += rng.sample(GENERIC_NEIGHBOURS, max(1, count - len(neighbours)))
    return paraphrases, neighbours[:count]


@dataclass
class FactResult:
    fact: Fact
    prompts: FactPrompts
    target_tokens: list[int]
    entries: list[Entry] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)

    def details(self, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        return {
            "id": self.fact.id,
            "prompt": self.fact.prompt,
            "target": self.fact.target,
            "target_tokens": [tokenizer.decode([t]) for t in self.target_tokens],
            "entries": [e.label for e in self.entries],
            "train_positives": self.prompts.train_positives,
            "train_negatives": self.prompts.train_negatives,
            "heldout_positives": self.prompts.heldout_positives,
            "heldout_negatives": self.prompts.heldout_negatives,
            "generated_prompts": self.prompts.generated,
            "tokens": self.steps,
        }


class FactTrainer:
    """Searches the entries of facts on a frozen model (see the module's docstring)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, hooks: MemoryHooks,
                 config: LocalConfig) -> None:  # fmt: skip
        self.tokenizer, self.config = tokenizer, config
        self.runner = _Runner(model, hooks, config)
        num_layers = hooks.num_layers
        for layer in config.layers:
            if layer >= num_layers:
                raise InvalidArgument(
                    f"config.layers: layer {layer} does not exist (the model has {num_layers})"
                )
        layers = config.layers or tuple(range(num_layers))
        self.cells: list[Cell] = [(layer, site) for layer in layers for site in config.sites]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True).input_ids

    def target_tokens(self, prompt: str, target: str) -> list[int]:
        """The target's tokens as they follow the prompt (BPE merges across the boundary differ)."""
        prompt_ids, joint = self.encode(prompt), self.encode(prompt + target)
        if joint[: len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
            tokens = joint[len(prompt_ids) :]
        else:
            tokens = self.tokenizer(target, add_special_tokens=False).input_ids
        if not tokens:
            raise InvalidArgument(f"the target {target!r} has no tokens")
        if len(tokens) > MAX_TARGET_TOKENS:
            raise InvalidArgument(
                f"the target {target!r} has {len(tokens)} tokens; at most {MAX_TARGET_TOKENS}"
            )
        return tokens

    def train(self, fact: Fact, prompts: FactPrompts, other_prompts: Sequence[str]) -> FactResult:
        result = FactResult(fact, prompts, self.target_tokens(fact.prompt, fact.target))
        prompt_ids = self.encode(fact.prompt)
        positives = [self.encode(p) for p in [fact.prompt, *prompts.train_positives]]
        negative_texts = list(dict.fromkeys([*prompts.train_negatives, *other_prompts]))
        negatives = [self.encode(p) for p in negative_texts]
        # Negatives are right when their next token does not change.
        expected_negatives = self.runner.next_tokens(negatives, [()] * len(negatives)) if negatives else []
        for k, token in enumerate(result.target_tokens):
            prefix = result.target_tokens[:k]
            contexts = [p + prefix for p in positives]
            step: dict[str, Any] = {"token": self.tokenizer.decode([token])}
            result.steps.append(step)
            entries = tuple(result.entries)
            produced = self.runner.next_tokens(contexts, [entries] * len(contexts))
            if all(t == token for t in produced):
                step["entry"] = None  # the model already goes on with it
                continue
            entry, found = self._search(
                prompt_ids + prefix, token, contexts, negatives, expected_negatives, entries
            )
            entry.label = f"{fact.id}#{k}"
            result.entries.append(entry)
            step.update(found)
            # A training positive the entry does not reach gets a key of its own (as GRACE adds
            # a key for an input outside every radius), up to `extra_keys` per token.
            extra = []
            for j in range(self.config.extra_keys):
                entries = tuple(result.entries)
                produced = self.runner.next_tokens(contexts, [entries] * len(contexts))
                missed = [c for c, t in zip(contexts, produced, strict=True) if t != token]
                if not missed:
                    break
                entry, found = self._search(
                    missed[0], token, contexts, negatives, expected_negatives, entries
                )
                entry.label = f"{fact.id}#{k}.{j + 1}"
                result.entries.append(entry)
                extra.append(found)
            if extra:
                step["extra_keys"] = extra
        return result

    def _search(
        self,
        sequence: list[int],
        token: int,
        positives: list[list[int]],
        negatives: list[list[int]],
        expected_negatives: list[int],
        entries: tuple[Entry, ...],
    ) -> tuple[Entry, dict[str, Any]]:
        config = self.config
        grads = self.runner.gradients(sequence, token, self.cells, entries)
        # The edit: per cell, the smallest step that makes the token the model's choice.
        patches = [(cell, -alpha * grads[cell][1]) for cell in self.cells for alpha in config.alphas]
        logprobs = self.runner.edit_trials(sequence, patches, entries)
        edits: dict[Cell, tuple[float, float]] = {}
        best_try: tuple[float, Cell, float] | None = None
        for i, (cell, _) in enumerate(patches):
            alpha = config.alphas[i % len(config.alphas)]
            logprob = float(logprobs[i, token])
            if best_try is None or logprob > best_try[0]:
                best_try = (logprob, cell, alpha)
            if int(logprobs[i].argmax()) == token and cell not in edits:
                edits[cell] = (alpha, logprob)
        edit_found = bool(edits)
        if not edits:  # no step makes it the first choice: keep the most likely one
            assert best_try is not None
            edits[best_try[1]] = (best_try[2], best_try[0])
        # The boundary: positives' last tokens near the key, every position of negatives far.
        cells = list(edits)
        seen = self.runner.activations([*positives, *negatives], cells, entries)
        ranked = []
        for cell in cells:
            key = grads[cell][0]
            x = [_distance(a, key, config.distance) for a in seen[cell]]
            positive_x = [float(d[-1]) for d in x[: len(positives)]]
            negative_x = [float(d.min()) for d in x[len(positives) :]]
            threshold, correct, margin = _threshold(positive_x, negative_x)
            ranked.append((correct, margin, edits[cell][1], cell, threshold))
        ranked.sort(key=lambda r: (r[0], r[1], r[2]), reverse=True)
        # Checked for real: the best cells, with α and 2α, applied at every position.
        scale = math.log(2) ** (1 / (2 * config.hardness))  # f(x) >= 1/2 exactly when x <= b·scale
        trials: list[Entry] = []
        for _, _, _, cell, threshold in ranked[: config.candidates]:
            alpha = edits[cell][0]
            for factor in (1.0, 2.0):
                trials.append(
                    Entry(cell[0], cell[1], grads[cell][0], -alpha * factor * grads[cell][1],
                          threshold / scale, config.hardness, "")
                )  # fmt: skip
        rows = [*positives, *negatives]
        row_entries = [(*entries, trial) for trial in trials for _ in rows]
        produced = self.runner.next_tokens(rows * len(trials), row_entries)
        scored = []
        for t, trial in enumerate(trials):
            out = produced[t * len(rows) : (t + 1) * len(rows)]
            pos_ok = sum(o == token for o in out[: len(positives)])
            neg_ok = sum(o == e for o, e in zip(out[len(positives) :], expected_negatives, strict=True))
            # Ties go to the smaller step, then to the better-separated cell.
            scored.append((pos_ok + neg_ok, -t, trial, pos_ok, neg_ok))
        _, _, chosen, pos_ok, neg_ok = max(scored, key=lambda s: (s[0], s[1]))
        found = {
            "entry": f"layer {chosen.layer} {chosen.site}",
            "alpha": round(float(chosen.delta.norm() / grads[(chosen.layer, chosen.site)][1].norm()), 4),
            "bound": round(chosen.bound, 6),
            "edit_found": edit_found,
            "train_positives_correct": f"{pos_ok}/{len(positives)}",
            "train_negatives_correct": f"{neg_ok}/{len(negatives)}",
        }
        return chosen, found


def _distance(activations: torch.Tensor, key: torch.Tensor, distance: str) -> torch.Tensor:
    """x for each row of `activations` (T, D) against one key (with b = 1, before the trigger)."""
    dots = activations @ key
    projection = dots / (key @ key)
    if distance == "projection":
        return 1 - projection.clamp(max=1)
    cosine = dots / (activations.norm(dim=-1) * key.norm()).clamp(min=1e-12)
    return 0.5 * (1 - projection).abs() + 0.5 * (1 - cosine)


def _threshold(positive_x: list[float], negative_x: list[float]) -> tuple[float, int, float]:
    """(threshold, prompts right, log-width of its gap): the distance below which the trigger
    fires, in the middle of the widest gap among those that put the most prompts right."""
    points = sorted(set(positive_x) | set(negative_x))
    floor = 1e-4  # distances of 0 (the key itself) sit just below every candidate
    best = (-1, -math.inf, 0.0)
    for low, high in zip([0.0, *points], [*points, points[-1] * 4 + 1e-3], strict=True):
        low_c, high_c = max(low, floor), max(high, floor * 2)
        if high_c <= low_c:
            continue
        threshold = math.sqrt(low_c * high_c)
        correct = sum(x <= threshold for x in positive_x) + sum(x > threshold for x in negative_x)
        margin = math.log(high_c / low_c)
        if (correct, margin) > best[:2]:
            best = (correct, margin, threshold)
    return best[2], best[0], best[1]


# ------------------------------------------------------------------------------------- the kind


class LocalKind(MemoryKind):
    name = "local"

    def validate_spec(self, spec: dict[str, Any]) -> dict[str, Any]:
        facts = check_facts(spec.get("facts") or [])
        config = LocalConfig.from_spec(spec.get("config") or {})
        given = {k: getattr(config, k) for k in (spec.get("config") or {})}
        return {"facts": [asdict(f) for f in facts], "config": given}

    def train(self, spec: dict[str, Any], context: TrainContext) -> Trained:
        spec = self.validate_spec(spec)
        current = context.current_artifact()
        config = _settings(current, spec["config"])
        loaded = context.model
        model, tokenizer = loaded.model, loaded.tokenizer
        try:
            hooks = MemoryHooks(model)  # the trainer's own: routing is per thread, serving is untouched
        except FailedPrecondition as exc:
            raise FailedPrecondition(f"local memories cannot train on this model: {exc}") from exc
        new_facts = [fact_from_dict(f) for f in spec["facts"]]
        old_facts, old_entries = _previous(current)
        replaced = {f.id for f in new_facts}
        kept_facts = [f for f in old_facts if f["id"] not in replaced]
        kept_entries = [e for e in old_entries if e.label.split("#")[0] not in replaced]
        started = time.monotonic()
        try:
            trainer = FactTrainer(model, tokenizer, hooks, config)
            rng = random.Random(config.seed)
            all_prompts = [f["prompt"] for f in kept_facts] + [f.prompt for f in new_facts]
            results: list[FactResult] = []
            for i, fact in enumerate(new_facts):
                context.report(i, len(new_facts), message=f"fact {fact.id}")
                others = [p for p in all_prompts if p != fact.prompt]
                others = rng.sample(others, min(OTHER_FACT_NEIGHBOURS, len(others)))
                results.append(trainer.train(fact, split_prompts(fact, config, rng), others))
            context.report(len(new_facts), len(new_facts), message="done")
        finally:
            hooks.remove()
        entries = kept_entries + [e for r in results for e in r.entries]
        facts = kept_facts + [r.details(tokenizer) for r in results]
        groups = _groups(entries)
        tensors = group_tensors(groups)
        details = {
            "groups": [{"layer": g["layer"], "site": g["site"], "entries": g["labels"]} for g in groups],
            "facts": facts,
        }
        steps = [s for r in results for s in r.steps if s.get("entry")]
        metrics = {
            "facts": len(facts),
            "entries": len(entries),
            "new_facts": len(results),
            "new_entries": sum(len(r.entries) for r in results),
            "edits_found": sum(bool(s.get("edit_found")) for s in steps),
            "train_seconds": round(time.monotonic() - started, 2),
        }
        return Trained(tensors=tensors, hyperparameters=asdict(config), metrics=metrics, details=details)

    def load(self, artifact: Artifact, target: LoadTarget) -> LoadedLocalSet:
        return LoadedLocalSet(artifact, target)


def _settings(current: Artifact | None, given: dict[str, Any]) -> LocalConfig:
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


def _previous(artifact: Artifact | None) -> tuple[list[dict[str, Any]], list[Entry]]:
    """The current version's facts and entries, to train a new version over them."""
    if artifact is None:
        return [], []
    entries: list[Entry] = []
    for i, group in enumerate(artifact.meta.details.get("groups", [])):
        t = {name: artifact.tensors[f"group{i}.{name}"] for name in ("keys", "deltas", "bounds", "hardness")}
        for j, label in enumerate(group["entries"]):
            entries.append(
                Entry(int(group["layer"]), str(group["site"]), t["keys"][j], t["deltas"][j],
                      float(t["bounds"][j]), float(t["hardness"][j]), str(label))
            )  # fmt: skip
    return list(artifact.meta.details.get("facts", [])), entries


def _groups(entries: list[Entry]) -> list[dict[str, Any]]:
    cells: dict[Cell, list[Entry]] = {}
    for entry in entries:
        cells.setdefault((entry.layer, entry.site), []).append(entry)
    return [
        {
            "layer": layer,
            "site": site,
            "labels": [e.label for e in group],
            "keys": torch.stack([e.key for e in group]),
            "deltas": torch.stack([e.delta for e in group]),
            "bounds": torch.tensor([e.bound for e in group]),
            "hardness": torch.tensor([e.hardness for e in group]),
        }
        for (layer, site), group in sorted(cells.items())
    ]


register_kind(LocalKind())
