"""Sampler: greedy, seeded and unseeded sampling, filters, penalties and raw logprobs on CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sglora.messages import SamplingParams
from sglora.model_executor.sampler import (
    Sampler,
    SamplingBatchInfo,
    apply_penalties,
    filter_probs,
    seeded_uniforms,
)

# Probabilities whose top-k / top-p / min-p cuts are far from rounding boundaries.
PROBS = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
# Upper 0.1% point of chi-square: the fixed-seed draws below are deterministic, so a test
# either always passes or always fails; this only says how far off a failure is.
CHI2_999 = {4: 18.47, 7: 24.32}


def make_info(
    params: list[SamplingParams],
    vocab: int,
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
) -> SamplingBatchInfo:
    n = len(params)
    return SamplingBatchInfo.from_requests(
        params, prompts or [[] for _ in range(n)], outputs or [[] for _ in range(n)], vocab, "cpu"
    )


def repeated_draws(
    logits_row: torch.Tensor, params: SamplingParams, n: int, seeded: bool
) -> torch.Tensor:
    """[n] tokens drawn for one request: seeded rows use steps 0..n-1 of one seed."""
    info = make_info([params] * n, logits_row.shape[-1])
    if seeded:
        info = dataclasses.replace(info, steps=torch.arange(n))
    else:
        torch.manual_seed(0)
    return Sampler()(logits_row.expand(n, -1), info).next_token_ids


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    support = expected > 0
    assert counts[~support].sum() == 0, "sampled a token of probability 0"
    return float(((counts - expected)[support] ** 2 / expected[support]).sum())


# ---------------------------------------------------------------- greedy


def test_greedy_equals_argmax_for_temperature_zero_and_top_k_one() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    params = [SamplingParams(temperature=0.0) for _ in range(3)]
    params += [SamplingParams(temperature=0.8, top_k=1) for _ in range(3)]
    info = make_info(params, 50)
    assert info.is_all_greedy
    out = Sampler()(logits, info)
    assert torch.equal(out.next_token_ids, logits.argmax(-1))


@pytest.mark.parametrize("all_greedy", [True, False])
def test_greedy_ties_pick_the_lowest_id(all_greedy: bool) -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    params = [SamplingParams(temperature=0.0)] * 2
    if not all_greedy:
        params = [*params, SamplingParams(seed=1)]
        logits = torch.cat([logits, torch.zeros(1, 4)])
    out = Sampler()(logits, make_info(params, 4))
    assert out.next_token_ids[:2].tolist() == [1, 0]


def test_mixed_batch_rows_do_not_influence_each_other() -> None:
    torch.manual_seed(1)
    vocab = 64
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.9, seed=7),
        SamplingParams(temperature=1.3),
        SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=8),
        SamplingParams(temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.5),
        SamplingParams(temperature=1.0, min_p=0.1, presence_penalty=1.0, seed=9),
    ]
    prompt, output = [1, 2, 3], [4, 4, 5]
    logits = torch.randn(6, vocab)
    batch = Sampler()(logits, make_info(params, vocab, [prompt] * 6, [output] * 6))
    for i in (0, 1, 3, 4, 5):  # every row but the unseeded one is reproducible alone
        alone = Sampler()(logits[i : i + 1], make_info([params[i]], vocab, [prompt], [output]))
        assert alone.next_token_ids.item() == batch.next_token_ids[i].item(), f"row {i}"


# ---------------------------------------------------------------- seeded sampling


def test_seeded_token_is_independent_of_batch_composition_and_row_position() -> None:
    torch.manual_seed(2)
    vocab = 100
    target_logits = torch.randn(vocab) * 0.3  # flat enough that the token depends on the seed
    for seed, step in [(0, 0), (1, 5), (123456789, 17), (-3, 2), (2**70 + 5, 9)]:
        target = SamplingParams(temperature=1.0, seed=seed)
        prompt, output = [1, 2], [3] * step
        alone_info = make_info([target], vocab, [prompt], [output])
        alone = Sampler()(target_logits[None], alone_info).next_token_ids.item()
        others = [
            SamplingParams(temperature=0.0),
            SamplingParams(temperature=0.5, seed=seed + 1),
            SamplingParams(temperature=1.2, top_k=3),
            SamplingParams(temperature=1.0, seed=seed),  # same seed, another step
            SamplingParams(temperature=0.8, top_p=0.5, repetition_penalty=1.2),
        ]
        for position in (0, 3, 5):
            params = others[:position] + [target] + others[position:]
            outputs = [[9]] * position + [output] + [[9]] * (len(others) - position)
            logits = torch.randn(len(params), vocab)
            logits[position] = target_logits
            info = make_info(params, vocab, [prompt] * len(params), outputs)
            batch = Sampler()(logits, info).next_token_ids
            assert batch[position].item() == alone, (seed, step, position)


def test_seeded_sampling_repeats_whatever_the_global_generator_does() -> None:
    logits = torch.zeros(4, 1000)
    info = make_info([SamplingParams(seed=s) for s in range(4)], 1000)
    first = Sampler()(logits, info).next_token_ids
    torch.rand(1000)  # moves the global generator
    assert torch.equal(Sampler()(logits, info).next_token_ids, first)


def test_different_seeds_and_steps_give_different_tokens() -> None:
    vocab, n = 1000, 200
    logits = torch.zeros(n, vocab)  # uniform: the token is decided by the uniforms alone
    by_seed = Sampler()(logits, make_info([SamplingParams(seed=s) for s in range(n)], vocab))
    info = dataclasses.replace(
        make_info([SamplingParams(seed=42)] * n, vocab), steps=torch.arange(n)
    )
    by_step = Sampler()(logits, info)
    # 200 uniform draws from 1000 ids have ~181 distinct values on average.
    assert len(set(by_seed.next_token_ids.tolist())) > 150
    assert len(set(by_step.next_token_ids.tolist())) > 150


@pytest.mark.parametrize("seed", [0, 12345, -1, 2**70])
@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
def test_seeded_samples_over_many_steps_follow_the_softmax(seed: int, temperature: float) -> None:
    gen = torch.Generator().manual_seed(abs(seed) % 1000)
    logits = torch.randn(8, generator=gen) * 1.5
    params = SamplingParams(temperature=temperature, seed=seed)
    tokens = repeated_draws(logits, params, 20_000, seeded=True)
    assert chi_square(tokens, torch.softmax(logits / temperature, -1)) < CHI2_999[7]


def _mix32_reference(x: int) -> int:
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def _uniform_reference(seed: int, step: int, token: int) -> float:
    """Plain unsigned 32-bit Python arithmetic: what every device must reproduce bit for bit."""
    s = seed % 2**64
    key = _mix32_reference((s >> 32) ^ 0x9E3779B9)
    key = _mix32_reference(key ^ (s & 0xFFFFFFFF))
    key = _mix32_reference(key ^ step)
    h = _mix32_reference(key ^ _mix32_reference(token ^ 0x85EBCA6B))
    return ((h >> 9) + 0.5) / 2**23


def test_seeded_uniforms_match_a_pure_python_32_bit_hash() -> None:
    seeds = [0, 1, -1, 2**63 - 1, -(2**63), 987654321987]
    steps = [0, 1, 2**31, 7, 100, 2**32 - 1]
    info = make_info([SamplingParams(seed=s) for s in seeds], 16)
    u = seeded_uniforms(info.seeds, torch.tensor(steps), 300)
    for row, (seed, step) in enumerate(zip(seeds, steps, strict=True)):
        for token in (0, 1, 2, 150, 299):
            assert u[row, token].item() == _uniform_reference(seed, step, token)


def test_seeded_uniforms_lie_strictly_inside_the_unit_interval_and_look_uniform() -> None:
    u = seeded_uniforms(torch.arange(64), torch.zeros(64, dtype=torch.int64), 4096)
    assert u.dtype == torch.float32
    assert bool((u > 0).all()) and bool((u < 1).all())
    buckets = (u * 16).long().flatten()
    assert chi_square(buckets, torch.full((16,), 1 / 16)) < 37.70  # chi-square, 15 dof, 0.1%


# ---------------------------------------------------------------- top-k / top-p / min-p


@pytest.mark.parametrize(
    ("top_k", "top_p", "min_p", "allowed"),
    [
        (3, 1.0, 0.0, {0, 1, 2}),
        (-1, 0.65, 0.0, {0, 1}),
        (-1, 0.01, 0.0, {0}),  # the top token always survives
        (-1, 1.0, 0.3, {0, 1, 2}),  # keep prob >= 0.3 * 0.4 = 0.12
        (3, 0.8, 0.0, {0, 1}),  # top-p on the mass left by top-k (HF/vLLM): 0.4+0.3 >= 0.8*0.85
        (4, 0.9, 0.5, {0, 1}),
    ],
)
@pytest.mark.parametrize("seeded", [True, False])
def test_filters_never_sample_excluded_tokens_and_sample_every_allowed_one(
    top_k: int, top_p: float, min_p: float, allowed: set[int], seeded: bool
) -> None:
    params = SamplingParams(top_k=top_k, top_p=top_p, min_p=min_p, seed=0 if seeded else None)
    tokens = repeated_draws(PROBS.log(), params, 4000, seeded)
    assert set(tokens.tolist()) == allowed
    kept = torch.zeros_like(PROBS)
    kept[list(allowed)] = PROBS[list(allowed)]
    assert chi_square(tokens, kept / kept.sum()) < CHI2_999[4]


def test_disabled_filters_equal_plain_sampling() -> None:
    torch.manual_seed(3)
    n, vocab = 4000, 5
    plain = SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, min_p=0.0, seed=11)
    filtered = SamplingParams(temperature=1.0, top_k=2, seed=12)
    logits = PROBS.log().expand(2 * n, -1)
    # The same seeded row, once in a batch that runs the filter code and once in one that does not.
    mixed = make_info([plain, filtered] * n, vocab)
    alone = make_info([plain] * (2 * n), vocab)
    assert mixed.need_top_p_top_k_min_p and not alone.need_top_p_top_k_min_p
    steps = torch.arange(2 * n) // 2
    mixed = dataclasses.replace(mixed, steps=steps)
    alone = dataclasses.replace(alone, steps=steps)
    with_filter = Sampler()(logits, mixed).next_token_ids[0::2]
    without = Sampler()(logits, alone).next_token_ids[0::2]
    assert torch.equal(with_filter, without)
    assert chi_square(with_filter, PROBS) < CHI2_999[4]


# ---------------------------------------------------------------- penalties


def _penalise_reference(
    logits: torch.Tensor, params: list[SamplingParams], prompts: list[list[int]], outputs
) -> torch.Tensor:
    out = logits.clone().double()
    for row, p in enumerate(params):
        for token in set(prompts[row]) | set(outputs[row]):
            value = out[row, token]
            rep = p.repetition_penalty
            out[row, token] = value / rep if value > 0 else value * rep
        for token in set(outputs[row]):
            count = outputs[row].count(token)
            out[row, token] -= p.frequency_penalty * count + p.presence_penalty
    return out.float()


def test_penalties_match_a_per_row_python_reference() -> None:
    gen = torch.Generator().manual_seed(4)
    bs, vocab = 6, 40
    logits = torch.randn(bs, vocab, generator=gen) * 3
    rand = lambda lo, hi: float(torch.empty(1).uniform_(lo, hi, generator=gen))  # noqa: E731
    params = [
        SamplingParams(
            temperature=0.0,
            repetition_penalty=rand(0.5, 2.0),
            frequency_penalty=rand(-2, 2),
            presence_penalty=rand(-2, 2),
        )
        for _ in range(bs - 1)
    ] + [SamplingParams(temperature=0.0)]  # a row without penalties stays untouched
    prompts = [torch.randint(0, vocab, (12,), generator=gen).tolist() for _ in range(bs)]
    outputs = [torch.randint(0, vocab, (r * 3,), generator=gen).tolist() for r in range(bs)]
    info = make_info(params, vocab, prompts, outputs)
    expected = _penalise_reference(logits, params, prompts, outputs)
    torch.testing.assert_close(apply_penalties(logits.clone(), info), expected)
    assert torch.equal(Sampler()(logits, info).next_token_ids, expected.argmax(-1))


def test_repetition_counts_the_prompt_but_frequency_and_presence_only_outputs() -> None:
    logits = torch.tensor([[2.0, -2.0, 2.0, 2.0]])
    params = [SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)]
    info = make_info(params, 4, prompts=[[0, 1]], outputs=[[2, 2]])
    out = apply_penalties(logits.clone(), info)
    # token 0: prompt only; 1: prompt only, negative; 2: output twice; 3: unseen
    assert out.tolist() == [[1.0, -4.0, 1.0 - 2 * 0.5 - 0.25, 2.0]]


def test_a_token_in_flight_counts_as_if_the_host_had_read_it() -> None:
    """Overlap scheduling: a row's last output token is still on the device (`last_ids`).
    Penalty tables and seeded steps must equal those built with the token in `output_ids`."""
    gen = torch.Generator().manual_seed(5)
    vocab = 30
    params = [
        SamplingParams(temperature=0.7, seed=3, frequency_penalty=0.5, presence_penalty=0.2),
        SamplingParams(temperature=0.0, repetition_penalty=1.3),
        SamplingParams(temperature=0.9, seed=8),  # no penalty, token in flight
        SamplingParams(temperature=0.0, frequency_penalty=1.0),  # penalty, nothing in flight
    ]
    prompts = [torch.randint(0, vocab, (6,), generator=gen).tolist() for _ in params]
    outputs = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (4, 0, 2, 3)]
    last = torch.tensor([7, 7, 11, 5])  # rows 0-2 sampled these; row 3's token is read
    read = [o + [int(t)] if i < 3 else o for i, (o, t) in enumerate(zip(outputs, last))]
    want = make_info(params, vocab, prompts, read)
    got = SamplingBatchInfo.from_requests(params, prompts, outputs, vocab, "cpu", [0, 1, 2], last)
    assert torch.equal(got.steps, want.steps)
    assert torch.equal(got.output_counts, want.output_counts)
    assert torch.equal(got.prompt_mask, want.prompt_mask)
    logits = torch.randn(4, vocab, generator=gen)
    assert torch.equal(
        Sampler()(logits, got).next_token_ids, Sampler()(logits, want).next_token_ids
    )


def test_sampler_leaves_the_callers_logits_untouched() -> None:
    logits = torch.randn(2, 10)
    before = logits.clone()
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.5, frequency_penalty=1.0)] * 2
    Sampler()(logits, make_info(params, 10, [[1, 2]] * 2, [[3, 3]] * 2))
    assert torch.equal(logits, before)


# ---------------------------------------------------------------- logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_are_raw_log_softmax_at_the_chosen_ids(dtype: torch.dtype) -> None:
    torch.manual_seed(5)
    vocab = 30
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.8),
        SamplingParams(temperature=0.5, top_k=4, seed=1),
        SamplingParams(temperature=1.5, top_p=0.7, frequency_penalty=1.0),
        SamplingParams(temperature=1.0, min_p=0.2, presence_penalty=-1.0, seed=2),
    ]
    logits = torch.randn(4, vocab).to(dtype)
    info = make_info(params, vocab, [[1, 2, 3]] * 4, [[4, 5, 5]] * 4)
    out = Sampler()(logits, info)
    expected = torch.log_softmax(logits.float(), -1).gather(1, out.next_token_ids[:, None])
    assert out.next_token_ids.dtype == torch.int64 and out.logprobs.dtype == torch.float32
    torch.testing.assert_close(out.logprobs, expected.squeeze(1))
    assert out.top_logprob_ids is None and out.top_logprob_vals is None


def test_no_logprobs_are_computed_when_no_row_returns_them() -> None:
    vocab = 40
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, seed=3)]
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(2))
    args = (params, [[1]] * 2, [[2]] * 2, vocab, "cpu")
    with_lp = Sampler()(logits, SamplingBatchInfo.from_requests(*args))
    without = Sampler()(logits, SamplingBatchInfo.from_requests(*args, need_logprobs=False))
    assert torch.equal(without.next_token_ids, with_lp.next_token_ids)
    assert without.logprobs is None and with_lp.logprobs is not None
    # top logprobs asked for: computed whatever the flag says
    top = Sampler()(logits, SamplingBatchInfo.from_requests(*args, need_logprobs=False), 3)
    assert top.logprobs is not None and top.top_logprob_ids.shape == (2, 3)


def test_top_logprobs_are_sorted_and_correct() -> None:
    torch.manual_seed(6)
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=0.0), SamplingParams(seed=3), SamplingParams()]
    out = Sampler()(logits, make_info(params, 50), top_logprobs_num=5)
    reference = torch.log_softmax(logits, -1)
    assert out.top_logprob_ids.shape == (3, 5) and out.top_logprob_ids.dtype == torch.int64
    assert bool((out.top_logprob_vals[:, :-1] >= out.top_logprob_vals[:, 1:]).all())
    torch.testing.assert_close(out.top_logprob_vals, reference.topk(5, -1).values)
    torch.testing.assert_close(out.top_logprob_vals, reference.gather(1, out.top_logprob_ids))
    assert torch.equal(out.top_logprob_ids[0, 0], out.next_token_ids[0])  # greedy row: best first


def test_top_logprobs_beyond_the_vocab_return_the_whole_vocab() -> None:
    out = Sampler()(torch.randn(1, 4), make_info([SamplingParams()], 4), top_logprobs_num=20)
    assert out.top_logprob_ids.shape == (1, 4)


# ---------------------------------------------------------------- from_requests


def test_from_requests_accepts_empty_outputs_and_vocab_edge_ids() -> None:
    vocab = 6
    params = [SamplingParams(frequency_penalty=1.0, repetition_penalty=1.2)] * 3
    prompts = [[], [vocab - 1, vocab, 0], [2]]  # `vocab` has no logit: ignored, not an error
    outputs = [[], [], [vocab - 1, vocab - 1]]
    info = make_info(params, vocab, prompts, outputs)
    assert info.output_counts.shape == (3, vocab) and info.output_counts.dtype == torch.float32
    assert info.output_counts.tolist() == [[0] * 6, [0] * 6, [0, 0, 0, 0, 0, 2]]
    assert info.prompt_mask.tolist()[1] == [True, False, False, False, False, True]
    assert info.steps.tolist() == [0, 0, 2]
    out = Sampler()(torch.randn(3, vocab), info)
    assert out.next_token_ids.shape == (3,)


def test_from_requests_sets_cpu_flags_and_disabled_values() -> None:
    vocab = 10
    info = make_info([SamplingParams(temperature=0.0), SamplingParams(top_k=-1, seed=5)], vocab)
    assert not info.is_all_greedy and not info.need_penalties
    assert not info.need_top_p_top_k_min_p  # a greedy row's filters never matter
    assert info.any_seeded and not info.all_seeded
    assert info.output_counts is None and info.prompt_mask is None
    assert info.temperatures.tolist() == [[1.0], [1.0]]
    assert info.top_ks.tolist() == [vocab, vocab]
    assert info.greedy.tolist() == [True, False]
    assert make_info([SamplingParams(top_k=50)], vocab).top_ks.tolist() == [vocab]


def test_empty_batch_samples_nothing() -> None:
    out = Sampler()(torch.zeros(0, 8), make_info([], 8), top_logprobs_num=2)
    assert out.next_token_ids.shape == (0,) and out.top_logprob_ids.shape == (0, 2)


def test_disabled_filters_keep_tokens_whose_mass_rounds_away() -> None:
    # float32 cumsum reaches the total before the last token here; top_p = 1 must keep it.
    probs = torch.softmax(torch.tensor([[0.0, -30.0, -31.0], [0.0, -30.0, -31.0]]), -1)
    params = [SamplingParams(), SamplingParams(top_k=2)]  # row 1 makes the filter code run
    info = make_info(params, 3)
    assert info.need_top_p_top_k_min_p
    filtered = filter_probs(probs, info)
    assert torch.equal(filtered[0], probs[0])
    assert filtered[1].tolist() == [probs[1, 0].item(), probs[1, 1].item(), 0.0]


# ---------------------------------------------------------------- no host syncs


@pytest.mark.parametrize(
    "params",
    [
        [SamplingParams(temperature=0.0)] * 2,
        [SamplingParams(seed=1), SamplingParams(seed=2, top_k=3)],
        [SamplingParams(), SamplingParams(top_p=0.5, min_p=0.1)],
        [
            SamplingParams(temperature=0.0, repetition_penalty=1.3),
            SamplingParams(temperature=0.7, top_k=3, top_p=0.9, min_p=0.05, seed=1),
            SamplingParams(temperature=1.2, frequency_penalty=0.5, presence_penalty=0.5),
        ],
        [
            SamplingParams(temperature=0.0, logit_bias={4: 3.0, 9: -100.0}),
            SamplingParams(temperature=0.9, min_new_tokens=5, stop_token_ids=[7]),
        ],
    ],
    ids=["all_greedy", "all_seeded", "unseeded_filtered", "mixed_penalised", "bias_min_tokens"],
)
def test_sampler_call_runs_on_meta_tensors_so_it_never_syncs_the_host(
    params: list[SamplingParams],
) -> None:
    # Meta tensors hold no data: .item(), .tolist(), nonzero, boolean-mask indexing and Python
    # branches on tensor values all raise, exactly the operations that sync a GPU's host.
    n = len(params)
    info = SamplingBatchInfo.from_requests(params, [[1, 2]] * n, [[3, 3]] * n, 50, "meta")
    out = Sampler()(torch.empty(n, 50, device="meta"), info, top_logprobs_num=4)
    assert out.next_token_ids.device.type == "meta" and out.next_token_ids.shape == (n,)
    assert out.top_logprob_ids.shape == (n, 4)


# ---------------------------------------------------------------- logit_bias and min_new_tokens


def test_logit_bias_changes_the_greedy_choice_and_minus_100_bans() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 3)
    params = [
        SamplingParams(temperature=0.0, logit_bias={2: 2.5}),  # 1 + 2.5 beats 3
        SamplingParams(temperature=0.0, logit_bias={0: -100.0, 1: -100.0}),
        SamplingParams(temperature=0.0),  # unbiased row next to biased ones
    ]
    out = Sampler()(logits, make_info(params, 4))
    assert out.next_token_ids.tolist() == [2, 2, 0]


def test_logit_bias_minus_100_is_never_sampled_and_logprobs_stay_raw() -> None:
    """Sampled rows too; the returned logprobs are the raw model's, as with penalties."""
    logits = torch.zeros(1, 5)
    sp = SamplingParams(temperature=1.0, seed=1, logit_bias={0: -100.0, 3: -100.0})
    tokens = repeated_draws(logits[0], sp, 2000, seeded=True)
    assert set(tokens.tolist()) == {1, 2, 4}
    info = make_info([sp], 5)
    out = Sampler()(logits, info)
    torch.testing.assert_close(out.logprobs, torch.log(torch.tensor([0.2])))


def test_min_new_tokens_masks_eos_and_stop_ids_until_reached_counting_in_flight() -> None:
    """Row 0 has 2 outputs read and one in flight: step 3 < 4 still masks. Row 1 reached its
    minimum (step 3 = 3). Row 2 ignores eos, so only its stop id is masked."""
    vocab, eos = 6, 5
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 9.0]] * 3)
    params = [
        SamplingParams(temperature=0.0, min_new_tokens=4, stop_token_ids=[4]),
        SamplingParams(temperature=0.0, min_new_tokens=3),
        SamplingParams(temperature=0.0, min_new_tokens=9, ignore_eos=True, stop_token_ids=[5]),
    ]
    outputs = [[1, 2], [1, 2, 3], [1]]
    last = torch.tensor([3, 3, 3])
    info = SamplingBatchInfo.from_requests(
        params, [[0]] * 3, outputs, vocab, "cpu", [0], last, eos_ids=[eos]
    )
    assert Sampler()(logits, info).next_token_ids.tolist() == [0, 5, 4]
    # One token later row 0 reaches its minimum: eos wins again.
    outputs[0] = [1, 2, 3]
    info = SamplingBatchInfo.from_requests(
        params, [[0]] * 3, outputs, vocab, "cpu", [0], last, eos_ids=[eos]
    )
    assert Sampler()(logits, info).next_token_ids.tolist() == [5, 5, 4]


def test_logit_edits_are_off_when_no_row_asks() -> None:
    params = [SamplingParams(temperature=0.0, min_new_tokens=1)]
    info = SamplingBatchInfo.from_requests(params, [[0]], [[1]], 4, "cpu", eos_ids=[3])
    assert not info.need_logit_edits and info.ban_index is None


@pytest.mark.parametrize(
    ("bias", "needle"),
    [
        ({"x": 1.0}, "keys must be token ids"),
        ({"-1": 1.0}, "keys must be token ids"),
        ({"4": 1.0}, "keys must be token ids"),
        ({"1": 100.5}, "values must be numbers"),
        ({"1": float("nan")}, "values must be numbers"),
        ({str(i): 1.0 for i in range(301)}, "at most 300"),
    ],
)
def test_verify_refuses_bad_logit_bias(bias: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle) as e:
        SamplingParams(logit_bias=bias).verify(4 if len(bias) < 301 else 1000)
    assert str(e.value).startswith("logit_bias ")


def test_verify_turns_logit_bias_keys_into_ints_and_checks_min_new_tokens() -> None:
    sp = SamplingParams(logit_bias={"3": -100, "0": 2.5})
    sp.verify(4)
    assert sp.logit_bias == {3: -100.0, 0: 2.5}
    for bad in (-1, 129):
        with pytest.raises(ValueError, match="^min_new_tokens "):
            SamplingParams(max_new_tokens=128, min_new_tokens=bad).verify(4)
