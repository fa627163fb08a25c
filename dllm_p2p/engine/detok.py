"""Incremental detokenization: token ids in, valid text pieces out.

A token is not a character. In byte-level BPE one token can hold half of a multi-byte
UTF-8 character (a Chinese character or an emoji is often two or three tokens), and with
SentencePiece-style tokenizers a token's text depends on its neighbours (leading spaces).
So a piece is computed as the difference between decoding a short window of recent tokens
with and without the newest ones, and held back while that window ends in U+FFFD, the
mark of an incomplete character. This is the scheme text-generation-inference uses; it
works with any Hugging Face tokenizer and costs a decode of a few tokens per step.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Feed token ids one at a time; collect the text they complete.

    The concatenation of everything ``push`` and ``flush`` return is the generation's text.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the decoding window (already emitted context)
        self._read = 0  # end of what has been emitted

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text, possibly ``""``."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """The held-back remainder at the end of generation.

        A character whose bytes were cut off by the end (``max_new_tokens`` reached in the
        middle of it) is dropped rather than sent as U+FFFD.
        """
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return after[len(before) :].rstrip(REPLACEMENT) if len(after) > len(before) else ""

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
