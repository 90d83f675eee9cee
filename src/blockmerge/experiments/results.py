"""The data contract between a sweep (which makes images) and its evaluation (metrics, report).

A sweep writes images into one folder and describes them with a :class:`SweepResult`, saved as
``sweep.json`` next to the images. Everything downstream (metrics, the U-shaped report, later
model comparisons) reads only this description, so a sweep can be produced by the in-place runner,
by hand from A1111 outputs, or by another tool, and evaluated the same way.

All paths inside are relative (POSIX style) to the sweep folder, so the folder can be moved.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import BlockmergeError
from ..io.text import split_lines

VariantKind = Literal["baseline", "scale", "bypass", "swap", "custom", "lora"]
VARIANT_KINDS: tuple[str, ...] = ("baseline", "scale", "bypass", "swap", "custom", "lora")
BASELINE_ID = "baseline"
SWEEP_FILE = "sweep.json"
FORMAT_VERSION = 1


def _int(v: Any) -> int:
    """A JSON integer (not a bool, not 1.5, not "3")."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"expected a whole number, got {v!r}"[:80])
    return v


def _fmt_param(v: Any) -> str:
    # 0.75 -> "0.75", 1.0 -> "1", so ids stay short and stable across float formatting.
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


@dataclass(frozen=True)
class Variant:
    """One way of running the model: the baseline, or one block changed in one way.

    ``group`` puts variants that belong in the same U picture together (every block scaled by
    0.75 is one group, every block bypassed another). Left empty it is derived from ``kind`` and
    ``params``, which is right for the standard sweeps.
    """

    id: str
    kind: str
    block: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    group: str = ""

    def __post_init__(self) -> None:
        if self.kind not in VARIANT_KINDS:
            raise BlockmergeError(f"variant {self.id!r}: unknown kind {self.kind!r} (one of {', '.join(VARIANT_KINDS)})")
        if not self.group:
            object.__setattr__(self, "group", self.default_group(self.kind, self.params))
        if not self.label:
            object.__setattr__(self, "label", self.id)

    @staticmethod
    def default_group(kind: str, params: dict[str, Any]) -> str:
        """``scale:k=0.75``, ``bypass``, ``swap:donor=B``: kind plus its parameters, sorted."""
        if not params:
            return kind
        return kind + ":" + ",".join(f"{k}={_fmt_param(params[k])}" for k in sorted(params))

    # The standard variants, with the ids the sweep runner and the report agree on.
    @classmethod
    def baseline(cls) -> Variant:
        return cls(BASELINE_ID, "baseline", None, {}, "baseline")

    @classmethod
    def scale(cls, block: str, k: float) -> Variant:
        return cls(f"scale:{block}:{_fmt_param(float(k))}", "scale", block, {"k": float(k)},
                   f"{block} ×{_fmt_param(float(k))}")

    @classmethod
    def bypass(cls, block: str) -> Variant:
        return cls(f"bypass:{block}", "bypass", block, {}, f"{block} bypassed")

    @classmethod
    def swap(cls, block: str, donor: str) -> Variant:
        return cls(f"swap:{block}:{donor}", "swap", block, {"donor": donor}, f"{block} from {donor}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Variant:
        if d.get("block") is not None and not isinstance(d.get("block"), str):
            raise ValueError(f"variant block must be a block id or null, not {d.get('block')!r}"[:120])
        return cls(
            id=str(d["id"]),
            kind=str(d["kind"]),
            block=d.get("block"),
            params=dict(d.get("params") or {}),
            label=str(d.get("label") or ""),
            group=str(d.get("group") or ""),
        )


@dataclass(frozen=True)
class ImageRecord:
    """One generated image: which variant, prompt (index) and seed, and where it lies.

    ``latent`` optionally names the final latent (``.npy`` or ``.pt``) for the latent distance.
    """

    variant: str
    prompt: int
    seed: int
    path: str
    latent: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageRecord:
        latent = d.get("latent")
        if latent is not None and not isinstance(latent, str):
            raise ValueError(f"image latent must be a path or null, not {latent!r}"[:120])
        return cls(str(d["variant"]), _int(d["prompt"]), _int(d["seed"]), str(d["path"]), latent)


@dataclass
class SweepResult:
    """Everything a sweep made: the grid of (variant × prompt × seed) images and what they mean.

    ``prompts`` are A1111 infotext strings (prompt, ``Negative prompt:`` line, parameters line),
    so the exact generation settings travel with the numbers. ``meta`` is free-form (model
    name and hash, device, timings). ``root`` is the folder the relative paths refer to; it is
    not serialised (the folder of ``sweep.json`` when loaded).
    """

    architecture: str
    block_ids: list[str]
    prompts: list[str]
    seeds: list[int]
    variants: list[Variant]
    images: list[ImageRecord] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    root: Path | None = None

    # ---- lookups -------------------------------------------------------------------------
    def variant(self, variant_id: str) -> Variant:
        for v in self.variants:
            if v.id == variant_id:
                return v
        raise BlockmergeError(f"sweep: no variant {variant_id!r}")

    @property
    def baseline(self) -> Variant:
        bases = [v for v in self.variants if v.kind == "baseline"]
        if len(bases) != 1:
            raise BlockmergeError(f"sweep: needs exactly one baseline variant, found {len(bases)}")
        return bases[0]

    def image(self, variant_id: str, prompt: int, seed: int) -> ImageRecord | None:
        return self._index().get((variant_id, prompt, seed))

    def _index(self) -> dict[tuple[str, int, int], ImageRecord]:
        return {(r.variant, r.prompt, r.seed): r for r in self.images}

    def groups(self) -> list[str]:
        """Variant groups other than the baseline, in first-seen order."""
        out: list[str] = []
        for v in self.variants:
            if v.kind != "baseline" and v.group not in out:
                out.append(v.group)
        return out

    def group_variants(self, group: str) -> list[Variant]:
        return [v for v in self.variants if v.group == group and v.kind != "baseline"]

    def prompt_title(self, i: int, width: int = 80) -> str:
        """First line of the infotext (the positive prompt), shortened for menus."""
        first = split_lines(self.prompts[i].strip())[0] if self.prompts[i].strip() else f"prompt {i}"
        return first if len(first) <= width else first[: width - 1] + "…"

    def path_of(self, rel: str) -> Path:
        if self.root is None:
            raise BlockmergeError("sweep: root folder unknown; load it with SweepResult.load or set .root")
        return self.root / rel

    # ---- checks --------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`BlockmergeError` on an inconsistent description, before any work."""
        if not self.prompts or not self.seeds:
            raise BlockmergeError("sweep: needs at least one prompt and one seed")
        ids = [v.id for v in self.variants]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise BlockmergeError(f"sweep: duplicate variant ids {sorted(dup)}")
        _ = self.baseline
        seen_group_block: set[tuple[str, str]] = set()
        for v in self.variants:
            if v.block is not None and v.block not in self.block_ids:
                raise BlockmergeError(f"sweep: variant {v.id!r} names block {v.block!r}, not one of {self.architecture}'s")
            if v.block is not None and v.kind != "baseline":
                key = (v.group, v.block)
                if key in seen_group_block:
                    raise BlockmergeError(f"sweep: two variants for block {v.block} in group {v.group!r}")
                seen_group_block.add(key)
        idset = set(ids)
        seen: set[tuple[str, int, int]] = set()
        for r in self.images:
            if r.variant not in idset:
                raise BlockmergeError(f"sweep: image {r.path} names unknown variant {r.variant!r}")
            if not 0 <= r.prompt < len(self.prompts):
                raise BlockmergeError(f"sweep: image {r.path} has prompt index {r.prompt} out of range")
            if r.seed not in self.seeds:
                raise BlockmergeError(f"sweep: image {r.path} has seed {r.seed} not in the sweep's seeds")
            k = (r.variant, r.prompt, r.seed)
            if k in seen:
                raise BlockmergeError(f"sweep: two images for {k}")
            seen.add(k)

    # ---- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "blockmerge.sweep",
            "version": FORMAT_VERSION,
            "architecture": self.architecture,
            "block_ids": list(self.block_ids),
            "prompts": list(self.prompts),
            "seeds": list(self.seeds),
            "variants": [v.to_dict() for v in self.variants],
            "images": [r.to_dict() for r in self.images],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], root: Path | None = None) -> SweepResult:
        try:
            for name in ("block_ids", "prompts", "seeds", "variants"):
                if not isinstance(d[name], list):
                    raise TypeError(f"{name!r} must be a list")
            if not isinstance(d.get("images", []), list):
                raise TypeError("'images' must be a list")
            return cls(
                architecture=str(d["architecture"]),
                block_ids=[str(b) for b in d["block_ids"]],
                prompts=[str(p) for p in d["prompts"]],
                seeds=[_int(s) for s in d["seeds"]],
                variants=[Variant.from_dict(v) for v in d["variants"]],
                images=[ImageRecord.from_dict(r) for r in d.get("images", [])],
                meta=dict(d.get("meta") or {}),
                root=root,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BlockmergeError(f"sweep description: missing or bad field ({str(e)[:160]})") from None

    def save(self, path: Path | None = None, *, overwrite: bool = False) -> Path:
        """Write ``sweep.json`` (into ``root`` by default) through the write policy; returns its path.

        An existing sweep description (blockmerge's own, by its ``format`` field) is replaced, any other
        file of that name only with ``overwrite``.
        """
        from ..io import write_text
        from .outputs import own_output

        if path is None:
            if self.root is None:
                raise BlockmergeError("sweep: no path given and root unknown")
            path = self.root / SWEEP_FILE
        path = Path(path)
        try:
            text = json.dumps(self.to_dict(), indent=1, ensure_ascii=False, allow_nan=False)
        except ValueError:
            raise BlockmergeError(f"{path}: the sweep description holds a non-finite number") from None
        write_text(path, text, overwrite=overwrite, replace_if=own_output)
        return path

    @classmethod
    def load(cls, path: Path) -> SweepResult:
        """Read a sweep description; ``path`` is ``sweep.json`` or the folder holding it."""
        from ..io.text import read_user_text

        path = Path(path)
        if path.is_dir():
            path = path / SWEEP_FILE
        text = read_user_text(path, f"{path} (sweep description)", max_bytes=512 << 20)
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise BlockmergeError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        except RecursionError:
            raise BlockmergeError(f"{path}: not a sweep description (JSON nested too deeply)") from None
        if not isinstance(d, dict):
            raise BlockmergeError(f"{path}: not a sweep description (a JSON {type(d).__name__}, not an object)")
        if d.get("format", "blockmerge.sweep") != "blockmerge.sweep":
            raise BlockmergeError(f"{path}: not a sweep description (format {str(d.get('format'))[:60]!r})")
        try:
            res = cls.from_dict(d, root=path.parent)
        except BlockmergeError as e:
            raise BlockmergeError(f"{path}: {e}") from None
        return res

