"""Other ways a text names a fact's subject, made by rules, for the `gated` method's detectors.

A rewording seldom repeats the subject word for word: "The play Romeo and Juliet" is asked about
as "Romeo and Juliet", "Wolfgang Amadeus Mozart" as "Mozart", "Japan" as "the Japanese
government". Each form gets sentences that mention it (the detector's positives) and sentences
that name something else the same way (its negatives: another country's adjective, another person
with the same surname), so its boundary is drawn between the two as the subject's own is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from memserve.kinds.local.subject import CONTEXTS, _fill

# Countries and their adjectives: "the Japanese government" names Japan.
DEMONYMS = {
    "Afghanistan": "Afghan", "Albania": "Albanian", "Algeria": "Algerian", "Argentina": "Argentine",
    "Armenia": "Armenian", "Australia": "Australian", "Austria": "Austrian", "Belgium": "Belgian",
    "Bolivia": "Bolivian", "Brazil": "Brazilian", "Bulgaria": "Bulgarian", "Cambodia": "Cambodian",
    "Canada": "Canadian", "Chile": "Chilean", "China": "Chinese", "Colombia": "Colombian",
    "Croatia": "Croatian", "Cuba": "Cuban", "Denmark": "Danish", "Ecuador": "Ecuadorian",
    "Egypt": "Egyptian", "England": "English", "Estonia": "Estonian", "Ethiopia": "Ethiopian",
    "Finland": "Finnish", "France": "French", "Germany": "German", "Ghana": "Ghanaian",
    "Greece": "Greek", "Hungary": "Hungarian", "Iceland": "Icelandic", "India": "Indian",
    "Indonesia": "Indonesian", "Iran": "Iranian", "Iraq": "Iraqi", "Ireland": "Irish",
    "Israel": "Israeli", "Italy": "Italian", "Jamaica": "Jamaican", "Japan": "Japanese",
    "Kenya": "Kenyan", "Korea": "Korean", "Latvia": "Latvian", "Lebanon": "Lebanese",
    "Lithuania": "Lithuanian", "Malaysia": "Malaysian", "Mexico": "Mexican", "Mongolia": "Mongolian",
    "Morocco": "Moroccan", "Nepal": "Nepalese", "the Netherlands": "Dutch", "New Zealand": "New Zealand",
    "Nigeria": "Nigerian", "Norway": "Norwegian", "Pakistan": "Pakistani", "Peru": "Peruvian",
    "the Philippines": "Filipino", "Poland": "Polish", "Portugal": "Portuguese", "Romania": "Romanian",
    "Russia": "Russian", "Saudi Arabia": "Saudi", "Scotland": "Scottish", "Serbia": "Serbian",
    "Singapore": "Singaporean", "Slovakia": "Slovak", "South Africa": "South African",
    "Spain": "Spanish", "Sweden": "Swedish", "Switzerland": "Swiss", "Syria": "Syrian",
    "Thailand": "Thai", "Turkey": "Turkish", "Ukraine": "Ukrainian",
    "the United Kingdom": "British", "the United States": "American", "Vietnam": "Vietnamese",
    "Wales": "Welsh",
}  # fmt: skip
DEMONYM_SENTENCES = (
    "The {s} government",
    "{S} people",
    "I like {s} food.",
    "The {s} capital",
    "a famous {s} city",
)
# First names for people who share a surname with the subject (the surname's negatives).
OTHER_FIRST_NAMES = ("Maria", "Thomas", "Aiko", "Rahul")
SURNAME_SENTENCES = (*CONTEXTS[:3], "The famous {s}", "{S} is known for", "{S}, the")
# Last words that make a name a place or a thing, not a person: no surname form.
NOT_SURNAMES = {
    "bridge", "building", "castle", "cathedral", "church", "company", "desert", "falls", "gate",
    "house", "island", "lake", "mountain", "museum", "ocean", "palace", "park", "prize", "river",
    "sea", "square", "station", "street", "tower", "university", "valley", "wall",
}  # fmt: skip
# Kinds of building a name is often said without ("the Golden Gate", "the Louvre").
KINDS_LEFT_OUT = {"bridge", "building", "cathedral", "museum", "palace", "stadium"}
_PERSON = re.compile(r"[A-Z][a-zà-ÿ'-]+(?: (?:van|von|de|da|del|di|la|le) )?(?: ?[A-Z][a-zà-ÿA-Z'-]+){1,2}")
_NAME_RUN = re.compile(r"\b[A-Z][\w'-]*(?:(?: and | of | de | van | the | )[A-Z][\w'-]*)*")


@dataclass(frozen=True)
class SubjectForm:
    text: str
    """The form as texts write it ("Mozart", "Japanese")."""
    how: str
    """"name inside", "without its kind", "surname" or "adjective"."""
    sentences: list[str]
    """Sentences that mention it."""
    others: list[str]
    """Sentences that name something else the same way: the form's negatives."""


def subject_forms(subject: str) -> list[SubjectForm]:
    """The other forms of `subject` that the rules know (none for most subjects)."""
    forms: list[SubjectForm] = []
    bare = _without_article(subject)
    # The name inside a described subject: "The play Romeo and Juliet" → "Romeo and Juliet".
    # A single capitalised word that starts the subject is the sentence's capital ("Polar bears").
    runs = [
        r.group()
        for r in _NAME_RUN.finditer(bare)
        if len(r.group()) >= 2 and (r.start() > 0 or " " in r.group()) and r.group() != bare
    ]
    if runs:
        forms.append(SubjectForm(runs[-1], "name inside", [_fill(c, runs[-1]) for c in CONTEXTS[:4]], []))
    # A building without its kind: "The Golden Gate Bridge" → "the Golden Gate". Nothing can be
    # its negative: a causal model has read the same words at the name's last token either way.
    words = subject.split()
    if (
        bare != subject
        and len(words) >= 3
        and words[-1].lower() in KINDS_LEFT_OUT
        and words[-2][:1].isupper()
        and " ".join(words[1:-1]).lower() not in NOT_SURNAMES  # "The Tower Bridge" is no Tower
    ):
        short = " ".join(words[:-1])
        forms.append(SubjectForm(short, "without its kind", [_fill(c, short) for c in CONTEXTS[:4]], []))
    # A person's surname: "Wolfgang Amadeus Mozart" → "Mozart" (a subject with an article is a
    # thing: "The Mona Lisa" is not a Lisa).
    name = subject
    if bare == subject and _PERSON.fullmatch(name) and " " in name:
        surname = name.split()[-1]
        if len(surname) >= 4 and surname.lower() not in NOT_SURNAMES:
            sentences = [_fill(t, surname) for t in SURNAME_SENTENCES]
            namesakes = [f"{first} {surname}" for first in OTHER_FIRST_NAMES]
            others = [_fill(CONTEXTS[i % 3], person) for i, person in enumerate(namesakes)]
            forms.append(SubjectForm(surname, "surname", sentences, others))
    # A country's adjective: "Japan" → "Japanese".
    for country, adjective in DEMONYMS.items():
        if bare.lower() == _without_article(country).lower() and adjective.lower() != bare.lower():
            sentences = [_fill(t, adjective) for t in DEMONYM_SENTENCES]
            neighbours = [a for c, a in DEMONYMS.items() if a != adjective][:: len(DEMONYMS) // 4][:4]
            others = [_fill(DEMONYM_SENTENCES[i % 2], a) for i, a in enumerate(neighbours)]
            forms.append(SubjectForm(adjective, "adjective", sentences, others))
            break
    return forms


def _without_article(text: str) -> str:
    first, _, rest = text.partition(" ")
    return rest if first in ("The", "the", "A", "a", "An", "an") and rest else text
