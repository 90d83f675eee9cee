"""A1111's samplers, schedules and noise, checked against k-diffusion's own code (from its wheel) and
against independent computations, end to end on the bundled tiny SD1 model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import kdiffusion_ref
from blockmerge.errors import BlockmergeError
from blockmerge.generation.generate import GenerationParams, encode_prompts, generate
from blockmerge.generation.noise import ImageNoise, effective_source, philox_randn
from blockmerge.generation.samplers import SAMPLERS, SCHEDULE_TYPES, SigmaOptions, k_sigmas, resolve_sampler
from blockmerge.generation.schedules import DiscreteSchedule, ldm_alphas_cumprod
from blockmerge.generation.tsamplers import a1111_timesteps

pytestmark = pytest.mark.usefixtures("single_torch_thread")

PROMPT = "a large red circle on the left, white background"
NEG = "blurry"


def _ref_alphas(downcast: bool = False) -> torch.Tensor:
    # LDM's register_schedule, computed here independently: float64 betas and cumprod, then float32.
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    ac = torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32)
    return ac.half() if downcast else ac


def test_alphas_cumprod_are_ldms() -> None:
    assert torch.equal(ldm_alphas_cumprod(), _ref_alphas())
    assert ldm_alphas_cumprod(downcast=True).dtype == torch.float16


# --- names as A1111 reads them --------------------------------------------------------------------


@pytest.mark.parametrize(("name", "schedule", "expected"), [
    ("DPM++ 2M", None, ("DPM++ 2M", "Automatic")),
    ("DPM++ 2M Karras", None, ("DPM++ 2M", "Automatic")),  # Karras is its default: Automatic
    ("DPM++ 2M", "Karras", ("DPM++ 2M", "Automatic")),
    ("DPM++ 2M", "Exponential", ("DPM++ 2M", "Exponential")),
    ("Euler a Karras", None, ("Euler a", "Karras")),
    ("DPM++ 2M SDE Exponential", None, ("DPM++ 2M SDE", "Automatic")),
    ("DPM++ 2M SDE Karras", None, ("DPM++ 2M SDE", "Karras")),
    ("DPM++ 2M SDE Heun Karras", None, ("DPM++ 2M SDE Heun", "Karras")),
    ("LMS Karras", None, ("LMS", "Karras")),
    ("Euler", "SGMUniform", ("Euler", "SGM Uniform")),
    ("Euler", "sgm_uniform", ("Euler", "SGM Uniform")),
    ("DDIM", None, ("DDIM", "Automatic")),
])
def test_resolve_sampler_as_a1111(name, schedule, expected) -> None:
    assert resolve_sampler(name, schedule) == expected


def test_unknown_names_are_errors() -> None:
    with pytest.raises(BlockmergeError, match=r"unknown sampler 'Euler b'.*DPM\+\+ 2M.*Euler a"):
        resolve_sampler("Euler b")
    with pytest.raises(BlockmergeError, match="Schedule type.*'Fancy'"):
        resolve_sampler("Euler", "Fancy")
    for required in ("DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE", "DPM2", "DPM2 a",
                     "DPM fast", "DPM adaptive", "Restart", "LCM", "DDIM CFG++", "UniPC", "PLMS"):
        assert required in SAMPLERS
    assert {"Automatic", "Uniform", "Karras", "Exponential", "SGM Uniform", "KL Optimal", "Align Your Steps",
            "Simple", "Normal", "DDIM", "Beta", "Polyexponential"} <= set(SCHEDULE_TYPES)


# --- sigma sequences ------------------------------------------------------------------------------


def _ref_schedule():
    _, external = kdiffusion_ref.load()

    class Inner:
        alphas_cumprod = _ref_alphas()

    return external.CompVisDenoiser(Inner())


def _ref_sigmas(name: str, schedule: str, n: int) -> torch.Tensor:
    """The sigmas A1111 would use, from k-diffusion's functions and the rules of sd_schedulers.py."""
    sampling, _ = kdiffusion_ref.load()
    wrap = _ref_schedule()
    spec = SAMPLERS[name]
    discard = spec.discard_penultimate
    n = n + 1 if discard else n
    if schedule == "Automatic":
        schedule = {"karras": "Karras", "exponential": "Exponential", None: "Uniform"}[spec.scheduler]
    smin, smax = wrap.sigmas[0].item(), wrap.sigmas[-1].item()
    if schedule == "Uniform":
        s = wrap.get_sigmas(n)
    elif schedule == "Karras":
        s = sampling.get_sigmas_karras(n, smin, smax)
    elif schedule == "Exponential":
        s = sampling.get_sigmas_exponential(n, smin, smax)
    elif schedule == "Polyexponential":
        s = sampling.get_sigmas_polyexponential(n, smin, smax, rho=1.0)
    elif schedule in ("SGM Uniform", "Normal"):
        a, b = wrap.sigma_to_t(torch.tensor(smax)), wrap.sigma_to_t(torch.tensor(smin))
        ts = torch.linspace(a, b, n + 1)[:-1] if schedule == "SGM Uniform" else torch.linspace(a, b, n)
        s = torch.tensor([wrap.t_to_sigma(t).item() for t in ts] + [0.0])
    elif schedule == "KL Optimal":
        lo, hi = math.atan(smin), math.atan(smax)
        s = torch.tensor([math.tan(i / n * lo + (1 - i / n) * hi) for i in range(n + 1)])
    elif schedule == "Simple":
        s = torch.tensor([wrap.sigmas[-(1 + int(x * 1000 / n))].item() for x in range(n)] + [0.0])
    elif schedule == "DDIM":
        s = torch.tensor([wrap.sigmas[i].item() for i in range(1, 1000, max(1000 // n, 1))][::-1] + [0.0])
    elif schedule == "Beta":
        from scipy import stats

        s = torch.tensor([smin + stats.beta.ppf(1 - i / (n - 1) if n > 1 else 1, 0.6, 0.6) * (smax - smin)
                          for i in range(n)] + [0.0])
    elif schedule == "Align Your Steps":
        ays = np.array([14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029])
        if n == 11:
            s = torch.tensor([*ays, 0.0])
        else:
            log_interp = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, 11), np.log(ays[::-1]))
            s = torch.tensor([*np.exp(log_interp)[::-1], 0.0])
    else:
        raise AssertionError(schedule)
    if discard:
        s = torch.cat([s[:-2], s[-1:]])
    return s.float()


_K_SAMPLERS = [n for n, s in SAMPLERS.items() if s.kind == "k" and n not in ("DPM fast", "DPM adaptive")]


@pytest.mark.parametrize("steps", [1, 2, 7, 20, 33])
@pytest.mark.parametrize("name", _K_SAMPLERS)
def test_automatic_sigmas_equal_a1111s(name: str, steps: int) -> None:
    ours = k_sigmas(SAMPLERS[name], "Automatic", steps, DiscreteSchedule(ldm_alphas_cumprod()))
    ref = _ref_sigmas(name, "Automatic", steps)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=2e-6, atol=1e-6)
    assert ours[-1] == 0 or ours[-1] > 0  # KL Optimal ends at sigma_min; all others at 0


@pytest.mark.parametrize("schedule", [s for s in SCHEDULE_TYPES if s != "Automatic"])
@pytest.mark.parametrize("steps", [3, 11, 20])
def test_every_schedule_type_equals_a1111s(schedule: str, steps: int) -> None:
    for name in ("Euler", "DPM2"):  # DPM2 drops the penultimate sigma on top of any schedule
        ours = k_sigmas(SAMPLERS[name], schedule, steps, DiscreteSchedule(ldm_alphas_cumprod()))
        torch.testing.assert_close(ours, _ref_sigmas(name, schedule, steps), rtol=2e-5, atol=2e-6)


def test_sigma_options() -> None:
    inner = DiscreteSchedule(ldm_alphas_cumprod())
    spec = SAMPLERS["DPM++ 2M"]
    sampling, _ = kdiffusion_ref.load()
    got = k_sigmas(spec, "Automatic", 10, inner, SigmaOptions(rho=3.0, sigma_min=0.1, sigma_max=10.0))
    torch.testing.assert_close(got, sampling.get_sigmas_karras(10, 0.1, 10.0, rho=3.0))
    got = k_sigmas(SAMPLERS["Euler"], "Automatic", 10, inner, SigmaOptions(discard_penultimate=True))
    ref = _ref_schedule().get_sigmas(11)
    torch.testing.assert_close(got, torch.cat([ref[:-2], ref[-1:]]))


@pytest.mark.parametrize(("steps", "count"), [(20, 20), (30, 31), (7, 8), (1, 1)])
def test_timestep_samplers_step_counts(steps: int, count: int) -> None:
    ts = a1111_timesteps(steps)
    assert len(ts) == count
    assert ts[0] == 1 and ts[1] == 1 + 1000 // steps if count > 1 else ts[0] == 1


# --- noise sources --------------------------------------------------------------------------------


def test_nv_stream_is_torch_cuda_randn() -> None:
    # torch.randn((3, 4), generator=cuda seeded 0): the values A1111's rng_philox documents
    cuda = np.array([[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
                     [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
                     [-1.07454231, -0.36314407, -1.67105067, 2.26550497]], dtype=np.float32)
    ours = philox_randn(0, 0, (3, 4))
    assert ours.dtype == np.float32 and np.abs(ours - cuda).max() < 1e-6
    assert not np.array_equal(philox_randn(0, 1, (3, 4)), ours)  # the next call continues the stream
    assert not np.array_equal(philox_randn(1, 0, (3, 4)), ours)


@pytest.mark.parametrize("source", ["CPU", "NV"])
def test_image_noise_is_per_seed_and_continues(source: str) -> None:
    a = ImageNoise((4, 8, 8), [5, 6], source, "cpu")
    first, second = a.first(), a.next()
    b = ImageNoise((4, 8, 8), [6], source, "cpu")
    assert torch.equal(b.first()[0], first[1]) and torch.equal(b.next()[0], second[1])
    if source == "CPU":
        g = torch.Generator().manual_seed(5)
        assert torch.equal(first[0], torch.randn((4, 8, 8), generator=g))
        assert torch.equal(second[0], torch.randn((4, 8, 8), generator=g))
    # ENSD: the later draws come from a generator seeded seed + ENSD
    e = ImageNoise((4, 8, 8), [5], source, "cpu", ensd=31337)
    assert torch.equal(e.first()[0], first[0])
    fresh = ImageNoise((4, 8, 8), [5 + 31337], source, "cpu")
    assert torch.equal(e.next()[0], fresh.first()[0])


def test_gpu_off_cuda_draws_nv() -> None:
    assert effective_source("GPU", "cpu") == "NV"
    assert effective_source("CPU", "cpu") == "CPU"
    with pytest.raises(BlockmergeError, match="RNG"):
        effective_source("TPU", "cpu")


# --- end to end against k-diffusion's loops -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from blockmerge.generation.loader import load_pipeline
    from blockmerge.models import resolve_model

    return load_pipeline(resolve_model("tiny-a"), device="cpu")


class _Hijack:
    """A1111's TorchHijack: k-diffusion's torch.randn_like becomes the images' noise streams."""

    def __init__(self, draw):
        self.draw = draw

    def __getattr__(self, item):
        return getattr(torch, item)

    def randn_like(self, x):
        return self.draw()


def _reference(tiny, params: GenerationParams, seeds: list[int]) -> torch.Tensor:
    """What A1111 would compute: k-diffusion's sampler over CompVisDenoiser, CFG, CPU RNG streams."""
    sampling, external = kdiffusion_ref.load()
    unet = tiny.pipeline.unet
    emb = encode_prompts(tiny, params)
    c = emb.conds[0][0][0][1].crossattn
    u = emb.uncond[0][1].crossattn

    class Inner:
        alphas_cumprod = _ref_alphas()

        def apply_model(self, x, t, cond):
            return unet(x, t, encoder_hidden_states=cond).sample

    wrap = external.CompVisDenoiser(Inner())
    b = len(seeds)

    def cfg(x, sigma, **_):
        out = wrap(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([c.repeat(b, 1, 1), u.repeat(b, 1, 1)]))
        cond_out, uncond_out = out[:b], out[b:]
        return uncond_out + (cond_out - uncond_out) * params.cfg_scale

    gens = [torch.Generator().manual_seed(s) for s in seeds]

    def draw():
        return torch.stack([torch.randn((4, 8, 8), generator=g) for g in gens])

    x = draw()
    name, schedule = resolve_sampler(params.sampler, params.schedule_type)
    spec = SAMPLERS[name]
    func = getattr(sampling, spec.function)
    import inspect

    # A1111's Sampler.initialize: every k-diffusion function that takes eta gets opts.eta_ancestral (1)
    eta = {"eta": 1.0} if "eta" in inspect.signature(func).parameters else {}
    saved = sampling.torch
    sampling.torch = _Hijack(draw)
    try:
        with torch.inference_mode():
            if spec.function in ("sample_dpm_fast", "sample_dpm_adaptive"):
                s = wrap.get_sigmas(params.steps)
                kw = {"n": params.steps} if spec.function == "sample_dpm_fast" else {}
                return func(cfg, x * s[0], wrap.sigmas[0].item(), wrap.sigmas[-1].item(), disable=True, **kw, **eta)
            sigmas = _ref_sigmas(name, schedule, params.steps)
            kw = {}
            if spec.brownian:
                kw["noise_sampler"] = sampling.BrownianTreeNoiseSampler(
                    x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seeds)
            if spec.solver_type:
                kw["solver_type"] = spec.solver_type
            return func(cfg, x * sigmas[0], sigmas, disable=True, **kw, **eta)
    finally:
        sampling.torch = saved


_KD = [n for n, s in SAMPLERS.items() if s.kind == "k" and s.function not in ("restart",)]


@pytest.mark.parametrize("name", _KD)
def test_sampler_equals_k_diffusion(tiny, name: str) -> None:
    steps = 4 if name != "DPM adaptive" else 3
    p = GenerationParams(prompt=PROMPT, negative_prompt=NEG, steps=steps, sampler=name, cfg_scale=6.0,
                         seeds=(3, 4), rng="CPU")
    seeds = [3] if name == "DPM adaptive" else [3, 4]  # adaptive: one image at a time
    ours = torch.stack([g.latent for g in generate(tiny, p, seeds=seeds)])
    ref = _reference(tiny, p, seeds)
    assert torch.isfinite(ours).all()
    assert (ours - ref).abs().max().item() < 1e-4, name


@pytest.mark.parametrize(("name", "schedule"), [("Euler", "Karras"), ("DPM++ 2M", "Exponential"),
                                                ("Euler a", "Polyexponential"), ("DPM++ SDE", "Uniform"),
                                                ("DPM++ 2M SDE", "Karras")])
def test_schedule_types_end_to_end(tiny, name: str, schedule: str) -> None:
    p = GenerationParams(prompt=PROMPT, steps=4, sampler=name, schedule_type=schedule, seeds=(9,), rng="CPU")
    ours = generate(tiny, p)[0].latent[None]
    assert (ours - _reference(tiny, p, [9])).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_is_deterministic_and_batch_equals_single(tiny, name: str) -> None:
    steps = 3 if name not in ("UniPC",) else 4
    p = GenerationParams(prompt=PROMPT, negative_prompt=NEG, steps=steps, sampler=name, seeds=(1, 2))
    a = generate(tiny, p)
    b = generate(tiny, p)
    single = [generate(tiny, p, seeds=[s])[0] for s in (1, 2)]
    for x, y, z in zip(a, b, single, strict=True):
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image))  # same seed twice: same pixels
        assert np.abs(np.asarray(x.image, np.int16) - np.asarray(z.image, np.int16)).max() <= 1
        assert torch.isfinite(x.latent).all()
    assert not torch.equal(a[0].latent, a[1].latent)


def test_unipc_is_finite_at_every_step_count(tiny) -> None:
    """The old diffusers UniPC gave NaN latents (all-black PNGs) on this model at every step count."""
    for steps in (3, 5, 8, 20):
        out = generate(tiny, GenerationParams(prompt=PROMPT, steps=steps, sampler="UniPC", seeds=(1,)))[0]
        assert torch.isfinite(out.latent).all() and np.asarray(out.image).std() > 1
    with pytest.raises(BlockmergeError, match="UniPC"):
        generate(tiny, GenerationParams(prompt=PROMPT, steps=2, sampler="UniPC", seeds=(1,)))


def test_brownian_noise_comes_from_the_seed(tiny) -> None:
    p = GenerationParams(prompt=PROMPT, steps=4, sampler="DPM++ SDE", seeds=(5,), rng="CPU")
    torch.manual_seed(0)
    a = generate(tiny, p)[0].latent
    torch.manual_seed(123)  # the global RNG must not matter
    b = generate(tiny, p)[0].latent
    assert torch.equal(a, b)
    assert not torch.equal(a, generate(tiny, GenerationParams(prompt=PROMPT, steps=4, sampler="DPM++ SDE",
                                                                seeds=(6,), rng="CPU"))[0].latent)
    nv = generate(tiny, GenerationParams(prompt=PROMPT, steps=4, sampler="DPM++ SDE", seeds=(5,), rng="NV"))[0]
    assert not torch.equal(a, nv.latent)  # the tree draws from the chosen source


def test_ensd_changes_ancestral_noise_only(tiny) -> None:
    base = GenerationParams(prompt=PROMPT, steps=4, sampler="Euler a", seeds=(5,), rng="CPU")
    with_ensd = GenerationParams(prompt=PROMPT, steps=4, sampler="Euler a", seeds=(5,), rng="CPU", ensd=31337)
    assert not torch.equal(generate(tiny, base)[0].latent, generate(tiny, with_ensd)[0].latent)
    euler = GenerationParams(prompt=PROMPT, steps=4, sampler="Euler", seeds=(5,), rng="CPU")
    euler_ensd = GenerationParams(prompt=PROMPT, steps=4, sampler="Euler", seeds=(5,), rng="CPU", ensd=31337)
    assert torch.equal(generate(tiny, euler)[0].latent, generate(tiny, euler_ensd)[0].latent)


# --- A1111's own loops against independent references ----------------------------------------------


def _cfg_eps(tiny, params: GenerationParams, b: int):
    """Classifier-free-guided eps of the U-Net at integer/float timesteps (the timestep samplers' model)."""
    emb = encode_prompts(tiny, params)
    c = emb.conds[0][0][0][1].crossattn.repeat(b, 1, 1)
    u = emb.uncond[0][1].crossattn.repeat(b, 1, 1)
    unet = tiny.pipeline.unet

    def eps(x, t):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        out = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([c, u])).sample
        return out[b:] + (out[:b] - out[b:]) * params.cfg_scale

    return eps


def _start(seeds: list[int]) -> torch.Tensor:
    return torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(s)) for s in seeds])


def test_ddim_equals_diffusers_ddim(tiny) -> None:
    """A1111's DDIM (its timesteps, stopping at t=1) is diffusers' DDIMScheduler stepping over the same
    timesteps with the same alphas."""
    from diffusers import DDIMScheduler

    for steps in (5, 7):
        p = GenerationParams(prompt=PROMPT, negative_prompt=NEG, steps=steps, sampler="DDIM", seeds=(3,), rng="CPU")
        ours = generate(tiny, p)[0].latent
        sched = DDIMScheduler(num_train_timesteps=1000, set_alpha_to_one=False, clip_sample=False)
        sched.alphas_cumprod = _ref_alphas()
        sched.num_inference_steps = 1000 // (1000 // steps)
        ts = [int(t) for t in a1111_timesteps(steps)]
        eps, x = _cfg_eps(tiny, p, 1), _start([3])
        with torch.inference_mode():
            for i in range(len(ts) - 1, 0, -1):
                # diffusers steps to t - 1000 // num_inference_steps, which is A1111's previous timestep
                assert ts[i] - 1000 // sched.num_inference_steps == ts[i - 1]
                x = sched.step(eps(x, ts[i]), ts[i], x, eta=0.0).prev_sample
        assert (ours - x[0]).abs().max().item() < 1e-4


def test_plms_and_ddim_cfgpp_equal_their_formulas(tiny) -> None:
    ac = _ref_alphas().double()
    steps = 6
    ts = [int(t) for t in a1111_timesteps(steps)]
    for name in ("PLMS", "DDIM CFG++"):
        p = GenerationParams(prompt=PROMPT, negative_prompt=NEG, steps=steps, sampler=name, seeds=(2,), rng="CPU")
        ours = generate(tiny, p)[0].latent
        emb = encode_prompts(tiny, p)
        c, u = emb.conds[0][0][0][1].crossattn, emb.uncond[0][1].crossattn
        unet = tiny.pipeline.unet
        x = _start([2])

        def both(x, t, c=c, u=u, unet=unet):
            tt = torch.tensor([float(t)] * 2)
            out = unet(torch.cat([x, x]), tt, encoder_hidden_states=torch.stack([c, u])).sample
            return out[:1], out[1:]

        def step(x, e, t, t_prev, direction=None):
            a, a_prev = ac[t].item(), ac[t_prev].item()
            x0 = (x - (1 - a) ** 0.5 * e) / a**0.5
            return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * (e if direction is None else direction)

        old: list[torch.Tensor] = []
        with torch.inference_mode():
            for i in range(len(ts) - 1, 0, -1):
                ce, ue = both(x, ts[i])
                if name == "DDIM CFG++":
                    e = ue + (ce - ue) * (p.cfg_scale / 12.5)
                    x = step(x, e, ts[i], ts[i - 1], direction=ue)
                    continue
                e = ue + (ce - ue) * p.cfg_scale
                if not old:
                    ce2, ue2 = both(step(x, e, ts[i], ts[i - 1]), ts[i - 1])
                    e_prime = (e + ue2 + (ce2 - ue2) * p.cfg_scale) / 2
                else:
                    coeffs = {1: [3, -1], 2: [23, -16, 5], 3: [55, -59, 37, -9]}[min(len(old), 3)]
                    div = {1: 2, 2: 12, 3: 24}[min(len(old), 3)]
                    hist = [e, *old[::-1]][: len(coeffs)]
                    e_prime = sum(k * h for k, h in zip(coeffs, hist, strict=True)) / div
                x = step(x, e_prime, ts[i], ts[i - 1])
                old = (old + [e])[-3:]
        assert (ours - x[0]).abs().max().item() < 5e-4, name  # the formulas here run in float64


def test_unipc_equals_diffusers_unipc_on_an_exact_grid(tiny) -> None:
    """26 steps are 27 timesteps: A1111's continuous times then fall on whole timesteps
    (999, 962, ..., 0), where diffusers' UniPC (bh1, order 3, x0 prediction, ending at sigma_min) is the
    same algorithm."""
    from diffusers import UniPCMultistepScheduler

    p = GenerationParams(prompt=PROMPT, negative_prompt=NEG, steps=26, sampler="UniPC", seeds=(4,), rng="CPU")
    ours = generate(tiny, p)[0].latent
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    sched = UniPCMultistepScheduler(num_train_timesteps=1000, trained_betas=betas.tolist(), solver_order=3,
                                    solver_type="bh1", predict_x0=True, lower_order_final=True,
                                    timestep_spacing="linspace", final_sigmas_type="sigma_min")
    sched.set_timesteps(27)
    assert [int(t) for t in sched.timesteps] == list(range(999, 0, -37))
    eps, x = _cfg_eps(tiny, p, 1), _start([4])
    with torch.inference_mode():
        for t in sched.timesteps:
            x = sched.step(eps(x, t), t, x).prev_sample
    assert (ours - x[0]).abs().max().item() < 2e-3


def test_restart_equals_heun_segments_of_k_diffusion(tiny) -> None:
    """Restart is Heun steps over A1111's step list (a Karras schedule with 9 restart steps back up to
    sigma 2 at sigma 0.1, for 20+ steps), re-noised with the image's stream on the way up."""
    sampling, _ = kdiffusion_ref.load()
    steps = 20
    p = GenerationParams(prompt=PROMPT, steps=steps, sampler="Restart", seeds=(7,), rng="CPU", cfg_scale=5.0)
    ours = generate(tiny, p)[0].latent
    eps = _cfg_eps(tiny, p, 1)
    wrap = _ref_schedule()

    def denoise(x, sigma, **_):
        t = wrap.sigma_to_t(sigma)
        return x - eps(x / (sigma[:, None, None, None] ** 2 + 1) ** 0.5, t) * sigma[:, None, None, None]

    full = sampling.get_sigmas_karras(steps, wrap.sigmas[0].item(), wrap.sigmas[-1].item())
    main = sampling.get_sigmas_karras(steps - 9, full[-2].item(), full[0].item())
    at = int(torch.argmin((main - 0.1).abs()))
    top = int(torch.argmin((main - 2).abs()))
    pairs = [(main[i], main[i + 1]) for i in range(len(main) - 1)]
    restart = sampling.get_sigmas_karras(10, main[at].item(), main[top].item())[:-1]
    pairs[at:at] = list(zip(restart[:-1], restart[1:], strict=True))
    g = torch.Generator().manual_seed(7)
    x = torch.randn((4, 8, 8), generator=g)[None] * full[0]
    last = None
    with torch.inference_mode():
        for s0, s1 in pairs:
            if last is not None and last < s0:
                x = x + torch.randn((4, 8, 8), generator=g)[None] * (s0**2 - last**2) ** 0.5
            x = sampling.sample_heun(denoise, x, torch.stack([s0, s1]), disable=True)
            last = s1
    assert (ours - x[0]).abs().max().item() < 1e-4


def test_lcm_equals_its_consistency_formula(tiny) -> None:
    """LCM: 50 original timesteps (19, 39, ..., 999), the consistency-model output at the nearest one,
    re-noised to the next sigma with the image's stream."""
    steps = 4
    p = GenerationParams(prompt=PROMPT, steps=steps, sampler="LCM", seeds=(8,), rng="CPU", cfg_scale=1.5)
    ours = generate(tiny, p)[0].latent
    eps = _cfg_eps(tiny, p, 1)
    ac = _ref_alphas()
    valid = ac[19::20]  # alphas of timesteps 19, 39, ..., 999
    sig = ((1 - valid) / valid) ** 0.5
    t_cont = torch.linspace(999, 19, steps)
    idx = ((t_cont - 19) / 20).clamp(0, 49)
    lo, hi, w = idx.floor().long(), idx.ceil().long(), idx.frac()
    sigmas = torch.cat([((1 - w) * sig.log()[lo] + w * sig.log()[hi]).exp(), torch.zeros(1)])
    g = torch.Generator().manual_seed(8)
    x = torch.randn((4, 8, 8), generator=g)[None] * sigmas[0]
    with torch.inference_mode():
        for i in range(steps):
            s = sigmas[i]
            t = (sig.log() - s.log()).abs().argmin() * 20 + 19
            x0 = x - eps(x / (s**2 + 1) ** 0.5, t.float()) * s
            st = t.float() * 10.0
            x = st / (st**2 + 0.25) ** 0.5 * x0 + 0.25 / (st**2 + 0.25) * x
            if sigmas[i + 1] > 0:
                x = x + sigmas[i + 1] * torch.randn((4, 8, 8), generator=g)[None]
    assert (ours - x[0]).abs().max().item() < 1e-4
