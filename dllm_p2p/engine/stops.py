"""Stop sequences: end an answer where one of the client's strings appears, without it.

Text streams out piece by piece, and a stop string may arrive split across pieces
("\\nUs" + "er:"). So the end of the text that could still become a stop string is held
back until the next piece decides it: either the stop completes (the answer ends before
it, and the held text is never sent) or it does not (the held text goes out with the
next piece). The concatenation of what ``push`` and ``flush`` return is the text up to,
and without, the stop string that completes first, however the text was split.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopText:
    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.matched: str | None = None

    def push(self, piece: str) -> str:
        """Add a piece; return the text that is now safe to send. After a match, ``matched``
        is set and nothing more is returned."""
        if self.matched is not None:
            return ""
        text = self._held + piece
        # The stop string that completes first ends the answer (as generation would see
        # it, token by token); of two that complete together, the longer one.
        hits = [(at + len(stop), at, stop) for stop in self.stops if (at := text.find(stop)) >= 0]
        if hits:
            _, at, self.matched = min(hits)
            self._held = ""
            return text[:at]
        keep = max((_overlap(text, stop) for stop in self.stops), default=0)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        """What was held back, at the end of the answer."""
        held, self._held = self._held, ""
        return held if self.matched is None else ""


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of ``text`` that begins ``stop`` (shorter than ``stop``)."""
    for size in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0
