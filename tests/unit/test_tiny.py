"""The tiny test models: tokenizer round-trips and chat template, every family loads in HF with
finite logits, the on-disk cache and checkpoint variants, and weights that make decisive tests
(peaked next-token distributions, varied greedy text, router top-k without near-ties)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from sglora.testing import tiny
from sglora.testing.tiny import (
    EOS_ID,
    FAMILIES,
    IM_END_ID,
    VOCAB_SIZE,
    build_tokenizer,
    make_config,
    tiny_model_path,
)
from tests.conftest import MOE_FAMILIES, random_prompts

TEXTS = [
    "The weather in Zürich today is",
    "  leading spaces, a naïve café, emoji 🙂😅 and 日本語\n\n\ttabs  ",
    'def main():\n    print(f"{x!r}")  # trailing  \n',
    "a  .  b , c",
]


def load(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(
        build_tokenizer(tmp_path_factory.mktemp("tok")), local_files_only=True
    )


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_text(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(i < EOS_ID for i in ids), "plain text must not produce special tokens"
    assert tokenizer.decode(ids) == text


def test_tokenizer_vocab_and_special_ids(tokenizer):
    assert len(tokenizer) == VOCAB_SIZE
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id) == (
        tiny.EOS_ID,
        tiny.PAD_ID,
        tiny.BOS_ID,
    )
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [
        tiny.IM_START_ID,
        IM_END_ID,
    ]


def test_tokenizer_training_is_deterministic():
    assert tiny._train_tokenizer().to_str() == tiny._train_tokenizer().to_str()


def test_chat_template_renders(tokenizer):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi café!"}]},
    ]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi café!<|im_end|>\n<|im_start|>assistant\n"
    )
    plain = tokenizer.apply_chat_template(msgs[:1], tokenize=False)
    assert plain == "<|im_start|>system\nBe brief.<|im_end|>\n"
    ids = tokenizer.encode(text)
    assert ids[0] == tiny.IM_START_ID and ids.count(IM_END_ID) == 2


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_builds_and_loads_with_finite_logits(family):
    path = tiny_model_path(family)
    model = load(path)
    assert type(model).__name__ == make_config(family).architectures[0]
    cfg = model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (VOCAB_SIZE, 64, 2)
    assert cfg.eos_token_id == EOS_ID and not cfg.tie_word_embeddings
    assert GenerationConfig.from_pretrained(path).eos_token_id == [EOS_ID, IM_END_ID]
    assert (path / "tokenizer.json").is_file()
    with torch.no_grad():
        logits = model(torch.tensor(random_prompts(VOCAB_SIZE, [9, 9]))).logits
    assert logits.shape == (2, 9, VOCAB_SIZE) and logits.isfinite().all()


def test_cache_is_reused_not_rebuilt(tmp_path, monkeypatch):
    first = tiny_model_path("llama", cache_dir=tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(tiny, "_build", no_rebuild)
    assert tiny_model_path("llama", cache_dir=tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name], "temp dirs left behind"
    with pytest.raises(AssertionError, match="rebuilt"):  # other overrides, other checkpoint
        tiny_model_path("llama", overrides={"tie_word_embeddings": True}, cache_dir=tmp_path)


def _weights_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sharded_variant_has_index_and_same_weights():
    path = tiny_model_path("qwen2_moe", sharded=True)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (path / "model.safetensors").exists()
    assert _weights_equal(load(path), load(tiny_model_path("qwen2_moe")))


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_fused_variant_has_3d_expert_keys_and_same_weights(family):
    path = tiny_model_path(family, variant="fused_experts")
    with safe_open(path / "model.safetensors", "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert shapes["model.layers.0.mlp.experts.gate_up_proj"] == [8, 64, 64]  # [E, 2I, H]
    assert shapes["model.layers.0.mlp.experts.down_proj"] == [8, 64, 32]  # [E, H, I]
    assert not any(".experts.0." in k for k in shapes)
    assert _weights_equal(load(path), load(tiny_model_path(family)))


def test_overrides_reach_the_checkpoint():
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 512,
    }
    path = tiny_model_path(
        "llama",
        variant="llama3_tied",
        overrides={"rope_scaling": rope, "tie_word_embeddings": True},
    )
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["tie_word_embeddings"] and cfg["rope_parameters"]["rope_type"] == "llama3"
    model = load(path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_fused_variant_of_a_dense_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="MoE"):
        tiny_model_path("llama", variant="fused_experts", cache_dir=tmp_path)


def _greedy_gaps(model, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    ids, gaps = list(prompt), []
    for _ in range(steps):
        top = model(torch.tensor([ids])).logits[0, -1].topk(2)
        gaps.append((top.values[0] - top.values[1]).item())
        ids.append(int(top.indices[0]))
    return ids[len(prompt) :], gaps


@torch.no_grad()
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_is_decisive_and_varied(family):
    model = load(tiny_model_path(family))
    outs, gaps = [], []
    for prompt in random_prompts(VOCAB_SIZE, [4, 11, 19, 30], seed=3):
        out, g = _greedy_gaps(model, prompt, steps=16)
        outs.append(out)
        gaps += g
    gaps_t = torch.tensor(gaps)
    assert (gaps_t > 1e-2).float().mean() >= 0.9 and gaps_t.median() > 0.1, gaps
    assert len({tuple(o) for o in outs}) == len(outs), "prompts share one continuation"
    assert all(len(set(o)) > 2 for o in outs), f"greedy collapses to a repeat: {outs}"


@torch.no_grad()
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_router_topk_has_no_near_ties(family):
    model = load(tiny_model_path(family))
    inputs = []  # [tokens, H] per layer: what the router sees
    for layer in model.model.layers:
        layer.mlp.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].flatten(0, 1)))
    model(torch.tensor(random_prompts(VOCAB_SIZE, [64, 64], seed=4)))
    k = model.config.num_experts_per_tok
    for layer, x in zip(model.model.layers, inputs):
        logits = (x @ layer.mlp.gate.weight.T).sort(-1, descending=True).values  # [T, E]
        gap = logits[:, k - 1] - logits[:, k]
        assert (gap > 1e-2).float().mean() >= 0.95 and gap.median() > 0.2, gap
