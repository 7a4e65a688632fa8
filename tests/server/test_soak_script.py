"""The soak test in CI: scripts/soak.py drives the tiny MoE server with eight adapters for
SGLORA_SOAK_S seconds (default 180) of mixed traffic with disconnects, aborts, bad requests and
load/unload cycles, under API keys, a queue limit (so some requests get 503), two adapter slots
(slot pressure) and a small KV cache (retractions). It must pass its own checks: no request
without a well-formed answer or explicit error, both pools whole with nothing held, RSS growth
under 5% after warm-up. Prints the counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sglora.testing.adapters import tiny_adapter_paths
from tests.server.conftest import MODEL, start_server

SOAK_S = float(os.environ.get("SGLORA_SOAK_S", "180"))
KINDS = [  # eight adapter formats of the tiny MoE model
    "attn",
    "experts",
    "attn_experts_rslora",
    "mixed_ranks",
    "embed_head",
    "per_expert",
    "compact_experts",
    "shared_outer",
]
KEYS = {"SGLORA_API_KEY": "soak-user", "SGLORA_ADMIN_API_KEY": "soak-admin"}
ROOT = Path(__file__).resolve().parents[2]


def test_soak_mixed_faulty_traffic(model_path, tmp_path, capsys):
    paths = {k: tiny_adapter_paths("qwen3_moe", k)[0] for k in KINDS}
    srv = start_server(
        [
            "--model-path",
            model_path,
            "--served-model-name",
            MODEL,
            "--lora-paths",
            *(f"{k}={p}" for k, p in paths.items()),
            "--max-loras-per-batch",
            "3",
            "--max-total-tokens",
            "2048",
            "--max-running-requests",
            "16",
            "--max-queued-requests",
            "24",
            "--lora-allowed-dirs",
            str(paths["attn"].parent.parent),
            "--disable-lora-hub-download",
        ],
        tmp_path / "server.log",
        env={**KEYS, "OMP_NUM_THREADS": "1"},
    )
    out = tmp_path / "soak.json"
    try:
        run = subprocess.run(
            [
                sys.executable,
                str(ROOT / "scripts" / "soak.py"),
                "--url",
                srv.url,
                "--duration",
                str(SOAK_S),
                "--concurrency",
                "32",
                "--out",
                str(out),
            ],
            env={**os.environ, **KEYS},
            capture_output=True,
            text=True,
            timeout=SOAK_S + 600,
        )
    finally:
        code = srv.stop()
    with capsys.disabled():
        print("\n" + run.stdout.strip())
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    c = report["counts"]
    assert report["passed"] and report["num_failures"] == 0
    assert report["adapters_at_start"] == len(KINDS)
    for key in ("disconnect_before_first_token", "disconnect_mid_stream", "client_timeouts"):
        assert c.get(key, 0) > 0, key
    assert c["loads"] > 0 and c["unloads"] == c["loads"] and c["bad_requests"] > 0
    assert c["abort_request_200"] > 0 and report["num_retractions"] > 0
    assert code == 0 and "Traceback" not in srv.log()
