"""The prompts a fact's boundary is tuned on: given and generated, split into training and held-out."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from memserve.kinds.local.config import Fact, LocalConfig

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
    "France",
    "Japan",
    "Brazil",
    "Canada",
    "Egypt",
    "Germany",
    "India",
    "Mexico",
    "Spain",
    "Kenya",
    "Norway",
    "Peru",
    "London",
    "Berlin",
    "Madrid",
    "Cairo",
    "Toronto",
    "Sydney",
    "Moscow",
    "Lima",
)


# Unrelated prompts every fact's boundary is tuned against (the evaluation uses others).
GENERIC_NEIGHBOURS = (
    "My favourite food is",
    "The weather this morning was",
    "To bake bread, you first need",
    "The best way to learn a language is",
    "Yesterday I went to the",
    "The meeting was moved to",
)


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
