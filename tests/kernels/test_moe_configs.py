"""The tuned MoE block configs (`kernels/moe_common.py`, `kernels/configs/*.json`): every table
entry parses into a config the kernels can take, and a GPU finds its own table, else its
architecture's (`SAME_ARCH_TABLES`) for the shapes it lacks, else the heuristic default."""

from __future__ import annotations

import json

import pytest
import torch

from sglora.kernels import moe_common
from sglora.kernels.moe_common import CONFIG_DIR, config_from_dict, shape_key

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
