"""Merge-engine benchmark (issue 2): blockmerge vs load-everything vs sd-mecha, wall time and peak RSS.

Usage::

    python bench/bench_merge.py [--sdxl/--no-sdxl] [--scratch DIR] [--repeat N] [--no-write]

It writes two synthetic full-size fp16 checkpoints per architecture (real key names and shapes,
seeded random values, from ``blockmerge.architectures.synthetic``) to a scratch directory, then
runs the same block-weighted ``weighted_sum`` with each contender, each in its own child process
under ``/usr/bin/time -v``:

- ``blockmerge``: ``blockmerge.merge.merge`` (streaming, threads=2; also threads=1 to show that
  the output bytes do not depend on the thread count);
- ``load-everything``: what the A1111 extensions do: ``safetensors.torch.load_file`` of both
  models, the arithmetic key by key, ``save_file``;
- ``sd-mecha``: sd-mecha 1.1.x (a streaming merger), its default threads/buffers, fp32 merge and
  fp16 output like the others.

All three get the same per-block weights (SD1.5: the GRAD_V preset, BASE 0.5; SDXL: a 19-value V
gradient, BASE 0.5) and the same key -> block rule: the Merge Block Weighted one that blockmerge
uses. sd-mecha's built-in ``sd1-supermerger_blocks`` conversion puts ``time_embed`` (and SDXL's
``label_emb``) in BASE where MBW puts them in IN00, and gives SDXL's VAE its own block, so sd-mecha
gets a conversion of its own kind (a ``map_keys`` merge method, the same machinery as its
built-in one) that asks blockmerge's ``Architecture.block_of``. The three outputs are then
compared tensor by tensor, and against an fp64 reference on a sample of keys: a benchmark of wrong
results is worthless.

The child side is this same file run with ``--child NAME``.
"""

# No `from __future__ import annotations`: sd-mecha reads the merge method annotations at runtime.

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
# A child benchmarking another revision of blockmerge (``--before-rev``) is pointed at its sources.
SRC = Path(os.environ["BENCH_BLOCKMERGE_SRC"]) if os.environ.get("BENCH_BLOCKMERGE_SRC") else REPO / "src"
if SRC.is_dir() and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

import _common as common  # noqa: E402

SECTION = "Merge engine (issue 2)"
BASE_ALPHA = 0.5
SD1_SPEC = "GRAD_V"
# SDXL has 9/1/9 blocks and GRAD_V is an SD1 preset: the same V shape over 19 values.
SDXL_SPEC = [round(abs(i - 9) / 9, 10) for i in range(19)]
# Targets from the issue, per architecture: (max wall ratio vs sd-mecha, vs load-everything, max RSS bytes).
# The issue sets wall-time targets for the SD1.5 pair only; for SDXL just the memory one.
TARGETS = {"sd1": (0.3, 0.5, 1.0e9), "sdxl": (None, None, 1.5e9)}
CONTENDERS = ("blockmerge", "load-everything", "sd-mecha")


def _arch(name: str):
    from blockmerge.architectures import SD1, SDXL

    return {"sd1": SD1, "sdxl": SDXL}[name]


def _spec(arch_name: str) -> str | list[float]:
    return SD1_SPEC if arch_name == "sd1" else SDXL_SPEC


def block_alphas(arch_name: str) -> dict[str, float]:
    """BASE + per-block α as blockmerge parses the spec; every contender gets exactly these."""
    from blockmerge.merge import parse_weights

    return dict(parse_weights(_spec(arch_name), _arch(arch_name), base=BASE_ALPHA).as_dict())


# ----------------------------------------------------------------------------------------------
# Child side: one contender per process
# ----------------------------------------------------------------------------------------------


def child_blockmerge(a: str, b: str, out: str, arch_name: str, threads: int) -> None:
    from blockmerge.merge import merge

    merge([a, b], out, alpha=_spec(arch_name), base_alpha=BASE_ALPHA, dtype="fp16", threads=threads)


def child_load_everything(a: str, b: str, out: str, arch_name: str, threads: int) -> None:
    """The shape of the A1111 Merge Block Weighted extension: both models in memory, merge into
    A's dict key by key, save the dict. Arithmetic in fp32 per tensor, stored as fp16."""
    import torch
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(max(1, threads))
    arch = _arch(arch_name)
    alphas = block_alphas(arch_name)
    theta_0 = load_file(a)
    theta_1 = load_file(b)
    for key in list(theta_0):
        t0 = theta_0[key]
        if key not in theta_1 or not t0.is_floating_point():
            continue
        al = alphas[arch.block_of(key)]
        theta_0[key] = (t0.float() * (1.0 - al) + theta_1[key].float() * al).to(torch.float16)
    del theta_1
    save_file(theta_0, out, metadata={"format": "pt"})


def child_sd_mecha(a: str, b: str, out: str, arch_name: str, threads: int) -> None:
    import sd_mecha
    import torch
    from sd_mecha.extensions import model_configs
    from sd_mecha.extensions.merge_methods import Parameter, Return, StateDict, merge_method

    arch = _arch(arch_name)
    target = {"sd1": "sd1-ldm", "sdxl": "sdxl-sgm"}[arch_name]
    blocks_cfg = {"sd1": "sd1-supermerger_blocks", "sdxl": "sdxl-supermerger_blocks"}[arch_name]
    target_cfg = model_configs.resolve(target)
    T = TypeVar("T")

    # Same machinery as sd-mecha's convert_sd1_blocks_to_ldm, with the MBW key -> block rule.
    @merge_method(register=False, reuse_outputs=False)
    class mbw_blocks_to_ldm:
        @staticmethod
        def map_keys(builder):
            for k in target_cfg.keys():
                builder[k] = builder.keys[arch.block_of(k)]

        def __call__(self, blocks: Parameter(StateDict[T], model_config=blocks_cfg), **kwargs) -> Return(
            T, model_config=target
        ):
            return blocks[kwargs["key_relation"].inputs["blocks"][0]]

    alphas = block_alphas(arch_name)
    blocks = {k: v for k, v in alphas.items()}
    if arch_name == "sdxl":
        blocks["VAE"] = alphas["BASE"]  # sdxl-supermerger_blocks has a VAE entry; MBW puts the VAE in BASE
    alpha = mbw_blocks_to_ldm(sd_mecha.literal(blocks, blocks_cfg))
    recipe = sd_mecha.weighted_sum(sd_mecha.model(a, target), sd_mecha.model(b, target), alpha=alpha)

    class _Quiet:  # no progress bar on stderr
        def __init__(self, *args, **kwargs) -> None: ...
        def update(self, *args, **kwargs) -> None: ...
        def set_postfix(self, *args, **kwargs) -> None: ...
        def close(self) -> None: ...
        def __enter__(self): return self
        def __exit__(self, *exc) -> None: ...

    sd_mecha.merge(recipe, output=out, output_dtype=torch.float16, threads=threads or None, tqdm=_Quiet)


CHILDREN: dict[str, Callable[[str, str, str, str, int], None]] = {
    "blockmerge": child_blockmerge,
    "load-everything": child_load_everything,
    "sd-mecha": child_sd_mecha,
}


# ----------------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------------


@dataclass
class Agreement:
    other: str
    n_keys: int
    max_abs: float
    max_ulp: int
    n_differ: int  # tensors not bit-identical
    n_elems_differ: int
    dtype_mismatch: list[str]


def _ulp_diff(x, y) -> tuple[float, int, int]:
    """max |x-y|, max distance in fp16 units in the last place, and how many elements differ."""
    import torch

    xf, yf = x.float(), y.float()
    max_abs = float((xf - yf).abs().max()) if x.numel() else 0.0
    # Map fp16 bit patterns to a monotonic integer line so ulp distance is a subtraction.
    xi = x.view(torch.int16).to(torch.int32)
    yi = y.view(torch.int16).to(torch.int32)
    xi = torch.where(xi < 0, -32768 - xi, xi)
    yi = torch.where(yi < 0, -32768 - yi, yi)
    d = (xi - yi).abs()
    return max_abs, int(d.max()) if d.numel() else 0, int((d != 0).sum())


def compare_outputs(ref: Path, other: Path, name: str) -> Agreement:
    """Tensor-by-tensor comparison, streamed (never two models in memory)."""
    import torch
    from safetensors import safe_open

    with safe_open(str(ref), "pt") as fr, safe_open(str(other), "pt") as fo:
        kr, ko = set(fr.keys()), set(fo.keys())
        if kr != ko:
            raise AssertionError(f"{name}: key sets differ: only in blockmerge {sorted(kr - ko)[:5]}, "
                                 f"only in {name} {sorted(ko - kr)[:5]}")
        worst_abs, worst_ulp, n_differ, n_elems = 0.0, 0, 0, 0
        mism: list[str] = []
        for k in sorted(kr):
            x, y = fr.get_tensor(k), fo.get_tensor(k)
            if x.shape != y.shape:
                raise AssertionError(f"{name}: {k}: shape {tuple(y.shape)} != {tuple(x.shape)}")
            if x.dtype != y.dtype:
                mism.append(f"{k} ({y.dtype} vs {x.dtype})")
                y = y.to(x.dtype)
            if torch.equal(x, y):
                continue
            n_differ += 1
            if x.dtype == torch.float16:
                a, u, n = _ulp_diff(x, y)
            else:
                a, u, n = float((x.double() - y.double()).abs().max()), 0, int((x != y).sum())
            worst_abs, worst_ulp, n_elems = max(worst_abs, a), max(worst_ulp, u), n_elems + n
    return Agreement(name, len(kr), worst_abs, worst_ulp, n_differ, n_elems, mism)


def check_reference(a: Path, b: Path, outputs: dict[str, Path], arch_name: str, per_block: int = 2) -> int:
    """Check every output against (1-α)·A + α·B computed in fp64 on a few keys of every block.

    Independent of all three merge codes (only the key -> block rule is shared); within 1 fp16 ulp.
    Returns the number of keys checked.
    """
    import torch
    from safetensors import safe_open

    arch = _arch(arch_name)
    alphas = block_alphas(arch_name)
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        by_block: dict[str, list[str]] = {}
        for k in sorted(fa.keys()):
            if fa.get_slice(k).get_dtype() == "F16":
                by_block.setdefault(arch.block_of(k), []).append(k)
        sample = [k for ks in by_block.values() for k in ks[:per_block]]
        missing = set(arch.all_ids) - set(by_block)
        if missing:
            raise AssertionError(f"reference check: no keys in blocks {sorted(missing)}")
        handles = {n: safe_open(str(p), "pt") for n, p in outputs.items()}
        try:
            for k in sample:
                al = alphas[arch.block_of(k)]
                ref = (fa.get_tensor(k).double() * (1 - al) + fb.get_tensor(k).double() * al)
                for n, h in handles.items():
                    got = h.get_tensor(k)
                    # 1 ulp of fp16 at |ref| (the rounding of one fp16 store) plus the fp32 step.
                    tol = torch.clamp(ref.abs(), min=2.0**-14) * 2.0**-10 + 1e-7
                    bad = (got.double() - ref).abs() > tol
                    if bool(bad.any()):
                        worst = float((got.double() - ref).abs().max())
                        raise AssertionError(f"{n}: {k} (block {arch.block_of(k)}, α={al}) is off the fp64 "
                                             f"reference by {worst:.3g}")
        finally:
            handles.clear()
    return len(sample)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Parent side
# ----------------------------------------------------------------------------------------------


@dataclass
class Run:
    contender: str
    arch: str
    threads: int
    m: common.Measurement


def generate(scratch: Path, arch_name: str) -> tuple[Path, Path, float]:
    """Two synthetic full-size fp16 checkpoints (seeds 1 and 2); reused if already there."""
    import torch

    from blockmerge.architectures.synthetic import write_synthetic

    t0 = time.perf_counter()
    paths = []
    for seed in (1, 2):
        p = scratch / f"{arch_name}_full_seed{seed}.safetensors"
        if not p.exists():
            tmp = p.with_suffix(".part")
            write_synthetic(tmp, arch_name, size="full", seed=seed, dtype=torch.float16)
            tmp.replace(p)
        paths.append(p)
    return paths[0], paths[1], time.perf_counter() - t0


def run_child(contender: str, a: Path, b: Path, out: Path, arch_name: str, threads: int, cache: Path,
              src: Path | None = None) -> Run:
    if out.exists():
        out.unlink()
    # A fresh hash cache per blockmerge run: it hashes both inputs (sha256, for its metadata) the
    # way a first merge of new files does; the others do not hash at all.
    src = src or SRC
    env = {"BLOCKMERGE_CACHE": str(cache), "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
           "BENCH_BLOCKMERGE_SRC": str(src)}
    shutil.rmtree(cache, ignore_errors=True)
    cmd = common.python_cmd(Path(__file__), "--child", contender, "--arch", arch_name, "--threads", str(threads),
                            str(a), str(b), str(out))
    m = common.measure(cmd, env=env, cwd=REPO)
    if not out.exists():
        raise RuntimeError(f"{contender} wrote no output {out}")
    return Run(contender, arch_name, threads, m)


def bench_arch(arch_name: str, scratch: Path, repeat: int, log: Callable[[str], None]) -> dict:
    """Generate the pair, run every contender ``repeat`` times, verify the outputs, clean up."""
    a, b, gen_s = generate(scratch, arch_name)
    in_bytes = a.stat().st_size + b.stat().st_size
    log(f"[{arch_name}] inputs ready ({common.fmt_bytes(in_bytes)}, {gen_s:.0f} s)")
    cache = scratch / "hash-cache"
    outs = {c: scratch / f"{arch_name}_out_{c}.safetensors" for c in CONTENDERS}
    outs["blockmerge-t1"] = scratch / f"{arch_name}_out_blockmerge-t1.safetensors"
    plan: list[tuple[str, int, Path]] = [
        ("blockmerge", 2, outs["blockmerge"]),
        ("blockmerge", 1, outs["blockmerge-t1"]),
        ("sd-mecha", 2, outs["sd-mecha"]),
        ("load-everything", 2, outs["load-everything"]),
    ]
    skipped: dict[str, str] = {}
    runs: list[Run] = []
    for rep in range(repeat):
        for contender, threads, out in plan:
            # What each contender holds at its peak must fit, or the kernel kills something
            # (maybe another process on a shared machine) instead of giving us a number:
            # load-everything holds both models and a serialized copy of the output, sd-mecha
            # keeps its output tensors until the end (3.8 GB for SD1.5).
            need = {"load-everything": in_bytes * 1.6, "sd-mecha": in_bytes * 0.5 + 2e9}.get(contender, 0)
            avail = common.mem_available()
            if contender in skipped or (avail and avail < need):
                skipped.setdefault(contender, f"not run: needs about {common.fmt_bytes(need)} of RAM, "
                                              f"{common.fmt_bytes(avail)} was available")
                log(f"[{arch_name}] {contender} skipped ({skipped[contender]})")
                continue
            common.warm_read([a, b])
            r = run_child(contender, a, b, out, arch_name, threads, cache)
            runs.append(r)
            log(f"[{arch_name}] run {rep + 1}/{repeat} {contender:16s} threads={threads}: "
                f"{r.m.wall_s:7.1f} s wall, {r.m.cpu_s:7.1f} s cpu, {common.fmt_bytes(r.m.max_rss):>8s} peak RSS "
                f"(load {r.m.load_before:.1f} -> {r.m.load_after:.1f})")
    # Verify before anything is reported.
    present = {c: p for c, p in outs.items() if p.exists() and c not in ("blockmerge", "blockmerge-t1")}
    agreements = [compare_outputs(outs["blockmerge"], p, c) for c, p in present.items()]
    for ag in agreements:
        log(f"[{arch_name}] blockmerge vs {ag.other}: {ag.n_differ}/{ag.n_keys} tensors differ, "
            f"max |diff| {ag.max_abs:.3g}, max {ag.max_ulp} fp16 ulp"
            + (f", dtype mismatches: {ag.dtype_mismatch}" if ag.dtype_mismatch else ""))
    n_ref = check_reference(a, b, {c: outs[c] for c in CONTENDERS if outs[c].exists()}, arch_name)
    log(f"[{arch_name}] all outputs within 1 fp16 ulp of the fp64 reference on {n_ref} sampled keys")
    same_bytes = sha256(outs["blockmerge"]) == sha256(outs["blockmerge-t1"])
    log(f"[{arch_name}] blockmerge threads=1 vs threads=2 output byte-identical: {same_bytes}")
    out_bytes = outs["blockmerge"].stat().st_size
    for p in outs.values():
        p.unlink(missing_ok=True)
    shutil.rmtree(cache, ignore_errors=True)
    return {"arch": arch_name, "runs": runs, "agreements": agreements, "n_ref": n_ref, "same_bytes": same_bytes,
            "in_bytes": in_bytes, "out_bytes": out_bytes, "skipped": skipped}


def _best(runs: Sequence[Run], contender: str, threads: int | None = None) -> Run | None:
    """The fastest of the repeats (least disturbed by the other work on the machine)."""
    rs = [r for r in runs if r.contender == contender and (threads is None or r.threads == threads)]
    return min(rs, key=lambda r: r.m.wall_s) if rs else None


def _ratio(x: float, y: float | None) -> str:
    return f"{x / y:.2f}x" if y else "n/a"


def render(results: Sequence[dict], info: dict[str, str], notes: Sequence[str]) -> str:
    lines = [
        "Same block-weighted `weighted_sum` of two synthetic full-size fp16 checkpoints (real key names "
        "and shapes, random values), each contender in its own process under `/usr/bin/time -v` (wall = "
        "\"Elapsed (wall clock)\", peak RSS = \"Maximum resident set size\"); the fastest of the repeats "
        "per contender, inputs read once before each run so all find them in the page cache. blockmerge's "
        "time includes hashing both inputs (sha256, for its metadata; hash cache emptied before each run). "
        "Reproduce: `python bench/bench_merge.py` (see bench/README.md).",
        "",
        "Machine: " + "; ".join(f"{k}: {v}" for k, v in info.items()),
        "",
    ]
    for res in results:
        arch_name, runs = res["arch"], res["runs"]
        title = {"sd1": "SD1.5", "sdxl": "SDXL"}[arch_name]
        spec = SD1_SPEC if arch_name == "sd1" else "V gradient over 19 blocks (1 → 0 at M00 → 1)"
        n_rep = max((sum(1 for r in runs if (r.contender, r.threads) == key) for key in {(r.contender, r.threads) for r in runs}),
                    default=0)
        lines += [f"### {title} pair ({common.fmt_bytes(res['in_bytes'])} of inputs, "
                  f"{common.fmt_bytes(res['out_bytes'])} output; α = {spec}, BASE {BASE_ALPHA}; "
                  f"best of {n_rep})", ""]
        bm = _best(runs, "blockmerge", 2)
        mecha = _best(runs, "sd-mecha")
        load = _best(runs, "load-everything")
        rows = []
        for label, r in [
            ("blockmerge (threads=2)", bm),
            ("blockmerge (threads=1)", _best(runs, "blockmerge", 1)),
            ("sd-mecha 1.1 (threads=2)", mecha),
            ("load-everything (load_file + save_file)", load),
        ]:
            if r is None:
                continue
            load_s = f"{r.m.load_before:.1f} → {r.m.load_after:.1f}"
            rows.append([label, f"{r.m.wall_s:.1f}", f"{r.m.cpu_s:.1f}", common.fmt_bytes(r.m.max_rss), load_s])
        for c, why in res["skipped"].items():
            rows.append([{"load-everything": "load-everything (load_file + save_file)"}.get(c, c), why, "", "", ""])
        lines += [common.md_table(["contender", "wall s", "CPU s (user+sys)", "peak RSS", "load avg before → after"],
                                  rows), ""]
        if bm is not None:
            t_mecha, t_load, t_rss = TARGETS[arch_name]
            checks = []
            if mecha:
                r = bm.m.wall_s / mecha.m.wall_s
                checks.append(f"wall vs sd-mecha **{r:.2f}x** ({_verdict(r, t_mecha)})"
                              f"; CPU time vs sd-mecha {_ratio(bm.m.cpu_s, mecha.m.cpu_s)}"
                              f"; peak RSS vs sd-mecha {_ratio(bm.m.max_rss, mecha.m.max_rss)}")
            if load:
                r = bm.m.wall_s / load.m.wall_s
                checks.append(f"wall vs load-everything **{r:.2f}x** ({_verdict(r, t_load)}); CPU time vs load-everything "
                              f"{_ratio(bm.m.cpu_s, load.m.cpu_s)}; peak RSS vs load-everything "
                              f"{_ratio(bm.m.max_rss, load.m.max_rss)}")
            checks.append(f"peak RSS **{common.fmt_bytes(bm.m.max_rss)}** (target ≤ {common.fmt_bytes(t_rss)}: "
                          f"{'met' if bm.m.max_rss <= t_rss else 'MISSED'})")
            lines += [f"- {c}" for c in checks]
        for ag in res["agreements"]:
            lines.append(f"- blockmerge vs {ag.other}: {ag.n_differ} of {ag.n_keys} tensors not bit-identical, "
                         f"max |diff| {ag.max_abs:.2g} = {ag.max_ulp} fp16 ulp"
                         + (f"; dtype differs: {', '.join(ag.dtype_mismatch)}" if ag.dtype_mismatch else ""))
        lines.append(f"- every output within 1 fp16 ulp of an fp64 reference on {res['n_ref']} keys sampled from "
                     "every block; blockmerge threads=1 and threads=2 outputs byte-identical: "
                     f"**{'yes' if res['same_bytes'] else 'NO'}**")
        lines.append("")
    lines += [f"Note: {n}" for n in notes]
    return "\n".join(lines)


def parent(args: argparse.Namespace) -> int:
    log = lambda s: print(s, flush=True)  # noqa: E731
    archs = ["sd1"] + (["sdxl"] if args.sdxl else [])
    own_scratch = args.scratch is None
    scratch = Path(args.scratch) if args.scratch else Path(tempfile.mkdtemp(prefix="blockmerge-bench-", dir="/tmp"))
    scratch.mkdir(parents=True, exist_ok=True)
    need = (4.4e9 + 3 * 2.2e9) + ((14e9 + 3 * 7e9) if args.sdxl else 0)
    free = common.disk_free(scratch)
    log(f"scratch {scratch}: {common.fmt_bytes(free)} free, needs about {common.fmt_bytes(need)}")
    if free < need:
        print(f"error: {scratch}: not enough free disk ({common.fmt_bytes(free)} < {common.fmt_bytes(need)})",
              file=sys.stderr)
        return 2
    info = common.machine_info(("torch", "safetensors", "sd-mecha"))
    results = []
    try:
        for arch_name in archs:
            repeat = args.repeat_sdxl if arch_name == "sdxl" and args.repeat_sdxl else args.repeat
            results.append(bench_arch(arch_name, scratch, repeat, log))
            if not args.keep_inputs:
                for p in scratch.glob(f"{arch_name}_full_seed*.safetensors"):
                    p.unlink()
    finally:
        if own_scratch and not args.keep_inputs:
            shutil.rmtree(scratch, ignore_errors=True)
    notes = list(args.note or [])
    max_load = max((r.m.load_before for res in results for r in res["runs"]), default=0.0)
    if max_load > 1.5 * (os.cpu_count() or 1):
        notes.append(f"the machine was shared with other work (1-min load average up to {max_load:.1f} on "
                     f"{os.cpu_count()} cores): wall times are inflated and noisy; CPU seconds are the steadier "
                     "number.")
    text = render(results, info, notes)
    print("\n" + text)
    if not args.no_write:
        common.write_results_section(SECTION, text)
        log(f"updated {common.RESULTS}")
    return 0


BEFORE_SECTION = "Write policy before/after (issue 10)"


def before_after(args: argparse.Namespace) -> int:
    """The SD1.5 pair merged by this tree and by ``--before-rev`` (its ``src/`` exported with ``git
    archive``), alternating run by run in one invocation, so both see the same machine and cache."""
    import subprocess

    log = lambda s: print(s, flush=True)  # noqa: E731
    scratch = Path(args.scratch) if args.scratch else Path(tempfile.mkdtemp(prefix="blockmerge-bench-", dir="/tmp"))
    scratch.mkdir(parents=True, exist_ok=True)
    before = scratch / "before-src"
    shutil.rmtree(before, ignore_errors=True)
    before.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", args.before_rev, "src"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.before_rev], check=True,
                         capture_output=True, text=True).stdout.strip()
    now = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=True, capture_output=True,
                         text=True).stdout.strip()
    info = common.machine_info(("torch", "safetensors"))
    a, b, _ = generate(scratch, "sd1")
    cache = scratch / "hash-cache"
    runs: dict[str, list[common.Measurement]] = {"before": [], "after": []}
    outs = {k: scratch / f"sd1_out_{k}.safetensors" for k in runs}
    try:
        for rep in range(args.repeat):
            for label, src in (("before", before / "src"), ("after", REPO / "src")):
                common.warm_read([a, b])
                r = run_child("blockmerge", a, b, outs[label], "sd1", 2, cache, src)
                runs[label].append(r.m)
                log(f"[{label}] run {rep + 1}/{args.repeat}: {r.m.wall_s:.2f} s wall, {r.m.cpu_s:.2f} s cpu, "
                    f"{common.fmt_bytes(r.m.max_rss)} (load {r.m.load_before:.1f})")
        same = sha256(outs["before"]) == sha256(outs["after"])
    finally:
        for p in outs.values():
            p.unlink(missing_ok=True)
        if not args.keep_inputs:
            shutil.rmtree(scratch, ignore_errors=True)
    best = {k: min(v, key=lambda m: m.wall_s) for k, v in runs.items()}
    med = {k: sorted(m.wall_s for m in v)[len(v) // 2] for k, v in runs.items()}
    cpu = {k: sorted(m.cpu_s for m in v)[len(v) // 2] for k, v in runs.items()}
    load = max(m.load_before for v in runs.values() for m in v)
    rows = [[f"{k} ({rev if k == 'before' else now})", f"{best[k].wall_s:.2f}", f"{med[k]:.2f}",
             f"{cpu[k]:.2f}", common.fmt_bytes(max(m.max_rss for m in runs[k])),
             ", ".join(f"{m.wall_s:.1f}" for m in runs[k])] for k in ("before", "after")]
    text = "\n".join([
        "The SD1.5 pair of the merge benchmark (two synthetic full-size fp16 checkpoints, GRAD_V, BASE 0.5, "
        "threads=2, hashing included) merged by the code before issue 10's write policy and after it, "
        f"alternating, {args.repeat} runs each, in one invocation. Reproduce: "
        f"`python bench/bench_merge.py --before-rev {rev} --repeat {args.repeat}`.",
        "",
        "Machine: " + "; ".join(f"{k}: {v}" for k, v in info.items()),
        "",
        common.md_table(["code", "best wall s", "median wall s", "median CPU s", "peak RSS", "all runs (wall s)"],
                        rows),
        "",
        f"- after / before, best wall: **{best['after'].wall_s / best['before'].wall_s:.2f}x**; median wall: "
        f"{med['after'] / med['before']:.2f}x; median CPU (user+sys): **{cpu['after'] / cpu['before']:.2f}x**",
        f"- 1-min load average before the runs up to {load:.1f} on {os.cpu_count()} cores (a shared machine): "
        "wall times are noisy, CPU seconds are the steadier number",
        f"- outputs byte-identical before and after: **{'yes' if same else 'NO'}**",
        "- what the write path does now on top: a flock on the temporary file, a scan of the output folder for "
        "stale temporary files, link(2) instead of rename, an fsync of the folder, and the write-error tracking "
        "wrapper around the file object (one Python call per 8 MiB slice); preallocation and early writeback "
        "are unchanged",
        *[f"- {n}" for n in (args.note or [])],
    ])
    print("\n" + text)
    if not args.no_write:
        common.write_results_section(BEFORE_SECTION, text)
        log(f"updated {common.RESULTS}")
    return 0 if same else 1


def _verdict(ratio: float, target: float | None) -> str:
    if target is None:
        return "no target for this pair"
    return f"target ≤ {target}x: {'met' if ratio <= target else 'MISSED'}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sdxl", action=argparse.BooleanOptionalAction, default=True,
                   help="also benchmark the SDXL pair (~14 GB of inputs)")
    p.add_argument("--scratch", help="directory for the synthetic files and outputs (default: a new one in /tmp)")
    p.add_argument("--repeat", type=int, default=1, help="runs per contender; the fastest is reported")
    p.add_argument("--repeat-sdxl", type=int, help="runs per contender for the SDXL pair (default: --repeat)")
    p.add_argument("--keep-inputs", action="store_true", help="keep the synthetic inputs for the next run")
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    p.add_argument("--note", action="append", help="a line to add under the results")
    p.add_argument("--before-rev", metavar="REV",
                   help="only the SD1.5 pair, merged by this tree and by git revision REV, alternating")
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--arch", choices=("sd1", "sdxl"), default="sd1", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        a, b, out = args.paths
        CHILDREN[args.child](a, b, out, args.arch, args.threads)
        return 0
    if args.paths:
        p.error("unexpected arguments: " + " ".join(args.paths))
    if args.before_rev:
        return before_after(args)
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
