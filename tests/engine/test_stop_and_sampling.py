"""Stop conditions (max tokens, stop strings, stop token ids, eos), seeded sampling that does
not depend on the batch, and abort freeing KV at once."""

from __future__ import annotations

import pytest

from sglora.engine import Engine
from sglora.messages import SamplingParams, TokenizedGenerateReq


@pytest.fixture(scope="module")
def engine(tiny_path):
    return Engine(model_path=str(tiny_path("qwen3_moe")), device="cpu")


PROMPT = "The weather in Zürich today is"


def greedy(n: int, **kw) -> dict:
    return {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True, **kw}


def test_max_new_tokens_finishes_with_length(engine):
    res = engine.generate(PROMPT, greedy(7))
    assert len(res["output_ids"]) == 7
    assert res["meta_info"]["finish_reason"] == {"type": "length", "length": 7}


def test_stop_string_cuts_text_before_it(engine):
    full = engine.generate(PROMPT, greedy(40))["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), "pick a visible stop string"
    res = engine.generate(PROMPT, greedy(40, stop=[stop]))
    assert res["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert stop not in res["text"]
    assert full.startswith(res["text"])
    assert len(res["output_ids"]) < 40


def test_stop_token_id_ends_generation(engine):
    ids = engine.generate(PROMPT, greedy(20))["output_ids"]
    stop_tok = ids[5]
    res = engine.generate(PROMPT, greedy(20, stop_token_ids=[stop_tok]))
    first = ids.index(stop_tok)
    assert res["output_ids"] == ids[: first + 1]
    assert res["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_tok}


def test_eos_stops_unless_ignored(engine):
    ids = engine.generate(PROMPT, greedy(20))["output_ids"]
    eos = ids[3]
    engine.scheduler.eos_ids = frozenset([eos])  # pretend that token is the model's eos
    try:
        stopped = engine.generate(PROMPT, {"max_new_tokens": 20, "temperature": 0.0})
        ignored = engine.generate(PROMPT, greedy(20))
    finally:
        engine.scheduler.eos_ids = frozenset(engine.model_config.eos_token_ids)
    assert stopped["output_ids"] == ids[: ids.index(eos) + 1]
    assert ignored["output_ids"] == ids


def test_seeded_sampling_is_independent_of_batch(engine):
    sp = {"max_new_tokens": 16, "temperature": 1.0, "seed": 1234, "ignore_eos": True}
    alone = engine.generate(PROMPT, sp)["output_ids"]
    others = ["Once upon a time", "def main():", PROMPT]
    batch = engine.generate(
        others + [PROMPT], [{"max_new_tokens": 9, "temperature": 0.8}] * 3 + [sp]
    )
    assert batch[3]["output_ids"] == alone
    other_seed = engine.generate(PROMPT, {**sp, "seed": 99})["output_ids"]
    assert other_seed != alone


def test_abort_frees_kv_immediately(engine):
    s = engine.scheduler
    before = s.kv.allocator.available_size() + s.kv.tree.evictable_size()
    s.add_request(
        TokenizedGenerateReq(
            "r-abort",
            engine.tokenizer.encode(PROMPT * 4),
            SamplingParams(max_new_tokens=50, ignore_eos=True),
        )
    )
    for _ in range(3):
        s.step()
    assert s.running
    assert s.abort_request("r-abort")
    out = s.step()
    assert any(o.rid == "r-abort" and o.finish_reason["type"] == "abort" for o in out)
    assert not s.running and not s.waiting
    s.check_integrity()
    assert s.kv.allocator.available_size() + s.kv.tree.evictable_size() >= before


def test_invalid_sampling_params_raise(engine):
    with pytest.raises(ValueError, match="top_p"):
        engine.generate(PROMPT, {"top_p": 0.0})
    with pytest.raises(ValueError, match="temperature"):
        engine.generate(PROMPT, {"temperature": -1})
