"""Every command the README names, run once on the bundled models, with its output checked.

A command that crashes on start (``blockmerge models`` once did: ``'BundledModel' object has no
attribute 'description'``) cannot land again: the list of commands run here must equal the list the
README names, so a new documented command without a run here fails too.
"""

from __future__ import annotations

import json
import re
import tomllib
import urllib.request
from pathlib import Path

import pytest
from safetensors import safe_open

from blockmerge.cli import main
from blockmerge.models import list_models, resolve_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.usefixtures("single_torch_thread"), pytest.mark.slow]

PROMPT = "a large red circle on the left, white background\nSteps: 4, Sampler: Euler a, CFG scale: 6, Size: 64x64"


def documented_commands() -> set[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return set(re.findall(r"(?m)(?:^|`|&& )blockmerge ([a-z][a-z-]+)", text))


def run(capsys, *args: object) -> tuple[str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "internal error" not in err and "Traceback" not in err
    # the libraries' chatter (transformers' "requires torchvision" lines, deprecations) never reaches the user
    assert "torchvision" not in err and "Warning" not in err, err
    return out, err


def test_every_readme_command_runs_on_the_bundled_models(tmp_path: Path, capsys) -> None:
    a, b = resolve_model("tiny-a"), resolve_model("tiny-b")
    done: set[str] = set()

    out, _ = run(capsys, "models")
    names = [m.name for m in list_models()]
    assert all(n in out for n in names) and "flat-filled shapes" in out and "outline" in out
    done.add("models")

    merged = tmp_path / "m.safetensors"
    out, _ = run(capsys, "merge", a, b, "-o", merged, "--alpha", "GRAD_V", "--base-alpha", "0.3")
    assert f"wrote {merged}" in out
    with safe_open(merged, "pt") as f:
        assert json.loads(f.metadata()["blockmerge"])["method"] == "weighted_sum"
    done.add("merge")

    out, _ = run(capsys, "blocks", merged)
    assert "IN00" in out and "OUT11" in out and "BASE" in out
    done.add("blocks")

    out, _ = run(capsys, "info", merged)
    assert "SD1" in out and "merge:        weighted_sum" in out
    done.add("info")

    out, _ = run(capsys, "hash", a, "--no-cache")
    assert re.search(r"^[0-9a-f]{8}  [0-9a-f]{10}  [0-9a-f]{64}  ", out.splitlines()[1])
    done.add("hash")

    out, _ = run(capsys, "presets")
    assert "GRAD_V" in out
    done.add("presets")

    syn = tmp_path / "syn.safetensors"
    out, _ = run(capsys, "synthetic", syn, "--seed", "3")
    assert syn.stat().st_size > 100_000 and "synthetic tiny SD1" in out
    done.add("synthetic")

    gen = tmp_path / "gen"
    out, _ = run(capsys, "generate", "-o", gen, "--prompt", "a small blue square in the center, gray background",
                 "--seed", "1", "--steps", "3")
    pngs = sorted(gen.glob("*.png"))
    assert len(pngs) == 1 and str(pngs[0]) in out
    done.add("generate")

    sweep = tmp_path / "sweep"
    out, err = run(capsys, "sweep", "tiny-a", "-o", sweep, "--prompt", PROMPT, "--seeds", "1", "--scale", "0.5",
                   "--blocks", "IN00,M00", "-q")
    assert (sweep / "index.html").is_file() and "3 images" in err
    done.add("sweep")

    out, _ = run(capsys, "report", sweep)
    assert f"report: {sweep.resolve() / 'index.html'}" in out
    done.add("report")

    demo = tmp_path / "demo"
    out, _ = run(capsys, "demo", "--quick", "-q", "-o", demo)
    assert (demo / "index.html").is_file() and (demo / "reverse" / "index.html").is_file()
    done.add("demo")

    recipe = tmp_path / "r.toml"
    recipe.write_text(f'version = 1\n[inputs.A]\npath = "{a}"\n[inputs.B]\npath = "{b}"\n'
                      '[[steps]]\nname = "ab"\nmodels = ["A", "B"]\nalpha = 0.4\n'
                      '[[outputs]]\npath = "ab.safetensors"\n', encoding="utf-8")
    out, _ = run(capsys, "run", recipe)
    assert (tmp_path / "ab.safetensors").is_file()
    done.add("run")

    out, _ = run(capsys, "info", "--recipe", tmp_path / "ab.safetensors")
    assert tomllib.loads(out)["steps"][0]["alpha"] == 0.4

    board = tmp_path / "board.txt"
    board.write_text("mix = __A__ + __B__, 0.3\n", encoding="utf-8")
    out, _ = run(capsys, "import-mergeboard", board, "--model", f"A={a}", "--model", f"B={b}",
                 "-o", tmp_path / "board.toml")
    assert tomllib.loads((tmp_path / "board.toml").read_text())["steps"][0]["alpha"] == 0.3
    done.add("import-mergeboard")

    import sd_mecha  # the test extra's sd-mecha writes the .mecha text, as its users would have it

    mecha = tmp_path / "r.mecha"
    mecha.write_text(sd_mecha.serialize(sd_mecha.weighted_sum(sd_mecha.model(str(a), "sd1-ldm"),
                                                              sd_mecha.model(str(b), "sd1-ldm"), alpha=0.35),
                                        finalize=False), encoding="utf-8")
    out, _ = run(capsys, "import-mecha", mecha, "-o", tmp_path / "mecha.toml")
    step = tomllib.loads((tmp_path / "mecha.toml").read_text())["steps"][0]
    assert step["method"] == "weighted_sum" and step["alpha"] == 0.35
    done.add("import-mecha")

    out, _ = run(capsys, "methods", "--json")
    listed = {m["name"]: m for m in json.loads(out)}
    assert {"weighted_sum", "add_difference", "ties", "slerp"} <= set(listed)
    out, _ = run(capsys, "methods")
    assert all(name in out for name in listed)
    done.add("methods")

    out, _ = run(capsys, "compare", a, b, "--svg", tmp_path / "map.svg")
    assert "IN00" in out and (tmp_path / "map.svg").read_text().startswith("<svg")
    done.add("compare")

    # LoRAs: the bundled tiny-b-outline by name, baked by block, inspected, extracted, merged, resized
    out, _ = run(capsys, "blocks", "tiny-b-outline")
    assert "LoRA for SD1" in out and "OUT08" in out
    out, _ = run(capsys, "info", "tiny-b-outline")
    assert "Lora hash:" in out
    baked = tmp_path / "baked.safetensors"
    out, _ = run(capsys, "lora", "apply", "tiny-a", "tiny-b-outline:0.8:OUTALL", "-o", baked)
    assert f"wrote {baked}" in out
    with safe_open(baked, "pt") as f:
        rec = json.loads(f.metadata()["blockmerge"])
    assert rec["method"] == "lora" and rec["loras"][0]["blocks"]["OUT11"] == 0.8 and rec["loras"][0]["blocks"]["IN04"] == 0
    extracted = tmp_path / "outline.safetensors"
    out, _ = run(capsys, "lora", "extract", "tiny-b", "tiny-a", "-o", extracted, "--rank", "4", "--conv-rank", "4")
    assert "kept ||ΔW||²" in out and "OUT08" in out
    out, _ = run(capsys, "lora", "merge", f"{extracted}:0.7", "tiny-b-outline:1:OUT=1", "-o", tmp_path / "lm.safetensors",
                 "--rank", "8")
    assert "factored to rank 8" in out
    out, _ = run(capsys, "lora", "resize", "tiny-b-outline", "-o", tmp_path / "r.safetensors", "--keep-energy", "0.9")
    assert "ranks" in out
    gen = tmp_path / "gen-lora"
    out, err = run(capsys, "generate", "tiny-a", "-o", gen, "--prompt",
                   "a red circle <lora:tiny-b-outline:0.8:lbw=OUTD>", "--seed", "1", "--steps", "3")
    assert "Lora hashes" in (next(gen.glob("*.png")).read_bytes().decode("latin-1"))
    lsweep = tmp_path / "lsweep"
    out, err = run(capsys, "sweep", "tiny-a", "-o", lsweep, "--prompt", PROMPT, "--seeds", "1", "--lora",
                   "tiny-b-outline", "--blocks", "OUT08", "-q")
    assert (lsweep / "index.html").is_file() and "without OUT08" in (lsweep / "index.html").read_text()
    done.add("lora")
    from _ui import ui_server  # `blockmerge ui` serves until stopped: its own process, then SIGTERM

    with ui_server(tmp_path / "ui") as (url, proc, log):
        with urllib.request.urlopen(url, timeout=60) as r:
            page = r.read().decode()
        assert r.status == 200 and "Block-weighted merging" in page and "tiny-b" in page  # the config the page renders
    assert proc.returncode is not None and "blockmerge ui: http://127.0.0.1:" in log.read_text()
    done.add("ui")

    assert done == documented_commands(), (documented_commands() - done, done - documented_commands())


def test_a_command_prints_nothing_of_the_libraries_to_the_terminal(tmp_path: Path) -> None:
    """In a fresh process (where transformers is imported for the first time), no "requires
    torchvision" lines, no deprecation warnings: stderr is empty; with --debug they may show."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "BLOCKMERGE_CACHE": str(tmp_path / "cache")}
    for var in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "PYTHONWARNINGS"):
        env.pop(var, None)
    r = subprocess.run([sys.executable, "-m", "blockmerge", "generate", "-o", str(tmp_path / "g"), "--prompt",
                        "a red circle", "--seed", "1", "--steps", "2", "-q"], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert len(list((tmp_path / "g").glob("*.png"))) == 1
