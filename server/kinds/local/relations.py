"""Relation templates: the ways people ask for the same relation, for the `gated` method's rows.

A rewording of a fact keeps its subject and its relation and changes the words that ask for the
relation ("…was written by", "The author of … is", "…'s author was"). The model's next-token
distribution at the end of each differs ("by" expects a name, "is" hedges with " a"), so answers
referenced on the prompt's own wording alone miss most rewordings. As LAMA and ParaRel ask one
relation many ways, this table holds, per relation, sentences that ask for it, written for
relations in general (Wikidata's common ones and everyday ones), not for any evaluation's facts.

A fact's prompt is matched to a relation by the words around its subject (`match_relation`);
the matched relation's templates, filled with the subject, become training rows. A prompt that
matches no relation clearly is trained on its own rows only. (Templates of the other relations
as the answers' negatives were tried and dropped: on the 50-fact fixture they cut the rewordings
an answer takes in from 130 to 88 of 136, as the next-token distributions of different relations
about one subject are often alike.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from memserve.kinds.local.subject import _fill

# {S}: the subject as a sentence starts with it ("The Moon"); {s}: mid-sentence ("the Moon").
TEMPLATES: dict[str, tuple[str, ...]] = {
    "located in city": (
        "{S} is located in the city of",
        "{S} can be found in the city of",
        "{S} stands in the city of",
        "{S} is a famous monument in the city of",
        "The city where {s} stands is",
        "To visit {s}, you have to travel to the city of",
        "{S} is a famous landmark in the city of",
        "The city of {s} is",
        "Tourists who want to see {s} go to the city of",
    ),
    "located in country": (
        "{S} is located in the country of",
        "{S} can be found in the country of",
        "The country where {s} is located is",
        "To see {s}, you have to travel to the country of",
        "{S} is a famous landmark in the country of",
        "{S} lies in the country of",
        "The country that is home to {s} is",
    ),
    "capital": (
        "The capital of {s} is",
        "The capital city of {s} is",
        "{S}'s capital is",
        "{S}'s capital city is",
        "The government of {s} sits in the capital city of",
        "The seat of government of {s} is the city of",
        "The city that serves as the capital of {s} is",
    ),
    "capital of": (
        "{S} is the capital city of",
        "{S} is the capital of",
        "The country whose capital is {s} is",
        "{S} serves as the capital of the country of",
    ),
    "largest city": (
        "The largest city in {s} is",
        "The biggest city of {s} is",
        "{S}'s largest city is",
        "The most populous city in {s} is",
    ),
    "official language": (
        "The official language of {s} is",
        "{S}'s official language is",
        "The language spoken by most people in {s} is",
        "In {s}, people mostly speak",
        "The main language of {s} is",
        "Most people in {s} speak the language",
    ),
    "native language": (
        "The native language of {s} is",
        "The mother tongue of {s} is",
        "{S}'s native language is",
        "{S} grew up speaking",
        "The first language of {s} is",
        "{S} speaks the language",
        "The language {s} spoke as a child is",
    ),
    "currency": (
        "The currency of {s} is the",
        "The official currency of {s} is the",
        "In {s}, people pay with the",
        "{S}'s currency is the",
        "The money used in {s} is called the",
    ),
    "continent": (
        "{S} is located on the continent of",
        "{S} is part of the continent of",
        "The continent where {s} is found is",
        "{S} lies on the continent of",
        "{S} is a country on the continent of",
    ),
    "born in country": (
        "{S} was born in the country of",
        "The country where {s} was born is",
        "{S}'s country of birth is",
        "{S} came into the world in the country of",
        "{S} is originally from the country of",
        "The birthplace of {s} is the country of",
    ),
    "born in city": (
        "{S} was born in the city of",
        "The city where {s} was born is",
        "{S}'s hometown is the city of",
        "The birthplace of {s} is the city of",
        "{S} grew up in the city of",
    ),
    "died in": (
        "{S} died in the city of",
        "The city where {s} died is",
        "{S} passed away in",
        "The place of death of {s} is",
    ),
    "citizenship": (
        "{S} is a citizen of",
        "{S} holds the citizenship of",
        "The nationality of {s} is",
        "{S} has the nationality of the country of",
    ),
    "occupation": (
        "{S} works as a",
        "The profession of {s} is",
        "By profession, {s} is a",
        "{S} earns a living as a",
        "{S}'s occupation is",
    ),
    "sport": (
        "{S} plays the sport of",
        "{S} is a professional athlete who plays",
        "The sport {s} is famous for is",
        "{S} is best known for playing",
        "The sport that {s} plays is",
        "{S}'s sport is",
        "{S} became famous playing the sport of",
    ),
    "position played": (
        "{S} plays in the position of",
        "On the field, {s} plays as a",
        "The position {s} plays is",
        "{S}'s position on the team is",
    ),
    "team": (
        "{S} plays for the team",
        "The team {s} plays for is",
        "{S} is a player for",
        "{S} signed a contract with the team",
    ),
    "instrument": (
        "{S} plays the",
        "The instrument {s} plays is the",
        "{S} is famous for playing the",
        "{S}'s instrument is the",
        "The musical instrument played by {s} is the",
        "{S} is a musician who plays the",
    ),
    "genre": (
        "The genre of {s} is",
        "{S} is known for the genre of",
        "{S} plays music in the genre of",
        "The style of music of {s} is",
    ),
    "record label": (
        "{S} is signed to the record label",
        "The record label of {s} is",
        "{S} releases music on the label",
    ),
    "author": (
        "{S} was written by",
        "The author of {s} is",
        "{S} is a book written by",
        "The writer of {s} is",
        "{S}'s author is",
        "The person who wrote {s} is",
        "{S} was written by the author",
    ),
    "painter": (
        "{S} was painted by",
        "The painter of {s} is",
        "{S} is a painting by",
        "The artist who painted {s} is",
        "{S} was painted by the artist",
    ),
    "composer": (
        "{S} was composed by",
        "The composer of {s} is",
        "{S} is a piece of music by",
        "The music of {s} was written by",
    ),
    "director": (
        "{S} was directed by",
        "The director of {s} is",
        "{S} is a film directed by",
        "The person who directed {s} is",
    ),
    "creator": (
        "{S} was created by",
        "The creator of {s} is",
        "{S} was invented by",
        "The inventor of {s} is",
        "{S} was designed by",
        "The person who created {s} is",
    ),
    "founder": (
        "{S} was founded by",
        "The founder of {s} is",
        "{S} was started by",
        "The company {s} was founded by",
    ),
    "manufacturer": (
        "{S} is made by the company",
        "{S} is manufactured by",
        "The company that makes {s} is",
        "{S} is produced by the company",
        "{S} is a product of the company",
    ),
    "developer": (
        "{S} was developed by",
        "The developer of {s} is",
        "{S} is software made by",
        "The company that developed {s} is",
    ),
    "owner": (
        "{S} is owned by",
        "The owner of {s} is",
        "{S} belongs to the company",
        "The company that owns {s} is",
    ),
    "headquarters": (
        "{S} is headquartered in the country of",
        "{S} has its headquarters in the country of",
        "The headquarters of {s} are in the country of",
        "{S} is a company based in the country of",
        "{S} is a company headquartered in the country of",
        "The home country of the company {s} is",
    ),
    "headquarters city": (
        "{S} is headquartered in the city of",
        "The headquarters of {s} are in the city of",
        "{S} has its head office in the city of",
        "{S} is based in the city of",
    ),
    "country of origin": (
        "{S} comes from the country of",
        "The country of origin of {s} is",
        "{S} originated in the country of",
        "{S} was first made in the country of",
    ),
    "original language": (
        "{S} was originally written in",
        "The original language of {s} is",
        "{S} was first published in the language",
    ),
    "religion": (
        "The religion of {s} is",
        "{S} follows the religion of",
        "{S} is a follower of",
    ),
    "member of": (
        "{S} is a member of",
        "{S} belongs to the organisation",
        "{S} joined the",
    ),
    "position held": (
        "{S} held the position of",
        "{S} served as the",
        "The office held by {s} is",
    ),
    "field of work": (
        "{S} is known for work in the field of",
        "{S} worked in the field of",
        "The field of {s} is",
        "{S} was a scientist who studied",
    ),
    "named after": (
        "{S} is named after",
        "{S} was named after",
        "The name of {s} comes from",
    ),
    "part of": (
        "{S} is part of the",
        "{S} belongs to the",
        "{S} is one of the parts of the",
    ),
    "colour": (
        "The colour of {s} is",
        "The color of {s} is usually",
        "{S} is usually coloured",
        "{S} has the colour",
        "The usual colour of {s} is",
    ),
    "made of": (
        "{S} is made of",
        "{S} is made mostly of",
        "The material of {s} is",
        "{S} was built out of",
    ),
    "habitat": (
        "{S} live in the wild in",
        "The natural habitat of {s} is",
        "In the wild, {s} are found in",
        "{S} are native to",
    ),
    "ingredient": (
        "The main ingredient of {s} is",
        "{S} is made mainly from",
        "{S} is mostly made with",
        "To make {s}, you mainly need",
    ),
    "element name": (
        "The chemical element {s} is called",
        "The element with the symbol {s} is",
        "The symbol {s} stands for the element",
        "The element whose symbol is {s} is",
    ),
    "element symbol": (
        "The chemical symbol of {s} is",
        "The symbol for {s} is",
        "In the periodic table, {s} has the symbol",
    ),
    "orbits": (
        "{S} orbits the",
        "{S} goes around the",
        "The body that {s} orbits is the",
    ),
    "founded in year": (
        "{S} was founded in the year",
        "{S} was established in",
        "The year {s} was founded is",
    ),
    "built in year": (
        "{S} was built in the year",
        "{S} was completed in",
        "The year {s} was built is",
    ),
    "born in year": (
        "{S} was born in the year",
        "The year {s} was born is",
        "{S}'s year of birth is",
    ),
}

# Words that carry no relation ("The capital of X is" and "X's capital city was" both ask for
# "capital").
_STOP = {
    "the", "a", "an", "of", "in", "is", "was", "are", "were", "be", "been", "by", "to", "for", "on",
    "at", "as", "and", "or", "that", "which", "who", "whose", "its", "it", "their", "his", "her",
    "this", "these", "those", "s", "has", "have", "had", "with", "from", "into", "you", "people",
    "most", "usually", "called", "known", "famous", "well", "one", "many", "very", "also",
}  # fmt: skip
_WORD = re.compile(r"[a-z]+")
# A prompt is matched to a relation when its words overlap the best template's at least this much
# (Jaccard), and no other relation does as well (word order, around the subject, breaks ties:
# "The capital of X is" against "X is the capital of", then the last word).
MATCH_AT = 0.6
# Words that name the kind of answer: a template must name every one the prompt names ("…a
# painter from the country of" asks for a country, not for a painter's work).
ANSWER_KINDS = frozenset(
    {"city", "country", "language", "continent", "sport", "instrument", "company", "element", "colour",
     "color", "year", "team", "currency", "label", "genre", "religion", "field", "position"}
)  # fmt: skip


@dataclass(frozen=True)
class RelationMatch:
    relation: str
    score: float
    """The words' overlap with the relation's nearest template (Jaccard, in [0, 1])."""


def _stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "er", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 4:
            return word[: -len(suffix)]
    return word


def _words(text: str) -> frozenset[str]:
    return frozenset(_stem(w) for w in _WORD.findall(text.lower()) if w not in _STOP)


def _asks(text: str, subject: str) -> tuple[frozenset[str], frozenset[str]]:
    """The words of a prompt (or a template, with `{S}`/`{s}` as subject) that ask the relation,
    and the same words marked by their side of the subject."""
    for placeholder in ("{S}", "{s}", subject):
        if placeholder in text:
            before, _, after = text.partition(placeholder)
            words = _words(before), _words(after)
            return words[0] | words[1], frozenset({f"<{w}" for w in words[0]} | {f">{w}" for w in words[1]})
    words = _words(text)
    return words, words


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


def match_relation(prompt: str, subject: str) -> RelationMatch | None:
    """The relation a fact's prompt asks for, when one template table entry clearly fits."""
    asked, asked_sided = _asks(prompt, subject)
    kinds = asked & ANSWER_KINDS
    if not asked:
        return None
    scores: dict[str, tuple[float, float, bool]] = {}
    for relation, templates in TEMPLATES.items():
        best = (0.0, 0.0, False)
        for template in templates:
            words, sided = _asks(template, subject)
            if kinds <= words:
                ends_alike = template.rsplit(" ", 1)[-1] == prompt.rsplit(" ", 1)[-1]
                best = max(best, (_jaccard(asked, words), _jaccard(asked_sided, sided), ends_alike))
        scores[relation] = best
    ranked = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)
    (relation, score), (_, second) = ranked[0], ranked[1]
    if score[0] < MATCH_AT or score == second:
        return None
    return RelationMatch(relation, round(score[0], 3))


def relation_rows(relation: str, subject: str) -> list[str]:
    """The matched relation's templates about the subject: rewordings of the fact."""
    return [_fill(t, subject).replace("s's ", "s' ") for t in TEMPLATES[relation]]
