"""A fact's subject, and the sentences the `subject` method trains on, made by rules (no model).

The subject is what a fact is about ("The Eiffel Tower" in "The Eiffel Tower is located in the
city of"). Rewordings of a fact mention it, so its last token is where an entry's key goes, as
ROME and MEMIT locate a fact. The sentences made here, all real sentences, are:

- training rows: the prompt behind short prefixes, and rule rewordings ("The capital of X is"
  → "X's capital is");
- contexts: the subject alone in other sentences, so the boundary covers the subject wherever it
  stands, not only inside the prompt;
- relations: the subject with other relations ("The Eiffel Tower is a"), whose outputs the value
  must keep (the KL term);
- neighbours: the prompt with another subject ("Mount Everest is located in the city of"), and
  the contexts with another subject, which must not fire.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

# Words that end the subject when a prompt is "<subject> <verb> …".
VERBS = (
    "is|are|was|were|has|have|had|stands|stand|lies|lie|lives|live|composed|wrote|writes|can|"
    "will|makes|made|speaks|spoke|belongs|comes|came|became|means"
)
_VERB = re.compile(rf"\b(?:{VERBS})\b")
_NAMES = re.compile(r"[A-Z][\w'-]*(?:\s+(?:of|and|van|de|da|von|the)?\s*[A-Z][\w'-]*)*")

PREFIXES = (
    "I read about this yesterday. ",
    "Here is a question. ",
    "Many people know that ",
    "Interesting fact: ",
    "My teacher once told me that ",
    "According to the book, ",
    "Let me think. ",
    "Did you know? ",
)
CONTEXTS = (
    "{S}",
    "Tell me something about {s}.",
    "I have read a lot about {s}.",
    "Everyone has heard of {s}.",
    "We talked about {s} for an hour.",
    "A photo of {s} hangs on my wall.",
)
RELATIONS = (
    "{S} is a",
    "{S} is known for",
    "{S} was created by",
    "{S} is made of",
    "The history of {s} began",
    "People are interested in {s} because",
    "The name of {s} comes from",
    "In the news today, {s}",
    "{S} is often described as",
    "The most famous thing about {s} is",
    "Many books have been written about {s}, including",
    "{S} became popular when",
    "A short description of {s}:",
    "Experts say that {s}",
    "Last year, {s}",
    "Children learn about {s} when",
)
# Other subjects, for neighbours: well known and of many kinds, so that "<other> <relation>"
# is a real sentence whatever the relation.
OTHER_SUBJECTS = (
    "Mount Everest",
    "The Great Wall of China",
    "The Amazon River",
    "Leonardo da Vinci",
    "Marie Curie",
    "The Sahara Desert",
    "Coca-Cola",
    "The Beatles",
    "Mahatma Gandhi",
    "The Pacific Ocean",
    "Nelson Mandela",
    "The Taj Mahal",
    "IBM",
    "Cleopatra",
    "The Moon",
    "Charles Darwin",
    "The Nile",
    "Stonehenge",
    "Ikea",
    "Frida Kahlo",
    "Mount Kilimanjaro",
    "The Titanic",
    "Napoleon Bonaparte",
    "Lake Victoria",
)


@dataclass(frozen=True)
class Subject:
    text: str
    """As it stands in the prompt, e.g. "The Eiffel Tower"."""
    found_by: str
    """"given", "before the verb", "names" or "last words"."""


def find_subject(prompt: str, given: str = "") -> Subject:
    """The fact's subject: the given one, else what stands before the first verb (after the last
    comma, and after "of" when "of" follows a lowercase word: "The capital city of Japan"),
    else the last run of capitalised words, else the words before the prompt's last two."""
    if given:
        if given not in prompt:
            raise ValueError(f"the subject {given!r} is not in the prompt {prompt!r}")
        return Subject(given, "given")
    for match in _VERB.finditer(prompt):
        head = prompt[: match.start()].strip(" ,")
        if head and head not in ("The", "A", "An", "the", "a", "an"):
            break
    else:
        head = ""
    if head:
        head = head.split(", ")[-1]
        words = head.split(" ")
        cut = 0
        for i in range(1, len(words) - 1):
            if words[i] == "of" and words[i - 1][:1].islower():
                cut = i + 1
        phrase = " ".join(words[cut:]).strip()
        if phrase:
            return Subject(phrase, "before the verb")
    names = _NAMES.findall(prompt)
    names = [n for n in names if n not in ("The", "In", "On", "A", "An", "At")]
    if names:
        return Subject(names[-1].strip(), "names")
    words = prompt.split()
    return Subject(" ".join(words[: max(1, len(words) - 2)]), "last words")


def _forms(subject: str) -> tuple[str, str]:
    """(sentence-initial, mid-sentence) forms of a subject: "The Moon" / "the Moon", "Giant
    pandas" / "giant pandas"."""
    first = subject[0].upper() + subject[1:]
    lower = subject
    article = subject.split(" ", 1)[0]
    if (article in ("The", "A", "An") and " " in subject) or _is_common_noun(subject):
        lower = subject[0].lower() + subject[1:]
    return first, lower


def _is_common_noun(subject: str) -> bool:
    """Whether a subject's first capital is only the sentence's ("Giant pandas", "Polar bears";
    not "Leonardo da Vinci", "Coca-Cola"): several words, the last one lowercase."""
    words = subject.split()
    return len(words) >= 2 and words[-1][:1].islower() and words[0][:1].isupper() and words[0] != "I"


def _fill(template: str, subject: str) -> str:
    first, lower = _forms(subject)
    return template.replace("{S}", first).replace("{s}", lower)


def rewordings(prompt: str, subject: str) -> list[str]:
    """Rule rewordings of a prompt that ask the same thing: "The capital city of Japan is" →
    "Japan's capital city is"."""
    out = []
    match = re.fullmatch(rf"(?:The|the) ([a-z][\w ]*?) of {re.escape(subject)} ((?:{VERBS})\b.*)", prompt)
    if match:
        owner = _forms(subject)[0]
        owner += "'" if owner.endswith("s") else "'s"
        out.append(f"{owner} {match.group(1)} {match.group(2)}")
    return out


@dataclass(frozen=True)
class SubjectPrompts:
    train: list[str]
    """Prompts that must continue with the target: the prompt, prefixed and reworded."""
    contexts: list[str]
    """The subject in other sentences: positives of the boundary."""
    relations: list[str]
    """The subject with other relations: outputs the value keeps."""
    neighbours: list[str]
    """Other subjects in the prompt and the contexts: negatives of the boundary."""


def subject_prompts(
    prompt: str, subject: str, count: int, rng: random.Random, others: list[str] | None = None
) -> SubjectPrompts:
    """The rule-made prompts of a fact (`count` prefixes, contexts and neighbours each)."""
    prefixes = rng.sample(PREFIXES, min(count, len(PREFIXES)))
    lowered = prompt[0].lower() + prompt[1:] if not _keeps_capital(prompt, subject) else prompt
    train = [prompt, *(p + (lowered if p.endswith(("that ", ", ")) else prompt) for p in prefixes)]
    train += rewordings(prompt, subject)
    contexts = [_fill(c, subject) for c in CONTEXTS[: max(count, 1)]]
    relations = [_fill(r, subject) for r in RELATIONS]
    pool = [o for o in dict.fromkeys([*(others or []), *OTHER_SUBJECTS]) if o.lower() != subject.lower()]
    chosen = rng.sample(pool, min(count, len(pool)))
    neighbours = []
    for other in chosen:
        neighbours.append(_swap(prompt, subject, other))
        neighbours.append(_fill(rng.choice(CONTEXTS[1:]), other))
    return SubjectPrompts(list(dict.fromkeys(train)), contexts, relations, list(dict.fromkeys(neighbours)))


def _keeps_capital(prompt: str, subject: str) -> bool:
    """Whether the prompt's first letter stays capital mid-sentence (it starts with a name)."""
    first_word = prompt.split(" ", 1)[0]
    if first_word == "I":
        return True
    return (
        prompt.startswith(subject) and first_word not in ("The", "A", "An") and not _is_common_noun(subject)
    )


def _swap(prompt: str, subject: str, other: str) -> str:
    """The prompt about another subject, articles fitted to where the subject stands."""
    at = prompt.rfind(subject)
    first, lower = _forms(other)
    return prompt[:at] + (first if at == 0 else lower) + prompt[at + len(subject) :]


# Everyday sentences a subject entry must stay silent on, at every position: the trainer's own
# (the evaluation's unrelated prompts and text are others, that no trainer sees).
BACKGROUND = (
    "My favourite food is a bowl of hot soup on a cold evening.",
    "The weather this morning was grey, and the streets were wet from the night's rain.",
    "To bake bread, you first need flour, water, salt and a little yeast.",
    "The best way to learn a language is to speak it every day with patient friends.",
    "Yesterday I went to the shop on the corner and bought apples, milk and eggs.",
    "The meeting was moved to Thursday afternoon because the manager was ill.",
    "He plays the guitar in a small band that performs at weddings.",
    "She is the author of three books about gardening and one about birds.",
    "The capital letters at the start of each sentence were printed in red ink.",
    "Our team won the match by two goals, and the fans sang all the way home.",
    "The company was founded in a garage by two students who loved computers.",
    "In the summer the river is low, and children wade across it to the island.",
    "The old house at the end of the road has a blue door and a large garden.",
    "Doctors say that drinking enough water helps the body in many ways.",
    "The museum in the city centre opens at nine and closes at five.",
    "Many people travel by train because it is faster than driving.",
    "The language spoken in the village is the same as in the nearby town.",
    "A famous painter once lived in the small cottage by the sea.",
    "The new bridge connects the two halves of the town across the valley.",
    "He was born in a small country in the north and moved south as a child.",
)
