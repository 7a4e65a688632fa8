"""ServerArgs and ModelConfig refuse bad input with one line that names the flag or field."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from sglora.config import ConfigError, ServerArgs
from sglora.engine import Engine
from sglora.launch_server import main
from sglora.model_executor.model_config import ModelConfig, resolve_model_dir


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


def _patched_copy(tiny_path, tmp_path, family="llama", **changes):
    dst = tmp_path / "model"
    shutil.copytree(tiny_path(family), dst)
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


@pytest.mark.parametrize(
    "window, requested, want",
    [
        (4096, None, 4096),  # Mistral v0.1: the window caps max_position_embeddings 32768
        (4096, 1000, 1000),
        (None, None, 32768),  # v0.2/v0.3: no window
        (None, 8192, 8192),
    ],
)
def test_mistral_context_is_capped_to_its_sliding_window(
    tiny_path, tmp_path, caplog, window, requested, want
):
    dst = _patched_copy(tiny_path, tmp_path, "mistral", sliding_window=window)
    with caplog.at_level(logging.INFO, logger="sglora.model_executor.model_config"):
        cfg = ModelConfig.load(str(dst), context_length=requested)
    assert cfg.context_len == want
    capped = window is not None and requested is None
    assert ("context length capped to the model's sliding_window 4096" in caplog.text) == capped


def test_mistral_context_beyond_the_sliding_window_is_refused(tiny_path, tmp_path):
    dst = _patched_copy(tiny_path, tmp_path, "mistral", sliding_window=64)
    msg = "--context-length: 128 exceeds the model's sliding_window 64, which sglora does not"
    with pytest.raises(ConfigError, match=f"^{msg} implement$"):
        ModelConfig.load(str(dst), context_length=128)
    assert ModelConfig.load(str(dst), context_length=64).context_len == 64


def test_hub_download_skips_mistral_native_weights(monkeypatch, tmp_path):
    """Mistral repos hold a second copy of the weights as consolidated.safetensors."""
    import huggingface_hub

    seen = {}
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda repo, **kw: seen.update(kw) or str(tmp_path)
    )
    assert resolve_model_dir("mistralai/Mistral-7B-v0.3") == tmp_path
    assert "*.safetensors" in seen["allow_patterns"]
    assert seen["ignore_patterns"] == ["consolidated*"]


def test_missing_weights_are_named(tiny_path, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_path("llama"), dst)
    for f in dst.glob("*.safetensors"):
        f.unlink()
    (dst / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="safetensors"):
        Engine(model_path=str(dst), device="cpu")


def test_settings_given_as_text_are_typed_like_the_cli():
    got = ServerArgs.typed(
        {
            "disable_custom_all_reduce": "false",
            "disable_cuda_graph": "true",
            "max_loras_per_batch": "4",
            "cuda_graph_bs": "1,2,4",
            "mem_fraction_static": "0.5",
        }
    )
    assert got == {
        "disable_custom_all_reduce": False,  # not the truthy string "false"
        "disable_cuda_graph": True,
        "max_loras_per_batch": 4,
        "cuda_graph_bs": (1, 2, 4),
        "mem_fraction_static": 0.5,
    }
    for bad in ({"no_such": "1"}, {"max_loras_per_batch": "x"}, {"disable_cuda_graph": "on?"}):
        with pytest.raises(ConfigError):
            ServerArgs.typed(bad)
    with pytest.raises(ConfigError, match="invalid choice"):
        ServerArgs.typed({"attention_backend": "zzz"})
