"""Incremental detokenization with stop strings: text is released only once it cannot change.

Tokens arrive a few at a time (one engine step each). Decoding the whole output so far, as
``sequoia generate`` does, gives the text; two kinds of tail are held back:

* an incomplete UTF-8 character: the decoder shows its partial bytes as ``"\\ufffd"``;
* a tail that could be the start of a stop string, until the next tokens show whether it is.

A stop string cuts the text just before it (it is not part of the output) and ends the stream;
tokens after the one that completed it are not consumed, so ``tokens`` counts exactly what a
plain decode would have generated up to the stop.

    >>> stream = TextStream(lambda ids: "".join(f"<{i}>" for i in ids), stop=["<3>"])
    >>> stream.push([1, 2]), stream.push([3, 4]), stream.stopped, len(stream.tokens)
    ('<1><2>', '', True, 3)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

REPLACEMENT = "\ufffd"  # what the decoder shows for bytes of a character not complete yet


class TextStream:
    """The text of a growing token sequence, released in pieces that never change."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self.decode = decode  # token ids -> text, special tokens skipped
        self.stop = tuple(s for s in stop if s)
        self.tokens: list[int] = []  # tokens consumed (none after a stop string completes)
        self.stopped = False  # a stop string was found; the text ends before it
        self.text = ""  # the whole text so far (cut at the stop string once found)
        self._sent = 0  # characters of ``text`` released

    def push(self, tokens: Iterable[int]) -> str:
        """Consume ``tokens`` (stopping at a stop string) and return the newly final text."""
        if self.stop:
            for token in tokens:  # one at a time, so a stop is found at its exact token
                if self.stopped:
                    break
                self.tokens.append(int(token))
                self._update()
        else:
            self.tokens.extend(int(t) for t in tokens)
            self._update()
        return self._release(final=self.stopped)

    def flush(self) -> str:
        """The generation ended: release everything still held back."""
        return self._release(final=True)

    def _update(self) -> None:
        self.text = self.decode(self.tokens)
        hits = [i for i in (self.text.find(s, self._sent) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True

    def _release(self, final: bool) -> str:
        end = len(self.text) if final else self._safe_end()
        piece = self.text[self._sent : end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        return piece

    def _safe_end(self) -> int:
        """Where the text may still change: before a trailing incomplete character, and before
        the longest tail that is a proper prefix of a stop string."""
        end = len(self.text.rstrip(REPLACEMENT))
        head = self.text[:end]
        held = max(
            (k for s in self.stop for k in range(1, len(s)) if head.endswith(s[:k])),
            default=0,
        )
        return end - held
