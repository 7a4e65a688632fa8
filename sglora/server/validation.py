"""InputChecker: tokenization and every check a request passes before it reaches the scheduler
(used by the OpenAI and native route handlers through the tokenizer manager).

The scheduler trusts its input (an out-of-vocabulary id would crash the forward pass), so
everything user-controlled is checked here and rejected with a 4xx `APIError` naming the field.
Text longer than any prompt that could fit the context is refused before it is tokenized:
tokenizing runs on the event loop, so megabytes of text would stall every other request.
"""

from __future__ import annotations

from typing import Any

from sglora.messages import SamplingParams, SchedulerReady
from sglora.server.errors import APIError, bad_value

MAX_STOP_STRINGS = 32  # each is matched against the text after every token
MAX_STOP_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024


def max_token_bytes(tokenizer: Any) -> int:
    """Longest UTF-8 length of a vocabulary entry (as stored: byte-level BPE stores a byte as
    a 1-2 byte character, so this over-counts, which only loosens the bound)."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return max((len(t.encode("utf-8", "replace")) for t in vocab), default=64)


class InputChecker:
    def __init__(self, tokenizer: Any, ready: SchedulerReady, model_name: str):
        self.tokenizer, self.model_name = tokenizer, model_name
        self.vocab_size, self.context_len = ready.vocab_size, ready.context_len
        self.kv_capacity = ready.kv_capacity
        bos = getattr(tokenizer, "bos_token_id", None)
        self.health_token = bos if isinstance(bos, int) and 0 <= bos < self.vocab_size else 0
        # no token covers more text than this, so a longer text has more tokens than fit
        self.max_text_bytes = self.context_len * max_token_bytes(tokenizer)

    def check_text_length(self, text: str, param: str) -> None:
        if len(text) <= self.max_text_bytes // 4:  # 4: the most UTF-8 bytes of a character
            return
        size = len(text.encode("utf-8", "replace"))
        if size > self.max_text_bytes:
            raise APIError(
                400,
                f"{param} is {size} bytes of text: more tokens than this model's maximum "
                f"context length of {self.context_len} tokens can hold",
                param,
                "context_length_exceeded",
            )

    def encode(self, text: str, param: str) -> list[int]:
        self.check_text_length(text, param)
        ids = self.tokenizer.encode(text)
        if not ids:
            raise bad_value(f"{param} is empty", param)
        return ids

    def chat_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        if not messages:
            raise bad_value("messages must hold at least one message", "messages")
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception as e:  # noqa: BLE001 - template errors come from the user's messages
            raise bad_value(
                f"the chat template failed on these messages: {e}", "messages"
            ) from None
        # the template writes the special tokens (bos, role markers) itself
        return self.encode_raw(text, "messages")

    def encode_raw(self, text: str, param: str) -> list[int]:
        self.check_text_length(text, param)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise bad_value(f"{param} is empty", param)
        return ids

    def check_ids(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise bad_value(f"{param} is empty", param)
        bad = next(
            (
                t
                for t in ids
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size
            ),
            None,
        )
        if bad is not None:
            raise bad_value(
                f"{param} must hold token ids in [0, {self.vocab_size}), got {bad!r}", param
            )
        return list(ids)

    def max_new_tokens(self, prompt_len: int, requested: int | None, param: str) -> int:
        """`requested`, checked against the context length; None: the rest of the context
        (as vLLM), capped by the KV cache."""
        limit = min(self.context_len, self.kv_capacity)
        if prompt_len >= limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens, and "
                f"the prompt has {prompt_len} tokens, leaving no room for output.",
                param,
                "context_length_exceeded",
            )
        if requested is None:
            return limit - prompt_len
        if requested < 0:
            raise bad_value(f"{param} must be >= 0, got {requested}", param)
        if prompt_len + requested > limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. "
                f"However, you requested {prompt_len + requested} tokens "
                f"({prompt_len} in the prompt, {requested} for the completion). "
                f"Please reduce the length of the prompt or {param}.",
                param,
                "context_length_exceeded",
            )
        return requested

    def verify(self, sp: SamplingParams, names: dict[str, str] | None = None) -> SamplingParams:
        """SamplingParams.verify, with the failing field renamed to the API's name for it."""
        try:
            sp.verify(self.vocab_size)
            _check_stops(sp)
        except ValueError as e:
            message = str(e)
            field = message.split(" ", 1)[0]
            name = (names or {}).get(field, field)
            raise bad_value(name + message[len(field) :], name) from None
        return sp


def _check_stops(sp: SamplingParams) -> None:
    """Bounds on what is matched after every generated token (ValueError naming the field)."""
    if len(sp.stop) > MAX_STOP_STRINGS:
        raise ValueError(
            f"stop holds {len(sp.stop)} strings; at most {MAX_STOP_STRINGS} are allowed"
        )
    longest = max((len(s) for s in sp.stop), default=0)
    if longest > MAX_STOP_CHARS:
        raise ValueError(
            f"stop holds a string of {longest} characters; at most {MAX_STOP_CHARS} are allowed"
        )
    if len(sp.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise ValueError(
            f"stop_token_ids holds {len(sp.stop_token_ids)} ids; at most "
            f"{MAX_STOP_TOKEN_IDS} are allowed"
        )
