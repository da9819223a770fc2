#!/usr/bin/env python
"""Train the toy model that ships as `--model toy` (issue #14), from scratch, on a CPU.

    .venv/bin/python scripts/train_toy.py [--out DIR] [--seed 0] [--vae-steps N] [--unet-steps N]

Data (no downloads): the first 40 of the 50 frames of `examples/bunny.mp4` (frames 40-49
are held out), each at three scales, flipped, and hue/saturation-jittered, plus
procedural scenes (`models.toy.SceneGenerator`, seed 1000; the held-out procedural clip
uses seed 7). Every image comes with its five style targets (`models.toy.TOY_STYLES`).

Three stages, each seeded, written as a diffusers pipeline folder at the end:
1. VAE (AutoencoderKL, SD's 8x / 4-channel layout): L1 + 0.1 L2 reconstruction of
   128-px crops of source and styled images, KL weight 1e-6 (SD's order of magnitude);
   then `scaling_factor` = 1 / std of the latents, as SD's 0.18215 was chosen.
2. Latents of every image and style are computed once with the frozen VAE.
3. UNet + text encoder, v-prediction: x_t = sqrt(abar) z_in + sqrt(1-abar) eps with z_in
   the *source* latent (the first SDEdit step sees a noised input frame) or the *target*
   latent (later steps see a noised estimate of the styled frame), and the x0 implied by
   the predicted v is pulled to the target latent. So one model serves SDEdit at any
   strength, 1-step turbo mode (x0 sampler) and the multi-step LCM schedule. Timesteps
   are drawn mostly from the 50-entry LCM table the engine uses. The empty prompt and a
   few neutral ones are taught to keep the frame (so classifier-free guidance pushes away
   from the photo).

At the end the folder is loaded back with `load_components` and run through the stream
engine on held-out frames; the style accuracies and the photo PSNR go to
`DIR/training.json` with the losses and the time taken.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from diffstream.models import toy  # noqa: E402

BUNNY = ROOT / "examples" / "bunny.mp4"
TRAIN_FRAMES = 40  # bunny frames 0..39 train; 40..49 are held out
STYLES = list(toy.TOY_STYLES)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- data ----------------------------------------------------------------------------


def bunny_frames() -> list[np.ndarray]:
    """All 50 frames of the bundled clip, (180, 320, 3) uint8 RGB."""
    import av

    with av.open(str(BUNNY)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def jitter(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Hue rotation and saturation/brightness scaling (keeps the photo natural-looking)."""
    import cv2

    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-25, 25)) % 180
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.6, 1.3), 0, 255)
    hsv[..., 2] = np.clip(hsv[..., 2] * rng.uniform(0.8, 1.15), 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


def training_images(seed: int, num_scenes: int) -> list[np.ndarray]:
    """Source images: bunny frames 0..39 at 3 scales (x flips, x jitter) + procedural scenes."""
    import cv2

    rng = np.random.default_rng(seed)
    images = []
    for frame in bunny_frames()[:TRAIN_FRAMES]:
        for longer in (256, 320, 384):
            w, h = longer, round(longer * frame.shape[0] / frame.shape[1])
            img = cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA if longer <= 320 else cv2.INTER_CUBIC)
            img = img[: h // 8 * 8]  # the VAE needs sides that are multiples of 8
            images += [img, img[:, ::-1].copy(), jitter(rng, img)]
    scenes = toy.SceneGenerator(toy.TRAIN_SCENE_SEED + seed, size=(256, 144))
    square = toy.SceneGenerator(toy.TRAIN_SCENE_SEED + seed + 1, size=(192, 192))
    images += [scenes.scene() for _ in range(num_scenes // 2)]
    images += [square.scene() for _ in range(num_scenes - num_scenes // 2)]
    return images


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 127.5 - 1


# --- stage 1: VAE --------------------------------------------------------------------


def train_vae(vae, stacks: list[np.ndarray], steps: int, batch: int, crop: int, seed: int, history: dict):
    """Reconstruction training on random crops of source and styled images.

    Args:
        stacks: per image, (1 + S, H, W, 3) uint8: the source and its S style targets.
    """
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    vae.train()
    for step in range(steps):
        crops = []
        for _ in range(batch):
            stack = stacks[rng.integers(len(stacks))]
            img = stack[rng.integers(stack.shape[0])]
            y, x = rng.integers(img.shape[0] - crop + 1), rng.integers(img.shape[1] - crop + 1)
            crops.append(to_tensor(img[y:y + crop, x:x + crop]))
        x = torch.stack(crops)  # (B, 3, crop, crop)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
            rec = vae.decode(z).sample.float()
        kl = posterior.kl().mean() / (x.shape[-1] * x.shape[-2])
        loss = (rec - x).abs().mean() + 0.1 * ((rec - x) ** 2).mean() + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        history["vae_loss"].append(float(loss.detach()))
        if step % 100 == 0 or step == steps - 1:
            log(f"vae {step}/{steps} loss {np.mean(history['vae_loss'][-100:]):.4f}")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vae, stacks: list[np.ndarray]) -> list[torch.Tensor]:
    """Posterior-mean latents of every image and style: per image (1 + S, 4, h, w), unscaled."""
    out = []
    for stack in stacks:
        x = torch.stack([to_tensor(img) for img in stack])
        out.append(vae.encode(x).latent_dist.mean)
    return out


# --- stage 3: UNet + text encoder ----------------------------------------------------


def lcm_table() -> np.ndarray:
    from diffstream.schedule.timesteps import lcm_timestep_table

    return np.array(lcm_timestep_table())


def random_crop(rng: np.random.Generator, lat: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """A random (h, w) window of (..., H, W) latents, edge-padded where they are smaller."""
    if lat.shape[-2] < h or lat.shape[-1] < w:
        lat = F.pad(lat, (0, max(0, w - lat.shape[-1]), 0, max(0, h - lat.shape[-2])), mode="replicate")
    y, x = rng.integers(lat.shape[-2] - h + 1), rng.integers(lat.shape[-1] - w + 1)
    return lat[..., y:y + h, x:x + w]


def train_unet(unet, text_encoder, tokenizer, latents, steps: int, seed: int, history: dict, scheduler,
               weight_cap: float = 5.0):
    """v-prediction training whose implied x0 is the style's target latent (module doc).

    Args:
        latents: per image (1 + S, 4, h, w) scaled latents: index 0 the source, 1 + s style s.
    """
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    abar = scheduler.alphas_cumprod.float()
    table = lcm_table()
    params = [dict(params=unet.parameters(), lr=1e-3), dict(params=text_encoder.parameters(), lr=3e-4)]
    opt = torch.optim.AdamW(params, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[1e-3, 3e-4], total_steps=steps, pct_start=0.03)
    prompts = STYLES + [p for p in toy.IDENTITY_PROMPTS if p not in STYLES]
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    identity = STYLES.index("a photo")
    neutral = [identity] + list(range(len(STYLES), len(prompts)))  # prompts taught to keep the frame
    # (latent h, latent w, batch): mostly small crops; some at the 256-px frame's size, so
    # attention also trains at the token counts it runs at.
    shapes = [(16, 16, 32)] * 3 + [(16, 32, 16), (24, 32, 12)]
    unet.train()
    text_encoder.train()
    for step in range(steps):
        h, w, batch = shapes[rng.integers(len(shapes))]
        z_in, z_tgt, prompt_idx = [], [], []
        for _ in range(batch):
            crop = random_crop(rng, latents[rng.integers(len(latents))], h, w)  # (1 + S, 4, h, w)
            s = int(rng.integers(len(STYLES)))
            p = int(rng.choice(neutral)) if s == identity else s
            source_input = rng.random() < 0.5
            z_in.append(crop[0] if source_input else crop[1 + s])
            z_tgt.append(crop[1 + s])
            prompt_idx.append(p)
        z_in, z_tgt = torch.stack(z_in), torch.stack(z_tgt)  # (B, 4, h, w)
        t = np.where(rng.random(batch) < 0.75, rng.choice(table, batch), rng.integers(0, 1000, batch))
        t = torch.from_numpy(t).long()
        a = abar[t].sqrt().view(-1, 1, 1, 1)
        b = (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
        eps = torch.randn(z_in.shape, generator=gen)
        z_t = a * z_in + b * eps
        cond = text_encoder(ids[prompt_idx])[0]  # (B, 77, D)
        v = unet(z_t, t, encoder_hidden_states=cond).sample
        x0 = a * z_t - b * v  # v-prediction: x0 = sqrt(abar) x_t - sqrt(1 - abar) v
        weight = torch.clamp(1 / b**2, max=weight_cap)  # x0 error weighted as the noise's, capped at low noise
        loss = (weight * (x0 - z_tgt) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(text_encoder.parameters()), 1.0)
        opt.step()
        sched.step()
        history["unet_loss"].append(float(loss.detach()))
        if step % 100 == 0 or step == steps - 1:
            log(f"unet {step}/{steps} loss {np.mean(history['unet_loss'][-100:]):.4f}")
    return unet.eval().requires_grad_(False), text_encoder.eval().requires_grad_(False)


# --- saving and checking -------------------------------------------------------------


def save(out: Path, unet, vae, text_encoder, tokenizer, scheduler) -> None:
    """Write a diffusers StableDiffusionPipeline folder with fp16 safetensors weights."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(torch.float16)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    if _is_shipped(out):
        # The tokenizer is SD's CLIP BPE, which the package already ships (models/assets,
        # `clip_tokenizer`), and `--model toy` passes it in: its 3.6 MB tokenizer.json is
        # not kept there. Other folders keep it, so any SD loader opens them as they are.
        shutil.rmtree(out / "tokenizer", ignore_errors=True)


def _is_shipped(out: Path) -> bool:
    return out.resolve() == toy.TOY_DIR.resolve()


def held_out_eval(out: Path, size: int = toy.TOY_SIZE) -> dict:
    """Load the folder like any checkpoint and run the stream engine on held-out frames."""
    from diffstream import ModelConfig, StreamConfig, load_components
    from diffstream.frames import frames_to_tensor, resize, tensor_to_frames
    from diffstream.metrics.style import psnr, style_accuracy
    from diffstream.pipelines.factory import make_pipeline

    model = "toy" if _is_shipped(out) else str(out)  # the shipped folder has no tokenizer of its own
    components = load_components(ModelConfig(model=model, device="cpu", lcm_lora="none"))
    clips = {"bunny 40-49": bunny_frames()[TRAIN_FRAMES:], "procedural (seed 7)": toy.held_out_clip(10)}
    report = {}
    for clip_name, frames in clips.items():
        for prompt in STYLES:
            pipe = make_pipeline(components, StreamConfig(prompt=prompt, size=size))
            w, h = pipe.processing_size(frames[0].shape[1], frames[0].shape[0])
            outs = []
            for f in frames:
                outs += pipe.process(f)
            outs += pipe.flush()
            inputs = [resize(f, (w, h)) for f in frames]
            entry = dict(style_accuracy=style_accuracy(inputs, outs, prompt))
            if prompt == "a photo":
                entry["psnr"] = float(np.mean([psnr(a, b) for a, b in zip(inputs, outs)]))
            report[f"{clip_name}: {prompt}"] = entry
            log(f"eval {clip_name}: {prompt}: {entry}")
        # the VAE alone (encode, decode), at the same size: the ceiling of "a photo" PSNR
        with torch.no_grad():
            pixels = frames_to_tensor(inputs, device=components.device, dtype=components.dtype)  # (F, 3, h, w)
            round_trip = tensor_to_frames(components.decode_latents(components.encode_image(pixels)))
        report[f"{clip_name}: vae round trip"] = dict(psnr=float(np.mean([psnr(a, b) for a, b in
                                                                        zip(inputs, round_trip)])))
        log(f"eval {clip_name}: vae round trip: {report[f'{clip_name}: vae round trip']}")
        report[f"{clip_name}: denoising gain"] = denoising_gain(components, pixels)
        log(f"eval {clip_name}: denoising gain (dB by timestep): {report[f'{clip_name}: denoising gain']}")
    return report


def denoising_gain(components, pixels: torch.Tensor, timesteps=(100, 200, 400, 600), seed: int = 0) -> dict:
    """What one UNet call removes of the noise, per timestep, with the prompt "a photo".

    For the frames' latents z: x_t = sqrt(abar) z + sqrt(1 - abar) eps; the dB of the decoded
    x0 the UNet implies, minus the dB of the decoded x_t / sqrt(abar) (the noise left in),
    both against the VAE round trip of z. Near 0 the UNet leaves the noise in: the SDEdit
    steps' fresh noise then reaches the output as blotches (the toy's blur, measured).

    Args:
        pixels: (F, 3, H, W) frames in [-1, 1] on the components' device.
    Returns:
        {timestep: dB gained}.
    """
    from diffstream.frames import tensor_to_frames
    from diffstream.metrics.style import psnr

    abar = components.scheduler.alphas_cumprod
    gen = torch.Generator().manual_seed(seed)
    gains = {}
    with torch.no_grad():
        cond = components.encode_prompt(["a photo"]).expand(pixels.shape[0], -1, -1)  # (F, 77, D)
        z = components.encode_image(pixels)  # (F, 4, h, w), scaled
        reference = tensor_to_frames(components.decode_latents(z))
        for t in timesteps:
            a, b = float(abar[t].sqrt()), float((1 - abar[t]).sqrt())
            x_t = a * z + b * torch.randn(z.shape, generator=gen).to(z)
            v = components.unet(x_t, torch.full((z.shape[0],), t, device=z.device), encoder_hidden_states=cond).sample
            denoised = tensor_to_frames(components.decode_latents(a * x_t - b * v))  # x0 of v-prediction
            noisy = tensor_to_frames(components.decode_latents(x_t / a))
            gains[t] = round(float(np.mean([psnr(d, r) - psnr(n, r) for d, n, r in zip(denoised, noisy, reference)])),
                             2)
    return gains


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(toy.TOY_DIR), help="pipeline folder to write (default: the shipped one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenes", type=int, default=300, help="procedural training scenes")
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--unet-steps", type=int, default=2400)
    parser.add_argument("--weight-cap", type=float, default=5.0,
                        help="the UNet loss weighs the x0 error by 1 / (1 - abar) (the noise's error), capped here")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--beta-start", type=float, default=toy.TOY_BETAS[0],
                        help="scaled-linear beta_start (default: the toy's; SD 1.x: 0.00085)")
    parser.add_argument("--beta-end", type=float, default=toy.TOY_BETAS[1],
                        help="scaled-linear beta_end (default: the toy's; SD 1.x: 0.012)")
    parser.add_argument("--vae-from", default=None,
                        help="take the VAE of this toy folder instead of training it (the same seed gives the same "
                             "VAE: saves its 9 minutes when only the UNet's settings change)")
    parser.add_argument("--no-eval", action="store_true")
    parser.add_argument("--eval-only", action="store_true",
                        help="only re-run the held-out evaluation of the folder --out (updates its training.json)")
    args = parser.parse_args(argv)
    if args.eval_only:
        torch.set_num_threads(args.threads)
        path = Path(args.out) / "training.json"
        summary = json.loads(path.read_text()) if path.exists() else {}
        t0 = time.time()
        summary["held_out"] = held_out_eval(Path(args.out))
        summary.setdefault("times", {})["eval_s"] = time.time() - t0
        path.write_text(json.dumps(summary, indent=1))
        return 0

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    scheduler = toy.toy_scheduler(args.beta_start, args.beta_end)
    out = Path(args.out)
    start = time.time()
    history = {"vae_loss": [], "unet_loss": []}
    times = {}

    images = training_images(args.seed, args.scenes)
    stacks = [np.concatenate([img[None], toy.style_targets(img)]) for img in images]  # (1 + S, H, W, 3)
    times["data_s"] = time.time() - start
    log(f"{len(stacks)} training images x {1 + len(STYLES)} (source + styles) in {times['data_s']:.0f} s")

    t0 = time.time()
    if args.vae_from:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(Path(args.vae_from) / "vae").float().eval().requires_grad_(False)
    else:
        vae = train_vae(toy.toy_vae(args.seed), stacks, args.vae_steps, batch=8, crop=128, seed=args.seed + 1,
                        history=history)
        # The UNet learns the latents of the VAE as shipped (fp16 weights): the same numbers
        # as `--vae-from` the saved folder gives.
        vae = vae.to(torch.float16).to(torch.float32)
    raw = encode_all(vae, stacks)
    std = float(torch.cat([r.flatten() for r in raw]).std())
    vae.register_to_config(scaling_factor=1.0 / std)
    latents = [r / std for r in raw]
    times["vae_s"] = time.time() - t0
    log(f"vae trained in {times['vae_s']:.0f} s; latent std {std:.3f} -> scaling_factor {1 / std:.4f}")

    from diffstream.models.tokenizer import clip_tokenizer

    t0 = time.time()
    tokenizer = clip_tokenizer()
    unet, text_encoder = train_unet(toy.toy_unet(args.seed), toy.toy_text_encoder(args.seed + 2), tokenizer,
                                    latents, args.unet_steps, seed=args.seed + 3, history=history,
                                    scheduler=scheduler, weight_cap=args.weight_cap)
    times["unet_s"] = time.time() - t0
    save(out, unet, vae, text_encoder, tokenizer, scheduler)
    times["train_total_s"] = time.time() - start
    log(f"saved {out} after {times['train_total_s'] / 60:.1f} min")

    summary = dict(seed=args.seed, scenes=args.scenes, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
                   betas=(args.beta_start, args.beta_end),
                   vae_from=args.vae_from,
                   threads=args.threads, times=times, latent_std=std,
                   final_loss=dict(vae=float(np.mean(history["vae_loss"][-100:])) if history["vae_loss"] else None,
                                   unet=float(np.mean(history["unet_loss"][-100:]))),
                   loss_every_50={k: [float(np.mean(v[i:i + 50])) for i in range(0, len(v), 50)]
                                  for k, v in history.items()})
    if not args.no_eval:
        t0 = time.time()
        summary["held_out"] = held_out_eval(out)
        times["eval_s"] = time.time() - t0
    (out / "training.json").write_text(json.dumps(summary, indent=1))
    log(f"done in {(time.time() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
