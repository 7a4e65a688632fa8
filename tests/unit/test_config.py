"""ServerArgs and ModelConfig refuse bad input with one line that names the flag or field."""

from __future__ import annotations

import json
import shutil

import pytest

from sglora.config import ConfigError, ServerArgs
from sglora.engine import Engine
from sglora.launch_server import main
from sglora.model_executor.model_config import ModelConfig


def test_cli_is_generated_from_the_dataclass():
    args = ServerArgs.from_cli(
        [
            "--model-path",
            "m",
            "--tp-size",
            "2",
            "--disable-radix-cache",
            "--dtype",
            "float16",
            "--max-total-tokens",
            "1000",
        ]
    )
    assert (
        args.model_path,
        args.tp_size,
        args.disable_radix_cache,
        args.dtype,
        args.max_total_tokens,
    ) == ("m", 2, True, "float16", 1000)


@pytest.mark.parametrize(
    "kwargs,flag",
    [
        ({"port": 0}, "--port"),
        ({"mem_fraction_static": 1.5}, "--mem-fraction-static"),
        ({"tp_size": 0}, "--tp-size"),
        ({"dtype": "int3"}, "--dtype"),
        ({"max_total_tokens": 3}, "--max-total-tokens"),
        ({"chunked_prefill_size": 0}, "--chunked-prefill-size"),
    ],
)
def test_bad_values_name_the_flag(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        ServerArgs(model_path="m", **kwargs)


def test_model_path_required_without_demo():
    with pytest.raises(ConfigError, match="--model-path"):
        ServerArgs()


def test_launcher_prints_one_line_and_exits_2(capsys):
    assert main(["--model-path", "m", "--port", "99999"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--port" in err


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="--model-path"):
        ModelConfig.load(str(tmp_path / "nope"))


def _patched_copy(tiny_path, tmp_path, **changes):
    dst = tmp_path / "model"
    shutil.copytree(tiny_path("llama"), dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_unsupported_architecture_names_the_field(tiny_path, tmp_path):
    dst = _patched_copy(tiny_path, tmp_path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="architectures"):
        Engine(model_path=str(dst), device="cpu")


def test_unsupported_rope_type_names_the_field(tiny_path, tmp_path):
    dst = _patched_copy(
        tiny_path,
        tmp_path,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0] * 8,
            "long_factor": [1.0] * 8,
        },
    )
    with pytest.raises(ValueError, match="rope_type"):
        Engine(model_path=str(dst), device="cpu")


def test_context_length_above_model_limit(tiny_path):
    with pytest.raises(ConfigError, match="--context-length"):
        ModelConfig.load(str(tiny_path("llama")), context_length=10**7)


def test_missing_weights_are_named(tiny_path, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_path("llama"), dst)
    for f in dst.glob("*.safetensors"):
        f.unlink()
    (dst / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="safetensors"):
        Engine(model_path=str(dst), device="cpu")
