"""The safetensors header is validated exactly as the official library validates it.

Hypothesis builds valid files and then breaks them in every way the format can be broken (offsets
with holes, overlaps or out of order; trailing or missing bytes; shapes that are negative,
fractional, booleans, text or overflow; unknown and unsupported dtypes; metadata of the wrong
types; invalid UTF-8, lone surrogate escapes, NaN, deep nesting, duplicate keys...). Every file is
given to both readers: blockmerge accepts it exactly when ``safetensors`` does, except two refusals
of its own, both on purpose: duplicate keys (the official reader silently keeps the last) and
dtypes blockmerge cannot merge (named: "unsupported dtype U16", never "not a valid file").
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors import deserialize

from blockmerge.cli import main
from blockmerge.errors import CheckpointError
from blockmerge.io import open_checkpoint
from blockmerge.io.safetensors_io import DTYPES, KNOWN_DTYPE_BITS, MAX_HEADER, SafetensorsReader

DTYPE_NAMES = sorted(KNOWN_DTYPE_BITS)


def _official(data: bytes) -> dict[str, tuple[str, tuple[int, ...]]] | None:
    try:
        return {k: (v["dtype"], tuple(v["shape"])) for k, v in deserialize(data)}
    except Exception:  # the binding raises SafetensorError, and KeyError/ValueError for a few inputs
        return None


def _ours(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]] | None, str]:
    try:
        with SafetensorsReader(path) as r:
            names = {v: k for k, v in DTYPES.items()}
            return {k: (names[r.info(k).dtype], r.info(k).shape) for k in r.keys()}, ""
    except CheckpointError as e:
        return None, str(e)


@st.composite
def entries(draw):
    n = draw(st.integers(0, 5))
    names = draw(st.lists(st.text(min_size=1, max_size=12), min_size=n, max_size=n, unique=True))
    names = [x for x in names if x != "__metadata__"]
    out, offset = [], 0
    for name in names:
        dtype = draw(st.sampled_from(DTYPE_NAMES) if draw(st.booleans()) else st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        numel = 1
        for s in shape:
            numel *= s
        bits = numel * KNOWN_DTYPE_BITS[dtype]
        if bits % 8:
            shape, bits = [*shape, 8] if shape else [8], bits * 8  # sub-byte dtypes need whole bytes
        size = bits // 8
        out.append([name, {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}])
        offset += size
    return out, offset


MUTATIONS = [
    "none", "shuffle", "hole", "overlap", "trailing", "missing", "shape", "dtype", "offsets", "drop_field",
    "extra_field", "metadata", "duplicate", "padding", "leading_space", "trailing_nul", "bad_utf8", "surrogate",
    "nan", "not_object", "deep", "entry_type", "length_past_end", "length_huge", "empty_header",
]
BAD_SHAPE_VALUES = [-1, 1.5, True, False, "2", None, 2**64, 2**64 - 1, 2**70, [2], 2.0]
BAD_OFFSETS = [[0], [0, 1, 2], [0.0, 8], [-1, 7], [8, 0], "0,8", None, [0, 2**64]]


@st.composite
def files(draw):
    ents, data_len = draw(entries())
    mutation = draw(st.sampled_from(MUTATIONS))
    meta: object = draw(st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
    data = bytes(data_len)
    raw_override: bytes | None = None
    if mutation == "shuffle":
        ents = draw(st.permutations(ents))
    elif mutation == "hole" and ents:
        i = draw(st.integers(0, len(ents) - 1))
        k = draw(st.integers(1, 9))
        for e in ents[i:]:
            e[1]["data_offsets"] = [x + k for x in e[1]["data_offsets"]]
        data += bytes(k)
    elif mutation == "overlap" and len(ents) > 1:
        e = ents[draw(st.integers(1, len(ents) - 1))][1]
        b, end = e["data_offsets"]
        e["data_offsets"] = [max(0, b - draw(st.integers(1, 4))), end]
    elif mutation == "trailing":
        data += bytes(draw(st.integers(1, 9)))
    elif mutation == "missing" and data:
        data = data[: -draw(st.integers(1, len(data)))]
    elif mutation == "shape" and ents:
        e = ents[draw(st.integers(0, len(ents) - 1))][1]
        choice = draw(st.sampled_from(["value", "overflow", "not_list"]))
        if choice == "value":
            e["shape"] = [*e["shape"], draw(st.sampled_from(BAD_SHAPE_VALUES))]
        elif choice == "overflow":
            e["shape"] = [2**40, 2**40, 2**40]
        else:
            e["shape"] = draw(st.sampled_from(["2", 2, None, {"a": 1}]))
    elif mutation == "dtype" and ents:
        e = ents[draw(st.integers(0, len(ents) - 1))][1]
        e["dtype"] = draw(st.sampled_from(["f32", "Q4", "", 5, None, "F32 ", "float16"]))
    elif mutation == "offsets" and ents:
        ents[draw(st.integers(0, len(ents) - 1))][1]["data_offsets"] = draw(st.sampled_from(BAD_OFFSETS))
    elif mutation == "drop_field" and ents:
        e = ents[draw(st.integers(0, len(ents) - 1))][1]
        e.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])))
    elif mutation == "extra_field" and ents:
        ents[0][1][draw(st.text(min_size=1, max_size=5).filter(lambda k: k not in ents[0][1]))] = draw(
            st.integers() | st.text() | st.none())
    elif mutation == "metadata":
        meta = draw(st.sampled_from([[], 5, "x", {"k": 1}, {"k": None}, {"k": ["a"]}, {"k": {"a": "b"}}]))
    elif mutation == "entry_type" and ents:
        ents[0][1] = draw(st.sampled_from([5, "x", None, [1, 2]]))
    header: dict[str, object] = {}
    if meta is not None or draw(st.booleans()):
        header["__metadata__"] = meta
    for name, e in ents:
        header[name] = e
    text = json.dumps(header)
    if mutation == "duplicate" and ents:
        name, e = ents[0]
        text = text[:-1] + ("," if len(header) else "") + json.dumps(name) + ":" + json.dumps(e) + "}"
    elif mutation == "padding":
        text += " " * draw(st.integers(1, 16))
    elif mutation == "leading_space":
        text = " \n\t" + text
    elif mutation == "trailing_nul":
        text += "\x00"
    elif mutation == "surrogate":
        text = text[:-1] + ("," if len(header) else "") + '"__x":{"dtype":"F32","shape":[0],"data_offsets":[0,0],' \
            '"note":"\\ud800"}}'
    elif mutation == "nan":
        text = text[:-1] + ("," if len(header) else "") + '"__x":{"dtype":"F32","shape":[NaN],"data_offsets":[0,0]}}'
    elif mutation == "not_object":
        text = draw(st.sampled_from(["[]", "5", '"x"', "null", "true"]))
    elif mutation == "deep":
        depth = draw(st.sampled_from([100, 126, 130, 200]))
        text = text[:-1] + ("," if len(header) else "") + '"__x":{"dtype":"F32","shape":[0],"data_offsets":[0,0],' \
            '"n":' + "[" * depth + "]" * depth + "}}"
    elif mutation == "empty_header":
        text = ""
    raw = text.encode("utf-8")
    if mutation == "bad_utf8":
        raw = raw[:-1] + b',"\xff":1}' if raw.endswith(b"}") and len(raw) > 2 else b'{"\xff":1}'
    if raw_override is not None:
        raw = raw_override
    n = len(raw)
    if mutation == "length_past_end":
        n = len(raw) + len(data) + draw(st.integers(1, 100))
    elif mutation == "length_huge":
        n = draw(st.sampled_from([MAX_HEADER + 1, 2**40, 2**64 - 1]))
    return struct.pack("<Q", n) + raw + data, mutation


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=files())
def test_accepted_exactly_when_the_official_library_accepts(tmp_path_factory, case) -> None:
    data, mutation = case
    path = tmp_path_factory.getbasetemp() / "h.safetensors"
    path.write_bytes(data)
    official = _official(data)
    ours, why = _ours(path)
    if official is None:
        assert ours is None, f"accepted what safetensors rejects ({mutation})"
        assert why.startswith(str(path)) and "\n" not in why
        return
    if ours is None:
        # our two refusals of valid files, each named for what it is
        dupe = mutation == "duplicate"
        unsupported = any(dt not in DTYPES for dt, _ in official.values())
        assert dupe or unsupported, f"rejected a valid file ({mutation}): {why}"
        if not dupe:
            assert "unsupported dtype" in why and "not a valid" not in why, why
        else:
            assert "duplicate key" in why, why
        return
    assert ours == official, mutation


@pytest.mark.parametrize("dtype", sorted(set(KNOWN_DTYPE_BITS) - set(DTYPES)))
def test_valid_but_unsupported_dtypes_are_named(tmp_path: Path, capsys, dtype: str) -> None:
    bits = KNOWN_DTYPE_BITS[dtype]
    header = json.dumps({"model.diffusion_model.input_blocks.0.0.weight":
                         {"dtype": dtype, "shape": [8], "data_offsets": [0, bits]}}).encode()
    p = tmp_path / "u.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + bytes(bits))
    assert _official(p.read_bytes()) is not None  # a valid file
    code = main(["info", str(p), "--no-hash"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"unsupported dtype {dtype}" in err and "not a valid" not in err


def test_files_we_write_load_with_the_official_library(tmp_path: Path) -> None:
    """Metadata with characters JSON must escape and lone surrogates (a file name's undecodable bytes)
    still gives a header the strict official reader accepts."""
    from safetensors.torch import load_file

    from blockmerge.io import SafetensorsStreamWriter, atomic_write

    t = torch.arange(6, dtype=torch.float32)
    meta = {"name": "bad\udcff name \x01 \u2028 </script>", "k\udc80": "v"}
    out = tmp_path / "w.safetensors"
    with atomic_write(out) as f:
        w = SafetensorsStreamWriter(f, [("t", t.dtype, (6,))], meta)
        w.write("t", t)
        w.finish()
    assert torch.equal(load_file(out)["t"], t)
    with open_checkpoint(out) as r:
        assert r.metadata["name"] == "bad\ufffd name \x01 \u2028 </script>"


def test_wrong_kind_of_file_under_a_safetensors_name_says_what_it_is(tmp_path: Path) -> None:
    for data, kind in [(b"", "empty"), (b"hello\n" * 9, "text file"), (b"<!DOCTYPE html><html>", "HTML"),
                       (b"version https://git-lfs.github.com/spec/v1\n", "Git LFS pointer"),
                       (b"\x89PNG\r\n\x1a\n" + bytes(20), "PNG image"), (b"GGUF" + bytes(20), "GGUF")]:
        p = tmp_path / "x.safetensors"
        p.write_bytes(data)
        with pytest.raises(CheckpointError, match=kind):
            open_checkpoint(p)


@given(st.binary(max_size=64))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_bytes_are_a_checkpoint_error_never_a_crash(tmp_path_factory, blob: bytes) -> None:
    assume(_official(blob) is None)
    for suffix in (".safetensors", ".ckpt", ".bin", ""):
        p = tmp_path_factory.getbasetemp() / f"r{suffix}"
        p.write_bytes(blob)
        with pytest.raises(CheckpointError):
            open_checkpoint(p).close()
