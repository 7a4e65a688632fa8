"""Incremental detokenization for streams (used by the tokenizer manager for each request):
turns new token ids into text deltas that are never broken UTF-8 and never end in text that
could still grow into a stop string.

The final text of a request is `stop_strings.final_text(...)`: the whole output decoded at
once, without the matched stop token and cut at the matched stop string, exactly as the offline
Engine returns it; a stream's deltas add up to that text.
"""

from __future__ import annotations

import logging
from typing import Any

from sglora.stop_strings import final_text

logger = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"  # what decoding an incomplete UTF-8 sequence yields


def stop_holdback(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class IncrementalDetokenizer:
    """Decodes a window of recent tokens (`surr_offset:`) rather than the whole output, so a
    step costs O(window); the window's leading tokens give the tokenizer the context it needs
    for spaces (SentencePiece) and partial characters (byte-level BPE)."""

    def __init__(
        self,
        tokenizer: Any,
        skip_special_tokens: bool = True,
        stops: list[str] | None = None,
        min_new_tokens: int = 0,
    ):
        self.tokenizer, self.min_new_tokens = tokenizer, min_new_tokens
        self.skip_special_tokens = skip_special_tokens
        self.stops = list(stops or [])
        self.ids: list[int] = []
        self.surr_offset = 0  # start of the decode window
        self.read_offset = 0  # ids[:read_offset] are decoded into self.text
        self.text = ""  # complete characters of ids[:read_offset]
        self.sent = 0  # characters of self.text already handed out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, new_ids: list[int]) -> str:
        """Append tokens of an unfinished request; return the text now safe to emit."""
        self.ids.extend(new_ids)
        prefix = self._decode(self.ids[self.surr_offset : self.read_offset])
        window = self._decode(self.ids[self.surr_offset :])
        # A trailing replacement char may be a character whose remaining bytes are still to
        # come; wait for them rather than emit a broken character.
        if len(window) > len(prefix) and not window.endswith(REPLACEMENT_CHAR):
            self.text += window[len(prefix) :]
            self.surr_offset, self.read_offset = self.read_offset, len(self.ids)
        end = len(self.text) - stop_holdback(self.text, self.stops)
        if end <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : end], end
        return delta

    def finish(self, new_ids: list[int], finish_reason: dict | None) -> str:
        """Append the last tokens; return the rest of `final_text` (everything not yet sent)."""
        self.ids.extend(new_ids)
        full = final_text(
            self.tokenizer, self.ids, finish_reason, self.skip_special_tokens, self.min_new_tokens
        )
        sent = self.text[: self.sent]
        if not full.startswith(sent):
            # Only a tokenizer whose decode of a longer sequence rewrites earlier text (space
            # clean-up) gets here; the stream then differs from the one-shot text.
            logger.warning("streamed text %r is not a prefix of the final text %r", sent, full)
        return full[len(sent) :]
