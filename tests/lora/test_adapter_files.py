"""Adapter files as untrusted input, without a server: path confinement (symlinks, '..'),
regex patterns that could backtrack for minutes, hub downloads switched off, and a checkpoint
whose tensors break the parser is an AdapterError, never another exception. And an adapter read
straight into the slots' dtype is its float32 form rounded once, whatever dtype its file holds."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sglora.engine import Engine
from sglora.lora.adapter import AdapterError, load_adapter
from sglora.lora.adapter_files import AdapterLimits, _check_pattern, confine
from sglora.lora.registry import resolve_adapter_path
from sglora.testing.adapters import tiny_adapter_paths
from tests.lora.test_lora_matches_peft import MOE_KINDS


def test_confine_resolves_before_deciding(tmp_path):
    root, other = tmp_path / "root", tmp_path / "other"
    (root / "a").mkdir(parents=True)
    other.mkdir()
    assert confine(str(root / "a"), (str(root),)) == (root / "a").resolve()
    assert confine(f"{root}/x/../a", (str(root),)) == (root / "a").resolve()
    (root / "escape").symlink_to(other)
    (root / "loop").symlink_to(root / "loop")
    for bad in (str(other), f"{root}/../other", str(root / "escape"), str(root / "loop")):
        with pytest.raises(AdapterError, match="--lora-allowed-dirs"):
            confine(bad, (str(root),))
    (root / "a" / "adapter_model.safetensors").symlink_to(other / "w.safetensors")
    with pytest.raises(AdapterError, match="--lora-allowed-dirs"):
        confine(str(root / "a"), (str(root),))


@pytest.mark.parametrize(
    "pattern,ok",
    [
        (r"layers\.\d+\.mlp\.experts\.gate_up_proj", True),
        ("q_proj", True),
        (r"model\.layers\.(0|1)\.self_attn\.o_proj", True),
        ("(a+)+$", False),
        ("(x|xy)*z", False),
        (".*.*.*z", False),
        ("[unclosed", False),
        ("a" * 300, False),
    ],
)
def test_rank_patterns_that_could_backtrack_are_refused(pattern, ok):
    if ok:
        _check_pattern(pattern, "here")
    else:
        with pytest.raises(AdapterError):
            _check_pattern(pattern, "here")


def test_hub_download_can_be_switched_off():
    with pytest.raises(AdapterError, match="--disable-lora-hub-download"):
        resolve_adapter_path("someone/some-lora", allow_hub=False)


@pytest.fixture(scope="module")
def targets(tiny_path):
    engine = Engine(model_path=str(tiny_path("qwen3_moe")), device="cpu", enable_lora=True)
    return engine.scheduler.lora.targets


def test_malformed_tensors_are_an_adapter_error(tmp_path, targets):
    src = tiny_adapter_paths("qwen3_moe", "experts")[0]
    d = tmp_path / "bad"
    shutil.copytree(src, d)
    # fused expert B whose columns are not rank × experts: the reshape in the parser fails
    key = "base_model.model.model.layers.0.mlp.experts.lora_B.weight"
    tensors = {key: torch.zeros(7, 5), key.replace("lora_B", "lora_A"): torch.zeros(8, 3)}
    save_file(tensors, str(d / "adapter_model.safetensors"))
    with pytest.raises(AdapterError):
        load_adapter("bad", d, targets)


def test_limits_are_checked_before_the_weights_are_read(tmp_path, targets):
    d = tmp_path / "a"
    shutil.copytree(tiny_adapter_paths("qwen3_moe", "attn")[0], d)
    size = os.path.getsize(d / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="more than --max-lora-size-gb"):
        load_adapter("a", d, targets, AdapterLimits(max_bytes=size - 1))
    cfg = json.loads((d / "adapter_config.json").read_text())
    with pytest.raises(AdapterError, match=f"rank {cfg['r']} exceeds --max-lora-rank 2"):
        load_adapter("a", d, targets, AdapterLimits(max_rank=2))
    assert load_adapter("a", d, targets, AdapterLimits(cfg["r"], size)).max_rank == cfg["r"]


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", [*MOE_KINDS, "compact_experts"])
def test_adapter_read_in_slot_dtype_is_the_float32_adapter_rounded_once(
    tmp_path, targets, kind, file_dtype
):
    src = tiny_adapter_paths("qwen3_moe", kind)[0]
    d = tmp_path / "a"
    shutil.copytree(src, d)
    weights = d / "adapter_model.safetensors"
    tensors = {k: t.to(file_dtype).contiguous() for k, t in load_file(str(weights)).items()}
    save_file(tensors, str(weights))
    ref = load_adapter("a", d, targets)  # float32: B scaled in float32
    for dtype in (torch.bfloat16, torch.float16):
        got = load_adapter("a", d, targets, dtype=dtype)
        assert got.modules.keys() == ref.modules.keys()
        for key, w in ref.modules.items():
            for want, t in ((w.A, got.modules[key].A), (w.B, got.modules[key].B)):
                assert t.dtype == dtype and t.is_contiguous(), key
                assert torch.equal(t, want.to(dtype)), key  # bit for bit: no double rounding
