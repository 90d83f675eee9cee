"""LoRA files as low-rank deltas: group a file's keys into modules and rebuild each module's ΔW.

A LoRA holds, per module of the model it was trained on, a few small tensors whose product is a
change of that module's weight. The formats differ only in how the product is made:

- kohya / A1111 LoRA and LoCon: ``lora_up`` @ ``lora_down`` (convolutions flattened), with an
  optional Tucker core ``lora_mid`` (LyCORIS' "CP" LoCon); ``alpha`` / rank scales it; DoRA files
  add ``dora_scale`` (applied where the model's weight is known, see :func:`apply_dora`);
- LyCORIS LoHa: the elementwise (Hadamard) product of two low-rank products (``hada_*``);
- LyCORIS LoKr: the Kronecker product of two factors, each whole or low-rank (``lokr_*``);
- LyCORIS "full": the difference itself (``diff``, ``diff_b``);
- diffusers / PEFT: ``lora_B`` @ ``lora_A`` (also diffusers' older ``lora.up``/``lora.down`` and
  attention-processor names), scale ``alpha`` / rank when an ``alpha`` is stored, else 1.

Why written here and not taken from the lycoris-lora package: the formulas are a few lines each,
while importing lycoris (with its kernel dispatch) took 10 s on this machine per command; the
tests check every formula against lycoris' own ``diff_weight`` functions.

The scale rules are A1111's (``network.NetworkModule.calc_scale``): a stored ``scale`` wins, else
``alpha / rank`` where both are known, else 1; LoKr's rank is that of its decomposed factor.
Everything is computed in float32 (float64 if a factor is float64).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError

__all__ = ["LoraFile", "LoraModule", "apply_dora", "factor_shape", "group_modules", "lora_factors", "module_delta",
           "open_lora"]

# Key suffix -> role. Longest suffixes are tried first (``lora_down.weight`` before ``weight``).
_ROLES: dict[str, str] = {
    "lora_up.weight": "up", "lora_down.weight": "down", "lora_mid.weight": "mid",
    "lora_B.weight": "up", "lora_A.weight": "down",  # PEFT
    "lora_B.default.weight": "up", "lora_A.default.weight": "down",  # PEFT with its adapter name
    "lora.up.weight": "up", "lora.down.weight": "down",  # diffusers' LoRALinearLayer / LoRACompatible
    "lora_linear_layer.up.weight": "up", "lora_linear_layer.down.weight": "down",
    "alpha": "alpha", "scale": "scale", "dora_scale": "dora_scale",
    "hada_w1_a": "hada_w1_a", "hada_w1_b": "hada_w1_b", "hada_w2_a": "hada_w2_a", "hada_w2_b": "hada_w2_b",
    "hada_t1": "hada_t1", "hada_t2": "hada_t2",
    "lokr_w1": "lokr_w1", "lokr_w1_a": "lokr_w1_a", "lokr_w1_b": "lokr_w1_b",
    "lokr_w2": "lokr_w2", "lokr_w2_a": "lokr_w2_a", "lokr_w2_b": "lokr_w2_b", "lokr_t2": "lokr_t2",
    "diff": "diff", "diff_b": "diff_b",
}
_SUFFIXES = sorted(_ROLES, key=len, reverse=True)
# diffusers' old attention processors: ``...attn1.processor.to_q_lora.down.weight`` is ``...attn1.to_q``.
_PROCESSOR = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(up|down)\.weight$")

#: Module kinds, by the roles they need.
KINDS = ("lora", "loha", "lokr", "full")


@dataclass
class LoraModule:
    """One module of a LoRA file: its name in the file, its kind and the file keys of its tensors."""

    name: str
    keys: dict[str, str] = field(default_factory=dict)  # role -> file key

    @property
    def kind(self) -> str | None:
        r = self.keys
        if "up" in r and "down" in r:
            return "lora"
        if all(k in r for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
            return "loha"
        has1 = "lokr_w1" in r or ("lokr_w1_a" in r and "lokr_w1_b" in r)
        has2 = "lokr_w2" in r or ("lokr_w2_a" in r and "lokr_w2_b" in r)
        if has1 and has2:
            return "lokr"
        if "diff" in r or "diff_b" in r:
            return "full"
        return None

    @property
    def dora(self) -> bool:
        return "dora_scale" in self.keys


def group_modules(keys: Iterable[str]) -> tuple[dict[str, LoraModule], list[str]]:
    """A LoRA file's keys grouped by module (in file order), and the keys no format explains."""
    modules: dict[str, LoraModule] = {}
    unknown: list[str] = []
    for key in keys:
        m = _PROCESSOR.match(key)
        if m:
            name = f"{m[1]}.{m[2]}" + (".0" if m[2] == "to_out" else "")
            modules.setdefault(name, LoraModule(name)).keys["up" if m[3] == "up" else "down"] = key
            continue
        for suffix in _SUFFIXES:
            if key.endswith("." + suffix):
                name = key[: -len(suffix) - 1]
                mod = modules.setdefault(name, LoraModule(name))
                role = _ROLES[suffix]
                if role in mod.keys:
                    raise CheckpointError(f"{key}: module {name} has its {role} twice ({mod.keys[role]})")
                mod.keys[role] = key
                break
        else:
            unknown.append(key)
    # Modules with only scalars (an alpha without factors) or unknown combinations explain nothing.
    for name in [n for n, m in modules.items() if m.kind is None]:
        unknown.extend(modules.pop(name).keys.values())
    return modules, unknown


def _scale(t: Mapping[str, torch.Tensor], rank: int | None) -> float:
    if "scale" in t:
        return float(t["scale"])
    if rank is not None and "alpha" in t:
        return float(t["alpha"]) / rank
    return 1.0


def _float(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.to(torch.float32)


def _tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    # LyCORIS' rebuild_tucker / A1111's make_weight_cp: core (i j k l), wb (j r), wa (i r) -> (r j k l)
    temp = torch.einsum("ijkl,jr->irkl", core, wb)
    return torch.einsum("ijkl,ir->rjkl", temp, wa)


def lora_factors(t: Mapping[str, torch.Tensor], dyn: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A plain LoRA module's (no Tucker core) ``up`` and ``down`` as 2-D float32 (float64 if a
    factor is) matrices, ``dyn`` ranks kept, and its scale: ΔW = scale · up @ down, flattened."""
    up, down = _float(t["up"]), _float(t["down"])
    rank = down.shape[0]
    up2, down2 = up.reshape(up.shape[0], -1), down.reshape(rank, -1)
    if dyn is not None:
        up2, down2 = up2[:, :dyn], down2[:dyn]
    return up2, down2, _scale(t, rank)


def module_delta(kind: str, t: Mapping[str, torch.Tensor], shape: tuple[int, ...], *, name: str = "",
                 dyn: int | None = None) -> torch.Tensor:
    """ΔW of one module, already times its scale (``alpha / rank``), shaped ``shape`` (the module's
    weight: ``(out, in)`` or ``(out, in, kh, kw)``), in float32 (float64 if a factor is).

    ``t`` holds the module's tensors by role; ``dyn`` keeps only the first ``dyn`` ranks of a plain
    LoRA (A1111's ``<lora:name:1:1:dyn>``).
    """
    t = {k: _float(v) for k, v in t.items()}
    if kind == "lora" and "mid" not in t:
        up2, down2, scale = lora_factors(t, dyn)
        delta = up2 @ down2
    elif kind == "lora":
        up, down = t["up"], t["down"]
        rank = down.shape[0]
        up2, down2 = up.reshape(up.shape[0], -1), down.reshape(rank, -1)
        delta = torch.einsum("nmkl,in,mj->ijkl", t["mid"], up2, down2)
        scale = _scale(t, rank)
    elif kind == "loha":
        w1a, w1b, w2a, w2b = t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"]
        rank = w1b.shape[0]
        p1 = _tucker(t["hada_t1"], w1a, w1b) if "hada_t1" in t else w1a @ w1b.reshape(w1b.shape[0], -1)
        p2 = _tucker(t["hada_t2"], w2a, w2b) if "hada_t2" in t else w2a @ w2b.reshape(w2b.shape[0], -1)
        delta = p1 * p2
        scale = _scale(t, rank)
    elif kind == "lokr":
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"].reshape(t["lokr_w2_b"].shape[0], -1)
            if len(shape) == 4:
                w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
        rank = t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else None
        for _ in range(w2.dim() - w1.dim()):
            w1 = w1.unsqueeze(-1)
        delta = torch.kron(w1, w2.contiguous())
        scale = _scale(t, rank)
    elif kind == "full":
        delta = t["diff"].clone()  # callers may scale it in place; never the reader's own tensor
        scale = 1.0
    else:
        raise CheckpointError(f"{name}: unknown LoRA module kind {kind!r}")
    n = 1
    for s in shape:
        n *= s
    if delta.numel() != n:
        raise CheckpointError(f"{name}: the LoRA's {kind} factors make {list(delta.shape)}, but the model's "
                              f"weight there is {list(shape)}")
    delta = delta.reshape(shape)
    return delta.mul_(scale) if scale != 1.0 else delta


def apply_dora(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """DoRA's change of ``weight`` for a scaled ΔW, as A1111 computes it (``apply_weight_decompose``):
    ``m · (W + ΔW) / ||W + ΔW|| - W``, the norm taken per input column (kohya's layout,
    ``dora_scale`` of shape ``(1, in, ...)``) or per output row when ``dora_scale`` is ``(out, 1, ...)``
    (LyCORIS' ``wd_on_out``, PEFT)."""
    w = weight.to(delta.dtype)
    merged = w + delta
    m = dora_scale.to(delta.dtype)
    out_dim, in_dim = merged.shape[0], merged.shape[1]
    if m.numel() == in_dim and (m.dim() == 1 or m.shape[0] == 1):
        norm = merged.transpose(0, 1).reshape(in_dim, -1).norm(dim=1).reshape(1, in_dim, *[1] * (merged.dim() - 2))
    elif m.numel() == out_dim:
        norm = merged.reshape(out_dim, -1).norm(dim=1).reshape(out_dim, *[1] * (merged.dim() - 1))
    else:
        raise CheckpointError(f"dora_scale of shape {list(m.shape)} fits neither the {in_dim} inputs nor the "
                              f"{out_dim} outputs of a {list(merged.shape)} weight")
    return merged * (m.reshape(norm.shape) / norm) - w


@dataclass
class LoraFile:
    """An open LoRA file: its modules, the keys no format explains, its metadata."""

    path: Path
    reader: object = field(repr=False)
    modules: dict[str, LoraModule]
    unknown: list[str]
    metadata: dict[str, str]

    def tensors(self, module: LoraModule) -> dict[str, torch.Tensor]:
        return {role: self.reader.get(key) for role, key in module.keys.items()}  # type: ignore[attr-defined]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.reader.info(key).shape)  # type: ignore[attr-defined]

    def rank(self, module: LoraModule) -> int | None:
        """The module's rank (its down projection's rows; LoHa's and LoKr's factor rank), if it has one."""
        for role in ("down", "hada_w1_b", "lokr_w1_b", "lokr_w2_b"):
            if role in module.keys:
                return self.shape(module.keys[role])[0]
        return None

    def close(self) -> None:
        self.reader.close()  # type: ignore[attr-defined]

    def __enter__(self) -> LoraFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_SCALARS = ("alpha", "scale")


def _check_module(path: Path, reader: object, m: LoraModule) -> None:
    """Refuse a module whose tensors cannot make a ΔW, naming the file and module, before any
    command uses it: every command (apply, merge, resize, blocks, sweeps) then meets only modules
    that work, instead of an error deep in its own arithmetic, or a merged file as broken.

    ``alpha``/``scale`` must be one finite number (A1111 would scale by NaN and draw black). The
    factors' shapes are checked by running the module's own formula (:func:`module_delta`) on meta
    tensors, which carry shapes and no data: one rule for every kind, and the same one that runs.
    """
    info = reader.info  # type: ignore[attr-defined]
    where = f"{path}: module {m.name}"
    tensors: dict[str, torch.Tensor] = {}
    for role, key in m.keys.items():
        shape = tuple(info(key).shape)
        if role in _SCALARS:
            if math.prod(shape) != 1:
                raise CheckpointError(f"{where}: its {role} holds {math.prod(shape)} values, not one number")
            value = float(reader.get(key).reshape(-1)[0])  # type: ignore[attr-defined]
            if not math.isfinite(value):
                raise CheckpointError(f"{where}: its {role} is {value}, not a finite number")
            tensors[role] = torch.tensor(value)
        elif role == "dora_scale":
            continue  # checked against the model's weight when applied (apply_dora)
        elif 0 in shape or not shape:
            raise CheckpointError(f"{where}: its {role} ({key}) has shape {list(shape)}: no values to make a ΔW of")
        else:
            tensors[role] = torch.empty(shape, device="meta")
    kind = m.kind or ""
    if kind == "full" and "diff" not in tensors:
        return  # a bias-only module (diff_b): added as it is
    try:
        natural = factor_shape(kind, {r: tuple(t.shape) for r, t in tensors.items()})
        module_delta(kind, tensors, natural or (), name=where)
    except CheckpointError:
        raise
    except (RuntimeError, ValueError, IndexError, KeyError) as e:
        shapes = ", ".join(f"{r} {list(t.shape)}" for r, t in tensors.items() if r not in _SCALARS)
        raise CheckpointError(f"{where}: its {kind} factors do not fit together ({shapes})") from e


def factor_shape(kind: str | None, s: Mapping[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    """The shape of the weight a module's factors make, given the factors' shapes by role (None for
    a bias-only module). Convolutions come out 4-D where the factors say so, else flattened 2-D."""
    if kind == "lora":
        up, down = s["up"], s["down"]
        if "mid" in s:
            return (up[0], down[1], *s["mid"][2:])
        return (up[0], *down[1:]) if len(down) > 1 else (up[0], 1)
    if kind == "loha":
        a, b = s["hada_w1_a"], s["hada_w1_b"]
        if "hada_t1" in s:
            return (a[1], b[1], *s["hada_t1"][2:])
        return (a[0], *b[1:])
    if kind == "lokr":
        w1 = s["lokr_w1"] if "lokr_w1" in s else (s["lokr_w1_a"][0], s["lokr_w1_b"][1])
        if "lokr_w2" in s:
            w2 = s["lokr_w2"]
        elif "lokr_t2" in s:
            w2 = (s["lokr_w2_a"][1], s["lokr_w2_b"][1], *s["lokr_t2"][2:])
        else:
            w2 = (s["lokr_w2_a"][0], *s["lokr_w2_b"][1:])
        return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
    if kind == "full":
        return s.get("diff")
    return None


def open_lora(path: str | os.PathLike[str]) -> LoraFile:
    """Open a LoRA file (safetensors, or a PyTorch pickle read without running code) and group its keys.

    A file with no LoRA module at all is an error naming it (a checkpoint given where a LoRA was
    expected, say).
    """
    from ..io import open_checkpoint

    p = Path(path)
    reader = open_checkpoint(p)
    try:
        modules, unknown = group_modules(reader.keys())
        if not modules:
            hint = ""
            if any(k.startswith(("model.diffusion_model.", "double_blocks.", "cond_stage_model.")) for k in reader.keys()):
                hint = " (it looks like a checkpoint, not a LoRA)"
            raise CheckpointError(f"{p}: not a LoRA: no LoRA, LoCon, LoHa, LoKr or diff modules in its "
                                  f"{len(reader.keys())} tensors{hint}")
        for m in modules.values():
            for role, key in m.keys.items():
                if not reader.info(key).dtype.is_floating_point:
                    raise CheckpointError(f"{p}: {key}: the {role} of a LoRA module must be floating point")
            _check_module(p, reader, m)
    except Exception:
        reader.close()
        raise
    return LoraFile(p, reader, modules, unknown, dict(reader.metadata))
