"""The `subject` method's rules: finding a fact's subject, the sentences made from it, locating
it in tokens, and the evaluation leaving out what a trainer tuned on."""

from __future__ import annotations

import random

import pytest

from memserve.errors import InvalidArgument
from memserve.kinds.local.config import check_facts
from memserve.kinds.local.eval import tuned_on
from memserve.kinds.local.relations import TEMPLATES, match_relation, relation_rows
from memserve.kinds.local.subject import find_subject, rewordings, subject_prompts
from memserve.kinds.local.values import locate


@pytest.mark.parametrize(
    ("prompt", "subject", "found_by"),
    [
        ("The Eiffel Tower is located in the city of", "The Eiffel Tower", "before the verb"),
        ("The capital city of Japan is", "Japan", "before the verb"),
        ("The Statue of Liberty stands in the city of", "The Statue of Liberty", "before the verb"),
        ("On a clear day, the colour of the sky is", "the sky", "before the verb"),
        ("The play Hamlet was written by", "The play Hamlet", "before the verb"),
        ("In the band, Ringo Starr played the", "Ringo Starr", "names"),
        ("Giant pandas are native to", "Giant pandas", "before the verb"),
    ],
)
def test_the_subject_is_what_stands_before_the_verb(prompt, subject, found_by):
    assert (find_subject(prompt).text, find_subject(prompt).found_by) == (subject, found_by)


def test_a_given_subject_wins_and_must_be_in_the_prompt():
    assert find_subject("The Eiffel Tower is in", "Eiffel").text == "Eiffel"
    with pytest.raises(ValueError, match="not in the prompt"):
        find_subject("The Eiffel Tower is in", "Louvre")
    with pytest.raises(InvalidArgument, match="subject"):
        check_facts([{"prompt": "The Eiffel Tower is in", "target": " Rome", "subject": "Louvre"}])
    given = {"prompt": "The Eiffel Tower is in", "target": " Rome", "subject": "Eiffel Tower"}
    (fact,) = check_facts([given])
    assert fact.subject == "Eiffel Tower"


def test_rule_rewordings_ask_the_same_thing():
    assert rewordings("The capital city of Japan is", "Japan") == ["Japan's capital city is"]
    assert rewordings("The official language of Mars is", "Mars") == ["Mars' official language is"]
    assert rewordings("The Eiffel Tower is located in", "The Eiffel Tower") == []


def test_made_sentences_mention_the_subject_and_neighbours_do_not():
    prompt = "The Eiffel Tower is located in the city of"
    made = subject_prompts(prompt, "The Eiffel Tower", 3, random.Random(1))
    assert made.train[0] == "The Eiffel Tower is located in the city of" and len(made.train) == 4
    assert all(t.endswith("Eiffel Tower is located in the city of") for t in made.train)
    assert all("Eiffel Tower" in t for t in made.contexts + made.relations)
    assert any(r.startswith("The history of the Eiffel Tower") for r in made.relations)  # article lowered
    assert made.neighbours and not any("Eiffel" in n for n in made.neighbours)
    assert any(n.endswith("is located in the city of") for n in made.neighbours)  # the prompt, swapped


def test_locate_finds_every_mention_and_its_last_token(tiny):
    tokenizer = tiny.tokenizer
    text = "the quick fox saw the quick fox"
    located = locate(tokenizer, text, "quick fox")
    assert len(located.subject_positions) == 2
    ids = located.ids
    for last in located.subject_positions:
        assert tokenizer.decode(ids[: last + 1]).endswith("quick fox")
        assert last in located.subject_tokens
    assert not locate(tokenizer, text, "sea").subject_positions


def test_the_evaluation_leaves_out_what_the_trainer_tuned_on():
    made = {"rows": ["C"], "relations": ["D"], "contexts": [], "neighbours": ["E"]}
    fact = {"prompt": "P", "train_positives": ["A"], "train_negatives": ["B"], "subject": {"prompts": made}}
    assert tuned_on(fact) == {"P", "A", "B", "C", "D", "E"}


@pytest.mark.parametrize(
    ("prompt", "subject", "relation"),
    [
        ("The capital city of Japan is", "Japan", "capital"),
        ("Tokyo is the capital city of", "Tokyo", "capital of"),
        ("The Eiffel Tower is located in the city of", "The Eiffel Tower", "located in city"),
        ("The Taj Mahal is located in the country of", "The Taj Mahal", "located in country"),
        ("The mother tongue of Emmanuel Macron is", "Emmanuel Macron", "native language"),
        ("The play Hamlet was written by", "The play Hamlet", "author"),
        ("Yo-Yo Ma is a famous musician who plays the", "Yo-Yo Ma", "instrument"),
        # A painter's country is asked, not a painting's painter: the answer's kind must match.
        ("Pablo Picasso was a painter from the country of", "Pablo Picasso", None),
        # Nothing in the table asks this.
        ("Koalas mostly eat the leaves of the", "Koalas", None),
    ],
)
def test_a_prompt_is_matched_to_the_relation_it_asks(prompt, subject, relation):
    match = match_relation(prompt, subject)
    assert (match.relation if match else None) == relation


def test_relation_templates_are_sentences_about_the_subject():
    for name, templates in TEMPLATES.items():
        assert len(templates) >= 3 and all(("{S}" in t) != ("{s}" in t) for t in templates), name
        assert all(not t.endswith(" ") and t.count("{") == 1 for t in templates), name
    rows = relation_rows("capital", "The United States")
    assert "The capital of the United States is" in rows and "The United States' capital is" in rows
    assert relation_rows("capital", "Japan")[2] == "Japan's capital is"
