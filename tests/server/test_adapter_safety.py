"""Run-time adapter loads on the locked-down server: only from --lora-allowed-dirs (symlinks and
'..' resolved first, no hub), only safetensors, configs read as checked JSON data, rank and size
limits checked before the weights are read. Each refusal is a 400 `invalid_lora_adapter` with
its message, and changes nothing."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from sglora.testing.adapters import tiny_adapter_paths

OUTSIDE = "outside the directories adapters may be loaded from (--lora-allowed-dirs)"


def attn_copy(allowed_dir: Path, name: str) -> Path:
    d = allowed_dir / name
    shutil.copytree(allowed_dir / "attn", d)
    return d


def edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))


@pytest.fixture(scope="module")
def bad_adapters(allowed_dir: Path) -> dict[str, tuple[str, str]]:
    """case -> (lora_path, part of the error message), built once"""
    outside = tiny_adapter_paths("qwen3_moe", "attn")[0]
    cases: dict[str, tuple[str, str]] = {
        "outside": (str(outside), OUTSIDE),
        "missing outside": ("/no/such/dir", OUTSIDE),  # the same answer: no existence oracle
        "dot-dot": (f"{allowed_dir}/attn/../../{outside.name}", OUTSIDE),
        "hub id": ("someone/some-lora", OUTSIDE),
        "relative": ("attn", OUTSIDE),  # relative to the server's cwd, not the allowed dir
        "missing inside": (str(allowed_dir / "nothing"), "no such directory"),
    }
    (allowed_dir / "link").symlink_to(outside)
    cases["symlinked dir"] = (str(allowed_dir / "link"), OUTSIDE)
    d = attn_copy(allowed_dir, "weights-link")
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    cases["symlinked weights"] = (str(d), OUTSIDE)

    d = attn_copy(allowed_dir, "rank16")
    edit_config(d, r=16)
    (d / "adapter_model.safetensors").write_bytes(b"not read: the rank is checked first")
    cases["rank over the limit"] = (str(d), "rank 16 exceeds --max-lora-rank 8")
    d = attn_copy(allowed_dir, "pattern-rank")
    edit_config(d, rank_pattern={"q_proj": 64})
    cases["rank_pattern over the limit"] = (str(d), "rank 64 exceeds --max-lora-rank 8")
    d = allowed_dir / "big"
    shutil.copytree(tiny_adapter_paths("qwen3_moe", "embed_head")[0], d)
    cases["file too large"] = (str(d), "more than --max-lora-size-gb 0.0002")
    d = attn_copy(allowed_dir, "pickle")
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    cases["pickle"] = (str(d), "adapter_model.bin is a pickle file and is not loaded")
    d = attn_copy(allowed_dir, "corrupt")
    (d / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    cases["corrupt weights"] = (str(d), "cannot read safetensors")
    d = attn_copy(allowed_dir, "latin1")
    (d / "adapter_config.json").write_bytes(b'{"r": 8, "lora_alpha": 16, "x": "\xe9"}')
    cases["config not utf-8"] = (str(d), "not UTF-8 text (byte 33)")
    d = attn_copy(allowed_dir, "nan-alpha")
    (d / "adapter_config.json").write_text('{"r": 8, "lora_alpha": NaN}')
    cases["NaN alpha"] = (str(d), "field 'lora_alpha' must be a finite number")
    d = attn_copy(allowed_dir, "bool-rank")
    edit_config(d, r=True)
    cases["boolean rank"] = (str(d), "field 'r' must be a positive integer")
    d = attn_copy(allowed_dir, "redos")
    edit_config(d, rank_pattern={"(a+)+$": 4})
    cases["backtracking pattern"] = (str(d), "may backtrack for minutes; refused")
    d = attn_copy(allowed_dir, "huge-config")
    (d / "adapter_config.json").write_text(" " * (1 << 20) + '{"r": 8}')
    cases["config too large"] = (str(d), "bytes, more than 1048576")
    d = attn_copy(allowed_dir, "config-list")
    (d / "adapter_config.json").write_text("[1, 2]")
    cases["config not an object"] = (str(d), "expected a JSON object")
    return cases


CASES = [
    "outside",
    "missing outside",
    "dot-dot",
    "hub id",
    "relative",
    "missing inside",
    "symlinked dir",
    "symlinked weights",
    "rank over the limit",
    "rank_pattern over the limit",
    "file too large",
    "pickle",
    "corrupt weights",
    "config not utf-8",
    "NaN alpha",
    "boolean rank",
    "backtracking pattern",
    "config too large",
    "config not an object",
]


@pytest.mark.parametrize("case", CASES)
def test_unsafe_adapter_is_a_400_and_changes_nothing(admin_http, bad_adapters, case):
    path, message = bad_adapters[case]
    r = admin_http.post("/load_lora_adapter", json={"lora_name": "bad", "lora_path": path})
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["success"] is False and body["loaded_adapters"] == {}
    assert body["error"] == {
        "message": body["error_message"],
        "type": "invalid_request_error",
        "param": "lora_path",
        "code": "invalid_lora_adapter",
    }
    assert message in body["error_message"], body
    if case.startswith("symlinked"):  # where the link points is not revealed
        assert str(tiny_adapter_paths("qwen3_moe", "attn")[0]) not in body["error_message"]
    info = admin_http.get("/get_server_info").json()["lora"]
    assert info["loaded"] == {} and info["integrity_ok"], info


def test_adapter_inside_the_allowed_dir_loads_by_its_real_path(admin_http, allowed_dir):
    via_dots = f"{allowed_dir}/big/../attn"
    r = admin_http.post("/load_lora_adapter", json={"lora_name": "ok", "lora_path": via_dots})
    assert r.status_code == 200, r.text
    assert r.json()["loaded_adapters"] == {"ok": os.path.realpath(allowed_dir / "attn")}
    out = admin_http.post("/v1/completions", json={"model": "ok", "prompt": "Hi", "max_tokens": 2})
    assert out.status_code == 200, out.text
    assert admin_http.post("/unload_lora_adapter", json={"lora_name": "ok"}).status_code == 200
