"""A small Dockerfile reader for the deploy tests: instructions with their arguments, exec-form
JSON arrays decoded, ARG defaults and ENV values resolved the way `docker build` would."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, ...
    args: str  # the rest of the logical line, continuations joined
    line: int  # 1-based line where it starts

    def exec_form(self) -> list[str] | None:
        """The JSON array of ENTRYPOINT ["python", ...] / CMD / VOLUME; None in shell form."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            text = text.split(" CMD ", 1)[1] if " CMD " in text else ""
        text = text.strip()
        return json.loads(text) if text.startswith("[") else None


def parse(path: Path = DOCKERFILE) -> list[Instruction]:
    out: list[Instruction] = []
    pending, start = "", 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comments inside a continued instruction are dropped by docker too
        if not pending:
            start = n
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        keyword, _, args = text.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    return out


def assignments(args: str) -> dict[str, str]:
    """`A=1 B="x y"` (ENV, ARG) -> {"A": "1", "B": "x y"}; `ARG NAME` -> {"NAME": ""}."""
    return dict(tok.partition("=")[::2] for tok in shlex.split(args))


_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def expand(text: str, env: dict[str, str]) -> str:
    """$VAR / ${VAR} from env; unknown names stay as they are (the shell resolves them)."""
    return _VAR.sub(lambda m: env.get(m.group(1) or m.group(2), m.group(0)), text)
