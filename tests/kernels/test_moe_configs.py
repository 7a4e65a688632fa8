"""The tuned MoE block configs (`kernels/moe_common.py`, `kernels/configs/*.json`): every table
entry parses into a config the kernels can take, a GPU finds its own table, else its
architecture's (`SAME_ARCH_TABLES`) for the shapes it lacks, else the heuristic default, and
scripts/tune_kernels.py tunes the expert shape of the model it is given."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from sglora.kernels import moe_common
from sglora.kernels.moe_common import CONFIG_DIR, config_from_dict, shape_key

ROOT = Path(__file__).resolve().parents[2]
QWEN3_TP1 = shape_key(128, 2048, 768, 8, torch.bfloat16)
TABLES = sorted(CONFIG_DIR.glob("moe_*.json"))


@pytest.mark.parametrize("path", TABLES, ids=lambda p: p.stem)
def test_every_tuned_entry_is_a_valid_config(path):
    table = json.loads(path.read_text())
    assert QWEN3_TP1 in table, "the benchmarked shape is tuned"
    for key, buckets in table.items():
        assert sorted(map(int, buckets)) == [1, 8, 32, 128, 256, 512, 2048], key
        for d in buckets.values():
            cfg = config_from_dict(d)
            assert cfg.block_m in (16, 32, 64, 128)
            for gemm in (cfg.gate_up, cfg.down):
                assert all(v > 0 and v & (v - 1) == 0 for v in gemm[:2]), gemm  # powers of 2
            assert cfg.lora.split_k >= 1


def test_every_same_arch_table_exists():
    for name in moe_common.SAME_ARCH_TABLES.values():
        assert (CONFIG_DIR / f"moe_{name}.json").is_file(), name


@pytest.fixture
def on_gpu(monkeypatch):
    """The lookup as it runs on a CUDA device of the given name and compute capability."""

    def place(name: str, capability: tuple[int, int]) -> None:
        monkeypatch.setattr(moe_common, "interpreting", lambda: False)
        monkeypatch.setattr(moe_common, "device_name", lambda: name)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)

    return place


def table(name: str) -> dict:
    return json.loads((CONFIG_DIR / f"moe_{name}.json").read_text())


def test_a_gpu_reads_its_own_table(on_gpu):
    on_gpu("NVIDIA_H200", (9, 0))
    assert moe_common.tuned_entry(QWEN3_TP1) == table("NVIDIA_H200")[QWEN3_TP1]
    want = config_from_dict(table("NVIDIA_H200")[QWEN3_TP1]["2048"])
    assert moe_common.get_moe_config(1800, 128, 2048, 768, 8, torch.bfloat16) == want


def test_a_gpu_without_a_table_reads_its_architectures(on_gpu):
    sibling = moe_common.SAME_ARCH_TABLES[(9, 0)]
    on_gpu("NVIDIA_H100_PCIe", (9, 0))
    assert moe_common.tuned_entry(QWEN3_TP1) == table(sibling)[QWEN3_TP1]


def test_a_shape_missing_from_a_gpus_table_is_read_from_its_architectures(on_gpu, monkeypatch):
    own = {"other shape": {}}
    real = moe_common._load_table
    monkeypatch.setattr(moe_common, "_load_table", lambda d: own if d == "MY_GPU" else real(d))
    on_gpu("MY_GPU", (9, 0))
    sibling = moe_common.SAME_ARCH_TABLES[(9, 0)]
    assert moe_common.tuned_entry(QWEN3_TP1) == table(sibling)[QWEN3_TP1]


def test_other_architectures_and_unknown_shapes_get_the_default(on_gpu):
    on_gpu("NVIDIA_A100-SXM4-80GB", (8, 0))
    assert moe_common.tuned_entry(QWEN3_TP1) is None
    got = moe_common.get_moe_config(256, 128, 2048, 768, 8, torch.bfloat16)
    assert got == moe_common.default_moe_config(256 * 8, 128, 2048, 768)
    on_gpu("NVIDIA_H200", (9, 0))
    assert moe_common.tuned_entry(shape_key(8, 4096, 14336, 2, torch.bfloat16)) is None


def tune_script():
    spec = importlib.util.spec_from_file_location("tune_kernels", ROOT / "scripts/tune_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    "family,overrides,want",
    [  # each family names its expert count and width its own way
        ("qwen3_moe", dict(num_experts=16, moe_intermediate_size=96), (16, 64, 96, 2)),
        ("mixtral", dict(num_local_experts=4, intermediate_size=80), (4, 64, 80, 2)),
        (
            "olmoe",
            dict(num_experts=12, intermediate_size=48, num_experts_per_tok=3),
            (12, 64, 48, 3),
        ),
    ],
)
def test_the_tuner_reads_a_models_expert_shape(tmp_path, family, overrides, want):
    from sglora.testing.tiny import make_config

    make_config(family, hidden_size=64, **overrides).save_pretrained(tmp_path)
    tune = tune_script()
    e, h, i, k = want
    assert tune.expert_shape(str(tmp_path), 1) == dict(E=e, H=h, I=i, k=k)
    assert tune.expert_shape(str(tmp_path), 2) == dict(E=e, H=h, I=i // 2, k=k)
    with pytest.raises(ValueError, match="does not divide"):
        tune.expert_shape(str(tmp_path), 7)
    assert tune.expert_shape(None, 4) == dict(E=128, H=2048, I=192, k=8)  # Qwen3-30B-A3B's
