"""Planning a recipe is linear in its steps (issue 10, class 6).

A 16-step chain's ``--dry-run`` once took over a minute and doubled with every step: each merge
node asked its first operand for a key's info twice, so a chain asked its input 2^n times. The
cost is counted, not timed: the number of times the input files are asked about their tensors,
for chains of 4, 8 and 16 steps, with each step using the previous one once and twice.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from blockmerge.cli import main
from blockmerge.merge.nodes import FileSource
from blockmerge.recipes import run_recipe
from blockmerge.recipes.runner import recipe_from_text
from blockmerge.recipes.schema import MAX_STEPS


def chain(a: Path, b: Path, n: int, twice: bool) -> str:
    text = f'version = 1\n[inputs.A]\npath = "{a}"\n[inputs.B]\npath = "{b}"\n'
    prev = "A"
    for i in range(n):
        other = prev if twice else "B"
        text += f'[[steps]]\nname = "s{i}"\nmodels = ["{prev}", "{other}"]\nalpha = 0.5\n'
        prev = f"s{i}"
    return text + '[[outputs]]\npath = "out.safetensors"\n'


@pytest.mark.parametrize("twice", [False, True], ids=["chain", "step-used-twice"])
def test_planning_asks_the_inputs_a_number_of_times_linear_in_the_steps(tiny_sd1_paths, monkeypatch, twice) -> None:
    a, b, _ = tiny_sd1_paths
    calls = {"n": 0}
    real = FileSource.info

    def counting(self, key):
        calls["n"] += 1
        return real(self, key)

    monkeypatch.setattr(FileSource, "info", counting)
    counts = {}
    for n in (4, 8, 16):
        calls["n"] = 0
        run_recipe(recipe_from_text(chain(a, b, n, twice), a.parent), dry_run=True, verify_hashes=False)
        counts[n] = calls["n"]
    n_keys = len(FileSource(a).keys())
    # at most a fixed number of questions per key and step (it was 2^steps per key)
    assert counts[16] <= 4 * n_keys * 16, counts
    assert counts[16] / counts[8] < 2.2 and counts[8] / counts[4] < 2.2, counts


def test_a_long_chain_runs_and_a_too_long_one_is_refused(tiny_sd1_paths, tmp_path: Path, capsys) -> None:
    a, b, _ = tiny_sd1_paths
    r = tmp_path / "long.toml"
    r.write_text(chain(a, b, 40, True))
    assert main(["run", str(r), "-q"]) == 0
    assert (tmp_path / "out.safetensors").stat().st_size > 100_000
    r.write_text(chain(a, b, MAX_STEPS + 1, False))
    assert main(["run", str(r), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{MAX_STEPS + 1} steps; a recipe may have at most {MAX_STEPS}" in err and err.count("\n") == 1
