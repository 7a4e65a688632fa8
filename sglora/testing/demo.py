"""`--demo`: the tiny built-in MoE model and three LoRA adapters on it, built locally on first
use (between the launcher / Engine and `testing/tiny.py`, `testing/adapters.py`)."""

from __future__ import annotations

from sglora.config import ServerArgs

DEMO_FAMILY = "qwen3_moe"
# adapter name -> kind in testing/adapters.py
DEMO_ADAPTERS = {
    "attn-lora": "attn",
    "experts-lora": "experts",
    "rslora-mixed": "attn_experts_rslora",
}


def apply_demo(args: ServerArgs) -> ServerArgs:
    """Fill in the demo model and adapters unless the user named their own."""
    if not args.demo:
        return args
    from sglora.testing.adapters import tiny_adapter_paths
    from sglora.testing.tiny import demo_model_path

    changes: dict = {}
    if args.model_path is None:
        changes["model_path"] = str(demo_model_path())
        changes["served_model_name"] = args.served_model_name or "sglora-demo"
    if not args.lora_paths:
        changes["lora_paths"] = tuple(
            f"{name}={tiny_adapter_paths(DEMO_FAMILY, kind)[0]}"
            for name, kind in DEMO_ADAPTERS.items()
        )
    return args.replace(**changes)
