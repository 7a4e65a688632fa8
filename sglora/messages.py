"""Structs that cross a process boundary (api server <-> scheduler <-> TP ranks), and nothing else.

They are plain dataclasses so they pickle cheaply over ZMQ; validation of user input happens at
the HTTP edge (pydantic) and in `SamplingParams.verify`, which raises `ValueError` with a message
meant for the user.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# Cap on top-logprobs per token, as in the OpenAI API (top_logprobs <= 20).
MAX_TOP_LOGPROBS = 20
# Caps on logit_bias, as in the OpenAI API: entries per request, and |bias|.
MAX_LOGIT_BIAS_ENTRIES = 300
MAX_LOGIT_BIAS = 100.0


@dataclass
class SamplingParams:
    """Per-request generation controls (SGLang `sampling_params` names)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: whole vocabulary
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    seed: int | None = None
    # Token id -> bias added to its logit before sampling (OpenAI `logit_bias`); `verify` turns
    # the JSON's string keys into ints.
    logit_bias: dict[int, float] | None = None
    # EOS and stop token ids are masked, and stop strings ignored, until this many tokens exist.
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def verify(self, vocab_size: int | None = None) -> None:
        """Raise ValueError naming the first out-of-range field."""

        def bad(name: str, why: str) -> None:
            raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")

        for name in (
            "temperature",
            "top_p",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
        ):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(name, "must be a finite number")
        if self.max_new_tokens is None or self.max_new_tokens < 0:
            bad("max_new_tokens", "must be >= 0")
        if self.temperature < 0:
            bad("temperature", "must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if self.top_k < -1 or self.top_k == 0:
            bad("top_k", "must be -1 (disabled) or >= 1")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "must be in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", "must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 2.0:
            bad("repetition_penalty", "must be in (0, 2]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be non-empty strings")
        if vocab_size is not None and any(
            not isinstance(t, int) or not 0 <= t < vocab_size for t in self.stop_token_ids
        ):
            bad("stop_token_ids", f"must be token ids in [0, {vocab_size})")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", "must be an integer")
        if not isinstance(self.min_new_tokens, int) or self.min_new_tokens < 0:
            bad("min_new_tokens", "must be an integer >= 0")
        if self.min_new_tokens > self.max_new_tokens:
            bad("min_new_tokens", f"must be <= max_new_tokens ({self.max_new_tokens})")
        if self.logit_bias:
            self.logit_bias = _checked_logit_bias(self.logit_bias, vocab_size)


def _checked_logit_bias(bias: dict, vocab_size: int | None) -> dict[int, float]:
    """{token id: bias} with int keys, or ValueError naming `logit_bias` and the bad entry."""
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise ValueError(
            f"logit_bias holds {len(bias)} entries; at most {MAX_LOGIT_BIAS_ENTRIES} are allowed"
        )
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            token = -1
        if isinstance(key, bool) or token < 0 or (vocab_size is not None and token >= vocab_size):
            vocab = f"[0, {vocab_size})" if vocab_size is not None else "ids >= 0"
            raise ValueError(f"logit_bias keys must be token ids in {vocab}, got {key!r}")
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or abs(value) > MAX_LOGIT_BIAS:
            raise ValueError(
                f"logit_bias values must be numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                f"got {value!r} for token {key!r}"
            )
        out[token] = float(value)
    return out


@dataclass
class TokenizedGenerateReq:
    """api server -> scheduler: one generation request, already tokenized."""

    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    return_logprob: bool = False
    # First prompt position whose logprob is returned; -1: none of the prompt (outputs only).
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    stream: bool = False
    lora_name: str | None = None
    input_text: str | None = None


@dataclass
class AbortReq:
    """api server -> scheduler: stop a request and free its KV now."""

    rid: str


@dataclass
class ReqOutput:
    """scheduler -> api server: what one request produced in one step (incremental)."""

    rid: str
    new_token_ids: list[int]
    # Logprob of each new token under the model's raw distribution (before sampling controls).
    new_token_logprobs: list[float] | None = None
    # One list of (token_id, logprob) per new token, best first.
    new_top_logprobs: list[list[tuple[int, float]]] | None = None
    # Prompt tokens' logprobs (sent once, with the first output): (token_id, logprob|None).
    input_token_logprobs: list[tuple[int, float | None]] | None = None
    input_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    finished: bool = False
    # {"type": "stop", "matched": str|int|None} | {"type": "length", "length": int}
    # | {"type": "abort", "message": str}
    finish_reason: dict[str, Any] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


# ---- api server <-> scheduler process: transport, batching and control ---------------------


@dataclass
class PortArgs:
    """ZMQ endpoints (ipc:// in a private temp dir) between the api server and the scheduler."""

    scheduler_input: str  # api server PUSH -> scheduler PULL
    tokenizer_input: str  # scheduler PUSH -> api server PULL


@dataclass
class SchedulerReady:
    """scheduler -> launcher (over the ready pipe): the model is loaded and the sockets bound."""

    pid: int
    context_len: int
    vocab_size: int
    kv_capacity: int  # tokens
    max_running_requests: int
    architecture: str
    eos_token_ids: list[int]
    device: str
    dtype: str
    lora_enabled: bool = False
    lora_adapters: dict[str, str] = field(default_factory=dict)  # name -> path, at start-up


@dataclass
class SchedulerInitError:
    """scheduler -> launcher (over the ready pipe): start-up failed; `message` is for the user."""

    message: str


@dataclass
class BatchReqOutput:
    """scheduler -> api server: every request's output of one step, in one message."""

    outputs: list[ReqOutput]


@dataclass
class FlushCacheReq:
    """api server -> scheduler: drop the prefix cache (only done when no request runs)."""

    req_id: str


@dataclass
class FlushCacheResp:
    req_id: str
    success: bool
    message: str


@dataclass
class GetStatsReq:
    """api server -> scheduler: report load and KV usage, and check the KV pool's integrity
    (and the LoRA slot pool's when `check_lora`: it reads every empty slot, so /metrics skips
    it)."""

    req_id: str
    check_lora: bool = False


@dataclass
class SlotLoadHistogram:
    """Host durations of adapter loads into device slots (packing + queueing the host -> device
    copy, which runs on a side stream and is not included), cumulative since start:
    the api server renders it as the Prometheus histogram `sglora:lora_slot_load_seconds`."""

    bounds: tuple[float, ...]  # seconds, upper bucket bounds, ascending (+Inf implied)
    counts: list[int]  # loads taking <= bounds[i] (cumulative, as Prometheus buckets)
    count: int = 0
    total_seconds: float = 0.0

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.total_seconds += seconds
        for i, bound in enumerate(self.bounds):
            if seconds <= bound:
                self.counts[i] += 1


@dataclass
class LoRAStats:
    """The LoRA slot pool as the scheduler sees it (part of SchedulerStats)."""

    slots: list[str | None]  # adapter in each device slot, None: free
    pinned: list[str]
    loaded: dict[str, str]  # name -> path, adapters that new requests may use
    pending_unloads: list[str]  # refused to new requests, waiting for their last request
    integrity_error: str | None  # None: check_integrity() passed (or was not asked for)
    slot_loads: SlotLoadHistogram | None = None


@dataclass
class SchedulerStats:
    req_id: str
    running: int
    waiting: int
    kv_used_tokens: int  # slots not free: held by running requests or the prefix cache
    kv_cached_tokens: int  # slots held by the prefix cache
    kv_capacity: int
    num_retractions: int
    integrity_error: str | None  # None: check_integrity() passed
    lora: LoRAStats | None = None  # None: started without --enable-lora


@dataclass
class LoadLoRAReq:
    """api server -> scheduler: read, check and register an adapter (pinned: give it a slot
    for good). Answered with LoRAUpdateResp."""

    req_id: str
    lora_name: str
    lora_path: str
    pinned: bool = False


@dataclass
class UnloadLoRAReq:
    """api server -> scheduler: refuse new requests for the adapter now, and remove it once
    its last request finishes. Answered with LoRAUpdateResp only then."""

    req_id: str
    lora_name: str


@dataclass
class LoRAUpdateResp:
    """scheduler -> api server: the outcome of a LoadLoRAReq or UnloadLoRAReq."""

    req_id: str
    success: bool
    error_message: str | None
    # "lora_disabled" | "invalid_lora_adapter" | "lora_name_in_use" | "lora_not_found"
    error_code: str | None
    loaded_adapters: dict[str, str]  # name -> path, after this update (pending unloads left out)


@dataclass
class ShutdownReq:
    """api server -> scheduler: leave the loop and exit 0."""
