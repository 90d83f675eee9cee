"""LoRA benchmarks (issue 13), each contender in its own process, ratios from the same invocation.

- **apply**: ``lora apply`` of a synthetic rank-128 LoRA (kohya's attention modules and text
  encoder, real SD1.5 names and shapes) to a synthetic full-size SD1.5 fp16 checkpoint, against the
  load-everything way (``load_file`` both, ``W += scale·up@down`` per module in float32,
  ``save_file``). Targets: wall <= 0.5x, peak RSS <= 1.0 GB. blockmerge runs twice: with an empty
  hash cache (it then hashes the 2.1 GB model for the output's metadata, 1.4 CPU s of SHA-256
  here) and with the model's hashes cached (any earlier blockmerge command on the model, or an
  earlier apply, leaves them). Outputs go to a RAM-backed folder (``/dev/shm``) when it has room:
  there neither contender waits for the disk. blockmerge's atomic write fsyncs its output before it
  returns and ``save_file`` leaves it in the page cache, so on a disk slower than the work (this
  one writes ~200 MB/s with fdatasync: 10 s for the output) the ratio measures the disk;
  ``--out-dir`` puts them on a disk, and load-everything then also runs with an ``os.fsync``.
- **extract**: ``lora extract --rank 64`` on an SD1.5-shaped pair, against a plain per-tensor full
  ``torch.linalg.svd`` (``full_matrices=False``) of every difference on both models loaded whole.
  The "tuned" model is the base plus, on every module kohya trains, a full-rank difference with a
  power-law spectrum (as fine-tunes have; random noise would have a flat one). Targets: wall <=
  0.3x, peak RSS <= 1.5 GB, the share of ||ΔW||² kept within 1% (absolute) of the exact SVD's for
  every block.

Reproduce: ``python bench/bench_lora.py`` (needs ~8 GB free disk in bench/out; writes RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
RANK_APPLY = 128
RANK_EXTRACT = 64


# ----------------------------------------------------------------------------------------------
# Children
# ----------------------------------------------------------------------------------------------


def _work_done(t0: float) -> None:
    """Print the child's own time after its imports (the interpreter and torch take ~2 s to start,
    the same for every contender)."""
    print(f"WORK {time.perf_counter() - t0:.3f}", flush=True)


def child_apply_blockmerge(model: str, lora: str, out: str) -> None:
    from blockmerge.lora import LoraSpec, apply_loras

    t0 = time.perf_counter()
    apply_loras(model, [LoraSpec(Path(lora), 0.8, 0.8)], out, dtype="fp16")
    _work_done(t0)


def child_apply_load_everything(model: str, lora: str, out: str, mapping: str, durable: str = "") -> None:
    import torch
    from safetensors.torch import load_file, save_file

    t0 = time.perf_counter()
    sd = load_file(model)
    lo = load_file(lora)
    targets = json.loads(Path(mapping).read_text())
    for mod, key in targets.items():
        up = lo[mod + ".lora_up.weight"].float()
        down = lo[mod + ".lora_down.weight"].float()
        r = down.shape[0]
        scale = float(lo[mod + ".alpha"]) / r * 0.8
        w = sd[key].float()
        w += scale * (up.reshape(up.shape[0], -1) @ down.reshape(r, -1)).reshape(w.shape)
        sd[key] = w.to(torch.float16)
    save_file(sd, out)
    if durable:  # the same durability as blockmerge's atomic write: on disk before it returns
        fd = os.open(out, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _work_done(t0)


def child_extract_blockmerge(tuned: str, base: str, out: str) -> None:
    from blockmerge.lora import extract_lora

    res = extract_lora(tuned, base, out, rank=RANK_EXTRACT, clamp_quantile=1.0)
    print(json.dumps({b: k / t for b, (k, t) in res.energy.items()}))


def child_extract_svd(tuned: str, base: str, out: str, modules: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    t, b = load_file(tuned), load_file(base)
    mods = json.loads(Path(modules).read_text())
    lora: dict[str, torch.Tensor] = {}
    energy: dict[str, list[float]] = {}
    for name, key, rows, block in mods:
        d = t[key].float() - b[key].float()
        if rows:
            d = torch.cat([d[lo:hi] for lo, hi in rows])
        mat = d.reshape(d.shape[0], -1)
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        k = min(RANK_EXTRACT, s.numel())
        e = energy.setdefault(block, [0.0, 0.0])
        e[0] += float(s[:k].double().pow(2).sum())
        e[1] += float(s.double().pow(2).sum())
        lora[name + ".lora_up.weight"] = (u[:, :k] * s[:k]).to(torch.float16).contiguous()
        lora[name + ".lora_down.weight"] = vh[:k].to(torch.float16).contiguous()
        lora[name + ".alpha"] = torch.tensor(float(k))
    save_file(lora, out)
    print(json.dumps({bl: v[0] / v[1] for bl, v in energy.items()}))


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def make_inputs(scratch: Path) -> tuple[Path, Path, Path, Path, Path]:
    """Base SD1.5 fp16 (seed 1), a tuned one (power-law differences on kohya's modules), a rank-128
    LoRA, and the module lists the load-everything contenders get (name -> key)."""
    import torch

    from blockmerge.architectures import SD1
    from blockmerge.architectures.synthetic import write_synthetic
    from blockmerge.io import atomic_write
    from blockmerge.io.safetensors_io import SafetensorsStreamWriter
    from blockmerge.lora.extract import kohya_modules
    from blockmerge.lora.names import name_table
    from blockmerge.lora.synthetic import synthetic_lora
    from blockmerge.lora.writer import write_lora
    from blockmerge.merge.nodes import FileSource

    base = scratch / "sd15_base.safetensors"
    if not base.exists():
        write_synthetic(base, "SD1", size="full", seed=1, dtype=torch.float16)
    src = FileSource(base)
    shapes = {k: tuple(src.info(k).shape) for k in src.keys()}
    table = name_table(SD1, shapes)
    mods = kohya_modules(SD1, shapes, table, conv=False)
    tuned = scratch / "sd15_tuned.safetensors"
    if not tuned.exists():
        g = torch.Generator().manual_seed(7)
        by_key: dict[str, list] = {}
        for m in mods:
            by_key.setdefault(m.target.key, []).append(m.target)
        entries = [(k, src.info(k).dtype, shapes[k]) for k in sorted(shapes)]
        with atomic_write(tuned, overwrite=True) as f:
            w = SafetensorsStreamWriter(f, entries, dict(src.metadata))
            for k, _, shape in entries:
                t = src.get(k)
                if k in by_key:
                    t = t.float()
                    for target in by_key[k]:
                        out_d, in_d = target.shape[0], int(torch.tensor(target.shape[1:]).prod())
                        r0 = min(out_d, in_d)
                        decay = torch.arange(1, r0 + 1, dtype=torch.float32).pow(-0.8)
                        a = torch.randn(out_d, r0, generator=g) * decay
                        b = torch.randn(r0, in_d, generator=g) / in_d ** 0.5
                        delta = torch.zeros(shape)
                        target.add_into(delta, (a @ b).reshape(target.shape) * 0.02)
                        t += delta
                    t = t.to(torch.float16)
                w.write(k, t)
            w.finish()
    lora = scratch / "sd15_rank128.safetensors"
    if not lora.exists():
        sd = synthetic_lora(SD1, shapes, rank=RANK_APPLY, seed=3, scale=0.01)
        write_lora(lora, sd, {"ss_network_module": "networks.lora"}, dtype="fp16", overwrite=True)
    mapping = scratch / "apply_mapping.json"
    mapping.write_text(json.dumps({m.name: m.target.key for m in mods if not m.target.rows}))
    extract_mods = scratch / "extract_modules.json"
    extract_mods.write_text(json.dumps([[m.name, m.target.key, [list(r) for r in m.target.rows],
                                         SD1.block_of(m.target.key)] for m in mods]))
    src.close()
    return base, tuned, lora, mapping, extract_mods


# ----------------------------------------------------------------------------------------------
# Parent
# ----------------------------------------------------------------------------------------------


def disk_write_speed(folder: Path, size: int = 512 << 20) -> float:
    """MB/s of writing ``size`` bytes to a file in ``folder`` and fdatasync-ing it (the durable write)."""
    p = folder / "disk-speed.tmp"
    block = os.urandom(8 << 20)
    t0 = time.perf_counter()
    with open(p, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.flush()
        os.fdatasync(f.fileno())
    dt = time.perf_counter() - t0
    p.unlink()
    return size / 1e6 / dt


def _run(args: list[str], out: Path, cache: Path | None = None) -> common.Measurement:
    """One child run; ``cache``: a hash cache to use as it is, else an empty one."""
    if out.exists():
        out.unlink()
    if cache is None:
        cache = out.parent / "hash-cache"
        shutil.rmtree(cache, ignore_errors=True)
    env = {"PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "BLOCKMERGE_CACHE": str(cache)}
    m = common.measure(common.python_cmd(Path(__file__), "--child", *args), env=env, cwd=REPO)
    if not out.exists():
        raise RuntimeError(f"{args[0]} wrote no output {out}")
    return m


def output_dir(scratch: Path, need: int, asked: str | None) -> tuple[Path, bool]:
    """Where the apply outputs go, and whether it is memory-backed: ``asked``, else ``/dev/shm`` when
    it has room for ``need`` bytes and a margin, else the scratch folder."""
    from blockmerge.io.atomic import memory_backed

    if asked:
        folder = Path(asked)
    else:
        shm = Path("/dev/shm")
        folder = scratch
        if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > need + (2 << 30):
            folder = shm / f"blockmerge-bench-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        return folder, memory_backed(fd)
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs="+")
    ap.add_argument("--scratch", default=str(REPO / "bench" / "out" / "lora"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out-dir", help="where the apply outputs go (default: /dev/shm when it has room)")
    ap.add_argument("--settle", type=float, default=8.0, help="seconds between apply runs (see the loop)")
    ap.add_argument("--no-write", action="store_true", help="print, do not update RESULTS.md")
    a = ap.parse_args()
    if a.child:
        name, *rest = a.child
        {"apply-blockmerge": child_apply_blockmerge, "apply-load-everything": child_apply_load_everything,
         "apply-load-everything+fsync": child_apply_load_everything,
         "extract-blockmerge": child_extract_blockmerge, "extract-svd": child_extract_svd}[name](*rest)
        return
    scratch = Path(a.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    free = common.disk_free(scratch)
    print(f"free disk at {scratch}: {common.fmt_bytes(free)}", flush=True)
    t0 = time.perf_counter()
    base, tuned, lora, mapping, extract_mods = make_inputs(scratch)
    print(f"inputs ready in {time.perf_counter() - t0:.0f} s", flush=True)
    common.warm_read([base, tuned, lora])
    disk_mb_s = disk_write_speed(scratch)
    print(f"disk: {disk_mb_s:.0f} MB/s written with fdatasync", flush=True)
    runs: dict[str, list[common.Measurement]] = {}
    outs: dict[str, str] = {}
    out_dir, in_memory = output_dir(scratch, 3 * base.stat().st_size, a.out_dir)
    print(f"apply outputs in {out_dir} ({'memory-backed' if in_memory else 'on disk'})", flush=True)
    warm_cache = scratch / "hash-cache-warm"
    shutil.rmtree(warm_cache, ignore_errors=True)
    subprocess.run([sys.executable, "-c", "import sys; from blockmerge.io import file_hashes; "
                    "[file_hashes(p) for p in sys.argv[1:]]", str(base), str(lora)], check=True,
                   env={**os.environ, "BLOCKMERGE_CACHE": str(warm_cache), "PYTHONPATH": str(SRC)})
    contenders = [
        ("apply-blockmerge", "apply_bm.safetensors", [], None),
        ("apply-blockmerge (hashes cached)", "apply_bm_warm.safetensors", [], warm_cache),
        ("apply-load-everything", "apply_le.safetensors", [str(mapping)], None),
    ]
    if not in_memory:
        contenders.append(("apply-load-everything+fsync", "apply_le_fsync.safetensors", [str(mapping), "fsync"], None))
    for _, fname, _, _ in contenders:  # a previous invocation's outputs (--out-dir): gone before the settle
        (out_dir / fname).unlink(missing_ok=True)
    time.sleep(a.settle)  # the disk-speed probe just freed 512 MB of page cache
    try:
        for rep in range(a.repeat):
            # Interleaved, and the order rotated each round (A B C, B C A, C A B ...): on this VM
            # what a run pays for fresh memory depends on what the run before it freed, so each
            # contender follows each other one equally often (with a fixed order, blockmerge with
            # cached hashes always followed blockmerge without, and load-everything followed it).
            k = rep % len(contenders)
            for name, fname, extra, cache in contenders[k:] + contenders[:k]:
                child = name.split(" ")[0]
                out = out_dir / fname
                m = _run([child, str(base), str(lora), str(out), *extra], out, cache)
                runs.setdefault(name, []).append(m)
                print(f"{name}: {m.wall_s:.1f} s, {common.fmt_bytes(m.max_rss)} (load {m.load_before:.1f})", flush=True)
                out.unlink()  # no run starts with another's output still in memory
                # Every contender starts with no memory freed just before it. Why: on this VM
                # (Firecracker, virtio-balloon free page reporting) pages freed a moment ago are
                # reused cheaply, pages freed seconds ago were handed back to the host and fault
                # again at ~1 s per GB, so whoever ran right after an output was deleted got its
                # 2.1 GB cheaply (a 2x spread in the same contender's times).
                time.sleep(a.settle)
        # agreement: applied weights within fp16 rounding of each other (one more run of each, untimed:
        # an output kept during the timed runs made the runs after it pay for 2.1 GB of fresh memory)
        for name, fname, extra, cache in contenders:
            if name in ("apply-blockmerge", "apply-load-everything"):
                _run([name, str(base), str(lora), str(out_dir / fname), *extra], out_dir / fname, cache)
        from safetensors.torch import load_file

        x, y = load_file(str(out_dir / "apply_bm.safetensors")), load_file(str(out_dir / "apply_le.safetensors"))
        worst = max(float((x[k].float() - y[k].float()).abs().max()) for k in x if x[k].is_floating_point())
        del x, y
    finally:
        if out_dir != scratch and in_memory and not a.out_dir:
            shutil.rmtree(out_dir, ignore_errors=True)
    for name, args, out in (
        ("extract-blockmerge", [str(tuned), str(base)], scratch / "extract_bm.safetensors"),
        ("extract-svd", [str(tuned), str(base)], scratch / "extract_svd.safetensors"),
    ):
        extra = [str(extract_mods)] if name == "extract-svd" else []
        m = _run([name, *args, str(out), *extra], out)
        runs.setdefault(name, []).append(m)
        outs[name] = m.stdout.strip().splitlines()[-1]
        print(f"{name}: {m.wall_s:.1f} s, {common.fmt_bytes(m.max_rss)} (load {m.load_before:.1f})", flush=True)

    e_bm, e_svd = json.loads(outs["extract-blockmerge"]), json.loads(outs["extract-svd"])
    diffs = {b: abs(e_bm[b] - e_svd[b]) for b in e_svd}

    def best(n: str) -> common.Measurement:
        return min(runs[n], key=lambda m: m.wall_s)

    def median(n: str) -> float:
        return statistics.median(m.wall_s for m in runs[n])

    def work(n: str) -> float:
        """The best run's own time after its imports (``WORK`` line), NaN where it printed none."""
        found = re.findall(r"^WORK ([\d.]+)$", best(n).stdout, re.M)
        return float(found[-1]) if found else float("nan")

    ab, abw, al = best("apply-blockmerge"), best("apply-blockmerge (hashes cached)"), best("apply-load-everything")
    eb, es = best("extract-blockmerge"), best("extract-svd")
    rows = [[n, f"{best(n).wall_s:.1f}", f"{median(n):.1f}", f"{work(n):.1f}", f"{best(n).cpu_s:.1f}",
             common.fmt_bytes(best(n).max_rss), f"{best(n).load_before:.1f} → {best(n).load_after:.1f}"] for n in runs]
    disk_note = ""
    if "apply-load-everything+fsync" in runs:
        alf = best("apply-load-everything+fsync")
        disk_note = (f"\n- on disk, apply vs load-everything with its output on disk before it returns (`os.fsync`, as "
                     f"blockmerge's atomic write does): **{ab.wall_s / alf.wall_s:.2f}x**")
    machine = common.machine_info(("torch", "safetensors"))
    energy_rows = [[b, f"{e_bm[b]:.4f}", f"{e_svd[b]:.4f}", f"{diffs[b]:.4f}"] for b in e_svd]
    ratio, ratio_w = ab.wall_s / al.wall_s, abw.wall_s / al.wall_s
    body = f"""Synthetic full-size SD1.5 fp16 checkpoint (real key names and shapes); `apply`: a rank-{RANK_APPLY} LoRA on kohya's attention modules and the text encoder ({lora.stat().st_size / 1e6:.0f} MB, strength 0.8); `extract`: rank {RANK_EXTRACT} of a tuned copy whose differences on kohya's modules have a power-law spectrum. Each contender in its own process under `/usr/bin/time -v` (so each pays Python's and torch's start, ~2 s here); apply interleaved, best (and median) of {a.repeat}; extract once each. Apply outputs were written to {"a RAM-backed folder (/dev/shm): neither contender waits for the disk" if in_memory else "the disk"}. Reproduce: `python bench/bench_lora.py`.

Machine: {", ".join(f"{k}: {v}" for k, v in machine.items())}; free disk {common.fmt_bytes(free)}; the disk writes {disk_mb_s:.0f} MB/s with fdatasync (the 2.1 GB output alone: {2.13e3 / disk_mb_s:.1f} s)

{common.md_table(["contender", "best wall s", "median wall s", "work s (after imports)", "CPU s", "peak RSS", "load avg before → after"], rows)}

- apply, model hashes cached: wall vs load-everything **{ratio_w:.2f}x** (target ≤ 0.5x: {"met" if ratio_w <= 0.5 else "MISSED"}); the work alone, after each process's imports: **{work("apply-blockmerge (hashes cached)") / work("apply-load-everything"):.2f}x**; peak RSS **{common.fmt_bytes(abw.max_rss)}** (target ≤ 1.0 GB: {"met" if abw.max_rss <= 1e9 else "MISSED"})
- apply, empty hash cache (SHA-256 of the 2.1 GB model for the metadata on the side): **{ratio:.2f}x** ({"met" if ratio <= 0.5 else "MISSED"}); after imports **{work("apply-blockmerge") / work("apply-load-everything"):.2f}x**; peak RSS **{common.fmt_bytes(ab.max_rss)}** ({"met" if ab.max_rss <= 1e9 else "MISSED"}); outputs agree to {worst:.2g} (fp16 rounding of the same float32 sum){disk_note}
- extract: wall vs full per-tensor SVD **{eb.wall_s / es.wall_s:.2f}x** (target ≤ 0.3x: {"met" if eb.wall_s / es.wall_s <= 0.3 else "MISSED"}); peak RSS **{common.fmt_bytes(eb.max_rss)}** (target ≤ 1.5 GB: {"met" if eb.max_rss <= 1.5e9 else "MISSED"}); kept energy per block within **{max(diffs.values()):.4f}** of the exact SVD's (target ≤ 0.01: {"met" if max(diffs.values()) <= 0.01 else "MISSED"})

Share of each block's ||ΔW||² that rank {RANK_EXTRACT} keeps:

{common.md_table(["block", "blockmerge", "exact SVD", "|difference|"], energy_rows)}
"""
    print(body)
    if not a.no_write:
        common.write_results_section("LoRA apply and extract (issue 13)", body)


if __name__ == "__main__":
    main()
