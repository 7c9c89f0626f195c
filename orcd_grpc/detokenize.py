"""Streaming detokenization: token ids in, UTF-8-safe text chunks out, with stop strings.

Two things can make text unsafe to emit yet:
* its last bytes may be an incomplete UTF-8 character (byte-level BPE and SPM byte-fallback
  tokens split characters) -- held by Python's incremental UTF-8 decoder;
* its tail may be the beginning of a stop string -- the longest suffix of the pending text that
  is a proper prefix of some stop string is held back. No occurrence of a stop string can then
  start inside text already emitted, so matching only the pending text is complete.

A stop string matches as soon as it is complete. If several complete on the same token, the one
that ends first wins, and among those the one that starts first; the result is independent of
how the text is cut into tokens.
"""
from __future__ import annotations

import codecs
from collections.abc import Iterable


class StreamDecoder:
    def __init__(self, tokenizer, stop: Iterable[str] = ()):
        self._tok = tokenizer
        # An empty stop string would match before any text; it carries no meaning, so drop it.
        self._stops = sorted({s for s in stop if s}, key=len, reverse=True)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._early = 0  # leading chars of _pending generated before min_tokens
        self.stopped: str | None = None  # the stop string that ended the stream, if any

    def push(self, token_id: int, match: bool = True) -> tuple[str, str | None]:
        """(text safe to emit now, matched stop string or None). After a match, the stream is
        over: further pushes return ("", None). match False (before min_tokens): no stop string
        completes with this token; one that begins in its text may still complete later."""
        if self.stopped is not None:
            return "", None
        if self._tok.is_special(token_id):  # eos / end-of-turn and other control tokens
            return "", None
        return self._feed(self._utf8.decode(self._tok.token_bytes(token_id)), match=match)

    def flush(self) -> str:
        """At the end of generation: everything still held (incomplete UTF-8 as U+FFFD)."""
        if self.stopped is not None:
            return ""
        text, _ = self._feed(self._utf8.decode(b"", final=True), final=True)
        return text

    def _feed(self, text: str, final: bool = False, match: bool = True) -> tuple[str, str | None]:
        pending = self._pending + text
        # pending[:early] came before min_tokens: a stop string ending inside it does not count
        early = len(pending) if not match else self._early
        best = None  # (end, start, stop)
        for s in self._stops if match else ():
            i = pending.find(s, max(0, early - len(s) + 1))
            if i >= 0:
                cand = (i + len(s), i, s)
                if best is None or cand[:2] < best[:2]:
                    best = cand
        if best is not None:
            self._pending = ""
            self.stopped = best[2]
            return pending[:best[1]], best[2]
        hold = 0 if final else self._held_suffix(pending)
        self._pending = pending[len(pending) - hold:] if hold else ""
        self._early = max(0, early - (len(pending) - hold))
        return pending[:len(pending) - hold], None

    def _held_suffix(self, pending: str) -> int:
        """Length of the longest suffix of `pending` that is a proper prefix of a stop string."""
        best = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(pending)), best, -1):
                if pending.endswith(s[:k]):
                    best = k
                    break
        return best
