"""What the benchmark sends and when (between the CLI and the runner): prompts of exact token
lengths made from the server model's tokenizer or read from a JSONL file, the adapter each
request names (uniform or Zipf over N, plus a share of base requests), and arrival times."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    input_len: int  # tokens of `prompt` as the tokenizer encodes it (added specials included)
    output_len: int  # max tokens asked for
    adapter: str | None  # None: the base model


def sample_lengths(mean: int, range_ratio: float, n: int, rng: np.random.Generator) -> list[int]:
    """Uniform integers in [mean·(1 - r), mean·(1 + r)] (SGLang's --random-range-ratio;
    r = 0: all equal to mean), never below 1."""
    lo = max(1, round(mean * (1 - range_ratio)))
    hi = max(lo, round(mean * (1 + range_ratio)))
    return rng.integers(lo, hi + 1, size=n).tolist()


class PromptMaker:
    """Random text that encodes to exactly the asked number of tokens. Random ids need not
    survive decode -> encode (tokens merge across boundaries), so the ids are re-encoded, cut
    or extended, and tried again until the length holds. Only tokens that are printable ASCII
    and encode back to themselves are drawn: byte fragments of UTF-8 characters would decode
    to replacement characters that encode to other tokens."""

    ATTEMPTS = 16

    def __init__(self, tokenizer: Any, rng: np.random.Generator):
        self.tok, self.rng = tokenizer, rng
        self.vocab = np.array(_clean_vocab(tokenizer))
        self.added = len(tokenizer.encode(""))  # tokens the tokenizer adds itself (a BOS)

    def encode_len(self, text: str) -> int:
        return len(self.tok.encode(text))

    def make(self, n: int) -> tuple[str, int]:
        """(text, its token count): the count equals n unless no text of n tokens was found
        within ATTEMPTS tries, and then it is the closest found."""
        want = max(1, n - self.added)
        ids = self.rng.choice(self.vocab, want).tolist()
        best: tuple[int, str] | None = None
        for _ in range(self.ATTEMPTS):
            text = self.tok.decode(ids)
            got = self.tok.encode(text, add_special_tokens=False)
            if best is None or abs(len(got) - want) < abs(best[0] - want):
                best = (len(got), text)
            if len(got) == want:
                break
            ids = got[:want] if len(got) > want else got + self.draw(want - len(got))
        text = best[1]
        return text, self.encode_len(text)

    def draw(self, k: int) -> list[int]:
        return self.rng.choice(self.vocab, k).tolist()


def _clean_vocab(tok: Any) -> list[int]:
    specials = set(getattr(tok, "all_special_ids", []) or [])
    ids = [i for i in range(len(tok)) if i not in specials]
    texts = tok.batch_decode([[i] for i in ids])
    keep = [(i, t) for i, t in zip(ids, texts) if t.isascii() and t.isprintable() and t.strip()]
    encoded = tok([t for _, t in keep], add_special_tokens=False)["input_ids"]
    clean = [i for (i, _), e in zip(keep, encoded) if e == [i]]
    return clean if len(clean) >= 100 else ids  # an odd tokenizer: take what there is


@dataclass(frozen=True)
class DatasetEntry:
    prompt: str
    output_len: int | None
    adapter: str | None


def read_jsonl(path: str | Path) -> list[DatasetEntry]:
    """One JSON object a line: `prompt` (or `text`), and optionally `output_len` and
    `adapter` (which overrides the adapter distribution for that prompt)."""
    out = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        prompt = row.get("prompt", row.get("text"))
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"{path}:{i}: needs a non-empty string 'prompt'")
        out.append(DatasetEntry(prompt, row.get("output_len"), row.get("adapter")))
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


@dataclass(frozen=True)
class AdapterMix:
    """Which adapter each request names: None (the base model) with probability
    `base_fraction`, else one of `names`, uniform or Zipf(alpha) by rank in `names`."""

    names: tuple[str, ...]
    dist: str = "uniform"  # "uniform" | "zipf"
    alpha: float = 1.0
    base_fraction: float = 0.0

    def weights(self) -> np.ndarray:
        if self.dist == "zipf":
            w = 1.0 / np.arange(1, len(self.names) + 1) ** self.alpha
        else:
            w = np.ones(len(self.names))
        return w / w.sum()

    def sample(self, n: int, rng: np.random.Generator) -> list[str | None]:
        if not self.names:
            return [None] * n
        picks = rng.choice(len(self.names), size=n, p=self.weights())
        base = rng.random(n) < self.base_fraction
        return [None if b else self.names[i] for i, b in zip(picks, base)]


def arrival_times(n: int, rate: float, arrival: str, rng: np.random.Generator) -> list[float]:
    """Seconds after the start at which each request is sent: all at 0 for rate inf, else
    Poisson (exponential gaps) or fixed gaps of 1/rate."""
    if math.isinf(rate):
        return [0.0] * n
    gaps = rng.exponential(1.0 / rate, n) if arrival == "poisson" else np.full(n, 1.0 / rate)
    gaps[0] = 0.0  # the first request goes at once
    return np.cumsum(gaps).tolist()


def build_requests(
    n: int,
    tokenizer: Any,
    mix: AdapterMix,
    input_len: int,
    output_len: int,
    input_range: float,
    output_range: float,
    seed: int,
    dataset: list[DatasetEntry] | None = None,
) -> list[BenchRequest]:
    """n requests, the same for a given seed whatever the request rate."""
    rng = np.random.default_rng(seed)
    adapters = mix.sample(n, rng)
    outs = sample_lengths(output_len, output_range, n, rng)
    maker = PromptMaker(tokenizer, rng)
    reqs = []
    if dataset:
        for i in range(n):
            e = dataset[i % len(dataset)]
            adapter = e.adapter if e.adapter is not None else adapters[i]
            out_len = e.output_len or outs[i]
            reqs.append(BenchRequest(e.prompt, maker.encode_len(e.prompt), out_len, adapter))
        return reqs
    ins = sample_lengths(input_len, input_range, n, rng)
    for i in range(n):
        text, got = maker.make(ins[i])
        reqs.append(BenchRequest(text, got, outs[i], adapters[i]))
    return reqs
