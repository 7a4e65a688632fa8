"""Req.fill_slice / fill_len (the per-step paths) agree with the full fill_ids list."""

from __future__ import annotations

import random

from sglora.messages import SamplingParams
from sglora.scheduler.request import Req


def test_fill_slice_and_len_match_fill_ids():
    rng = random.Random(0)
    for _ in range(300):
        prompt = [rng.randrange(100) for _ in range(rng.randint(1, 12))]
        req = Req("r", prompt, SamplingParams())
        req.output_ids = [rng.randrange(100) for _ in range(rng.randint(0, 6))]
        full = req.fill_ids
        assert req.fill_len == len(full)
        start = rng.randint(0, len(full))
        end = rng.randint(start, len(full))
        assert req.fill_slice(start, end) == full[start:end], (len(prompt), start, end)
