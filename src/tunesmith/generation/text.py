"""A row's text as its tokens arrive: incremental detokenization and stop strings, so what reaches a caller
(a stream, a reply) is final: never half a UTF-8 character, never any part of a stop string."""

from __future__ import annotations


class StopScanner:
    """Cuts streamed text at the first stop string. It holds back only the longest tail that could still grow
    into a stop string (`"x<"` for `"</s>"`), so no piece of one ever reaches the caller."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.buffer = ""  # held back: a tail that is the start of some stop string
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The text that is safe to pass on now."""
        if self.stopped:
            return ""
        self.buffer += piece
        hits = [i for s in self.stops if (i := self.buffer.find(s)) >= 0]
        if hits:
            self.stopped = True
            out, self.buffer = self.buffer[:min(hits)], ""
            return out
        hold = max((k for s in self.stops for k in range(min(len(s) - 1, len(self.buffer)), 0, -1)
                    if self.buffer.endswith(s[:k])), default=0)
        cut = len(self.buffer) - hold
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out

    def flush(self) -> str:
        """At the end of the reply: what was held back is text after all."""
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out


class Detokenizer:
    """The text of a growing list of token ids, one piece per token, decoding only a short window each time
    rather than the whole reply (as vLLM and TGI do): the text from `prefix` to the end, minus the text from
    `prefix` to `read`. A window that ends in half a UTF-8 character (U+FFFD) waits for the next token."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix = self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.tokens.append(token)
        return self._piece(final=False)

    def flush(self) -> str:
        """What a final incomplete character left unsaid (as U+FFFD, as a full decode would show it)."""
        return self._piece(final=True)

    def _piece(self, final: bool) -> str:
        before = self._decode(self.tokens[self.prefix:self.read])
        now = self._decode(self.tokens[self.prefix:])
        if len(now) <= len(before) or (now.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.tokens)
        return now[len(before):]
