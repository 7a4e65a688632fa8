"""Incremental detokenization (no server): deltas are never broken UTF-8, never end in text
that could still become a stop string, and add up to the one-shot final text."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from sglora.server.detokenizer import IncrementalDetokenizer, final_text, stop_holdback

TEXTS = [
    "Zürich, 日本語 and 😀 emoji: naïve café",
    "plain ascii text, nothing special",
    "mixed 😀😀 runs of ünïcödé",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_path):
    return AutoTokenizer.from_pretrained(tiny_path("qwen3_moe"))


def stream(tokenizer, ids, stops=(), finish_reason=None) -> list[str]:
    det = IncrementalDetokenizer(tokenizer, True, list(stops))
    deltas = [det.add([t]) for t in ids[:-1]]
    return deltas + [det.finish(ids[-1:], finish_reason)]


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_deltas_are_whole_characters_and_add_up(tokenizer, text):
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids) or text.isascii()
    deltas = stream(tokenizer, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


@pytest.mark.parametrize(
    "text,stops,held",
    [
        ("hello wor", ["world"], 3),
        ("hello", ["xyz"], 0),
        ("abcab", ["abc"], 2),
        ("the end", ["end."], 3),
        ("aaaa", ["aab", "aaab"], 3),
        ("", ["a"], 0),
    ],
)
def test_stop_holdback_is_the_longest_partial_stop(text, stops, held):
    assert stop_holdback(text, stops) == held


def test_stream_never_emits_a_prefix_of_the_stop_string(tokenizer):
    text = "The answer is here. STOP and then more words follow"
    ids = tokenizer.encode(text)
    stop = "STOP"
    cut = next(i for i in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:i]))
    deltas = stream(tokenizer, ids[:cut], [stop], {"type": "stop", "matched": stop})
    emitted = ""
    for d in deltas[:-1]:
        emitted += d
        assert not any(emitted.endswith(stop[:k]) for k in range(1, len(stop)))
    assert "".join(deltas) == text[: text.index(stop)]


def test_final_text_drops_the_stop_token_and_cuts_at_the_stop_string(tokenizer):
    ids = tokenizer.encode("one two three four")
    last = ids[-1]
    assert final_text(tokenizer, ids, {"type": "stop", "matched": last}) == tokenizer.decode(
        ids[:-1]
    )
    assert final_text(tokenizer, ids, {"type": "stop", "matched": " three"}) == "one two"
    assert final_text(tokenizer, ids, {"type": "length", "length": 4}) == "one two three four"


def test_with_min_new_tokens_the_cut_skips_stops_before_the_minimum(tokenizer):
    """A stop string inside the first min_new_tokens - 1 tokens did not end the request: the
    text is cut at the occurrence that did, and the stream's deltas add up to it."""
    text = "a STOP b STOP c"
    ids = tokenizer.encode(text)
    first = next(i for i in range(1, len(ids) + 1) if "STOP" in tokenizer.decode(ids[:i]))
    min_new = first + 1  # the first STOP ends inside the tokens that may not end a stop
    ids = ids[
        : next(i for i in range(1, len(ids) + 1) if tokenizer.decode(ids[:i]).count("STOP") == 2)
    ]
    reason = {"type": "stop", "matched": "STOP"}
    assert final_text(tokenizer, ids, reason, True, min_new) == "a STOP b "
    assert final_text(tokenizer, ids, reason) == "a "
    det = IncrementalDetokenizer(tokenizer, True, ["STOP"], min_new)
    deltas = [det.add([t]) for t in ids[:-1]] + [det.finish(ids[-1:], reason)]
    assert "".join(deltas) == "a STOP b "
