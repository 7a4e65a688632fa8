"""ModelConfig: the facts about a checkpoint that the runner, scheduler and KV pool need.

Reads the HF `config.json` (as data: no remote code), resolves the dtype and context length, and
refuses what sglora cannot run with a one-line error naming the offending field.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, GenerationConfig, PretrainedConfig

from sglora.config import ConfigError

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_model_dir(path: str) -> Path:
    """A local directory as is; otherwise a hub repo id fetched with huggingface_hub (honours
    HF_HUB_OFFLINE, so an offline machine gets a clear error instead of a hang)."""
    if os.path.isdir(path):
        return Path(path)
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                path,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"],
                # Mistral repos also hold the weights in Mistral's own format (a second copy
                # under other names), which sglora does not read
                ignore_patterns=["consolidated*"],
            )
        )
    except Exception as e:  # noqa: BLE001 - any hub failure is a config problem for the user
        raise ConfigError(
            f"--model-path: {path!r} is not a directory and could not be fetched "
            f"from the Hugging Face hub ({type(e).__name__}: {e})"
        ) from e


@dataclass
class ModelConfig:
    path: Path
    hf_config: PretrainedConfig
    dtype: torch.dtype
    context_len: int
    eos_token_ids: tuple[int, ...]

    @property
    def architecture(self) -> str:
        return self.hf_config.architectures[0]

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        c = self.hf_config
        return getattr(c, "num_key_value_heads", None) or c.num_attention_heads

    @property
    def head_dim(self) -> int:
        c = self.hf_config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    @classmethod
    def load(
        cls,
        model_path: str,
        dtype: str = "auto",
        device: str = "cpu",
        context_length: int | None = None,
    ) -> ModelConfig:
        path = resolve_model_dir(model_path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"--model-path: no config.json in {path}")
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        if not getattr(hf_config, "architectures", None):
            raise ConfigError(f"config.json in {path}: field 'architectures' is missing")
        model_len = getattr(hf_config, "max_position_embeddings", None) or 4096
        if context_length is not None and context_length > model_len:
            raise ConfigError(
                f"--context-length: {context_length} exceeds the model's "
                f"max_position_embeddings {model_len}"
            )
        window = getattr(hf_config, "sliding_window", None)
        if window and getattr(hf_config, "use_sliding_window", True) and window < model_len:
            # Within the window, sliding-window attention equals full attention.
            if context_length is not None and context_length > window:
                raise ConfigError(
                    f"--context-length: {context_length} exceeds the model's "
                    f"sliding_window {window}, which sglora does not implement"
                )
            if context_length is None:
                logger.info(
                    "context length capped to the model's sliding_window %d "
                    "(max_position_embeddings %d): sglora does not implement sliding-window "
                    "attention, which equals full attention within the window",
                    window,
                    model_len,
                )
            model_len = window
        return cls(
            path=path,
            hf_config=hf_config,
            dtype=_resolve_dtype(dtype, hf_config, device),
            context_len=context_length or model_len,
            eos_token_ids=_eos_ids(path, hf_config),
        )


def _resolve_dtype(dtype: str, hf_config: PretrainedConfig, device: str) -> torch.dtype:
    if dtype != "auto":
        return _DTYPES[dtype]
    if device == "cpu":
        return torch.float32
    ckpt = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(ckpt, str):
        ckpt = _DTYPES.get(ckpt, torch.bfloat16)
    return torch.bfloat16 if ckpt in (None, torch.float32) else ckpt


def _eos_ids(path: Path, hf_config: PretrainedConfig) -> tuple[int, ...]:
    """Every eos id of generation_config.json and config.json, deduplicated, in order."""
    ids: list[int] = []
    sources = [getattr(hf_config, "eos_token_id", None)]
    if (path / "generation_config.json").is_file():
        try:
            sources.insert(0, GenerationConfig.from_pretrained(path).eos_token_id)
        except (OSError, ValueError, json.JSONDecodeError):
            pass
    for src in sources:
        for i in [src] if isinstance(src, int) else (src or []):
            if i not in ids:
                ids.append(i)
    return tuple(ids)
