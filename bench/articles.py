"""Fictional encyclopaedia articles, made deterministically from a seed: as many documents as a
benchmark needs (100, 1,000) without a network, about subjects no model has read of.

    python bench/articles.py --count 100 --out DIR     # DIR/<id>.txt, a title line then the text

Each article is about one invented subject (a town, a person, an instrument, a species, an
expedition or a railway) and is built from sentences whose names, places, dates and numbers are
all drawn from the seed, in an order that differs from article to article, so that two articles
share sentence shapes but hardly any facts.
"""

# ruff: noqa: E501  (the sentence templates read best one to a line)

from __future__ import annotations

import argparse
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ONSETS = [
    "b",
    "d",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "gl",
    "kr",
    "st",
    "th",
    "tr",
]
VOWELS = ["a", "e", "i", "o", "u", "ae", "ia", "ou"]
CODAS = ["", "", "n", "r", "l", "s", "th", "m", "nd", "rk", "ll"]
TRADES = ["wool", "salt", "timber", "copper", "linen", "barley", "glass", "leather", "amber", "slate"]
MATERIALS = ["spruce", "walnut", "horn", "brass", "birch bark", "bone", "maple", "copper wire"]
COLOURS = ["grey", "ochre", "russet", "slate-blue", "olive", "pale yellow", "chestnut", "ash-white"]
HABITATS = ["reed beds", "upland heath", "river gravel", "pine forest", "salt marsh", "limestone cliffs"]
OCCUPATIONS = [
    "cartographer",
    "glassblower",
    "botanist",
    "civil engineer",
    "composer",
    "printer",
    "astronomer",
]


class _Draw:
    """Seeded choices: invented words, numbers and years."""

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)

    def word(self, syllables: int = 2) -> str:
        parts = [self.random.choice(ONSETS) + self.random.choice(VOWELS) for _ in range(syllables)]
        return ("".join(parts) + self.random.choice(CODAS)).capitalize()

    def pick(self, options: list[str]) -> str:
        return self.random.choice(options)

    def number(self, low: int, high: int) -> int:
        return self.random.randint(low, high)


@dataclass(frozen=True)
class _Subject:
    """The facts one article tells, drawn once and used by all its sentences."""

    name: str
    region: str
    river: str
    founder: str
    rival: str
    year: int
    number: int
    trade: str
    material: str
    colour: str
    habitat: str
    occupation: str


def _subject(draw: _Draw) -> _Subject:
    return _Subject(
        name=draw.word(3),
        region=draw.word(2),
        river=draw.word(2),
        founder=f"{draw.word(2)} {draw.word(3)}",
        rival=f"{draw.word(2)} {draw.word(2)}",
        year=draw.number(1450, 1680),
        number=draw.number(12, 980),
        trade=draw.pick(TRADES),
        material=draw.pick(MATERIALS),
        colour=draw.pick(COLOURS),
        habitat=draw.pick(HABITATS),
        occupation=draw.pick(OCCUPATIONS),
    )


Sentence = Callable[[_Subject, _Draw], str]

SENTENCES: list[Sentence] = [
    lambda s, d: (
        f"{s.name} lies in the district of {s.region}, on the {d.pick(['north', 'south', 'east', 'west'])}ern bank of the River {s.river}."
    ),
    lambda s, d: (
        f"The first written record of {s.name} dates from {s.year}, when {s.founder} described it in a letter to the council of {d.word(2)}."
    ),
    lambda s, d: (
        f"By {s.year + d.number(10, 60)} the trade in {s.trade} had made {s.name} known as far as {d.word(3)} and {d.word(2)}."
    ),
    lambda s, d: (
        f"{s.founder} was a {s.occupation} who spent {d.number(3, 30)} years recording the customs of {s.region}."
    ),
    lambda s, d: (
        f"Its best known feature is a {s.colour} {d.pick(['tower', 'bridge', 'hall', 'gate', 'lantern'])} built of {s.material}, restored in {s.year + d.number(80, 200)}."
    ),
    lambda s, d: (
        f"In {s.year + d.number(5, 90)} a dispute with {s.rival} over the {s.trade} market lasted {d.number(2, 19)} years and ended in a treaty signed at {d.word(2)}."
    ),
    lambda s, d: (
        f"The population was counted at {s.number * d.number(3, 40)} in the census of {s.year + d.number(100, 300)}."
    ),
    lambda s, d: (
        f"Local tradition holds that the name {s.name} comes from an old word for {d.pick(['ford', 'hill', 'willow', 'harbour', 'crossing', 'bell'])} in the dialect of {s.region}."
    ),
    lambda s, d: (
        f"Every {d.pick(['spring', 'summer', 'autumn', 'winter'])} the people of {s.name} hold a festival of {s.trade} in which {d.number(3, 12)} guilds parade through the {d.word(2)} quarter."
    ),
    lambda s, d: (
        f"The {s.colour} {d.word(2)} bird, found mainly in the {s.habitat} around {s.name}, appears on its seal."
    ),
    lambda s, d: (
        f"A railway line to {d.word(3)} opened in {s.year + d.number(150, 320)}, with {d.number(2, 14)} stations and a viaduct of {d.number(9, 41)} arches over the {s.river}."
    ),
    lambda s, d: (
        f"The instrument called the {s.name.lower()} {d.pick(['fiddle', 'pipe', 'zither', 'drum', 'horn'])} is made of {s.material} and has {d.number(3, 17)} strings or keys."
    ),
    lambda s, d: (
        f"{s.rival} later wrote that {s.name} was {d.pick(['the quietest', 'the busiest', 'the oldest', 'the coldest', 'the proudest'])} place in all of {s.region}."
    ),
    lambda s, d: (
        f"An expedition led by {d.word(2)} {d.word(2)} reached the source of the {s.river} in {s.year + d.number(20, 240)} after {d.number(11, 140)} days."
    ),
    lambda s, d: (
        f"The {s.region} archive keeps {d.number(40, 900)} letters about {s.name}, most of them on the {s.trade} accounts of the {d.word(2)} family."
    ),
    lambda s, d: (
        f"A flood in {s.year + d.number(30, 250)} destroyed {d.number(10, 90)} houses, and the new quarter was laid out by {s.founder}'s grandson."
    ),
    lambda s, d: (
        f"Its school of {d.pick(['music', 'navigation', 'weaving', 'medicine', 'mathematics'])}, founded in {s.year + d.number(40, 260)}, once had {d.number(20, 400)} pupils."
    ),
    lambda s, d: (
        f"The {d.word(2)} stone, a boundary marker {d.number(2, 9)} metres tall, stands {d.number(1, 30)} kilometres from {s.name} on the road to {s.region}."
    ),
    lambda s, d: (
        f"Visitors today can still see the {s.material} workshop where {s.founder} made {d.number(12, 300)} {d.pick(['maps', 'clocks', 'bells', 'looms', 'lenses'])}."
    ),
    lambda s, d: (
        f"The coat of arms of {s.name} shows a {s.colour} {d.pick(['heron', 'stag', 'ship', 'wheel', 'key'])} on a field of {d.pick(COLOURS)}."
    ),
]


def article(seed: int, words: int = 500) -> tuple[str, str, str]:
    """(id, title, text) of the article for `seed`, about `words` words long."""
    draw = _Draw(seed)
    subject = _subject(draw)
    order = list(range(len(SENTENCES)))
    draw.random.shuffle(order)
    paragraphs: list[str] = []
    paragraph: list[str] = []
    count = 0
    while count < words:
        if not order:
            order = list(range(len(SENTENCES)))
            draw.random.shuffle(order)
        sentence = SENTENCES[order.pop()](subject, draw)
        paragraph.append(sentence)
        count += len(sentence.split())
        if len(paragraph) == draw.number(3, 5):
            paragraphs.append(" ".join(paragraph))
            paragraph = []
    if paragraph:
        paragraphs.append(" ".join(paragraph))
    doc_id = re.sub(r"[^a-z0-9]+", "-", f"{subject.name} {subject.region} {seed}".lower()).strip("-")
    return doc_id, f"{subject.name} ({subject.region})", "\n\n".join(paragraphs)


def articles(count: int, seed: int = 0, words: int = 500) -> list[dict[str, str]]:
    """`count` articles as documents ({id, title, text}), the same for the same seed."""
    made = [article(seed * 1_000_003 + i, words) for i in range(count)]
    return [{"id": doc_id, "title": title, "text": text} for doc_id, title, text in made]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--words", type=int, default=500)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for document in articles(args.count, args.seed, args.words):
        (args.out / f"{document['id']}.txt").write_text(f"# {document['title']}\n{document['text']}\n")
    print(f"wrote {args.count} articles to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
