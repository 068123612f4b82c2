"""Turns sampled tokens into text: incremental detokenization and stop strings.

Stop strings are matched on the decoded text, so one that spans several tokens (or ends inside a
multi-byte character) is found; the text is cut before it (or after it, with
include_stop_str_in_output). While a sequence runs, the last ``len(longest stop) - 1`` characters
are held back from the visible text, so a stream never shows the start of a stop string that the
next token completes."""
from __future__ import annotations

from dataclasses import dataclass

from ..tokenizer import IncrementalDetokenizer, Tokenizer
from .sequence import Sequence


@dataclass
class _SeqText:
    detok: IncrementalDetokenizer | None
    text: str = ""
    holdback: int = 0


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer

    def _state(self, seq: Sequence) -> _SeqText:
        st = seq.user_data
        if st is None:
            p = seq.params
            detok = self.tokenizer.detokenizer(p.skip_special_tokens) if self.tokenizer else None
            hold = max((len(s) for s in p.stop_strings), default=1) - 1
            st = seq.user_data = _SeqText(detok, holdback=hold)
        return st

    def process(self, seq: Sequence, new_tokens: list[int], final: bool | None = None) -> str | None:
        """Add seq's new tokens to its text. Returns the stop string that matched, if any (the
        caller then finishes the sequence). ``final`` (default: whether seq has finished): flush
        the detokenizer's held bytes after these tokens."""
        st = self._state(seq)
        if st.detok is None:
            return None
        prev = len(st.text)
        st.text += st.detok.add(new_tokens)
        if seq.is_finished if final is None else final:
            st.text += st.detok.flush()
        best: tuple[int, str] | None = None  # earliest match wins
        for stop in seq.params.stop_strings:
            i = st.text.find(stop, max(0, prev - len(stop) + 1))
            if i >= 0 and (best is None or i < best[0]):
                best = (i, stop)
        if best is None:
            return None
        i, stop = best
        st.text = st.text[:i + len(stop) if seq.params.include_stop_str_in_output else i]
        return stop

    def visible_len(self, seq: Sequence) -> int:
        """Characters of seq's text a client may see now (a possible stop-string start is held)."""
        st = self._state(seq)
        if seq.is_finished or not st.holdback:
            return len(st.text)
        return max(0, len(st.text) - st.holdback)

    def text_slice(self, seq: Sequence, start: int, end: int) -> str:
        """seq's text [start, end): a delta costs its own length, not the whole text's."""
        return self._state(seq).text[start:end]

    def visible_text(self, seq: Sequence) -> str:
        return self.text_slice(seq, 0, self.visible_len(seq))
