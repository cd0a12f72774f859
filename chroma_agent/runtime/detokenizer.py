"""Incremental detokenization: text deltas from a growing list of token ids that join to
exactly the whole decode, in every script.

A byte-level BPE token can hold part of a UTF-8 character ("é", a CJK character, an emoji
span several tokens), so decoding each new token on its own yields U+FFFD. As in vLLM's
and transformers' streamers, a window of recent ids is decoded and the new text is
released only once it no longer ends with U+FFFD, i.e. once the character is complete.
"""
from __future__ import annotations

from typing import Callable

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Feed token ids with `push`, get the text they complete; `flush` at the end.

    `decode` maps a list of ids to text (e.g. `ChromaProcessor.decode`). The deltas of
    `push` and `flush` joined equal `decode(all ids)`.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self.ids: list[int] = []
        self.text = ""     # released so far
        self._prefix = 0   # window start: ids before it are never decoded again
        self._read = 0     # ids up to here have been released as text

    def push(self, ids: list[int]) -> str:
        """Add `ids`; return the text that became complete ("" while a character is split)."""
        self.ids += ids
        delta = self._window_delta()
        if not delta or delta.endswith(REPLACEMENT):
            return ""
        return self._release(delta)

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end decodes as U+FFFD)."""
        whole = self._decode(self.ids)
        # always true for byte-level tokenizers; it makes the join exact whatever the tokenizer
        delta = whole[len(self.text):] if whole.startswith(self.text) else self._window_delta()
        return self._release(delta)

    def _window_delta(self) -> str:
        # decode from a little before the released point, so that pieces that depend on their
        # neighbours (byte-level merges, spaces) come out as in the whole decode
        before = self._decode(self.ids[self._prefix:self._read])
        return self._decode(self.ids[self._prefix:])[len(before):]

    def _release(self, delta: str) -> str:
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta
