"""Token ids -> text deltas for the completion stream, with stop strings applied."""

from __future__ import annotations

from fluxion_dist.model.tokenizer import Tokenizer


class Detokenizer:
    """Turns the token stream into text deltas and stops at a stop string (not included).

    Stream and non-stream read the same text: ``push`` returns what is safe to send now and
    ``flush`` the rest at the end. Held back are only a tail that could still become a stop
    string and a trailing U+FFFD for at most ``MAX_INCOMPLETE`` tokens (a UTF-8 character is
    at most 4 bytes; a replacement character that survives longer is genuine text).
    """

    MAX_INCOMPLETE = 3

    def __init__(self, tok: Tokenizer, stops: list[str]) -> None:
        self.tok, self.stops, self.ids, self.sent = tok, stops, [], ""
        self.text, self.stopped, self._held_tokens = "", False, 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        cut = min((at for at in (text.find(s) for s in self.stops) if at >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return ""
        self.text = text
        if text.endswith("\ufffd") and self._held_tokens < self.MAX_INCOMPLETE:
            self._held_tokens += 1  # maybe a multi-byte character still incomplete
            return ""
        self._held_tokens = 0
        safe = len(text) - self._stop_prefix_len(text)
        if safe <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):safe], text[:safe]
        return delta

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        """The text not sent yet (after the last token, or up to the stop string)."""
        delta = self.text[len(self.sent):] if self.text.startswith(self.sent) else ""
        self.sent = self.text
        return delta
