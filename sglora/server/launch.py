"""Start serving from ServerArgs. Until the HTTP front end lands, `--demo` runs the offline
engine on the built-in demo model and prints a few completions."""

from __future__ import annotations

from sglora.config import ServerArgs

DEMO_PROMPTS = ["The weather in Zürich today is", "A good recipe for soup starts with",
                "def fibonacci(n):"]


def launch(args: ServerArgs) -> int:
    from sglora.engine import Engine

    engine = Engine(args)
    results = engine.generate(DEMO_PROMPTS, {"max_new_tokens": 24, "temperature": 0.0})
    for prompt, res in zip(DEMO_PROMPTS, results):
        print(f"{prompt!r} -> {res['text']!r}")
    return 0
