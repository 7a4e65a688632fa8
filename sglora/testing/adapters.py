"""Tiny PEFT LoRA adapters for the tiny models (tests, the demo, benchmarks), built with `peft`
and cached on disk next to the models.

Each kind returns two directories: the adapter sglora serves, and the adapter `peft` loads as
the reference. They are the same directory for formats PEFT writes itself; for the formats it
does not write (per-expert modules, shared-outer experts) the reference is the mathematically
equal adapter in PEFT's fused-expert format.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from sglora.models.qwen3_moe import expert_intermediate_of, num_experts_of
from sglora.testing.tiny import make_config, tiny_model_path

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]

# kind -> LoraConfig kwargs; `experts` is replaced by dense MLP targets on dense models
ADAPTER_KINDS: dict[str, dict] = {
    "attn": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "experts": {"r": 8, "lora_alpha": 16, "target_modules": [], "target_parameters": EXPERTS},
    "attn_experts_rslora": {
        "r": 8,
        "lora_alpha": 24,
        "use_rslora": True,
        "target_modules": ["q_proj", "v_proj"],
        "target_parameters": EXPERTS,
    },
    # expert names in target_modules: PEFT converts them to target_parameters with gate_up at
    # rank 2r; plus explicit per-module ranks and alphas
    "mixed_ranks": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "k_proj", "o_proj", *MLP],
        "rank_pattern": {"q_proj": 12, "o_proj": 2},
        "alpha_pattern": {"k_proj": 3},
    },
    "embed_head": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["embed_tokens", "lm_head", "v_proj"],
    },
    # derived formats (built from "experts"-like random factors, see _derive)
    "per_expert": {},
    "compact_experts": {},
    "shared_outer": {},
    "fused_dense": {},
}
DERIVED = ("per_expert", "compact_experts", "shared_outer", "fused_dense")
_VERSION = "2"


def is_moe(family: str) -> bool:
    return family in ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")


def _lora_config(family: str, kind: str):
    from peft import LoraConfig

    kw = dict(ADAPTER_KINDS[kind])
    if not is_moe(family) and "target_parameters" in kw:
        kw["target_modules"] = [*kw["target_modules"], *MLP]
        del kw["target_parameters"]
    return LoraConfig(**kw)


def _randomize(model, seed: int, std: float = 0.15) -> None:
    """PEFT inits B to zero; random A and B make every adapter change the output visibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def tiny_adapter_paths(
    family: str, kind: str, seed: int = 0, cache_dir: str | Path | None = None
) -> tuple[Path, Path]:
    """(adapter sglora serves, adapter peft loads as the reference) for the tiny model."""
    base = tiny_model_path(family, cache_dir=cache_dir)
    key = hashlib.sha256(f"{_VERSION}|{family}|{kind}|{seed}|{base.name}".encode()).hexdigest()
    root = base.parent / "adapters" / f"{family}-{kind}-{key[:10]}"
    served, ref = root / "served", root / "reference"
    if not (root / "done").is_file():
        tmp = Path(tempfile.mkdtemp(dir=base.parent))
        _build(family, kind, seed, base, tmp / "served", tmp / "reference")
        (tmp / "done").write_text("ok")
        root.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, root)
        except OSError:  # another process built it first
            shutil.rmtree(tmp, ignore_errors=True)
    return served, (ref if ref.is_dir() else served)


def _build(family: str, kind: str, seed: int, base: Path, served: Path, ref: Path) -> None:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    if kind in DERIVED:
        if is_moe(family) == (kind == "fused_dense"):
            raise ValueError(f"{kind} adapters do not fit the {family} family")
        _derive(family, kind, seed, base, served, ref)
        return
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, _lora_config(family, kind))
    _randomize(peft_model, seed)
    peft_model.save_pretrained(served)


def _derive(family: str, kind: str, seed: int, base: Path, served: Path, ref: Path) -> None:
    """Write an adapter in a format PEFT does not produce, and its PEFT equivalent."""
    cfg = make_config(family)
    g = torch.Generator().manual_seed(seed + 1000)

    def rnd(*shape):
        return torch.randn(shape, generator=g) * 0.15

    r, alpha = 4, 8
    layers = range(cfg.num_hidden_layers)
    if kind == "fused_dense":
        served_t, ref_t, ref_cfg = _fused_dense(cfg, layers, r, rnd)
        served_cfg = {"r": r, "lora_alpha": alpha, "target_modules": ["qkv_proj", "gate_up_proj"]}
        ref_cfg.update(r=r, lora_alpha=alpha)
    else:
        served_t, ref_t, gu_rank = _experts(family, kind, cfg, layers, r, rnd)
        served_cfg = {
            "r": r,
            "lora_alpha": alpha,
            "target_modules": [],
            "target_parameters": EXPERTS,
        }
        if kind in ("per_expert", "compact_experts"):
            served_cfg.update(target_modules=MLP, target_parameters=None)
        pat = r"layers\.\d+\.mlp\.experts\.gate_up_proj"
        ref_cfg = {
            "r": r,
            "lora_alpha": alpha,
            "target_modules": [],
            "target_parameters": EXPERTS,
            "rank_pattern": {pat: gu_rank},
            "alpha_pattern": {pat: alpha * gu_rank // r},
        }
    common = {
        "peft_type": "LORA",
        "base_model_name_or_path": str(base),
        "task_type": "CAUSAL_LM",
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
    }
    for d, t, c in ((served, served_t, served_cfg), (ref, ref_t, ref_cfg)):
        d.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in t.items()}, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({**common, **c}, indent=1))


_PRE = "base_model.model.model.layers"


def _fused_dense(cfg, layers, r, rnd):
    """qkv_proj / gate_up_proj modules with one A each; reference: per-module, A repeated."""
    h, d = cfg.hidden_size, cfg.head_dim
    sizes = {
        "q_proj": cfg.num_attention_heads * d,
        "k_proj": cfg.num_key_value_heads * d,
        "v_proj": cfg.num_key_value_heads * d,
        "gate_proj": cfg.intermediate_size,
        "up_proj": cfg.intermediate_size,
    }
    served_t, ref_t = {}, {}
    for layer in layers:
        for fused, parts, block in (
            ("qkv_proj", ("q_proj", "k_proj", "v_proj"), "self_attn"),
            ("gate_up_proj", ("gate_proj", "up_proj"), "mlp"),
        ):
            a, b = rnd(r, h), rnd(sum(sizes[p] for p in parts), r)
            k = f"{_PRE}.{layer}.{block}"
            served_t[f"{k}.{fused}.lora_A.weight"], served_t[f"{k}.{fused}.lora_B.weight"] = a, b
            for part, bb in zip(parts, b.split([sizes[p] for p in parts])):
                # a copy of A per part: safetensors refuses tensors that share memory
                ref_t[f"{k}.{part}.lora_A.weight"] = a.clone()
                ref_t[f"{k}.{part}.lora_B.weight"] = bb
    return served_t, ref_t, {"target_modules": list(sizes)}


def _experts(family, kind, cfg, layers, r, rnd):
    """Expert LoRA in per-module, compact 3D or shared-outer layout, and PEFT's fused form."""
    e, h, i = num_experts_of(cfg), cfg.hidden_size, expert_intermediate_of(cfg)
    block = "block_sparse_moe" if family == "mixtral" else "mlp"
    names = ("w1", "w3", "w2") if family == "mixtral" else MLP
    served_t, ref_t = {}, {}
    for layer in layers:
        k = f"{_PRE}.{layer}.{block}.experts"
        if kind == "shared_outer":  # one gate_up A and one down B for all experts
            a_gu, b_gu = rnd(1, r, h), rnd(e, 2 * i, r)
            ad, bd = rnd(e, r, i), rnd(1, h, r)
            k = f"{_PRE}.{layer}.mlp.experts"
            served_t[f"{k}.base_layer.lora_A.weight"] = a_gu[0]
            served_t[f"{k}.base_layer.lora_B.weight"] = _expert_minor(b_gu)
            served_t[f"{k}.lora_A.weight"] = ad.reshape(e * r, i)
            served_t[f"{k}.lora_B.weight"] = bd[0]
            a_gu, bd = a_gu.expand(e, r, h), bd.expand(e, h, r)
        else:  # gate and up with their own A
            ag, au, ad = rnd(e, r, h), rnd(e, r, h), rnd(e, r, i)
            bg, bu, bd = rnd(e, i, r), rnd(e, i, r), rnd(e, h, r)
            for name, a, b in zip(names, (ag, au, ad), (bg, bu, bd)):
                if kind == "compact_experts":
                    served_t[f"{k}.{name}.lora_A.weight"] = a
                    served_t[f"{k}.{name}.lora_B.weight"] = b
                else:
                    for x in range(e):
                        served_t[f"{k}.{x}.{name}.lora_A.weight"] = a[x]
                        served_t[f"{k}.{x}.{name}.lora_B.weight"] = b[x]
            # PEFT's fused gate_up at rank 2r: A = [A_gate; A_up], B = blockdiag(B_gate, B_up)
            a_gu = torch.cat([ag, au], dim=1)
            b_gu = torch.zeros(e, 2 * i, 2 * r)
            b_gu[:, :i, :r], b_gu[:, i:, r:] = bg, bu
        k = f"{_PRE}.{layer}.mlp.experts"
        ref_t[f"{k}.base_layer.lora_A.weight"] = a_gu.reshape(-1, h)
        ref_t[f"{k}.base_layer.lora_B.weight"] = _expert_minor(b_gu)
        ref_t[f"{k}.lora_A.weight"] = ad.reshape(-1, i)
        ref_t[f"{k}.lora_B.weight"] = _expert_minor(bd)
    return served_t, ref_t, a_gu.shape[1]


def _expert_minor(b: torch.Tensor) -> torch.Tensor:
    """[E, out, r] -> PEFT's [out, r·E] with the expert index fastest."""
    return b.permute(1, 2, 0).reshape(b.shape[1], -1).contiguous()


def load_reference(family: str, adapter: Path | None):
    """HF model (+ PEFT adapter) in float32, for teacher-forced reference logprobs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path(family), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    return model.eval()
