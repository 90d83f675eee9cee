"""The README's quick start: exactly two commands, the main job and the test suite, both real."""

from __future__ import annotations

import re
from pathlib import Path

from blockmerge.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [ln for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_two_commands_main_job_and_tests():
    cmds = quick_start_commands()
    assert len(cmds) == 2
    main_job, tests = cmds
    assert "torch==2.13.0" in main_job and "blockmerge demo" in main_job
    assert tests.strip() == "bash .ci/run"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci and "torch==2.13.0" in (ROOT / "scripts" / "test.sh").read_text()


def test_every_documented_command_exists():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"(?m)(?:^|`|&& )blockmerge ([a-z][a-z-]+)", text))
    assert {"merge", "blocks", "info", "hash", "generate", "sweep", "demo", "run", "compare"} <= documented
    assert documented <= set(sub.choices), documented - set(sub.choices)
