"""The Dockerfile's Python install steps, run for real in a fresh venv with CPU wheels, so a broken
install line or package spec fails CI although there is no docker engine here.

It reads the Dockerfile like `docker build --build-arg TORCH_SPEC=<README's CPU pin>` would: ARG
and ENV are applied in order, WORKDIR and COPY stage the build context, and every RUN step that
is a Python command (`python3 -m venv`, `pip install ...`, `python -c ...`) runs as written. The
image's /opt tree lives in a temporary directory instead. Left to the image build: RUN steps that
are not Python (apt-get, useradd) and PIP_NO_CACHE_DIR, dropped so pip reuses its cache here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.deploy.dockerfile import ROOT, assignments, expand, parse

PYTHON_STEPS = ("python3 ", "python ", "pip ")
INSTALL_TIMEOUT_S = 600


def cpu_torch_spec() -> str:
    """The torch/triton pin of README's test command: CPU wheels on this machine."""
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"pip install (torch==\S+ triton==\S+)", readme)
    assert m, "README's test command lost its torch/triton pin"
    return m.group(1)


def run_install_steps(tmp: Path, build_args: dict[str, str]) -> list[str]:
    """Replays the Dockerfile under `tmp`; returns the RUN commands it executed."""
    image_root = tmp / "image"
    shim = tmp / "shim"  # `python3` is the interpreter running the tests (its wheels are cached)
    shim.mkdir()
    (shim / "python3").symlink_to(sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{shim}:{env['PATH']}"

    def here(text: str) -> str:  # image paths -> their place under tmp
        return text.replace("/opt/", f"{image_root}/opt/")

    image_root.mkdir()  # the image's `/`, docker's first working directory
    cwd, ran = image_root, []
    for ins in parse():
        if ins.keyword == "ARG":
            for name, default in assignments(ins.args).items():
                env[name] = build_args.get(name, default)
        elif ins.keyword == "ENV":
            for name, value in assignments(ins.args).items():
                if name != "PIP_NO_CACHE_DIR":
                    env[name] = here(expand(value, env))
        elif ins.keyword == "WORKDIR":
            cwd = Path(here(ins.args))
            cwd.mkdir(parents=True, exist_ok=True)
        elif ins.keyword == "COPY" and cwd.is_relative_to(image_root):
            *sources, dest = ins.args.split()
            for src in sources:
                target = cwd / dest / Path(src).name if dest.endswith("/") else cwd / dest
                if (ROOT / src).is_dir():
                    shutil.copytree(
                        ROOT / src, target, ignore=shutil.ignore_patterns("__pycache__")
                    )
                else:
                    shutil.copy(ROOT / src, target)
        elif ins.keyword == "RUN" and ins.args.startswith(PYTHON_STEPS):
            cmd = here(ins.args)
            res = subprocess.run(
                ["bash", "-c", cmd],
                cwd=cwd,
                env=env,
                capture_output=True,
                text=True,
                timeout=INSTALL_TIMEOUT_S,
            )
            assert res.returncode == 0, (
                f"Dockerfile:{ins.line} `{cmd}` failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
            )
            ran.append(ins.args)
    return ran


def test_dockerfile_pip_steps_install_and_import(tmp_path):
    ran = run_install_steps(tmp_path, {"TORCH_SPEC": cpu_torch_spec()})
    # the venv, torch, then the package with its import check: a step that stops matching
    # PYTHON_STEPS would silently go unchecked
    assert len(ran) == 3, ran
    assert ran[0].startswith("python3 -m venv") and "TORCH_SPEC" in ran[1]
    assert '".[router,demo]"' in ran[2] and "import sglora" in ran[2]
    venv_python = tmp_path / "image/opt/venv/bin/python"
    out = subprocess.run(
        [str(venv_python), "-c", "import sglora, torch; print(sglora.__file__, torch.__version__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    # installed into the venv (not an editable link back into the checkout)
    assert str(tmp_path / "image/opt/venv") in out.stdout, out.stdout
