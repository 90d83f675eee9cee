"""Sweep benchmarks (issue 4): the per-variant cost of switching a block in place versus writing a
merged checkpoint and reloading the pipeline for every variant, and the time of the whole demo with
the share spent outside the U-Net.

    PYTHONPATH=src python bench/bench_sweep.py            # everything, writes bench/RESULTS.md
    PYTHONPATH=src python bench/bench_sweep.py --skip-full --skip-demo --no-write

Switch overhead: for each block, one ``scaled_sum`` variant (block x 0.75). In place = apply +
restore (:meth:`InPlaceModel.applied`, a copy of the one block); file route = ``merge()`` to a
safetensors file + ``load_pipeline()`` of it (what the article did with 25 files). No images are
generated: the switch itself is measured. Done on the bundled tiny model and on a synthetic
full-size SD1.5 (real shapes and key names, random values; ~2.1 GB fp16 in a temporary folder,
deleted afterwards).

Demo: ``run_demo`` in a child process (imports included in the wall time), with the U-Net's
forward timed by a wrapper, so "outside the U-Net" = everything else: loading, text encoding,
the scheduler, the VAE decoder, PNG writing, metrics and the report.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

HEADING = "Sweeps (issue 4)"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def switch_costs(model_path: Path, blocks_file: list[str], work: Path, threads: int) -> dict:
    """Per-variant seconds: in-place apply+restore over every block; file route over ``blocks_file``."""
    import torch

    from blockmerge.experiments.inplace import InPlaceModel, MergeEdit
    from blockmerge.generation.loader import load_pipeline
    from blockmerge.merge import merge, parse_weights

    torch.set_num_threads(threads)
    t = time.perf_counter()
    loaded = load_pipeline(model_path, device="cpu", hash_file=False)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    ipm = InPlaceModel(loaded)
    map_s = time.perf_counter() - t
    arch = loaded.architecture
    # Check the restore on the small model (a full copy of a full-size one is what we avoid).
    before = {q: p.detach().clone() for q, p in ipm.params.items()} if model_path.stat().st_size < 1e9 else None
    per_block: dict[str, float] = {}
    for b in arch.block_ids:
        edit = MergeEdit("scaled_sum", {"alpha": parse_weights(f"{b}=0.75", arch, keep_a=1.0)})
        t = time.perf_counter()
        with ipm.applied(edit):
            pass
        per_block[b] = time.perf_counter() - t
    if before is not None:
        assert all(torch.equal(p, before[q]) for q, p in ipm.params.items())
    del loaded, ipm
    file_route: dict[str, dict[str, float]] = {}
    for b in blocks_file:
        out = work / f"variant-{b}.safetensors"
        t = time.perf_counter()
        merge([model_path], out, method="scaled_sum", alpha=f"{b}=0.75", dtype="fp16", overwrite=True)
        t_merge = time.perf_counter() - t
        t = time.perf_counter()
        m = load_pipeline(out, device="cpu", hash_file=False)
        t_load = time.perf_counter() - t
        del m
        out.unlink()
        file_route[b] = {"merge_s": t_merge, "load_s": t_load, "total_s": t_merge + t_load}
    vals = list(per_block.values())
    return {
        "model": str(model_path), "size_bytes": model_path.stat().st_size, "pipeline_load_s": load_s,
        "block_map_s": map_s, "inplace_mean_s": statistics.mean(vals), "inplace_max_s": max(vals),
        "inplace_max_block": max(per_block, key=per_block.get), "inplace_total_s": sum(vals),
        "inplace_per_block_s": per_block, "file_route": file_route,
        "file_mean_s": statistics.mean(v["total_s"] for v in file_route.values()),
    }


_DEMO_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from diffusers import UNet2DConditionModel
spent = [0.0, 0]
orig = UNet2DConditionModel.forward
def timed(self, *a, **k):
    t = time.perf_counter()
    try:
        return orig(self, *a, **k)
    finally:
        spent[0] += time.perf_counter() - t
        spent[1] += 1
UNet2DConditionModel.forward = timed
from blockmerge.experiments.demo import demo_config, run_demo
if int(sys.argv[2]):
    torch.set_num_threads(int(sys.argv[2]))
t1 = time.perf_counter()
res = run_demo(sys.argv[1], demo_config(quick=False), progress=False)
t2 = time.perf_counter()
print(json.dumps({"imports_s": t1 - t0, "demo_s": t2 - t1, "unet_s": spent[0], "unet_calls": spent[1],
                  "timings": res.timings, "threads": torch.get_num_threads()}))
"""


def demo_time(work: Path, threads: int) -> dict:
    script = work / "demo_child.py"
    script.write_text(_DEMO_CHILD)
    out = work / f"demo-{threads}"
    if out.exists():
        shutil.rmtree(out)  # a fresh folder: nothing reused from an earlier run
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    m = common.measure(common.python_cmd(script, str(out), str(threads)), env=env)
    if m.returncode != 0:
        raise SystemExit(f"demo failed:\n{m.stderr[-3000:]}")
    d = json.loads(m.stdout.strip().splitlines()[-1])
    d.update(wall_s=m.wall_s, cpu_s=m.cpu_s, max_rss=m.max_rss, load_before=m.load_before, load_after=m.load_after)
    d["outside_unet_share"] = 1 - d["unet_s"] / m.wall_s
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", default="tiny-a", help="tiny model (bundled name or file)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the switch timings (default 1)")
    ap.add_argument("--demo-threads", type=int, nargs="+", default=[1],
                    help="torch threads for the demo (default 1, as `blockmerge demo` on CPU; 0 = torch's default)")
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--full-json", type=Path, help="reuse the full-size results saved by an earlier --save-json run")
    ap.add_argument("--save-json", type=Path, help="also save the raw results here")
    args = ap.parse_args()

    from blockmerge.models import resolve_model

    results: dict = {"machine": common.machine_info(("torch", "diffusers"))}
    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as tmp:
        work = Path(tmp)
        tiny = resolve_model(args.tiny)
        log(f"switch costs on {tiny}")
        results["tiny"] = switch_costs(tiny, ["IN04", "M00", "OUT05", "OUT11"], work, args.threads)
        log(json.dumps(results["tiny"], indent=1))
        if args.full_json:
            results["full"] = json.loads(args.full_json.read_text())["full"]
        elif not args.skip_full:
            from blockmerge.architectures.synthetic import write_synthetic

            full = work / "sd15-full.safetensors"
            free = common.disk_free(work)
            if free < 5e9:
                log(f"only {free / 1e9:.1f} GB free in {work}: skipping the full-size model")
            else:
                t = time.perf_counter()
                write_synthetic(full, "SD1", size="full")
                log(f"wrote {full} ({full.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s")
                results["full"] = switch_costs(full, ["M00", "OUT05"], work, args.threads)
                log(json.dumps(results["full"], indent=1))
                full.unlink()
        if not args.skip_demo:
            results["demo"] = []
            for th in args.demo_threads:
                log(f"demo with threads={th or 'default'}")
                results["demo"].append(demo_time(work, th))
                log(json.dumps(results["demo"][-1], indent=1))
    print(json.dumps(results, indent=1))
    if args.save_json:
        args.save_json.write_text(json.dumps(results, indent=1))
    if not args.no_write:
        common.write_results_section(HEADING, render(results))
        log(f"updated {common.RESULTS}")


def render(r: dict) -> str:
    mi = r["machine"]
    lines = [
        "Per-variant cost of switching one block (x0.75, `scaled_sum`) on a pipeline loaded once, versus "
        "writing the merged checkpoint and loading it as a new pipeline (what a file per variant costs). "
        "No images are generated; the switch alone is timed. Reproduce: `PYTHONPATH=src python bench/bench_sweep.py`.",
        "",
        "Machine: " + "; ".join(f"{k}: {v}" for k, v in mi.items()),
        "",
    ]
    rows = []
    for key, title in (("tiny", "bundled tiny-a (12 MB)"), ("full", "synthetic full-size SD1.5 (2.1 GB fp16)")):
        c = r.get(key)
        if not c:
            continue
        ratio = c["file_mean_s"] / c["inplace_mean_s"]
        same = [c["inplace_per_block_s"][b] for b in c["file_route"]] if "inplace_per_block_s" in c else []
        same_ratio = f" ({c['file_mean_s'] / statistics.mean(same):,.0f}x on the same blocks)" if same else ""
        rows.append([title, f"{c['inplace_mean_s'] * 1e3:.1f} ms", f"{c['inplace_max_s'] * 1e3:.1f} ms ({c['inplace_max_block']})",
                     f"{c['file_mean_s']:.2f} s ({len(c['file_route'])} blocks)",
                     f"**{ratio:,.0f}x**{same_ratio}", f"{c['pipeline_load_s']:.1f} s / {c['block_map_s'] * 1e3:.0f} ms"])
    lines.append(common.md_table(
        ["model", "in place: mean per variant", "in place: slowest block", "merge file + reload: mean",
         "ratio (target >= 50x)", "pipeline load once / block map"], rows))
    for d in r.get("demo", []):
        lines += [
            "",
            f"Demo (`blockmerge demo`, full configuration: 76 + 26 variants x 1 prompt x seeds 1-4, 15 steps, 64x64; "
            f"torch threads {d['threads']}): **{d['wall_s']:.0f} s** wall including imports "
            f"({d['cpu_s']:.0f} CPU s, peak RSS {common.fmt_bytes(d['max_rss'])}); U-Net forward "
            f"{d['unet_s']:.0f} s over {d['unet_calls']} calls, so **{d['outside_unet_share']:.0%} outside the U-Net** "
            f"(imports {d['imports_s']:.1f} s, load {d['timings']['load_s']:.1f} s, metrics + report "
            f"{d['timings']['report_s']:.1f} s, the rest VAE decode, scheduler, PNG/latent writing). "
            f"Load average {d['load_before']:.1f} -> {d['load_after']:.1f}: the machine was shared, so wall time "
            f"is inflated; with one thread the CPU time ({d['cpu_s']:.0f} s) is about what the demo takes on an "
            "idle 2-core machine.",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
