"""Where a stop string ends a request's text, one rule for every place that decides it: the
scheduler (which stops the request), the offline Engine and the streaming detokenizer (which
cut the text). With min_new_tokens, a stop string counts only where it ends past the text of
the first min_new_tokens - 1 tokens.
"""

from __future__ import annotations

from typing import Any


def find_stop(
    tokenizer: Any, ids: list[int], text: str, stop: str, min_new_tokens: int, skip: bool
) -> int:
    """Index in `text` (the decoding of `ids`) of the first `stop` that ends past the text of
    ids[:min_new_tokens - 1]; -1 if there is none."""
    before = ids[: max(min_new_tokens - 1, 0)]
    floor = len(tokenizer.decode(before, skip_special_tokens=skip)) if before else 0
    return text.find(stop, max(floor - len(stop) + 1, 0))


def final_text(
    tokenizer: Any,
    output_ids: list[int],
    finish_reason: dict | None,
    skip_special_tokens: bool = True,
    min_new_tokens: int = 0,
) -> str:
    """The whole output decoded at once, without the matched stop token and cut at the matched
    stop string (`find_stop`)."""
    reason, skip = finish_reason or {}, skip_special_tokens
    matched = reason.get("matched")
    ids = output_ids
    if reason.get("type") == "stop" and isinstance(matched, int) and ids and ids[-1] == matched:
        ids = ids[:-1]  # the stop token is not part of the text
    text = tokenizer.decode(ids, skip_special_tokens=skip)
    if reason.get("type") == "stop" and isinstance(matched, str):
        at = find_stop(tokenizer, ids, text, matched, min_new_tokens, skip)
        if at >= 0:
            text = text[:at]
    return text
