"""scripts/make_adapters.py writes adapters that sglora loads and that change the output."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sglora.engine import Engine
from sglora.testing.tiny import tiny_model_path


@pytest.mark.parametrize(
    "family, extra",
    [
        ("qwen3_moe", []),
        ("qwen3_moe", ["--shared-outer"]),
        ("llama", ["--targets", "attn", "mlp"]),  # a dense model: its MLP
        ("qwen2_moe", ["--targets", "experts", "mlp"]),  # experts and the shared expert
    ],
)
def test_made_adapters_load_and_apply(tmp_path, family, extra):
    model = tiny_model_path(family)
    subprocess.run(
        [
            sys.executable,
            "scripts/make_adapters.py",
            "--config",
            str(model),
            "--out",
            str(tmp_path),
            "--num",
            "2",
            "--rank",
            "4",
            "--dtype",
            "float32",
            *extra,
        ],
        check=True,
        capture_output=True,
    )
    engine = Engine(
        model_path=str(model),
        device="cpu",
        lora_paths=(f"a={tmp_path / 'lora0'}", f"b={tmp_path / 'lora1'}"),
        experts_shared_outer_loras="--shared-outer" in extra,
    )
    sp = {"max_new_tokens": 4, "temperature": 0.0, "ignore_eos": True}
    outs = engine.generate(
        input_ids=[[5, 6, 7, 8]] * 3,
        sampling_params=sp,
        return_logprob=True,
        lora_path=["a", "b", None],
    )
    lps = [[x[0] for x in o["meta_info"]["output_token_logprobs"]] for o in outs]
    assert lps[0] != lps[2] and lps[1] != lps[2]
