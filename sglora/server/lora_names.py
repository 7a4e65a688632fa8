"""The api server's view of the loaded LoRA adapters (kept by the tokenizer manager from the
scheduler's ready message and its LoRAUpdateResps; read by the route handlers).

It turns the `model` of an OpenAI request (`BASE`, `NAME` or `BASE:NAME`) and the `lora_path`
of /generate into an adapter name or None (the base model), and answers 404 for a name that is
not loaded before anything is tokenized. An adapter whose unload was sent counts as gone at
once, as it does in the scheduler, so no new request can slip in while it drains.
"""

from __future__ import annotations

from collections import Counter

from sglora.server.errors import APIError


class AdapterNames:
    def __init__(self, base: str, enabled: bool, loaded: dict[str, str]):
        self.base, self.enabled = base, enabled
        self._reported = dict(loaded)  # name -> path, as the scheduler last reported
        self._unloading: Counter[str] = Counter()  # unloads sent and not yet answered

    @property
    def loaded(self) -> dict[str, str]:
        """Adapters new requests may use: name -> path, in load order."""
        return {n: p for n, p in self._reported.items() if n not in self._unloading}

    def __contains__(self, name: object) -> bool:
        return name in self._reported and name not in self._unloading

    def sync(self, reported: dict[str, str]) -> None:
        """The scheduler's list after a load or unload (responses arrive in order)."""
        self._reported = dict(reported)

    def begin_unload(self, name: str) -> None:
        self._unloading[name] += 1

    def end_unload(self, name: str) -> None:
        self._unloading[name] -= 1
        if self._unloading[name] <= 0:
            del self._unloading[name]

    def from_model(self, model: str | None) -> str | None:
        """OpenAI `model` -> adapter name, None for the base model; 404 if unknown."""
        if model is None or model == self.base:
            return None
        if model in self:
            return model
        prefix = self.base + ":"
        if model.startswith(prefix) and model[len(prefix) :] in self:
            return model[len(prefix) :]
        raise APIError(404, f"The model `{model}` does not exist.", "model", "model_not_found")

    def from_lora_path(self, name: str | None, param: str) -> str | None:
        """/generate `lora_path` (an adapter name) -> the name, None for the base; 404 if
        unknown."""
        if name is None or name in self:
            return name
        why = "" if self.enabled else " (this server was started without --enable-lora)"
        raise APIError(
            404, f"no LoRA adapter named {name!r} is loaded{why}", param, "lora_not_found"
        )

    def check_new_name(self, name: str) -> None:
        """A name a load may register: one that `from_model` can tell apart."""
        if not name.strip() or name != name.strip():
            raise APIError(
                400,
                f"lora_name must be non-empty without surrounding spaces, got {name!r}",
                "lora_name",
                "invalid_value",
            )
        if name == self.base:
            raise APIError(
                400, f"lora_name {name!r} is the base model's name", "lora_name", "invalid_value"
            )
