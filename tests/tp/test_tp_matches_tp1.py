"""Tensor parallelism on CPU (gloo): a `--tp-size 2` server gives what one process gives, for
every model family, with batches that mix adapters of every format and base requests; a
two-"node" launch on loopback gives the same; bad TP set-ups fail at start with a clear line."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch

from sglora.engine import Engine
from sglora.testing.adapters import is_moe, tiny_adapter_paths
from sglora.testing.tiny import tiny_model_path
from tests.conftest import ALL_FAMILIES, random_prompts
from tests.lora.test_lora_matches_peft import DENSE_KINDS, MOE_KINDS
from tests.server.conftest import free_port, start_server
from tests.server.test_lifecycle import process_gone

ATOL = 1e-4  # max abs logprob, fp32
SP = {"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": True}


def server_args(family: str) -> list[str]:
    kinds = MOE_KINDS if is_moe(family) else DENSE_KINDS
    return [
        "--model-path",
        str(tiny_model_path(family)),
        "--device",
        "cpu",
        "--max-loras-per-batch",
        str(len(kinds)),
        "--lora-paths",
        *(f"{k}={tiny_adapter_paths(family, k)[0]}" for k in kinds),
    ]


def workload(family: str) -> tuple[list[list[int]], list[str | None]]:
    kinds = MOE_KINDS if is_moe(family) else DENSE_KINDS
    order = [*kinds, None, *kinds[::-1], None]
    prompts = random_prompts(1000, [5 + 3 * i for i in range(len(order))], seed=7)
    return prompts, order


def tp1_results(family: str) -> list[dict]:
    prompts, order = workload(family)
    kinds = MOE_KINDS if is_moe(family) else DENSE_KINDS
    engine = Engine(
        model_path=str(tiny_model_path(family)),
        device="cpu",
        lora_paths=tuple(f"{k}={tiny_adapter_paths(family, k)[0]}" for k in kinds),
        max_loras_per_batch=len(kinds),
    )
    return engine.generate(
        input_ids=prompts,
        sampling_params=SP,
        return_logprob=True,
        logprob_start_len=0,
        lora_path=order,
    )


def served_results(url: str, family: str) -> list[dict]:
    prompts, order = workload(family)
    body = {
        "input_ids": prompts,
        "lora_path": order,
        "sampling_params": SP,
        "return_logprob": True,
        "logprob_start_len": 0,
    }
    r = httpx.post(url + "/generate", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def assert_same(got: list[dict], want: list[dict], what: str) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g["output_ids"] == w["output_ids"], f"{what} request {i}: tokens differ"
        for key in ("input_token_logprobs", "output_token_logprobs"):
            a = torch.tensor([x[0] for x in g["meta_info"][key] if x[0] is not None])
            b = torch.tensor([x[0] for x in w["meta_info"][key] if x[0] is not None])
            err = (a - b).abs().max().item() if len(a) else 0.0
            assert err <= ATOL, f"{what} request {i} {key}: max |Δ| {err:.2e}"


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_tp2_server_equals_tp1(family, tmp_path):
    srv = start_server([*server_args(family), "--tp-size", "2"], tmp_path / "server.log")
    try:
        got = served_results(srv.url, family)
        info = httpx.get(srv.url + "/get_server_info?check_lora=true", timeout=30).json()
    finally:
        assert srv.stop() == 0, srv.log()
    assert_same(got, tp1_results(family), f"{family} TP2")
    assert "rank 1" in srv.log()
    assert info is not None


def test_tp2_shrink_in_gemm_equals_tp1(tmp_path):
    """The Triton dense LoRA kernels (interpreted) with every shrink done by the base GEMM: the
    row-parallel o_proj/down all-reduce [base partial | shrink partial] as one tensor and expand
    after it; TP2 still gives what one process with the PyTorch LoRA gives."""
    family = "llama"
    extra = ["--tp-size", "2", "--lora-backend", "triton", "--lora-shrink-in-gemm", "on"]
    srv = start_server(
        [*server_args(family), *extra], tmp_path / "server.log", env={"TRITON_INTERPRET": "1"}
    )
    try:
        got = served_results(srv.url, family)
    finally:
        assert srv.stop() == 0, srv.log()
    assert_same(got, tp1_results(family), f"{family} TP2, shrink in the GEMM")


def test_two_node_launch_equals_tp1(tmp_path):
    """Two launchers on loopback, one rank each: node 1 runs its rank without HTTP."""
    family = "qwen3_moe"
    addr = f"127.0.0.1:{free_port()}"
    multi = ["--tp-size", "2", "--nnodes", "2", "--dist-init-addr", addr]
    log1 = open(tmp_path / "node1.log", "w")  # noqa: SIM115 - the child writes it
    node1 = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sglora.launch_server",
            *server_args(family),
            *multi,
            "--node-rank",
            "1",
        ],
        stdout=log1,
        stderr=subprocess.STDOUT,
    )
    try:
        srv = start_server([*server_args(family), *multi, "--node-rank", "0"], tmp_path / "n0.log")
        try:
            got = served_results(srv.url, family)
        finally:
            assert srv.stop() == 0, srv.log()
        # node 1 follows node 0's shutdown
        assert node1.wait(60) == 0, (tmp_path / "node1.log").read_text()
    finally:
        if node1.poll() is None:
            node1.kill()
        log1.close()
    assert_same(got, tp1_results(family), "two-node TP2")


def test_tp_size_that_does_not_divide_heads_fails_at_start(tmp_path):
    model = str(tiny_model_path("qwen3_moe"))
    r = subprocess.run(
        [sys.executable, "-m", "sglora.launch_server", "--model-path", model, "--tp-size", "3"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode != 0
    assert "--tp-size 3 does not divide" in r.stderr + r.stdout, r.stderr[-2000:]


def test_tp2_adapter_load_unload_and_a_dead_rank(tmp_path):
    """Run-time loads reach both ranks (a bad one changes nothing anywhere); when a rank dies
    the whole server exits with a line naming it instead of hanging."""
    family = "qwen3_moe"
    srv = start_server(
        ["--model-path", str(tiny_model_path(family)), "--device", "cpu", "--tp-size", "2"]
        + ["--enable-lora", "--max-lora-rank", "16"],
        tmp_path / "server.log",
    )
    try:
        bad = httpx.post(
            srv.url + "/load_lora_adapter",
            json={"lora_name": "bad", "lora_path": str(tmp_path / "missing")},
            timeout=60,
        )
        assert bad.status_code == 400, bad.text
        path = tiny_adapter_paths(family, "attn_experts_rslora")[0]
        ok = httpx.post(
            srv.url + "/load_lora_adapter",
            json={"lora_name": "a", "lora_path": str(path)},
            timeout=60,
        )
        assert ok.status_code == 200, ok.text
        prompts = random_prompts(1000, [9, 14], seed=3)
        body = {"input_ids": prompts, "lora_path": ["a", None], "sampling_params": SP}
        body |= {"return_logprob": True, "logprob_start_len": 0}
        got = httpx.post(srv.url + "/generate", json=body, timeout=120).json()
        engine = Engine(
            model_path=str(tiny_model_path(family)), device="cpu", lora_paths=(f"a={path}",)
        )
        want = engine.generate(
            input_ids=prompts,
            sampling_params=SP,
            return_logprob=True,
            logprob_start_len=0,
            lora_path=["a", None],
        )
        assert_same(got, want, "TP2 run-time adapter")
        r = httpx.post(srv.url + "/unload_lora_adapter", json={"lora_name": "a"}, timeout=60)
        assert r.status_code == 200, r.text

        pid = int(re.search(r"rank 1 pid (\d+)", srv.log()).group(1))
        os.kill(pid, signal.SIGKILL)
        assert srv.proc.wait(60) != 0
        assert "TP rank 1 exited unexpectedly" in srv.log()
    finally:
        srv.stop()


def test_tp2_ranks_exit_when_the_api_server_is_killed(tmp_path):
    """SIGKILL to the api server (an OOM killer, `kill -9`): every rank exits on its own, also
    the ones waiting in a collective for a rank that left first, so the GPUs are free again."""
    model = str(tiny_model_path("qwen3_moe"))
    srv = start_server(
        ["--model-path", model, "--device", "cpu", "--tp-size", "2"], tmp_path / "orphan.log"
    )
    pids = [int(p) for p in re.findall(r"rank \d pid (\d+)", srv.log())]
    assert len(pids) == 2, srv.log()[-2000:]
    body = {"input_ids": random_prompts(1000, [9], seed=5), "sampling_params": SP}
    assert httpx.post(srv.url + "/generate", json=body, timeout=120).status_code == 200
    srv.proc.kill()
    srv.proc.wait(30)
    deadline = time.monotonic() + 30
    while not all(process_gone(p) for p in pids):
        assert time.monotonic() < deadline, f"orphaned ranks still running: {pids}"
        time.sleep(0.1)
