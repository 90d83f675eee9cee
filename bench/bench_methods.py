"""Merge-method benchmark (issue 11): every method's wall time and peak RSS, against sd-mecha 1.1
doing the same method where it has one, and today's three methods before vs after the method
registry.

Usage::

    python bench/bench_methods.py [--scratch DIR] [--methods a,b,...] [--before-src DIR] [--no-write]

Three synthetic full-size SD1.5-shaped fp16 checkpoints (real key names and shapes, seeded random
values) are written to a scratch directory; each merge runs in its own child process under
``/usr/bin/time -v`` with the inputs in the page cache. Parameters are one number per method (the
per-block machinery is the same for every method and is benchmarked in bench_merge.py), and the
same numbers go to sd-mecha. ``--before-src`` points at the ``src`` of an older blockmerge checkout
(e.g. ``git worktree add /tmp/before <commit>``); its ``weighted_sum``, ``add_difference`` and
``scaled_sum`` then run in the same invocation, interleaved with today's, so "not slower" is
measured on the same machine state. sd-mecha's output is compared with blockmerge's tensor by
tensor (max |diff| in fp16 units) so a speed ratio is never reported for a different result
without saying so.
"""

# No `from __future__ import annotations`: sd-mecha reads merge method annotations at runtime.

import argparse
import json
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
from bench_merge import compare_outputs  # noqa: E402

SECTION = "Merge methods (issue 11)"
# Each method: number of operands and its (scalar) parameters; the same values go to sd-mecha.
METHOD_CASES: dict[str, tuple[int, dict[str, float]]] = {
    "weighted_sum": (2, {"alpha": 0.5}),
    "add_difference": (3, {"alpha": 0.5}),
    "scaled_sum": (2, {"alpha": 0.75, "beta": 0.25}),
    "triple_sum": (3, {"alpha": 0.3, "beta": 0.3}),
    "sum_twice": (3, {"alpha": 0.3, "beta": 0.3}),
    "n_average": (3, {}),
    "difference": (2, {}),
    "train_difference": (3, {"alpha": 0.5}),
    "multiply_difference": (3, {"alpha": 0.5, "beta": 0.5}),
    "geometric_sum": (2, {"alpha": 0.5}),
    "slerp": (2, {"alpha": 0.5}),
    "add_perpendicular": (3, {"alpha": 1.0}),
    "add_cosine_a": (2, {"alpha": 0.1}),
    "add_cosine_b": (2, {"alpha": 0.1}),
    "smooth_add_difference": (3, {"alpha": 0.5}),
    "ties": (3, {"alpha": 1.0, "k": 0.2, "count_signs": 1}),
    "dare": (3, {"alpha": 1.0, "p": 0.9, "seed": 1}),
    "dare_ties": (3, {"alpha": 1.0, "p": 0.9, "seed": 1}),
    "model_stock": (3, {}),
    "geometric_median": (3, {"maxiter": 10}),
}
# add_delta takes a delta file: measured on difference's output.
DELTA_CASE = ("add_delta", {"alpha": 0.5})
# sd-mecha's recipe for the same formula (where it has one).
SD_MECHA = {
    "weighted_sum": lambda sm, m, p: sm.weighted_sum(m[0], m[1], alpha=p["alpha"]),
    "add_difference": lambda sm, m, p: sm.add_difference(m[0], m[1], m[2], alpha=p["alpha"]),
    "n_average": lambda sm, m, p: sm.n_average(*m),
    "geometric_sum": lambda sm, m, p: sm.geometric_sum(m[0], m[1], alpha=p["alpha"]),
    "slerp": lambda sm, m, p: sm.slerp(m[0], m[1], alpha=p["alpha"]),
    "add_perpendicular": lambda sm, m, p: sm.add_perpendicular(m[0], m[1], m[2], alpha=p["alpha"]),
    # sd-mecha's TIES (vote_sgn false = election by count) keeps about one more element per tensor.
    # Built from its parts: sd-mecha 1.1.8's add_difference_ties wrapper fails before merging
    # (its add_difference compares the base's merge space with the ties_sum node's, which is still
    # None when the recipe is built: AttributeError 'NoneType' object has no attribute 'identifier').
    "ties": lambda sm, m, p: _mecha_ties(sm, m, p),
    "geometric_median": lambda sm, m, p: sm.geometric_median(*m, maxiter=int(p["maxiter"])),
}


def _mecha_ties(sm, m, p):
    """sd-mecha's add_difference_ties recipe without its wrapper: ``base + α·ties_sum(Mᵢ - base)``,
    keys ties_sum leaves out taken from the base (the wrapper's ``| a``)."""
    from sd_mecha.extensions.builtin.merge_methods import linear

    deltas = [sm.subtract(x, m[0]) for x in m[1:]]
    return linear.add_difference(m[0], sm.ties_sum(*deltas, k=p["k"]), alpha=p["alpha"]) | m[0]


ELEMENTWISE_TARGETS = (0.3, 1.0e9)
WHOLE_TARGETS = (0.5, 1.5e9)


# ----------------------------------------------------------------------------------------------
# Child side
# ----------------------------------------------------------------------------------------------

def child(kind: str, method: str, params_json: str, out: str, paths: Sequence[str]) -> None:
    params = json.loads(params_json)
    if kind == "blockmerge":
        from blockmerge.merge import merge

        try:
            merge(paths, out, method=method, params=params, dtype="fp16")
        except TypeError:  # the code before the registry (--before-src): alpha/beta only
            merge(paths, out, method=method, alpha=params.get("alpha"), beta=params.get("beta"), dtype="fp16")
        return
    import sd_mecha
    import torch

    models = [sd_mecha.model(p, "sd1-ldm") for p in paths]
    recipe = SD_MECHA[method](sd_mecha, models, params)

    class _Quiet:
        def __init__(self, *a, **k) -> None: ...
        def update(self, *a, **k) -> None: ...
        def set_postfix(self, *a, **k) -> None: ...
        def close(self) -> None: ...
        def __enter__(self): return self
        def __exit__(self, *exc) -> None: ...

    sd_mecha.merge(recipe, output=out, output_dtype=torch.float16, threads=2, tqdm=_Quiet)


# ----------------------------------------------------------------------------------------------
# Parent side
# ----------------------------------------------------------------------------------------------

def _run(kind: str, method: str, params: dict, paths: Sequence[Path], out: Path, scratch: Path,
         src: Path = SRC) -> common.Measurement:
    out.unlink(missing_ok=True)
    cache = scratch / "hash-cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = {"BLOCKMERGE_CACHE": str(cache), "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    cmd = common.python_cmd(Path(__file__), "--child", kind, method, json.dumps(params), str(out), *map(str, paths))
    common.warm_read(paths)
    m = common.measure(cmd, env=env, cwd=REPO)
    if not out.exists():
        raise RuntimeError(f"{kind} {method}: no output")
    return m


def parent(args: argparse.Namespace) -> int:
    import torch

    from blockmerge.architectures.synthetic import write_synthetic
    from blockmerge.merge.methods import METHODS

    log = lambda s: print(s, flush=True)  # noqa: E731
    own = args.scratch is None
    scratch = Path(args.scratch) if args.scratch else Path(tempfile.mkdtemp(prefix="blockmerge-methods-", dir="/tmp"))
    scratch.mkdir(parents=True, exist_ok=True)
    need = 3 * 2.2e9 + 3 * 2.2e9
    if common.disk_free(scratch) < need:
        print(f"error: {scratch}: needs about {common.fmt_bytes(need)} free", file=sys.stderr)
        return 2
    wanted = args.methods.split(",") if args.methods else [*METHOD_CASES, DELTA_CASE[0]]
    info = common.machine_info(("torch", "safetensors", "sd-mecha"))
    paths = []
    for seed in (1, 2, 3):
        p = scratch / f"sd1_full_seed{seed}.safetensors"
        if not p.exists():
            tmp = p.with_suffix(".part")
            write_synthetic(tmp, "SD1", size="full", seed=seed, dtype=torch.float16)
            tmp.replace(p)
        paths.append(p)
    rows, notes, before_rows = [], list(args.note or []), []
    max_load = 0.0
    try:
        delta = scratch / "delta.safetensors"
        for name in wanted:
            if name == DELTA_CASE[0]:
                if not delta.exists():
                    _run("blockmerge", "difference", {}, paths[1:3], delta, scratch)
                n, params, ops = 2, DELTA_CASE[1], [paths[0], delta]
            else:
                n, params = METHOD_CASES[name]
                ops = paths[:n]
            ours = scratch / f"out_{name}.safetensors"
            m = _run("blockmerge", name, params, ops, ours, scratch)
            max_load = max(max_load, m.load_before)
            log(f"{name:22s} blockmerge {m.wall_s:7.1f} s {common.fmt_bytes(m.max_rss):>9s}")
            row = {"method": name, "whole": not METHODS[name].elementwise, "bm": m, "mecha": None, "agree": None}
            if name in SD_MECHA and not args.no_sd_mecha:
                theirs = scratch / f"mecha_{name}.safetensors"
                try:
                    mm = _run("sd-mecha", name, params, ops, theirs, scratch)
                except RuntimeError as e:  # recorded, not fatal: the other methods still get measured
                    notes.append(f"sd-mecha {name}: failed ({str(e).splitlines()[-1][:120]})")
                    mm = None
                if mm is not None:
                    log(f"{name:22s} sd-mecha   {mm.wall_s:7.1f} s {common.fmt_bytes(mm.max_rss):>9s}")
                    row["mecha"] = mm
                    row["agree"] = compare_outputs(ours, theirs, "sd-mecha")
                theirs.unlink(missing_ok=True)
            if args.before_src and name in ("weighted_sum", "add_difference", "scaled_sum"):
                old = scratch / f"before_{name}.safetensors"
                mb = _run("blockmerge", name, params, ops, old, scratch, src=Path(args.before_src))
                m2 = _run("blockmerge", name, params, ops, ours, scratch)  # interleaved: old, new, new
                best_new = min(m, m2, key=lambda x: x.wall_s)
                log(f"{name:22s} before     {mb.wall_s:7.1f} s {common.fmt_bytes(mb.max_rss):>9s}")
                same = compare_outputs(ours, old, "before")
                before_rows.append((name, mb, best_new, same))
                old.unlink(missing_ok=True)
            ours.unlink(missing_ok=True)
            rows.append(row)
    finally:
        if own and not args.keep_inputs:
            shutil.rmtree(scratch, ignore_errors=True)
    text = render(rows, before_rows, info, notes, max_load)
    print("\n" + text)
    if not args.no_write:
        common.write_results_section(SECTION, text)
        log(f"updated {common.RESULTS}")
    return 0


def render(rows, before_rows, info, notes, max_load) -> str:
    out = [
        "Every method on three synthetic full-size SD1.5-shaped fp16 checkpoints (1130 tensors, 2.13 GB each; "
        "one number per parameter, the same for sd-mecha), each run in its own process under `/usr/bin/time -v` "
        "with the inputs in the page cache; blockmerge's time includes hashing its inputs. `add_delta` adds the "
        "output of `difference` (B - C) to A. Reproduce: `python bench/bench_methods.py --before-src OLD/src`.",
        "",
        "Machine: " + "; ".join(f"{k}: {v}" for k, v in info.items()),
        "",
    ]
    table = []
    for r in rows:
        bm, mm, ag = r["bm"], r["mecha"], r["agree"]
        ratio_t, rss_t = WHOLE_TARGETS if r["whole"] else ELEMENTWISE_TARGETS
        verdict = []
        if mm is not None:
            ratio = bm.wall_s / mm.wall_s
            verdict.append(f"{ratio:.2f}x ({'met' if ratio <= ratio_t else 'MISSED'} ≤ {ratio_t}x)")
        verdict.append(f"RSS {'met' if bm.max_rss <= rss_t else 'MISSED'} ≤ {common.fmt_bytes(rss_t)}")
        agree = "" if ag is None else (
            "identical" if ag.n_differ == 0 else f"{ag.n_differ}/{ag.n_keys} tensors differ, ≤ {ag.max_ulp} fp16 ulp")
        table.append([r["method"], "whole tensors" if r["whole"] else "elementwise", f"{bm.wall_s:.1f}",
                      common.fmt_bytes(bm.max_rss),
                      f"{mm.wall_s:.1f}" if mm else "—", common.fmt_bytes(mm.max_rss) if mm else "—",
                      "; ".join(verdict), agree])
    out += [common.md_table(["method", "kind", "blockmerge s", "blockmerge peak RSS", "sd-mecha s",
                             "sd-mecha peak RSS", "vs targets", "output vs sd-mecha"], table), ""]
    if before_rows:
        out += ["Today's three methods, the code at `--before-src` (before) vs this checkout (now), same invocation, "
                "interleaved:", ""]
        t = []
        for name, mb, mn, same in before_rows:
            t.append([name, f"{mb.wall_s:.1f}", f"{mn.wall_s:.1f}", f"{mn.wall_s / mb.wall_s:.2f}x",
                      common.fmt_bytes(mb.max_rss), common.fmt_bytes(mn.max_rss),
                      "byte-identical tensors" if same.n_differ == 0 else f"{same.n_differ} tensors differ"])
        out += [common.md_table(["method", "before s", "now s", "now/before", "before RSS", "now RSS", "output"], t), ""]
    if max_load > 1.5 * (os.cpu_count() or 1):
        notes = [*notes, f"the machine was shared with other work (1-min load average up to {max_load:.1f} on "
                         f"{os.cpu_count()} cores): wall times are inflated and noisy."]
    out += [f"Note: {n}" for n in notes]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--child":
        kind, method, params_json, out, *paths = argv[1:]
        child(kind, method, params_json, out, paths)
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scratch", help="directory for the synthetic inputs and outputs (default: a new one in /tmp)")
    p.add_argument("--methods", help="comma-separated subset (default: all)")
    p.add_argument("--before-src", help="src/ of an older blockmerge to compare today's three methods with")
    p.add_argument("--no-sd-mecha", action="store_true", help="skip the sd-mecha runs")
    p.add_argument("--keep-inputs", action="store_true")
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    p.add_argument("--note", action="append")
    t0 = time.perf_counter()
    rc = parent(p.parse_args(argv))
    print(f"({time.perf_counter() - t0:.0f} s)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
