"""Infotext fields <-> :class:`~.generate.GenerationParams`, with A1111's defaults and its ``Version`` gates.

Reading applies what A1111 1.10's paste applies: its settings named by infotext fields (``RNG``,
``ENSD``, ``Eta``, ``Pad conds``, ...), the defaults it assumes for missing ones (no ``RNG`` is
``GPU``), the old-hires-fix conversion of ``First pass size``, and the compatibility settings
``infotext_versions.backcompat`` turns on for older ``Version`` values (prompt-editing timelines and
DDIM/PLMS padding before 1.6.0, fp16 ``alphas_cumprod`` before 1.7.0-225). Every field that is not
applied becomes a warning. Writing emits every option that changed the image, in A1111's spelling.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from blockmerge.errors import BlockmergeError

from .infotext import HONOURED_KEYS, INFORMATIONAL_KEYS, KNOWN_UNSUPPORTED, Infotext, unsupported_fields

if TYPE_CHECKING:
    from .generate import GenerationParams

__all__ = ["a1111_version", "infotext_fields", "params_from_infotext"]

_V160 = "1.6.0"
#: The largest ``Batch size`` an infotext can ask blockmerge to redraw (A1111's UI allows 8; its API more).
_MAX_SOURCE_BATCH = 64
_V170_TSNR = "v1.7.0-225"


def a1111_version(text: str | None) -> Any:
    """An A1111 ``Version`` value as ``infotext_versions.parse_version`` reads it (None if not one)."""
    from packaging import version

    if text is None:
        return None
    m = re.match(r"([^-]+-[^-]+)-.*", text)
    if m:
        text = m.group(1)
    try:
        return version.parse(text)
    except version.InvalidVersion:
        return None


def _old_hires_first_pass(width: int, height: int) -> tuple[int, int]:
    # A1111's old_hires_fix_first_pass_dimensions: about 512x512 pixels, rounded up to multiples of 64.
    scale = math.sqrt(512 * 512 / (width * height))
    return math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64


def params_from_infotext(info: Infotext) -> tuple[dict[str, Any], list[str]]:
    """GenerationParams keyword arguments for ``info``, and warnings about what is not applied."""
    from packaging import version

    from .generate import check_seed
    from .noise import RNG_SOURCES
    from .prompts import EMPHASIS_MODES
    from .samplers import SAMPLERS, resolve_sampler

    src = info.source
    info.validate()
    notes = [f"{src}: {n}" for n in info.notes]
    kw: dict[str, Any] = {"prompt": info.prompt, "negative_prompt": info.negative_prompt,
                          "clip_skip": info.clip_skip}
    if info.steps is not None:
        kw["steps"] = info.steps
    if info.cfg_scale is not None:
        kw["cfg_scale"] = info.cfg_scale
    if info.seed is not None:
        kw["seeds"] = (check_seed(info.seed, f"{src}: Seed"),)
    if info.sampler is not None:
        name, schedule = resolve_sampler(info.sampler, info.schedule_type, source=f"{src}: Sampler")
        kw["sampler"], kw["schedule_type"] = name, schedule
    elif info.schedule_type is not None:
        kw["schedule_type"] = resolve_sampler("Euler a", info.schedule_type, source=src)[1]
    size = info.size
    fp = info.first_pass_size
    if fp is not None:
        # A1111's restore_old_hires_fix_params: Size defaults to 512x512, and a 0 on either side of
        # First pass size means the old automatic first pass for that Size.
        size = size or (512, 512)
        if 0 in fp:
            fp = _old_hires_first_pass(*size)
        notes.append(f"{src}: hires fix not applied: A1111 drew a first pass at {fp[0]}x{fp[1]} (First pass size) "
                     f"and upscaled it to {size[0]}x{size[1]}; blockmerge draws the first pass")
        size = fp
    elif any(k.startswith("Hires ") for k in info.params):
        up = info.params.get("Hires upscale") or info.params.get("Hires resize") or "?"
        notes.append(f"{src}: hires fix not applied (Hires upscale/resize: {up}): the image is A1111's first pass "
                     "at Size, before its upscale and second denoise")
    if size is not None:
        kw["width"], kw["height"] = size

    def number(key: str, target: str, cast: type = float) -> None:
        v = info.float_field(key) if cast is float else info.int_field(key)
        if v is not None:
            kw[target] = v

    def flag(key: str, target: str) -> None:
        v = info.bool_field(key)
        if v is not None:
            kw[target] = v

    if info.params.get("Lora hashes"):  # applied with the prompt's <lora:...> (names looked up by hash)
        kw["lora_hashes"] = info.params["Lora hashes"].strip()
    rng = info.params.get("RNG", "GPU").strip()  # A1111: a missing RNG means the default, GPU
    if rng not in RNG_SOURCES:
        raise BlockmergeError(f"{src}: RNG: expected one of {', '.join(RNG_SOURCES)}, got {rng!r}")
    kw["rng"] = rng
    number("ENSD", "ensd", int)
    number("Eta noise seed delta", "ensd", int)
    number("Eta", "eta")
    number("Eta DDIM", "eta_ddim")
    number("Sigma churn", "s_churn")
    number("Sigma tmin", "s_tmin")
    number("Sigma tmax", "s_tmax")
    number("Sigma noise", "s_noise")
    number("Schedule rho", "schedule_rho")
    number("Schedule min sigma", "schedule_min_sigma")
    number("Schedule max sigma", "schedule_max_sigma")
    number("Beta schedule alpha", "beta_alpha")
    number("Beta schedule beta", "beta_beta")
    flag("Discard penultimate sigma", "discard_penultimate")
    flag("SGM noise multiplier", "sgm_noise_multiplier")
    flag("Pad conds", "pad_conds")
    flag("Pad conds v0", "pad_conds_v0")
    flag("Old prompt editing timelines", "old_prompt_editing")
    flag("Downcast alphas_cumprod", "downcast_alphas")
    emphasis = info.params.get("Emphasis")
    if emphasis is not None:
        if emphasis.strip() not in EMPHASIS_MODES:
            raise BlockmergeError(f"{src}: Emphasis: expected one of {', '.join(EMPHASIS_MODES)}, got {emphasis!r}")
        kw["emphasis"] = emphasis.strip()
    noise_schedule = info.params.get("Noise Schedule")
    if noise_schedule is not None:
        if noise_schedule.strip() == "Zero Terminal SNR":
            kw["zero_terminal_snr"] = True
        elif noise_schedule.strip() != "Default":
            notes.append(f"{src}: Noise Schedule {noise_schedule!r} is not applied (known: Default, Zero Terminal SNR)")

    # infotext_versions.backcompat: what older A1111 versions did, switched on by their Version field
    ver = a1111_version(info.params.get("Version"))
    if ver is not None:
        if ver < version.parse(_V160) and "[" in info.prompt:
            kw["old_prompt_editing"] = True
        if ver < version.parse(_V160) and (info.sampler or "") in ("DDIM", "PLMS"):
            kw["pad_conds_v0"] = True
        if ver < version.parse(_V170_TSNR):
            kw["downcast_alphas"] = True
        if ver < version.parse("1.8.0") and info.params.get("Refiner"):
            notes.append(f"{src}: Refiner (switch by sampling steps, A1111 < 1.8) is not applied")

    spec = SAMPLERS.get(kw.get("sampler", "Euler a"))
    size_b, pos_b = info.int_field("Batch size"), info.int_field("Batch pos")
    if size_b is not None and size_b > 1:
        if spec is not None and spec.function == "sample_dpm_adaptive":
            notes.append(f"{src}: Batch size {size_b} with DPM adaptive: A1111 sized its steps on the whole batch; "
                         "blockmerge draws each image as A1111 does at batch size 1")
        elif size_b > _MAX_SOURCE_BATCH:
            notes.append(f"{src}: Batch size {size_b} is not reproduced (over {_MAX_SOURCE_BATCH}); the image is drawn "
                         "at batch size 1, which can differ from it by rounding")
        elif pos_b is None or not 0 <= pos_b < size_b:
            notes.append(f"{src}: Batch size {size_b} without a Batch pos in 0..{size_b - 1} is not reproduced; the "
                         "image is drawn at batch size 1, which can differ from it by rounding")
        else:
            kw["source_batch"] = (size_b, pos_b)
    for key in unsupported_fields(info):
        if key in ("Sampler", "Schedule type") or key.startswith("Hires ") or key == "First pass size":
            continue
        why = KNOWN_UNSUPPORTED.get(key)
        if why is None and key.strip() in HONOURED_KEYS | INFORMATIONAL_KEYS:
            why = f"A1111 reads {key!r} (space before ':') as another key than {key.strip()!r}, so does blockmerge"
        notes.append(f"{src}: field {key!r} is not applied" + (f" ({why})" if why else " (unknown to blockmerge)"))
    return kw, notes


def infotext_fields(params: GenerationParams, applied: dict[str, object]) -> tuple[str, str, dict[str, object]]:
    """(Sampler, Schedule type, the other fields that changed the image) for an image of ``params``."""
    from .noise import effective_source
    from .samplers import SAMPLERS, effective_scheduler, resolve_sampler

    name, label = resolve_sampler(params.sampler, params.schedule_type)
    spec = SAMPLERS[name]
    out: dict[str, object] = {}
    if spec.kind == "timesteps":
        schedule = "Automatic"
    else:
        sched = effective_scheduler(spec, label)
        schedule = sched.label if sched is not None else "Automatic"
    if params.ensd:
        out["ENSD"] = params.ensd
    out["RNG"] = applied.get("RNG") or effective_source(params.rng, "cpu")
    if spec.eta and spec.kind == "timesteps" and params.eta_ddim != 0:
        out["Eta DDIM"] = params.eta_ddim
    elif spec.eta and spec.kind != "timesteps" and params.eta != 1.0:
        out["Eta"] = params.eta
    if spec.churn:
        for key, value, default in (("Sigma churn", params.s_churn, 0.0), ("Sigma tmin", params.s_tmin, 0.0),
                                    ("Sigma tmax", params.s_tmax, 0.0)):
            if value != default:
                out[key] = value
    if spec.s_noise and params.s_noise != 1.0:
        out["Sigma noise"] = params.s_noise
    if spec.kind != "timesteps":
        sched = effective_scheduler(spec, label)
        if sched is not None:
            if params.schedule_min_sigma:
                out["Schedule min sigma"] = params.schedule_min_sigma
            if params.schedule_max_sigma:
                out["Schedule max sigma"] = params.schedule_max_sigma
            if params.schedule_rho and sched.default_rho != -1 and params.schedule_rho != sched.default_rho:
                out["Schedule rho"] = params.schedule_rho
            if sched.name == "beta":
                out["Beta schedule alpha"] = params.beta_alpha
                out["Beta schedule beta"] = params.beta_beta
        if params.discard_penultimate and not spec.discard_penultimate:
            out["Discard penultimate sigma"] = True
        if params.sgm_noise_multiplier:
            out["SGM noise multiplier"] = True
    elif params.discard_penultimate:
        out["Discard penultimate sigma"] = True
    if applied.get("Pad conds"):
        out["Pad conds"] = True
    if applied.get("Pad conds v0"):
        out["Pad conds v0"] = True
    if params.emphasis != "Original":
        out["Emphasis"] = params.emphasis
    if params.old_prompt_editing:
        out["Old prompt editing timelines"] = True
    if params.downcast_alphas:
        out["Downcast alphas_cumprod"] = True
    if params.zero_terminal_snr:
        out["Noise Schedule"] = "Zero Terminal SNR"
    return name, schedule, out
