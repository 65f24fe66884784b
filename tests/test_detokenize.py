"""Incremental text: what a stream may show, and where stop sequences cut."""

from __future__ import annotations

import random

from memserve.engine.detokenize import IncrementalText


def _stream(tokenizer, text: str, stops: tuple[str, ...] = (), include: bool = False) -> tuple[list, str]:
    """Feeds `text` token by token; returns the released pieces and the final text."""
    ids = tokenizer(text).input_ids
    incremental = IncrementalText(tokenizer, tokenizer("Prompt:").input_ids, stops, include)
    pieces = []
    for token in ids:
        pieces.append(incremental.push(token))
        if incremental.stopped:
            break
    pieces.append(incremental.finish())
    return pieces, incremental.text


def test_streamed_pieces_add_up_to_the_text(tiny_tokenizer):
    pieces, text = _stream(tiny_tokenizer, "The quick brown fox jumps over the lazy dog.")
    assert "".join(pieces) == text == "The quick brown fox jumps over the lazy dog."


def test_a_partial_multibyte_character_is_never_shown(tiny_tokenizer):
    pieces, text = _stream(tiny_tokenizer, "東京 🙂 é")
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == text == "東京 🙂 é"


def test_the_text_stops_before_the_stop_sequence(tiny_tokenizer):
    pieces, text = _stream(tiny_tokenizer, "Once upon a time there was a village", stops=("there",))
    assert text == "Once upon a time " == "".join(pieces)


def test_the_stop_sequence_is_kept_when_asked(tiny_tokenizer):
    _, text = _stream(tiny_tokenizer, "Once upon a time there was a village", ("there",), include=True)
    assert text == "Once upon a time there"


def test_a_possible_start_of_a_stop_sequence_is_held_back_until_it_resolves(tiny_tokenizer):
    ids = tiny_tokenizer("lazy dog. lazy cat").input_ids
    incremental = IncrementalText(tiny_tokenizer, [], stop_sequences=("lazy dog!",))
    shown, longest_held = "", ""
    for token in ids:
        shown += incremental.push(token)
        held = incremental.text[len(shown) :]
        assert "lazy dog!".startswith(held), f"held back {held!r}, which cannot become the stop sequence"
        longest_held = max(longest_held, held, key=len)
    shown += incremental.finish()
    assert longest_held.startswith("lazy")
    assert shown == "lazy dog. lazy cat" and not incremental.stopped


def test_random_tokens_stream_to_exactly_the_full_decode(tiny_tokenizer):
    """Any token sequence, split mid-character or not, streams to what a full decode gives."""
    generator = random.Random(0)
    for _ in range(20):
        ids = [generator.randrange(1, len(tiny_tokenizer)) for _ in range(60)]
        incremental = IncrementalText(tiny_tokenizer, [5, 6, 7])
        streamed = "".join(incremental.push(t) for t in ids) + incremental.finish()
        assert streamed == incremental.text == tiny_tokenizer.decode(ids)
