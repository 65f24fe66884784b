"""The generator of fictional articles that the document benchmarks train on at scale."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from articles import articles


def test_the_same_seed_makes_the_same_articles_and_another_seed_others():
    first = articles(50)
    assert first == articles(50)
    assert len({a["id"] for a in first}) == 50
    assert {a["text"] for a in first}.isdisjoint(a["text"] for a in articles(50, seed=1))


def test_articles_are_about_the_asked_length_and_tell_different_facts():
    made = articles(20, words=400)
    for article in made:
        assert 400 <= len(article["text"].split()) < 480
    # Sentence shapes repeat across articles; their names do not: no two share a title.
    assert len({a["title"] for a in made}) == 20
