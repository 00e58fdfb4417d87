"""Token ids to streamed text: incremental detokenization and stop strings."""

from __future__ import annotations

from typing import Any


class TextStream:
    """The text of one request's generated tokens, released piece by piece.

    Text is decoded from all tokens so far (a token alone can be half a UTF-8 character or lose a
    leading space); a piece is released only when it no longer ends in a partial character and cannot
    be the start of a stop string."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
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
        end = len(self.text) - self.holdback
        if self.text.endswith("\ufffd"):
            end = min(end, len(self.text) - 1)
        if end <= self.released:
            return ""
        piece = self.text[self.released:end]
        self.released = end
        return piece

    def flush(self) -> str:
        """Release whatever is held back (the request is finished)."""
        piece = self.text[self.released:]
        self.released = len(self.text)
        return piece
