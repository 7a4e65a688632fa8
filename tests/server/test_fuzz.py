"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis over
hypothesis), for a fixed time (SGLORA_FUZZ_S, default 120 s): inputs that fit the schema and
inputs that break it, on every operation. Properties: no 5xx, and every 4xx body is a valid
OpenAI error (JSON `{"error": {"message", "type", "param", "code"}}`). Failures are collected
(not shrunk) so the whole budget runs; the test prints how many inputs it tried."""

from __future__ import annotations

import json
import os
import time
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from sglora.testing.soak_checks import error_problem
from tests.server.conftest import MODEL, start_server

FUZZ_S = float(os.environ.get("SGLORA_FUZZ_S", "120"))
BATCH = 25  # examples per hypothesis run; runs repeat until the time is up
MODES = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]


@pytest.fixture(scope="module")
def fuzz_server(model_path, tmp_path_factory):
    """A short context (generations stay small whatever max_tokens says) and LoRA on, with
    loads confined to an empty directory and no hub, so no input reaches the network."""
    empty = tmp_path_factory.mktemp("no_adapters")
    srv = start_server(
        [
            "--model-path",
            model_path,
            "--served-model-name",
            MODEL,
            "--context-length",
            "64",
            "--enable-lora",
            "--max-lora-rank",
            "8",
            "--lora-allowed-dirs",
            str(empty),
            "--disable-lora-hub-download",
            "--max-request-bytes",
            str(1 << 20),
        ],
        tmp_path_factory.mktemp("fuzz_server") / "server.log",
        env={"OMP_NUM_THREADS": "1"},
    )
    yield srv
    srv.stop()


def problem_of(status: int, text: str) -> str | None:
    if status >= 500:
        return f"status {status}"
    if status >= 400:
        try:
            return error_problem(json.loads(text))
        except json.JSONDecodeError:
            return f"{status} with a non-JSON body"
    return None


def fuzz_batch(schema, url: str, mode, deadline: float, tally: dict) -> None:
    """One hypothesis run of BATCH inputs; problems are collected in `tally`."""

    @settings(
        max_examples=BATCH,
        deadline=None,
        database=None,  # no .hypothesis/ directory in the checkout
        phases=[Phase.generate],  # no shrinking: keep fuzzing, report what failed
        suppress_health_check=list(HealthCheck),
    )
    @given(case=schema.as_strategy(generation_mode=mode))
    def run(case) -> None:
        if time.monotonic() > deadline:
            return
        r = case.call(base_url=url, timeout=120)
        tally["operations"][f"{case.method} {case.operation.path}"] += 1
        tally["modes"][mode.value] += 1
        tally["statuses"][r.status_code] += 1
        problem = problem_of(r.status_code, r.text)
        if problem is not None and len(tally["failures"]) < 20:
            tally["failures"].append(
                f"{case.method} {case.formatted_path} body={str(case.body)[:300]!r}: "
                f"{problem}: {r.text[:300]}"
            )

    run()


def test_fuzz_the_api_from_its_openapi_schema(fuzz_server, capsys):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    tally: dict = {"operations": Counter(), "modes": Counter(), "statuses": Counter()}
    tally["failures"] = []
    deadline = time.monotonic() + FUZZ_S
    runs = 0
    while time.monotonic() < deadline:
        fuzz_batch(schema, fuzz_server.url, MODES[runs % len(MODES)], deadline, tally)
        runs += 1
    total, modes, failures = sum(tally["modes"].values()), tally["modes"], tally["failures"]
    with capsys.disabled():
        print(
            f"\nfuzz: {total} inputs in {FUZZ_S:.0f} s ({modes['positive']} fitting the schema, "
            f"{modes['negative']} breaking it) over {len(tally['operations'])} operations; "
            f"{len(failures)} failures; statuses {dict(sorted(tally['statuses'].items()))}"
        )
    assert total > 0
    assert not failures, "\n".join(failures)
    assert "Traceback" not in fuzz_server.log()
