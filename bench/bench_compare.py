"""Compare / recipe benchmark (issue 5): ``blockmerge compare`` and ``blockmerge run`` on full-size
SD1.5-shaped fp16 checkpoints, wall time and peak RSS, beside the merge engine on the same files.

Usage::

    python bench/bench_compare.py [--scratch DIR] [--repeat N] [--keep-inputs] [--no-write]

It writes three synthetic full-size SD1 fp16 checkpoints (real key names and shapes, seeded random
values, ``blockmerge.architectures.synthetic``; the same file names as bench_merge.py, so a kept
scratch folder serves both) and runs, each in its own child process under ``/usr/bin/time -v``:

- ``compare A B`` and ``compare A B --base C`` (the CLI, JSON output, threads=2);
- ``merge A B`` (the merge engine, α 0.5, threads=2): the yardstick "as in the merge engine";
- ``run`` of a three-step recipe over A, B, C (weighted sum, add difference, block-weighted mix)
  into one fp16 file: the chain streamed in one pass;
- ``load-everything compare``: both files loaded whole with ``safetensors.torch.load_file`` and the
  same sums computed, which is what a notebook does; its per-block numbers are also checked
  against ``blockmerge compare``'s (a benchmark of wrong numbers is worthless).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
SRC = REPO / "src"
if SRC.is_dir() and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

import _common as common  # noqa: E402

SECTION = "Compare (issue 5)"
RSS_TARGET = 1.0e9

CHAIN = """version = 1
[inputs]
A = "{a}"
B = "{b}"
C = "{c}"

[[steps]]
name = "ab"
models = ["A", "B"]
alpha = "GRAD_V"
base_alpha = 0.5

[[steps]]
name = "plus"
method = "add_difference"
models = ["ab", "A", "C"]
alpha = 0.5

[[steps]]
name = "mix"
models = ["plus", "ab"]
alpha = "IN04-IN08=0.7,OUT=0.25"

[[outputs]]
path = "{out}"
dtype = "fp16"
"""


def child_load_everything(a: str, b: str) -> None:
    """Both models whole in memory, then the per-group sums: prints {group: rel_distance} as JSON."""
    import torch
    from safetensors.torch import load_file

    from blockmerge.architectures import BASE, detect

    ta, tb = load_file(a), load_file(b)
    arch = detect(list(ta), a)
    sums: dict[str, list[float]] = {}
    for k in sorted(ta):
        x = ta[k]
        if not x.is_floating_point() or k.endswith("position_ids") or k not in tb:
            continue
        blk = arch.block_of(k)
        g = arch.component_of(k) if blk == BASE else blk
        xf, yf = x.float().flatten(), tb[k].float().flatten()
        d = xf - yf
        s = sums.setdefault(g, [0.0, 0.0])
        s[0] += float(torch.dot(d, d))
        s[1] += float(torch.dot(xf, xf))
    print(json.dumps({g: math.sqrt(dd) / math.sqrt(aa) for g, (dd, aa) in sums.items()}))


def generate(scratch: Path) -> tuple[list[Path], float]:
    import torch

    from blockmerge.architectures.synthetic import write_synthetic

    t0 = time.perf_counter()
    paths = []
    for seed in (1, 2, 3):
        p = scratch / f"sd1_full_seed{seed}.safetensors"
        if not p.exists():
            tmp = p.with_suffix(".part")
            write_synthetic(tmp, "SD1", size="full", seed=seed, dtype=torch.float16)
            tmp.replace(p)
        paths.append(p)
    return paths, time.perf_counter() - t0


def run(label: str, cmd: list[str], scratch: Path, log) -> common.Measurement:
    cache = scratch / "hash-cache"
    shutil.rmtree(cache, ignore_errors=True)  # first-time inputs: merge / run hash them for metadata
    env = {"BLOCKMERGE_CACHE": str(cache), "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    m = common.measure(cmd, env=env, cwd=REPO)
    log(f"{label:32s} {m.wall_s:7.1f} s wall, {m.cpu_s:7.1f} s cpu, {common.fmt_bytes(m.max_rss):>8s} peak RSS "
        f"(load {m.load_before:.1f} -> {m.load_after:.1f})")
    return m


def parent(args: argparse.Namespace) -> int:
    def log(s: str) -> None:
        print(s, flush=True)

    own = args.scratch is None
    scratch = Path(args.scratch) if args.scratch else Path(tempfile.mkdtemp(prefix="blockmerge-bench-", dir="/tmp"))
    scratch.mkdir(parents=True, exist_ok=True)
    need = 5 * 2.2e9
    if common.disk_free(scratch) < need:
        print(f"error: {scratch}: needs about {common.fmt_bytes(need)} free disk", file=sys.stderr)
        return 2
    py = [sys.executable, "-m", "blockmerge"]
    try:
        (a, b, c), gen_s = generate(scratch)
        log(f"inputs ready: 3 x {common.fmt_bytes(a.stat().st_size)} ({gen_s:.0f} s)")
        out = scratch / "out.safetensors"
        recipe = scratch / "chain.toml"
        recipe.write_text(CHAIN.format(a=a, b=b, c=c, out=out), encoding="utf-8")
        plan: list[tuple[str, list[str], bool]] = [
            ("compare A B", py + ["compare", str(a), str(b), "--json", "-q"], False),
            ("compare A B --base C", py + ["compare", str(a), str(b), "--base", str(c), "--json", "-q"], False),
            ("merge A B (merge engine)", py + ["merge", str(a), str(b), "-o", str(out), "--alpha", "0.5", "-q",
                                               "--overwrite"], True),
            ("run: 3-step recipe over A, B, C", py + ["run", str(recipe), "-q", "--overwrite"], True),
            ("load-everything compare A B", common.python_cmd(Path(__file__), "--child", str(a), str(b)), False),
        ]
        best: dict[str, common.Measurement] = {}
        for _ in range(args.repeat):
            for label, cmd, _writes in plan:
                if label.startswith("load-everything") and common.mem_available() < 6e9:
                    log(f"{label}: skipped (needs ~5 GB of free RAM)")
                    continue
                common.warm_read([a, b, c])
                m = run(label, cmd, scratch, log)
                if label not in best or m.wall_s < best[label].wall_s:
                    best[label] = m
        ours = json.loads(best["compare A B"].stdout)
        check = ""
        if "load-everything compare A B" in best:
            ref = json.loads(best["load-everything compare A B"].stdout)
            worst = max(abs(g["rel_distance"] - ref[g["group"]]) / ref[g["group"]] for g in ours["groups"])
            check = f"per-group ||A-B||/||A|| agrees with the load-everything computation to {worst:.1e} (relative)"
            log(check)
        n_tensors = sum(g["tensors"] for g in ours["groups"])
        n_params = sum(g["parameters"] for g in ours["groups"])
    finally:
        for p in scratch.glob("*.safetensors"):
            if args.keep_inputs and "_full_seed" in p.name:
                continue
            p.unlink(missing_ok=True)
        shutil.rmtree(scratch / "hash-cache", ignore_errors=True)
        if own and not args.keep_inputs:
            shutil.rmtree(scratch, ignore_errors=True)
    info = common.machine_info(("torch", "safetensors"))
    rows = [[label, f"{m.wall_s:.1f}", f"{m.cpu_s:.1f}", common.fmt_bytes(m.max_rss),
             f"{m.load_before:.1f} → {m.load_after:.1f}"] for label, m in best.items()]
    cmp_rss = max(best["compare A B"].max_rss, best["compare A B --base C"].max_rss)
    lines = [
        "`blockmerge compare` and `blockmerge run` on synthetic full-size SD1.5-shaped fp16 checkpoints "
        f"(3 x {common.fmt_bytes(a.stat().st_size if a.exists() else 2.13e9)}, real key names and shapes, "
        f"random values; {n_tensors} tensors, {n_params:,} parameters compared), each command in its own "
        f"process under `/usr/bin/time -v`, inputs in the page cache, best of {args.repeat}. "
        "Reproduce: `python bench/bench_compare.py`.",
        "",
        "Machine: " + "; ".join(f"{k}: {v}" for k, v in info.items()),
        "",
        common.md_table(["command", "wall s", "CPU s (user+sys)", "peak RSS", "load avg before → after"], rows),
        "",
        f"- compare peak RSS **{common.fmt_bytes(cmp_rss)}** (target ≤ {common.fmt_bytes(RSS_TARGET)}: "
        f"{'met' if cmp_rss <= RSS_TARGET else 'MISSED'}); wall vs the merge engine on the same pair: "
        f"{best['compare A B'].wall_s / best['merge A B (merge engine)'].wall_s:.2f}x",
        f"- 3-step recipe (three inputs, one fp16 output, no intermediate file) peak RSS "
        f"**{common.fmt_bytes(best['run: 3-step recipe over A, B, C'].max_rss)}**",
    ]
    if check:
        lines.append(f"- {check}")
    max_load = max(m.load_before for m in best.values())
    if max_load > 1.5 * (os.cpu_count() or 1):
        lines.append(f"- the machine was shared with other work (1-min load average up to {max_load:.1f} on "
                     f"{os.cpu_count()} cores): wall times are inflated; CPU seconds are the steadier number")
    text = "\n".join(lines)
    print("\n" + text)
    if not args.no_write:
        common.write_results_section(SECTION, text)
        log(f"updated {common.RESULTS}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scratch", help="directory for the synthetic files (default: a new one in /tmp)")
    p.add_argument("--repeat", type=int, default=1, help="runs per command; the fastest is reported")
    p.add_argument("--keep-inputs", action="store_true", help="keep the synthetic inputs for the next run")
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_load_everything(*args.paths)
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
