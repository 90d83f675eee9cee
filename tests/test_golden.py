"""Golden outputs: SD1 / SD2 / SDXL merges give the very bytes they gave before model families
became data (issue 14). The digests below were written by this file's ``_digests`` on the code of
commit 767fc1f (before any change), on synthetic tiny files whose tensors depend only on
(seed, key).

Two digests per output, so that a later change of the metadata record alone (a new field, a new
tool version) does not hide or fake a change of the tensors:

- ``tensors``: sha256 over the header's tensor entries (names, dtypes, shapes, offsets; JSON with
  sorted keys, ``__metadata__`` left out) followed by every data byte of the file;
- ``metadata``: sha256 over the ``__metadata__`` object (sorted JSON) with blockmerge's own
  ``version`` fields removed, and its record read in the layout of 767fc1f: the method registry
  (issue 11) lists every parameter under ``params`` and adds ``space`` and the ``clamp`` option;
  :func:`_record_as_before` maps that back (α/β at the top, no ``space``, no ``clamp: false``), so
  every other byte of the record and all of A1111's fields are still compared with the old code.

The synthetic inputs themselves are pinned too (their whole-file sha256), since every merge digest
depends on them and the family refactor rewrote the code that lays them out.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

from blockmerge.architectures.synthetic import write_synthetic
from blockmerge.io import sha256_file
from blockmerge.merge import merge

SPEC_25 = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0,0.15,0.25,0.35,0.45,0.55,0.65,0.75,0.85,0.95,0.05,0.33,0.66,0.99,0.01,0.5"
SPEC_20 = "0.42,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0,0.15,0.25,0.35,0.45,0.55,0.65,0.75,0.85,0.95"

# name: (arch, input seeds, merge kwargs)
CASES: dict[str, tuple[str, tuple[int, ...], dict[str, Any]]] = {
    "sd1_ws_gradv_base": ("SD1", (1, 2), {"alpha": "GRAD_V", "base_alpha": 0.3}),
    "sd1_ws_list25_bf16": ("SD1", (1, 2), {"alpha": SPEC_25, "dtype": "bf16"}),
    "sd1_ad_readable": ("SD1", (1, 2, 3), {"method": "add_difference", "alpha": "0.5,IN04-IN08=1,OUT=0.25"}),
    "sd1_scaled_single": ("SD1", (1,), {"method": "scaled_sum", "alpha": "IN04=0.75"}),
    "sd1_scaled_pair_fp32": ("SD1", (1, 2), {"method": "scaled_sum", "alpha": 0.6, "beta": 0.6, "dtype": "fp32"}),
    "sd2_ws_readable": ("SD2", (1, 2), {"alpha": "IN04-IN08=0.5,M00=1"}),
    "sd2_ws_number": ("SD2", (1, 2), {"alpha": 0.35}),
    "sdxl_ws_list20": ("SDXL", (1, 2), {"alpha": SPEC_20}),
    "sdxl_ad": ("SDXL", (1, 2, 3), {"method": "add_difference", "alpha": "IN=0.7,M00=0.2", "base_alpha": 1.0}),
    "sdxl_scaled_beta": ("SDXL", (1, 2), {"method": "scaled_sum", "alpha": "OUT00-OUT08=0.9", "beta": "0.1,M00=0.5",
                                          "base_beta": 0.0}),
}

GOLDEN: dict[str, tuple[str, str]] = {
    "sd1_ws_gradv_base": ("5ffc8fd59e6768480ac51c69e1fc7069fd3dac54e9fcc8ce0185d382b0d80d9a",
                          "dae643dffb2ae08f45219c7e6e459f3915a2e279905ffbce0f5325377295e179"),
    "sd1_ws_list25_bf16": ("50262ddbd9722355ccb9b9b6598a0737c40021d841405a6bf3d2da4a9958821f",
                           "e29a6a50f06a8b1f7c509c5d608c280b2f376e8a56c271b9ed0d7a48a6294128"),
    "sd1_ad_readable": ("970ddd4461b4ee3ce547853ba60523ad073f9533c2e4d52c5325b1bbf45af50b",
                        "cd85e2234fb304c173edc3064d1dc680db08df58c99389cb833ee1452da80d6d"),
    "sd1_scaled_single": ("1d0bd6866b04117939e6583b3393add4339f5691db0f04ac8537f11c8c8b63a1",
                          "700645184599b8d492561ec6e1b1e47b4df7a4aeebc5ab6abffa44adf2e5eb41"),
    "sd1_scaled_pair_fp32": ("07026af5d7cabfb1cc626787d5522b0503e2c9fcffc26b8d0230c001c02ce727",
                             "b8aec2663fc96453d0e7f088b0b210a57b1fb6435ba280416bc6525043bf0fb8"),
    "sd2_ws_readable": ("1c1155e6dde914013b3f9de9d8e842c2921775dbaadeaa945f873e5cd7a692fb",
                        "ae93567fb083958caabaaf00fa9d1a6626cef91902a4aa7e443306b88e6ae488"),
    "sd2_ws_number": ("a9d7a4e4baef6b1dcd559bc006680d70716236977415cc1652c23ebd38031c1a",
                      "6c3ec103f54df6f004e4f892d66dee4af05b88d3503d275f70ad35fdd0c1e9d3"),
    "sdxl_ws_list20": ("20e53f340b81e401b06012421c2c0945fa00b360213eceb01a5a70fad7689a5f",
                       "0001926581c14d935f7bbcca3bfcb87a6c438b1ffc452e2518e5553529816e34"),
    "sdxl_ad": ("9d60acbd7e1e876cecbe53786a1afc1d382fc32c010b0a7906b54e732c479391",
                "49e743ea72edeeb19af9105fa456d2387a37defb51875381f62b2fdc9aa230ae"),
    "sdxl_scaled_beta": ("1773436b1979f7d42c7012c1baf4bc19f47bfda724de9dd0558d7983b32cf742",
                         "6dfa6b204728a46d7cfed764f96f4a602cc06eb09535a085a96e4221b2044af8"),
}
INPUTS: dict[str, str] = {
    "SD1-1": "73959177397b5a355661039836fba588a9ddebcefc9468dcf69dc9ee52ff8f2c",
    "SD1-2": "4661fbef6b85232f96380d3d82ac28c79661530caea5636d55cfc7143c3d4555",
    "SD1-3": "ca90fb5f95ff3c7c380dd442b130faaffac7ea1fb0afaa1d8e45dbbf7d8077c5",
    "SD2-1": "fbcb9a134b8bfa3e193baa9ce1ea2765b9157e7be83fa5f48f0d1da7b671f6ad",
    "SD2-2": "81dfef07d314850844ee2ad1d738d906d6f9da071e9dbf3477774e70afd4108e",
    "SDXL-1": "42583fb9dea91ed8e3254cebffc8b65472209fcf49eced244b710fe8a8b4cc28",
    "SDXL-2": "1133c09f8f79cfc72a69292e3a49b287e016ebe6939e890b003139b942207ccc",
    "SDXL-3": "d92ff88fdaa5972cf9a3f69daec4e0c2df0348e05d321fda34f386039fc16dd7",
}


def _strip_version(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_version(v) for k, v in obj.items() if k != "version"}
    if isinstance(obj, list):
        return [_strip_version(v) for v in obj]
    return obj


def _record_as_before(rec: Any) -> Any:
    if not isinstance(rec, dict) or "params" not in rec:
        return rec
    rec = dict(rec)
    params = rec.pop("params")
    rec["alpha"], rec["beta"] = params.get("alpha"), params.get("beta")
    if rec.pop("space", "model") != "model" or rec.pop("rules", None) or set(params) - {"alpha", "beta"}:
        raise AssertionError("not a record the code before the registry could write")
    opts = dict(rec.get("options") or {})
    if opts.pop("clamp", False):
        raise AssertionError("clamp did not exist before the registry")
    rec["options"] = opts
    return rec


def file_digests(path: Path) -> tuple[str, str]:
    """(tensors digest, metadata digest) of a safetensors file, as the module docstring defines."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    h.update(raw[8 + n :])
    decoded = {}
    for k, v in meta.items():
        try:
            decoded[k] = _strip_version(json.loads(v))
            if k == "blockmerge":
                decoded[k] = _record_as_before(decoded[k])
        except json.JSONDecodeError:
            decoded[k] = v
    m = hashlib.sha256(json.dumps(decoded, sort_keys=True).encode())
    return h.hexdigest(), m.hexdigest()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], Path]:
    d = tmp_path_factory.mktemp("golden")
    out = {}
    for arch, seeds, _ in CASES.values():
        for s in seeds:
            if (arch, s) not in out:
                out[(arch, s)] = write_synthetic(d / f"{arch}-{s}.safetensors", arch, "tiny", seed=s,
                                                 dtype=torch.float16)
    return out


def _run(name: str, inputs: dict[tuple[str, int], Path], tmp: Path) -> Path:
    arch, seeds, kw = CASES[name]
    out = tmp / f"{name}.safetensors"
    merge([inputs[(arch, s)] for s in seeds], out, threads=1, **kw)
    return out


def _digests(tmp: Path) -> None:  # pragma: no cover - how GOLDEN was written
    d = {}
    ins: dict[tuple[str, int], Path] = {}
    for arch, seeds, _ in CASES.values():
        for s in seeds:
            ins.setdefault((arch, s), write_synthetic(tmp / f"{arch}-{s}.safetensors", arch, "tiny", seed=s))
    for (arch, s), p in sorted(ins.items()):
        print(f'    "{arch}-{s}": "{sha256_file(p)}",')
    for name in CASES:
        d[name] = file_digests(_run(name, ins, tmp))
        print(f'    "{name}": ("{d[name][0]}",\n        "{d[name][1]}"),')


def test_synthetic_inputs_are_unchanged(inputs) -> None:
    got = {f"{a}-{s}": sha256_file(p) for (a, s), p in inputs.items()}
    assert got == INPUTS


@pytest.mark.parametrize("name", list(CASES))
def test_merge_output_is_byte_identical_to_before(name: str, inputs, tmp_path: Path) -> None:
    tensors, meta = file_digests(_run(name, inputs, tmp_path))
    want_t, want_m = GOLDEN[name]
    assert tensors == want_t, f"{name}: the merged tensors changed"
    assert meta == want_m, f"{name}: the metadata record changed"


def test_digest_sees_a_one_byte_change(inputs, tmp_path: Path) -> None:
    """The digest is not blind: flipping one data byte (or one metadata value) changes it."""
    p = _run("sd1_ws_gradv_base", inputs, tmp_path)
    t0, m0 = file_digests(p)
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 1
    q = tmp_path / "flipped.safetensors"
    q.write_bytes(bytes(raw))
    t1, m1 = file_digests(q)
    assert t1 != t0 and m1 == m0


# sha256 over "key<TAB>block<TAB>component\n" for every key of the layout, in layout order, as the
# U-Net-only code of commit 767fc1f assigned them.
BLOCK_TABLES = {
    ("SD1", "tiny"): "0b1844e88faec6d1bc1bef6ff987a96f2183fac03247d399a56ee638c5217455",
    ("SD1", "full"): "9c526858089445d8175a55483faa514a9d98465fdc45a4a72ae46f55666896c7",
    ("SD2", "tiny"): "e9f5bfb69a3651076e89ecb2c67cad8972ccfb5fec246791a787099d1e16c510",
    ("SD2", "full"): "995bdeb6b5c42791482d1c0a2af8ad10c811ad335de8a1d9dd6f0c151cfc3d47",
    ("SDXL", "tiny"): "cc1d474ede74719398d5f846353731d5797e67d1bc7ba894ffcdc1e035e2c636",
    ("SDXL", "full"): "7db65873628becb5a2445c3254788a5b1dac00ec0554e6707d91e2d549044d20",
}


@pytest.mark.parametrize(("arch", "size"), list(BLOCK_TABLES))
def test_block_and_component_of_every_key_unchanged(arch: str, size: str) -> None:
    from blockmerge.architectures import by_name
    from blockmerge.architectures.synthetic import layout

    fam = by_name(arch)
    lines = "".join(f"{k}\t{fam.block_of(k)}\t{fam.component_of(k)}\n" for k, _, _ in layout(arch, size))
    assert hashlib.sha256(lines.encode()).hexdigest() == BLOCK_TABLES[(arch, size)]
