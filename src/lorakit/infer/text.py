"""Token ids to streamed text: incremental detokenization and stop strings."""

from __future__ import annotations

from typing import Any


class TextStream:
    """The text of one request's generated tokens, released piece by piece.

    Text is decoded from all tokens so far (a token alone can be half a UTF-8 character or lose a
    leading space); a piece is released only when it no longer ends in a partial character, and an end of
    the text that could be the start of a stop string is held back."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.token_ids: list[int] = []
        self.text = ""
        self.released = 0
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Add one token; returns the newly released text (maybe empty). Sets `stopped` on a stop string."""
        self.token_ids.append(token_id)
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        for stop in self.stop:
            at = self.text.find(stop, max(0, self.released - len(stop)))
            if at != -1:
                self.text = self.text[:at]
                self.stopped = True
        if self.stopped:
            return self.flush()
        end = len(self.text) - self._partial_stop()
        if self.text.endswith("\ufffd"):
            end = min(end, len(self.text) - 1)
        if end <= self.released:
            return ""
        piece = self.text[self.released:end]
        self.released = end
        return piece

    def _partial_stop(self) -> int:
        """Length of the longest end of the text that could be the start of a stop string."""
        longest = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def flush(self) -> str:
        """Release whatever is held back (the request is finished)."""
        piece = self.text[self.released:]
        self.released = len(self.text)
        return piece
