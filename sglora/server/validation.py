"""InputChecker: tokenization and every check a request passes before it reaches the scheduler
(used by the OpenAI and native route handlers through the tokenizer manager).

The scheduler trusts its input (an out-of-vocabulary id would crash the forward pass), so
everything user-controlled is checked here and rejected with a 4xx `APIError` naming the field.
"""

from __future__ import annotations

from typing import Any

from sglora.messages import SamplingParams, SchedulerReady
from sglora.server.errors import APIError, bad_value


class InputChecker:
    def __init__(self, tokenizer: Any, ready: SchedulerReady, model_name: str):
        self.tokenizer, self.model_name = tokenizer, model_name
        self.vocab_size, self.context_len = ready.vocab_size, ready.context_len
        self.kv_capacity = ready.kv_capacity
        bos = getattr(tokenizer, "bos_token_id", None)
        self.health_token = bos if isinstance(bos, int) and 0 <= bos < self.vocab_size else 0

    def encode(self, text: str, param: str) -> list[int]:
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
        except ValueError as e:
            message = str(e)
            field = message.split(" ", 1)[0]
            name = (names or {}).get(field, field)
            raise bad_value(name + message[len(field) :], name) from None
        return sp
