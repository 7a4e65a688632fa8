"""Tiny, deterministic checkpoints of every supported HF family, built locally and cached on disk:
what tests, `--demo` (engine.py) and benchmarks load through the weight loader like any model.

Each checkpoint is an ordinary HF directory (config.json, safetensors, generation_config.json and
a byte-level BPE tokenizer trained on `corpus.txt`), so it also loads in `transformers`/`peft`,
the references the tests compare against. Nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OlmoeConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

logger = logging.getLogger(__name__)

CORPUS_PATH = Path(__file__).with_name("corpus.txt")
VOCAB_SIZE = 1024  # including the special tokens
SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|bos|>", "<|im_start|>", "<|im_end|>")
# Specials take the top ids, so random test prompts drawn from [0, VOCAB_SIZE - 8) avoid them.
EOS_ID, PAD_ID, BOS_ID, IM_START_ID, IM_END_ID = range(VOCAB_SIZE - len(SPECIAL_TOKENS), VOCAB_SIZE)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
FUSED_VARIANT = "fused_experts"
SHARD_SIZE = "200KB"  # ~1 MB of fp32 weights -> several shards

# Init scales (see _draw): unit-scale residual stream, logits with std ~3 so greedy argmax is
# decided by a margin far above float noise, router logits with std ~3 so top-k is decisive.
LM_HEAD_GAIN = 3.0
ROUTER_GAIN = 3.0
SPECIAL_ROW_SCALE = 0.25  # a random model rarely emits control tokens, so its text stays visible

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
    dtype="float32",
)
_MOE: dict[str, Any] = dict(num_experts_per_tok=2, output_router_logits=False)
# Qwen MoE fields: every layer sparse; the dense-MLP size is then unused but stays small.
_SPARSE_EVERY_LAYER: dict[str, Any] = dict(
    decoder_sparse_step=1, mlp_only_layers=[], intermediate_size=128
)


# ---------------------------------------------------------------------------------- tokenizer


def _paragraphs() -> Iterator[str]:
    for block in CORPUS_PATH.read_text(encoding="utf-8").split("\n\n"):
        if block.strip():
            yield block + "\n\n"


def _train_tokenizer() -> Tokenizer:
    """Byte-level BPE; the trainer breaks count ties by pair id, so the result is deterministic."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_paragraphs(), trainer=trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE - len(SPECIAL_TOKENS), "corpus too small for vocab"
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    special_ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    assert special_ids == list(range(EOS_ID, VOCAB_SIZE)), special_ids
    return tok


@lru_cache(maxsize=1)
def _hf_tokenizer() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(),
        bos_token="<|bos|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=_COMMON["max_position_embeddings"],
        clean_up_tokenization_spaces=False,  # decode must round-trip text exactly
    )


def build_tokenizer(out_dir: str | Path) -> Path:
    """Trains the tiny tokenizer (once per process) and saves it into `out_dir`, unless it is
    already there."""
    out = Path(out_dir)
    if not ((out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()):
        _hf_tokenizer().save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------- configs


def _llama(**kw: Any) -> PretrainedConfig:
    fields = dict(architectures=["LlamaForCausalLM"], intermediate_size=128)
    return LlamaConfig(**{**_COMMON, **fields, **kw})


def _mistral(**kw: Any) -> PretrainedConfig:
    # v0.1's shape: a sliding window below max_position_embeddings (so the context is capped to
    # it, model_config.py), and head_dim set apart from hidden_size / heads, as Mistral-Nemo does.
    fields = dict(
        architectures=["MistralForCausalLM"],
        intermediate_size=128,
        max_position_embeddings=32768,
        sliding_window=4096,
        head_dim=32,
    )
    return MistralConfig(**{**_COMMON, **fields, **kw})


def _qwen2(**kw: Any) -> PretrainedConfig:
    fields = dict(architectures=["Qwen2ForCausalLM"], intermediate_size=128)
    return Qwen2Config(**{**_COMMON, **fields, **kw})  # q/k/v bias is built into the model


def _qwen3(**kw: Any) -> PretrainedConfig:
    fields = dict(architectures=["Qwen3ForCausalLM"], intermediate_size=128)
    return Qwen3Config(**{**_COMMON, **fields, **kw})


def _qwen3_moe(**kw: Any) -> PretrainedConfig:
    fields = dict(
        architectures=["Qwen3MoeForCausalLM"],
        num_experts=8,
        moe_intermediate_size=32,
        norm_topk_prob=True,
    )
    return Qwen3MoeConfig(**{**_COMMON, **_MOE, **_SPARSE_EVERY_LAYER, **fields, **kw})


def _qwen2_moe(**kw: Any) -> PretrainedConfig:
    fields = dict(
        architectures=["Qwen2MoeForCausalLM"],
        num_experts=8,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        norm_topk_prob=False,
    )
    return Qwen2MoeConfig(**{**_COMMON, **_MOE, **_SPARSE_EVERY_LAYER, **fields, **kw})


def _mixtral(**kw: Any) -> PretrainedConfig:
    fields = dict(architectures=["MixtralForCausalLM"], num_local_experts=8, intermediate_size=32)
    return MixtralConfig(**{**_COMMON, **_MOE, **fields, **kw})


def _olmoe(**kw: Any) -> PretrainedConfig:
    # OLMoE's q/k norms span the whole projected width (heads·head_dim), not one head.
    fields = dict(architectures=["OlmoeForCausalLM"], num_experts=8, intermediate_size=32)
    return OlmoeConfig(**{**_COMMON, **_MOE, **fields, **kw})


FAMILIES: dict[str, Callable[..., PretrainedConfig]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "qwen3_moe": _qwen3_moe,
    "qwen2_moe": _qwen2_moe,
    "mixtral": _mixtral,
    "olmoe": _olmoe,
}


def make_config(family: str, **overrides: Any) -> PretrainedConfig:
    """The tiny config of `family`; `overrides` are config fields (e.g. tie_word_embeddings,
    rope_parameters, or the legacy rope_scaling that transformers 5 folds into it)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose from {sorted(FAMILIES)}")
    return FAMILIES[family](**overrides)


# ------------------------------------------------------------------------------------ weights


def _draw(name: str, shape: torch.Size, g: torch.Generator) -> torch.Tensor:
    """A fresh value for parameter `name`. HF's std-0.02 init gives near-uniform next-token
    distributions whose argmax is decided by float noise; these scales give peaked ones."""
    noise = torch.randn(shape, generator=g)
    if name.endswith("norm.weight"):  # every RMSNorm, q/k norms included
        return 1.0 + 0.1 * noise
    if name.endswith(".bias"):
        return 0.1 * noise
    if "embed_tokens" in name:
        return noise  # unit-scale residual stream
    gain = 1.0
    if name.startswith("lm_head"):
        gain = LM_HEAD_GAIN
    elif re.search(r"\.mlp\.gate\.weight$", name):  # the router, not shared_expert.gate_proj
        gain = ROUTER_GAIN
    return noise * (gain / math.sqrt(shape[-1]))  # fan-in is the last dim, 3D experts too


def _init_weights(model: PreTrainedModel, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied weights appear once
            param.copy_(_draw(name, param.shape, g))
        model.get_output_embeddings().weight[EOS_ID:] *= SPECIAL_ROW_SCALE


def _family_seed(family: str) -> int:
    return zlib.crc32(family.encode())  # stable across processes, unlike hash()


def _generation_config() -> GenerationConfig:
    # Two eos ids, as chat models have, so stopping on any of several ids is exercised.
    return GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=[EOS_ID, IM_END_ID], pad_token_id=PAD_ID
    )


def _save_fused(model: PreTrainedModel, out: Path) -> None:
    """The in-memory layout: fused 3D `experts.gate_up_proj` [E, 2I, H] / `down_proj` [E, H, I]."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if not any(k.endswith("experts.gate_up_proj") for k in state):
        raise ValueError(f"variant {FUSED_VARIANT!r} needs an MoE family")
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # safetensors refuses shared storage
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


def _build(family: str, variant: str, overrides: dict[str, Any], sharded: bool, out: Path) -> None:
    config = make_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _init_weights(model, _family_seed(family))
    model.generation_config = _generation_config()
    if variant == FUSED_VARIANT:
        _save_fused(model, out)
    else:
        model.save_pretrained(out, max_shard_size=SHARD_SIZE if sharded else "1GB")
    build_tokenizer(out)


# -------------------------------------------------------------------------------------- cache


@lru_cache(maxsize=1)
def _code_fingerprint() -> str:
    """Any edit of this file or the corpus changes every cache key, so stale builds are unused."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(CORPUS_PATH.read_bytes())
    return h.hexdigest()


def _cache_key(family: str, variant: str, overrides: dict[str, Any], sharded: bool) -> str:
    payload = {
        "config": make_config(family, **overrides).to_dict(),  # includes transformers_version
        "overrides": overrides,
        "variant": variant,
        "sharded": sharded,
        "code": _code_fingerprint(),
    }
    blob = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    return Path(os.environ.get("SGLORA_CACHE_DIR") or Path.home() / ".cache" / "sglora")


def _make_readable(path: Path) -> None:
    """mkdtemp and safetensors create private files; a cache may be shared between users."""
    path.chmod(0o755)
    for f in path.iterdir():
        f.chmod(0o644)


def tiny_model_path(
    family: str,
    *,
    variant: str = "default",
    overrides: dict | None = None,
    sharded: bool = False,
    cache_dir: str | Path | None = None,
) -> Path:
    """The directory of a tiny checkpoint, built on first use. `variant` names the checkpoint
    (any label; "fused_experts" also saves fused 3D expert tensors); `overrides` are config
    fields. Safe to call from concurrent processes: each builds in a temp dir and renames it."""
    if not re.fullmatch(r"[A-Za-z0-9_.]+", variant):
        raise ValueError(f"variant {variant!r}: use letters, digits, '_' and '.'")
    if sharded and variant == FUSED_VARIANT:
        raise ValueError(f"variant {FUSED_VARIANT!r} is written as one file; drop sharded=True")
    overrides = dict(overrides or {})
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    final = root / f"{family}-{variant}-{_cache_key(family, variant, overrides, sharded)}"
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        start = time.perf_counter()
        _build(family, variant, overrides, sharded, tmp)
        _make_readable(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # not merely another process's win
                raise
        logger.info("built tiny %s in %.2f s: %s", final.name, time.perf_counter() - start, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def demo_model_path() -> Path:
    """The model `--demo` serves: tiny Qwen3-MoE."""
    return tiny_model_path("qwen3_moe")
