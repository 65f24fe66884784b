"""Turning a growing list of token ids into text, with stop sequences and safe streaming.

Streamed text never shows what may still change: the tail of an incomplete
multi-byte character, or the start of what may become a stop sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

_PREFIX_TOKENS = 4
_REPLACEMENT = "\ufffd"


class IncrementalText:
    """The text of one request's output, decoded a few tokens at a time.

    Each push decodes only the tokens since the last complete piece of text (a
    sliding window, as in TGI and vLLM), so a step costs the same at token 10 and
    at token 2,000.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: Sequence[int],
        stop_sequences: Sequence[str] = (),
        include_stop_sequence: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        # Decoding with a few prompt tokens in front keeps tokenizers that drop a
        # leading space at the start of a sequence (SentencePiece) from changing the
        # first word.
        self._ids = list(prompt_ids[-_PREFIX_TOKENS:])
        self._prefix_offset = 0  # _ids[prefix_offset:read_offset] is context already shown
        self._read_offset = len(self._ids)
        self._stops = tuple(stop_sequences)
        self._include_stop = include_stop_sequence
        self._longest_stop = max((len(s) for s in self._stops), default=0)
        self.text = ""
        self._released = 0
        self.stopped = False

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        """Adds a token; returns the text that may now be shown (possibly empty)."""
        previous = len(self.text)
        self._ids.append(token)
        self._advance(final=False)
        if self._stops:
            self._find_stop(previous)
        return self._release(final=self.stopped)

    def finish(self) -> str:
        """Returns whatever is still held back; call once, when generation ends."""
        if not self.stopped:
            previous = len(self.text)
            self._advance(final=True)
            if self._stops:
                self._find_stop(previous)
        return self._release(final=True)

    def _advance(self, final: bool) -> None:
        """Appends the text of the tokens since the last complete piece, unless it ends mid-character."""
        shown = self._decode(self._ids[self._prefix_offset : self._read_offset])
        current = self._decode(self._ids[self._prefix_offset :])
        if len(current) > len(shown) and (final or not current.endswith(_REPLACEMENT)):
            self.text += current[len(shown) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)

    def _find_stop(self, previous: int) -> None:
        start = max(0, previous - self._longest_stop + 1)
        hits = [(i, s) for s in self._stops if (i := self.text.find(s, start)) >= 0]
        if hits:
            index, stop = min(hits)
            self.text = self.text[: index + len(stop) if self._include_stop else index]
            self.stopped = True

    def _release(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - self._held_back()
        end = max(end, self._released)
        delta = self.text[self._released : end]
        self._released = end
        return delta

    def _held_back(self) -> int:
        """How many trailing characters may still turn out to start a stop sequence."""
        held = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(self.text)), held, -1):
                if self.text.endswith(stop[:k]):
                    held = k
                    break
        return held
