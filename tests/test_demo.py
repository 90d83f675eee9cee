"""``blockmerge demo`` on the bundled models (the quick configuration; the full demo is timed in
bench/bench_sweep.py): reports written, every block in every group, both swap directions, and a
rerun that reuses every image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blockmerge.architectures import SD1
from blockmerge.cli import main
from blockmerge.experiments.demo import demo_config, run_demo
from blockmerge.experiments.results import SweepResult
from blockmerge.models import list_models

pytestmark = pytest.mark.slow  # real model runs / a browser: seconds each


def quick_demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder per test session: the demo is resumable, so a second caller only re-renders."""
    return tmp_path_factory.getbasetemp() / "demo-quick"


def run_quick_demo(tmp_path_factory: pytest.TempPathFactory):
    if len(list_models()) < 2:
        pytest.skip("the bundled models (blockmerge/data/models) are not in this checkout")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_demo(quick_demo_dir(tmp_path_factory), demo_config(quick=True), progress=False)
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return run_quick_demo(tmp_path_factory)


def test_demo_writes_both_reports_with_every_block(demo) -> None:
    assert demo.index.is_file() and demo.reverse_index is not None and demo.reverse_index.is_file()
    res = SweepResult.load(demo.index.parent)
    names = [m.name for m in list_models()]
    assert res.meta["model"] == names[0]
    assert res.groups() == ["scale:k=0.75", "bypass", f"swap:donor={names[1]}"]
    for g in res.groups():
        assert sorted(v.block for v in res.group_variants(g)) == sorted(SD1.block_ids)
    assert len(res.images) == (1 + 3 * 25) * len(res.prompts) * len(res.seeds)
    rev = SweepResult.load(demo.reverse_index.parent)
    assert rev.meta["model"] == names[1] and rev.groups() == [f"swap:donor={names[0]}"]
    html = demo.index.read_text()
    assert html.count('class="cell"') == 26 and "reverse/index.html" in html
    results = json.loads((demo.index.parent / "results.json").read_text())
    # Scaling a block by 0.75 changes the image measurably for most blocks of a trained model.
    ranking = results["ranking"]["scale:k=0.75"]["rmse"]
    assert len(ranking) == 25 and ranking[0][1] > 0.01


def test_demo_rerun_reuses_everything_and_the_command_prints_the_report(demo, tmp_path_factory, capsys) -> None:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main(["demo", "--quick", "-q", "-o", str(quick_demo_dir(tmp_path_factory))])
    finally:
        torch.set_num_threads(n)
    assert rc == 0
    out = capsys.readouterr().out
    assert f"report: {demo.index}" in out
    res = SweepResult.load(demo.index.parent)
    assert res.meta["images_made"] == 0 and res.meta["images_reused"] == len(res.images)
