"""Hashes against hashlib, the hash cache, and the blocks / info / hash commands."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from blockmerge.architectures import SD1, SDXL
from blockmerge.cli import main
from blockmerge.io import file_hashes, hashes, open_checkpoint
from blockmerge.merge import merge


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKMERGE_CACHE", str(tmp_path / "cache"))


def test_hashes_match_hashlib(tmp_path):
    data = os.urandom(0x100000 + 0x10000 + 12345)
    f = tmp_path / "m.safetensors"
    f.write_bytes(data)
    h = file_hashes(f)
    assert h.sha256 == hashlib.sha256(data).hexdigest()
    assert h.short == h.sha256[:10]
    assert h.legacy == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_article_style_legacy_hash_of_small_file(tmp_path):
    f = tmp_path / "small.bin"
    f.write_bytes(b"x" * 100)
    assert file_hashes(f).legacy == hashlib.sha256(b"").hexdigest()[:8]  # nothing at 1 MiB, as A1111 computes it


def test_cache_makes_second_call_instant_and_notices_changes(tmp_path, monkeypatch):
    f = tmp_path / "m.bin"
    f.write_bytes(b"a" * 5000)
    first = file_hashes(f)
    calls = []
    real = hashes.sha256_file
    monkeypatch.setattr(hashes, "sha256_file", lambda p: calls.append(p) or real(p))
    assert file_hashes(f) == first and calls == []  # from the cache: the file is not read again
    f.write_bytes(b"b" * 5001)
    changed = file_hashes(f)
    assert calls and changed.sha256 == hashlib.sha256(b"b" * 5001).hexdigest()
    calls.clear()
    assert file_hashes(f, use_cache=False) == changed and calls


def test_hash_command(tiny_sd1_paths, capsys):
    assert main(["hash", "-q", str(tiny_sd1_paths[0])]) == 0
    out = capsys.readouterr().out.split()
    data = tiny_sd1_paths[0].read_bytes()
    full = hashlib.sha256(data).hexdigest()
    assert out[:3] == [hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8], full[:10], full]


def _independent_counts(path, arch):
    counts = {}
    with open_checkpoint(path) as r:
        for k in r.keys():
            b = arch.block_of(k)
            c = counts.setdefault(b, [0, 0])
            c[0] += 1
            c[1] += r.info(k).numel
    return counts


@pytest.mark.parametrize("fixture,arch", [("tiny_sd1_paths", SD1), ("tiny_sdxl_paths", SDXL)])
def test_blocks_command(request, capsys, fixture, arch):
    path = request.getfixturevalue(fixture)[0]
    assert main(["blocks", "--json", str(path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["architecture"] == arch.name
    assert [r["block"] for r in data["blocks"]] == list(arch.all_ids)
    expected = _independent_counts(path, arch)
    for r in data["blocks"]:
        assert [r["tensors"], r["parameters"]] == expected[r["block"]]
        assert r["tensors"] > 0
    assert {c["block"] for c in data["base_components"]} == {c.name for c in arch.components}
    assert main(["blocks", str(path)]) == 0
    text = capsys.readouterr().out
    assert "M00" in text and f"{expected['M00'][1]:,}" in text


def test_info_command_prints_merge_record(tiny_sd1_paths, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    merge(tiny_sd1_paths[:2], out, alpha="IN04-IN08=0.5", base_alpha=0.2)
    assert main(["info", "--json", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "SD1" and info["format"] == "safetensors"
    assert info["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert info["dtypes"]["float16"] > 0 and info["size_bytes"] == out.stat().st_size
    rec = info["merge_record"]
    alpha = rec["params"]["alpha"]
    assert alpha["IN05"] == 0.5 and alpha["IN09"] == 0.0 and alpha["BASE"] == 0.2
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "weighted_sum" in text and "IN05=0.5" in text and tiny_sd1_paths[0].name in text


def test_info_on_ckpt(tiny_sd1_ckpt_path, capsys):
    assert main(["info", "--json", "--no-hash", str(tiny_sd1_ckpt_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "pickle" and info["architecture"] == "SD1" and "sha256" not in info


def test_presets_command(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "GRAD_V" in out and "SD1/SD2" in out


def test_merge_progress_on_stderr_and_quiet_silences_it(tiny_sd1_paths, tmp_path, capsys):
    a, b = (str(p) for p in tiny_sd1_paths[:2])
    assert main(["merge", a, b, "-o", str(tmp_path / "p.safetensors"), "--alpha", "0.5"]) == 0
    out, err = capsys.readouterr()
    assert "merge p.safetensors" in err and "B/s" in err  # tqdm's bar, on stderr
    assert out.startswith("wrote ") and "merge p.safetensors" not in out
    assert main(["merge", a, b, "-o", str(tmp_path / "q.safetensors"), "--alpha", "0.5", "-q"]) == 0
    assert capsys.readouterr() == ("", "")


def test_no_home_directory_means_no_hash_cache_and_no_failure(tmp_path, monkeypatch) -> None:
    """A container user without HOME or a passwd entry: Path.home() raises. The hashes are still
    computed, nothing is cached, and cached_hashes says "not cached" instead of failing."""
    from blockmerge.io import hashes

    f = tmp_path / "x.bin"
    f.write_bytes(os.urandom(3 << 20))
    for var in ("BLOCKMERGE_CACHE", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.delenv(var, raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(hashes.Path, "home", staticmethod(no_home))
    assert hashes.cache_path() is None
    assert hashes.cached_hashes(f) is None
    h = hashes.file_hashes(f)
    assert h.sha256 == hashlib.sha256(f.read_bytes()).hexdigest()
    assert hashes.cached_hashes(f) is None
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # any of the three gives a cache again
    assert hashes.cache_path() == tmp_path / "xdg" / "blockmerge" / "hashes.json"
    hashes.file_hashes(f)
    assert hashes.cached_hashes(f) == h


def test_addnet_hash_is_cached_beside_the_file_hashes_and_follows_changes(tmp_path, monkeypatch):
    """A LoRA's addnet hash is computed once per content (path, size, mtime) and kept in the same
    cache entry as sha256/legacy; either kind of hash added later keeps the other."""
    import struct

    from blockmerge.io import addnet_hash

    monkeypatch.setenv("BLOCKMERGE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "l.safetensors"
    header = b'{"__metadata__":{"x":"1"}}'
    data = os.urandom(4096)
    f.write_bytes(struct.pack("<Q", len(header)) + header + data)
    want = hashlib.sha256(data).hexdigest()
    assert addnet_hash(f) == want
    reads = []
    real = hashes._addnet
    monkeypatch.setattr(hashes, "_addnet", lambda p: reads.append(p) or real(p))
    assert addnet_hash(f) == want and reads == []  # from the cache
    assert hashes.cached_hashes(f) is None  # an entry with only the addnet hash has no sha256 yet
    both = file_hashes(f)
    entry = json.loads(hashes.cache_path().read_text())[str(f.resolve())]
    assert entry["addnet"] == want and entry["sha256"] == both.sha256 == hashlib.sha256(f.read_bytes()).hexdigest()
    assert addnet_hash(f) == want and reads == []  # file_hashes kept it
    # new content of the same size: the mtime tells; the stale entry is replaced, not merged
    data2 = os.urandom(4096)
    f.write_bytes(struct.pack("<Q", len(header)) + header + data2)
    os.utime(f, ns=(1, 2))
    assert addnet_hash(f) == hashlib.sha256(data2).hexdigest() and reads == [f]
    entry = json.loads(hashes.cache_path().read_text())[str(f.resolve())]
    assert "sha256" not in entry and entry["mtime_ns"] == 2
    assert addnet_hash(f, use_cache=False) == hashlib.sha256(data2).hexdigest() and len(reads) == 2


@pytest.mark.parametrize("bad", [{"addnet": "xyz"}, {"addnet": "0" * 63}, {"sha256": "0" * 64},
                                 {"size": 1, "mtime_ns": 2}, {"size": "1", "mtime_ns": 2, "addnet": "0" * 64}])
def test_malformed_cache_entries_are_ignored(tmp_path, monkeypatch, bad):
    """An entry with a malformed hash, a hash without its size/mtime, or no hash at all is left out
    (and the hash computed again), never returned."""
    from blockmerge.io import addnet_hash

    monkeypatch.setenv("BLOCKMERGE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "x.bin"
    f.write_bytes(b"z" * 3000)
    st = f.stat()
    entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, **bad}
    hashes.cache_path().parent.mkdir(parents=True)
    hashes.cache_path().write_text(json.dumps({str(f.resolve()): entry}))
    assert addnet_hash(f) == hashlib.sha256(b"z" * 3000).hexdigest()
    assert hashes.cached_hashes(f) is None or hashes.cached_hashes(f).sha256 == hashlib.sha256(b"z" * 3000).hexdigest()
