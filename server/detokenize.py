"""Turning a growing list of token ids into text, with stop sequences and safe streaming.

Streamed text never shows what may still change: the tail of an incomplete
multi-byte character, or the start of what may become a stop sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

# Decoding with a few prompt tokens in front keeps tokenizers that drop a leading
# space at the start of a sequence (SentencePiece) from changing the first word.
_PREFIX_TOKENS = 4
_REPLACEMENT = "\ufffd"


class IncrementalText:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: Sequence[int],
        stop_sequences: Sequence[str] = (),
        include_stop_sequence: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self._prefix = list(prompt_ids[-_PREFIX_TOKENS:])
        self._prefix_text = self._decode(self._prefix)
        self._ids: list[int] = []
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
        self.text = self._decode(self._prefix + self._ids)[len(self._prefix_text) :]
        if self._stops:
            self._find_stop(previous)
        return self._release(final=self.stopped)

    def finish(self) -> str:
        """Returns whatever is still held back; call once, when generation ends."""
        return self._release(final=True)

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
        held = 0
        if self.text.endswith(_REPLACEMENT):
            held = len(self.text) - len(self.text.rstrip(_REPLACEMENT))
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(self.text)), held, -1):
                if self.text.endswith(stop[:k]):
                    held = k
                    break
        return held
