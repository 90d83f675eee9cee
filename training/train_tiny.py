"""Train the two bundled tiny models (A: flat shapes; B: fine-tuned from A on outlined shapes).

Run from the repository root (never in CI; about 40 minutes on an idle 2-core CPU):

    PYTHONPATH=src python training/train_tiny.py --out /tmp/tiny-train
    PYTHONPATH=src python training/train_tiny.py --out /tmp/tiny-train --export-only

Phases, each seeded and resumable from its saved diffusers state dict in ``--out``:

1. VAE (SD's AutoencoderKL, SD's four levels: 64 px images -> 8x8x4 latents), trained on both styles
   with L1 + MSE reconstruction weighted 10x on and around the shape, an edge term and a small KL
   term, then reparameterised so that latents times SD1's scaling factor 0.18215 have unit variance
   (the loader uses SD1's factor; no special case). Then the decoder alone is refined on the frozen
   encoder's latents with a little noise added, so it draws clean shapes from generated latents.
2. Model A: SD1-layout U-Net (12 input blocks, cross-attention at the first three levels, middle
   block, 12 output blocks) + a tiny CLIP text encoder with the real 49408-token vocabulary, trained
   together on style A captions (epsilon prediction, SD's scaled-linear DDPM schedule, 10% caption
   dropout for classifier-free guidance). The text encoder is trained rather than kept random: with
   a 32-wide encoder a random one mixes the few words we use poorly and the U-Net learns slower.
3. Model B: a copy of A fine-tuned (lower learning rate, fewer steps) on style B, so A and B stay in
   one basin like community fine-tunes of SD1.5, and block merges between them are meaningful.
4. Export: both models in the SD1 single-file LDM layout as fp16 .safetensors, plus models.json.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dataset as ds  # noqa: E402

SCALING = 0.18215
REPO = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO / "src" / "blockmerge" / "data" / "models"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- configs
def vae_config() -> dict:
    return dict(
        in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[32, 64, 64, 64], layers_per_block=1, latent_channels=4,
        norm_num_groups=32, sample_size=ds.IMAGE_SIZE, scaling_factor=SCALING,
    )


def unet_config() -> dict:
    return dict(
        sample_size=ds.IMAGE_SIZE // 8, in_channels=4, out_channels=4,
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        block_out_channels=[32, 64, 64, 64], layers_per_block=2, cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=32,
    )


def text_config():
    from transformers import CLIPTextConfig

    # Same conventions as SD1's openai/clip-vit-large-patch14 text tower, only narrower and shallower.
    return CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=1, max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=32, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )


def tokenizer():
    from blockmerge.generation.tokenizer import load_clip_tokenizer

    return load_clip_tokenizer(max_length=77, pad_token="<|endoftext|>")


# ----------------------------------------------------------------------------- data
def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def encode_captions(tok, captions: list[str]) -> torch.Tensor:
    return tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


# ----------------------------------------------------------------------------- phases
def train_vae(out: Path, steps: int, seed: int) -> None:
    from diffusers import AutoencoderKL

    path = out / "vae.pt"
    if path.exists():
        log("vae: exists, skipped")
        return
    torch.manual_seed(seed)
    ia, _ = ds.make_dataset(1500, "A", seed + 1)
    ib, _ = ds.make_dataset(1500, "B", seed + 2)
    x_all = to_tensor(np.concatenate([ia, ib]))
    vae = AutoencoderKL(**vae_config())
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    weight_all = shape_weight(x_all)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(x_all), (16,), generator=g)
        x, w = x_all[idx], weight_all[idx]
        # Random 32x32 crops for most steps: 3.5x cheaper and the convs do not care; full images
        # in the last part so the middle attention sees whole scenes.
        if step < steps * 0.85:
            oy, ox = (int(v) for v in torch.randint(0, 33, (2,), generator=g))
            x, w = x[:, :, oy:oy + 32, ox:ox + 32], w[:, :, oy:oy + 32, ox:ox + 32]
        post = vae.encode(x).latent_dist
        z = post.sample(generator=None)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / x[0].numel()
        loss = recon_loss(rec, x, w) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"vae step {step} loss {loss.item():.4f} kl {kl.item():.3f} ({time.time() - t0:.0f}s)")
    vae.eval()
    with torch.no_grad():
        mu = torch.cat([vae.encode(x_all[i:i + 200]).latent_dist.mean for i in range(0, 600, 200)])
        c = 1.0 / (SCALING * mu.std().item())
        # Reparameterise z' = c z exactly: the mean rows of quant_conv times c, log-variance + 2 ln c,
        # post_quant_conv's input columns / c. Decoding is unchanged; latents get SD1's scale.
        lc = vae.config.latent_channels
        vae.quant_conv.weight[:lc] *= c
        vae.quant_conv.bias[:lc] *= c
        vae.quant_conv.bias[lc:] += 2 * math.log(c)
        vae.post_quant_conv.weight /= c
        mu2 = vae.encode(x_all[:200]).latent_dist.mean
        rec = vae.decode(mu2).sample
        log(f"vae: rescaled by {c:.3f}; scaled latent std {(mu2 * SCALING).std():.3f}; "
            f"recon mae {(rec - x_all[:200]).abs().mean() * 127.5:.2f}/255")
    torch.save(vae.state_dict(), path)


def shape_weight(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel loss weight: 10 on and around the shape (pixels far from the border's median colour), 1 on
    the background. Most pixels are background; unweighted, the VAE spends its short training on
    them and rounds the shapes' corners, which is exactly what tells a square from a circle."""
    border = torch.cat([x[:, :, :2].flatten(2), x[:, :, :, :2].flatten(2)], dim=2)
    bg = border.median(dim=2).values[:, :, None, None]
    shape = ((x - bg).abs().amax(dim=1, keepdim=True) > 0.15).float()
    # Grown by 2 px so the background right around the shape counts too: that is where a decoder
    # that has also seen style B paints a dark rim on style A's shapes.
    return 1.0 + 9.0 * F.max_pool2d(shape, 5, stride=1, padding=2)


def recon_loss(rec: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Shape-weighted L1 + MSE, plus L1 between the images' horizontal and vertical differences
    (edges and corners: a blurred corner costs here even when its pixels are almost right)."""
    err = (rec - x).abs() + (rec - x) ** 2
    pix = (err * w).mean() / w.mean()
    dx = (rec[..., 1:] - rec[..., :-1]) - (x[..., 1:] - x[..., :-1])
    dy = (rec[..., 1:, :] - rec[..., :-1, :]) - (x[..., 1:, :] - x[..., :-1, :])
    return pix + 0.5 * (dx.abs().mean() + dy.abs().mean())


def refine_decoder(out: Path, steps: int, seed: int, latent_noise: float = 0.0) -> None:
    """Sharpen the decoder with the encoder frozen: latents (and so the U-Nets) are unaffected.

    The joint VAE phase is short and spends most of its loss on background; here the decoder
    learns from the encoder's posterior means with shape pixels weighted 10x, which is what fixes
    the colours and edges the tests read.
    """
    from diffusers import AutoencoderKL

    path = out / "vae-decoder.pt"
    if path.exists():
        log("decoder: exists, skipped")
        return
    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_config())
    vae.load_state_dict(torch.load(out / "vae.pt"))
    ia, _ = ds.make_dataset(1500, "A", seed + 3)
    ib, _ = ds.make_dataset(1500, "B", seed + 4)
    x_all = to_tensor(np.concatenate([ia, ib]))
    vae.eval()
    mean, _ = cache_latents(vae, np.concatenate([ia, ib]))
    weight = shape_weight(x_all)
    params = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    vae.requires_grad_(False)
    for q in params:
        q.requires_grad_(True)
    vae.decoder.train()
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-4, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(x_all), (8,), generator=g)
        z = mean[idx]
        if latent_noise:
            # The U-Net's latents are never exactly the encoder's: a decoder that has seen slightly
            # perturbed ones draws cleaner shapes (and fewer stray rims) from generated latents.
            z = z + latent_noise * z.std() * torch.randn(z.shape, generator=g)
        rec = vae.decode(z).sample
        loss = recon_loss(rec, x_all[idx], weight[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"decoder step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    vae.eval()
    torch.save(vae.state_dict(), path)


@torch.no_grad()
def cache_latents(vae, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = to_tensor(images)
    means, stds = [], []
    for i in range(0, len(x), 250):
        d = vae.encode(x[i:i + 250]).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def train_diffusion(
    name: str, out: Path, style: str, steps: int, lr: float, seed: int, init: str | None, bs: int
) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    path = out / f"{name}.pt"
    if path.exists():
        log(f"{name}: exists, skipped")
        return
    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_config())
    vae.load_state_dict(torch.load(out / "vae.pt"))
    vae.eval()
    tok = tokenizer()
    images, captions = ds.make_dataset(4000, style, seed + 10)
    mean, std = cache_latents(vae, images)
    ids = encode_captions(tok, captions)
    empty = encode_captions(tok, [""])[0]
    unet = UNet2DConditionModel(**unet_config())
    te = CLIPTextModel(text_config())
    if init:
        sd = torch.load(out / f"{init}.pt")
        unet.load_state_dict(sd["unet"])
        te.load_state_dict(sd["te"])
    unet.train()
    te.train()
    # Training speed only (the weights do not depend on it beyond rounding): with 8-wide heads,
    # torch's CPU scaled-dot-product kernel made the U-Net step ~7% slower than the classic path.
    from diffusers.models.attention_processor import AttnProcessor

    unet.set_attn_processor(AttnProcessor())
    noise_sched = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    alphas = noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    params = [{"params": unet.parameters(), "lr": lr}, {"params": te.parameters(), "lr": lr}]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2, foreach=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[lr, lr], total_steps=steps, pct_start=0.05 if init is None else 0.02
    )
    ema = copy.deepcopy({"unet": unet.state_dict(), "te": te.state_dict()})
    ema_decay = 0.995
    # The live tensors behind each EMA entry, gathered once: the optimiser updates them in place,
    # and one fused update per step is cheaper than walking two state dicts every step.
    ema_pairs = [
        (ema[part][k], v) for part, mod in (("unet", unet), ("te", te))
        for k, v in mod.state_dict().items() if v.dtype.is_floating_point
    ]
    ema_t, live_t = [e for e, _ in ema_pairs], [v for _, v in ema_pairs]
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(mean), (bs,), generator=g)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * SCALING
        cap = ids[idx].clone()
        drop = torch.rand(bs, generator=g) < 0.1
        cap[drop] = empty
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, 1000, (bs,), generator=g)
        noisy = noise_sched.add_noise(z, noise, t)
        cond = te(cap)[0]
        pred = unet(noisy, t, encoder_hidden_states=cond).sample
        # Min-SNR-5 weighting (Hang et al. 2023): converges several times faster on small budgets.
        w = torch.clamp(snr[t], max=5.0) / snr[t]
        loss = (w * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(te.parameters()), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_t, live_t, 1 - ema_decay)
        if step % 50 == 0 or step == steps - 1:
            log(f"{name} step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
        if step % 500 == 499:
            torch.save(ema, out / f"{name}.partial.pt")
    torch.save(ema, path)


# ----------------------------------------------------------------------------- export
def export(out: Path, models_dir: Path = MODELS_DIR) -> None:
    """Write both models as SD1 single-file LDM checkpoints (fp16) + models.json."""
    from blockmerge.architectures import ldm_names
    from blockmerge.io import SafetensorsStreamWriter, atomic_write

    vae_sd = torch.load(out / "vae-decoder.pt")
    models_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, desc in (
        ("tiny-a", "flat-filled shapes"),
        ("tiny-b", "shapes with a thick black outline (fine-tuned from tiny-a)"),
    ):
        sd = torch.load(out / f"{name}.pt")
        ldm = {}
        ldm.update(ldm_names.unet_to_ldm(sd["unet"], unet_config()))
        ldm.update(ldm_names.vae_to_ldm(vae_sd, vae_config()))
        ldm.update(ldm_names.clip_to_ldm(sd["te"], ldm_names.SD1_TE_PREFIX))
        ldm = {k: (v.detach().to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in ldm.items()}
        file = models_dir / f"{name}.safetensors"
        # Stability's modelspec keys: the loader reads the resolution and prediction type from them.
        meta = {
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": "stable-diffusion-v1",
            "modelspec.title": f"blockmerge {name}",
            "modelspec.description": desc,
            "modelspec.resolution": f"{ds.IMAGE_SIZE}x{ds.IMAGE_SIZE}",
            "modelspec.prediction_type": "epsilon",
            "trained_by": "training/train_tiny.py",
        }
        # blockmerge's own writer, not safetensors' save_file: its header (metadata order included) is
        # the same on every run, so a re-export gives byte-identical files and the same sha256.
        keys = sorted(ldm)
        with atomic_write(file, overwrite=True) as f:
            writer = SafetensorsStreamWriter(f, [(k, ldm[k].dtype, tuple(ldm[k].shape)) for k in keys], meta)
            for k in keys:
                writer.write(k, ldm[k])
            writer.finish()
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        entries.append({
            "name": name, "file": file.name, "style": desc, "sha256": digest,
            "image_size": ds.IMAGE_SIZE, "vocabulary": ds.vocabulary(),
            "example_prompt": ds.Scene("circle", "red", "large", "left", "white").caption,
            "parent": "tiny-a" if name == "tiny-b" else None,
        })
        log(f"export {file} ({file.stat().st_size / 1e6:.2f} MB)")
    (models_dir / "models.json").write_text(json.dumps({"models": entries}, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/blockmerge-tiny-train"))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--vae-steps", type=int, default=2000)
    ap.add_argument("--decoder-steps", type=int, default=1000)
    ap.add_argument("--decoder-noise", type=float, default=0.5, help="latent noise (x latent std) while refining the decoder")
    ap.add_argument("--decoder-only", action="store_true", help="stop after the decoder phase")
    ap.add_argument("--a-steps", type=int, default=5000)
    ap.add_argument("--b-steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    ap.add_argument("--export-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormals make CPU training crawl
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if not args.export_only:
        train_vae(args.out, args.vae_steps, args.seed)
        refine_decoder(args.out, args.decoder_steps, args.seed + 50, args.decoder_noise)
        if args.decoder_only:
            return
        train_diffusion("tiny-a", args.out, "A", args.a_steps, 1e-3, args.seed + 100, None, args.batch)
        train_diffusion("tiny-b", args.out, "B", args.b_steps, 3e-4, args.seed + 200, "tiny-a", args.batch)
        log(f"training done in {(time.time() - t0) / 60:.1f} min")
    export(args.out, args.models_dir)


if __name__ == "__main__":
    main()
