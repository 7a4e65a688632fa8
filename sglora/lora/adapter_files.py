"""An adapter's files read as untrusted input (between the disk and lora/adapter.py, which
turns the tensors into canonical form).

Only `adapter_config.json` (parsed as JSON data, at most MAX_CONFIG_BYTES, every field the
reader uses type-checked) and `adapter_model.safetensors` are read; pickle files never are.
Limits are checked before anything large is read or allocated: the ranks the config declares
against `--max-lora-rank`, the weights file's size against `--max-lora-size-gb`. Every failure
is an `AdapterError` naming the file, which the API turns into a 400.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20
MAX_PATTERN_CHARS = 256
# A quantified group, e.g. `(a+)+` or `(x|xy)*`: the shape of catastrophic backtracking. PEFT
# matches rank_pattern/alpha_pattern keys as regexes in the scheduler, where a pattern that
# backtracks for minutes would stall every request, so such patterns are refused.
_NESTED_QUANTIFIER = re.compile(r"\)[*+{]")
# Several unbounded repeats in a row (`.*.*.*x`) backtrack polynomially: n^k steps on a key of
# n characters. Real patterns have one (`layers\.\d+\.q_proj`).
_UNBOUNDED = re.compile(r"(?<!\\)[*+]|\{\d*,\}")
MAX_UNBOUNDED = 2
_UNSUPPORTED_CONFIG = {
    "use_dora": "DoRA adapters",
    "lora_bias": "LoRA bias terms",
    "trainable_token_indices": "trainable extra tokens",
    "modules_to_save": "modules_to_save",
}


class AdapterError(ValueError):
    """A checkpoint sglora cannot serve; the message names the file, key or field."""


@dataclass(frozen=True)
class AdapterLimits:
    max_rank: int | None = None  # None: no limit (start-up adapters size the slots)
    max_bytes: int | None = None  # of adapter_model.safetensors


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_rank(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _regular_file(f: Path) -> bool:
    """True for a regular file (following symlinks): never read a FIFO or a device."""
    try:
        return f.is_file()
    except OSError:
        return False


def read_adapter_config(path: Path) -> dict:
    cfg_file = path / CONFIG
    if not _regular_file(cfg_file):
        raise AdapterError(f"{path}: no {CONFIG}")
    try:
        size = cfg_file.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise AdapterError(f"{cfg_file}: {size} bytes, more than {MAX_CONFIG_BYTES}")
        cfg = json.loads(cfg_file.read_bytes().decode("utf-8"))
    except OSError as e:
        raise AdapterError(f"{cfg_file}: cannot read it ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise AdapterError(f"{cfg_file}: not UTF-8 text (byte {e.start})") from e
    except (ValueError, RecursionError) as e:
        raise AdapterError(f"{cfg_file}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_file}: expected a JSON object")
    _check_fields(cfg, cfg_file)
    return cfg


def _check_fields(cfg: dict, cfg_file: Path) -> None:
    ptype = str(cfg.get("peft_type", "LORA")).upper()
    if ptype != "LORA":
        raise AdapterError(f"{cfg_file}: peft_type {ptype!r} is not supported (only LORA)")
    for key, what in _UNSUPPORTED_CONFIG.items():
        if cfg.get(key):
            raise AdapterError(f"{cfg_file}: {what} ({key}) are not supported")
    if not _is_rank(cfg.get("r")):
        raise AdapterError(f"{cfg_file}: field 'r' must be a positive integer")
    if "lora_alpha" in cfg and not _is_number(cfg["lora_alpha"]):
        raise AdapterError(f"{cfg_file}: field 'lora_alpha' must be a finite number")
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise AdapterError(f"{cfg_file}: field 'use_rslora' must be true or false")
    for key, ok, what in (
        ("rank_pattern", _is_rank, "positive integers"),
        ("alpha_pattern", _is_number, "finite numbers"),
    ):
        patterns = cfg.get(key) or {}
        if not isinstance(patterns, dict) or not all(ok(v) for v in patterns.values()):
            raise AdapterError(f"{cfg_file}: field {key!r} must map patterns to {what}")
        for pat in patterns:
            _check_pattern(pat, f"{cfg_file}: {key} key {pat[:40]!r}")
    targeted = cfg.get("target_parameters") or []
    if not isinstance(targeted, list) or not all(isinstance(t, str) for t in targeted):
        raise AdapterError(f"{cfg_file}: field 'target_parameters' must be a list of names")


def _check_pattern(pat: str, where: str) -> None:
    if len(pat) > MAX_PATTERN_CHARS:
        raise AdapterError(f"{where}: longer than {MAX_PATTERN_CHARS} characters")
    if _NESTED_QUANTIFIER.search(pat) or len(_UNBOUNDED.findall(pat)) > MAX_UNBOUNDED:
        raise AdapterError(
            f"{where}: repeated groups or more than {MAX_UNBOUNDED} unbounded repeats may "
            "backtrack for minutes; refused"
        )
    try:
        re.compile(pat)
    except re.error as e:
        raise AdapterError(f"{where}: not a valid regular expression ({e})") from e


def check_limits(cfg: dict, path: Path, limits: AdapterLimits) -> None:
    """Before the weights are read: declared ranks and the weights file's size."""
    if limits.max_rank is not None:
        ranks = [cfg["r"], *(cfg.get("rank_pattern") or {}).values()]
        if max(ranks) > limits.max_rank:
            raise AdapterError(
                f"{path}: rank {max(ranks)} exceeds --max-lora-rank {limits.max_rank}"
            )
    f = path / WEIGHTS
    if limits.max_bytes is not None and _regular_file(f):
        size = f.stat().st_size
        if size > limits.max_bytes:
            raise AdapterError(
                f"{f}: {size / 1e9:.2f} GB, more than --max-lora-size-gb {limits.max_bytes / 1e9:g}"
            )


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    f = path / WEIGHTS
    if not _regular_file(f):
        if (path / "adapter_model.bin").exists():
            raise AdapterError(
                f"{path}: adapter_model.bin is a pickle file and is not loaded; "
                "save the adapter with safetensors"
            )
        raise AdapterError(f"{path}: no {WEIGHTS}")
    try:
        return load_file(str(f))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for corrupt files
        raise AdapterError(f"{f}: cannot read safetensors ({e})") from e


def confine(path: str, allowed_dirs: tuple[str, ...]) -> Path:
    """`path` with symlinks and '..' resolved, if it and the files read from it lie inside one
    of `allowed_dirs` (--lora-allowed-dirs); else AdapterError. The caller must read the
    returned path, not `path`. A path outside gets the same answer whether it exists or not,
    so the check cannot be used to probe the file system."""
    roots = [Path(d).resolve() for d in allowed_dirs]

    def inside(p: Path) -> bool:
        return any(p == r or p.is_relative_to(r) for r in roots)

    outside = AdapterError(
        f"{path}: outside the directories adapters may be loaded from (--lora-allowed-dirs)"
    )
    try:
        real = Path(path).resolve()
        if not inside(real):
            raise outside
        for name in (CONFIG, WEIGHTS):
            f = real / name
            if f.is_symlink() and not inside(f.resolve()):
                raise outside
    except (OSError, RuntimeError, ValueError) as e:  # symlink loops, NUL bytes
        if isinstance(e, AdapterError):
            raise
        raise outside from e
    return real
