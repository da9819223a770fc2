"""Engine overhead and speed against diffusers' img2img pipeline, side by side, on the CPU.

A full-size SD 1.5-architecture UNet and CLIP text encoder with random weights, a
TAESD-size AutoencoderTiny (ours) and an SD-size AutoencoderKL (diffusers'), 256 px,
2 denoising steps. Random weights time exactly like real ones.

Prints human-readable lines, then as its last line one JSON object (with --json):
- fps, seconds_per_frame: our stream (stream batch, RCFG self, tiny VAE), fp32 eager;
- model_seconds_per_frame: the same UNet call (same batch shape) + VAE encode + decode,
  timed in isolation in this process, interleaved with the stream's frames (medians);
  overhead_ratio = seconds_per_frame / that;
- vs_diffusers_img2img: our best CPU throughput (the fastest of the settings tried,
  named in best_settings) over a plain loop of StableDiffusionImg2ImgPipeline at its
  defaults (CFG 7.5, strength 0.8, full VAE) with the same UNet, 2 denoising steps;
- vs_diffusers_img2img_same_settings: both sides fp32 eager.

    python benchmarks/stream_overhead.py --json [--frames 4] [--no-bf16] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from diffstream.models.tiny import sd15_random_components, sd15_unet, sd15_vae
from diffstream.testing import benchmark_clip



def time_stream_and_models(components, frames, steps: int):
    """Seconds per frame of our stream in steady state, and of the same model calls alone.

    The two are measured interleaved (one streamed frame, then the same UNet batch, VAE
    encode and decode called directly, and again), and each is summarised by its median,
    so drift in the machine's speed hits both sides alike.

    Returns:
        (stream seconds per frame, model-only seconds per frame)
    """
    import statistics

    from diffstream import frames as F
    from diffstream.config import StreamConfig
    from diffstream.pipelines.stream import StreamPipeline

    cfg = StreamConfig(prompt="a watercolor painting", size=max(frames[0].shape[:2]), steps=steps,
                       strength=0.5, guidance=1.2, cfg_type="self")
    pipe = StreamPipeline(components, cfg)
    for f in frames[:steps]:  # fill the stream batch; first UNet calls also warm up kernels
        pipe.push(f)
    pixels = F.frames_to_tensor(frames[0], device=components.device, dtype=components.dtype)
    with torch.no_grad():
        z = components.encode_image(pixels)
        x = z.repeat(steps, 1, 1, 1)  # the stream's UNet batch: one row per step
        t = torch.arange(steps, dtype=torch.long) * 200 + 99
        emb = components.encode_prompt(["a watercolor painting"]).expand(steps, -1, -1).contiguous()
    stream_times, model_times = [], []
    for f in frames[steps:]:
        start = time.perf_counter()
        out = pipe.push(f)
        stream_times.append(time.perf_counter() - start)
        assert out is not None
        with torch.no_grad():
            start = time.perf_counter()
            components.encode_image(pixels)
            components.unet(x, t, encoder_hidden_states=emb)
            components.decode_latents(z)
            model_times.append(time.perf_counter() - start)
    pipe.flush()
    pipe.close()
    return statistics.median(stream_times), statistics.median(model_times)


def time_stream(components, frames, steps: int) -> float:
    """Seconds per frame of our stream in steady state (median)."""
    return time_stream_and_models(components, frames, steps)[0]


def time_diffusers_img2img(unet, text_encoder, tokenizer, frames):
    """A plain loop of StableDiffusionImg2ImgPipeline at its defaults (guidance 7.5,
    strength 0.8), num_inference_steps=3 so that int(3 * 0.8) = 2 steps are denoised."""
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline
    from PIL import Image

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionImg2ImgPipeline(vae=sd15_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    handle = unet.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(args[0].shape[0]), with_kwargs=True)
    images = [Image.fromarray(f) for f in frames]
    pipe("a watercolor painting", image=images[0], num_inference_steps=3)  # warm-up
    calls.clear()
    start = time.perf_counter()
    for img in images[1:]:
        pipe("a watercolor painting", image=img, num_inference_steps=3)
    elapsed = time.perf_counter() - start
    handle.remove()
    per_frame_calls = len(calls) / (len(images) - 1)
    return elapsed / (len(images) - 1), per_frame_calls, sorted(set(calls))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    parser.add_argument("--frames", type=int, default=4, help="frames timed per configuration")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 configuration")
    parser.add_argument("--compile", action="store_true", help="also try torch.compile (slow to build on CPU)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    import dataclasses

    frames, origin = benchmark_clip(args.frames + args.steps + 1, args.size)
    h, w = frames[0].shape[:2]
    print(f"clip: {origin}, {w}x{h}, {args.steps} steps, {torch.get_num_threads()} threads", file=sys.stderr)
    base = sd15_random_components()
    unet, text_encoder, tokenizer = base.unet, base.text_encoder, base.tokenizer

    results = {"clip": origin, "width": w, "height": h, "steps": args.steps, "threads": torch.get_num_threads()}
    spf, model_spf = time_stream_and_models(base, frames, args.steps)
    results.update(fps=1 / spf, seconds_per_frame=spf, model_seconds_per_frame=model_spf,
                   overhead_ratio=spf / model_spf)
    print(f"ours fp32 eager: {spf:.3f} s/frame; model calls alone {model_spf:.3f} s -> overhead {spf / model_spf:.3f}",
          file=sys.stderr)

    settings = {"fp32 eager, tiny VAE, RCFG self": spf}
    if not args.no_bf16:
        bf16 = dataclasses.replace(base, unet=sd15_unet().to(torch.bfloat16), vae=base.vae.to(torch.bfloat16),
                                   text_encoder=text_encoder.to(torch.bfloat16), dtype=torch.bfloat16)
        settings["bf16 eager, tiny VAE, RCFG self"] = time_stream(bf16, frames, args.steps)
        print(f"ours bf16 eager: {settings['bf16 eager, tiny VAE, RCFG self']:.3f} s/frame", file=sys.stderr)
        del bf16
        base.vae.float()
        text_encoder.float()
    if args.compile:
        compiled = dataclasses.replace(base, unet=torch.compile(unet))
        settings["fp32 torch.compile, tiny VAE, RCFG self"] = time_stream(compiled, frames, args.steps)
        print(f"ours fp32 compile: {settings['fp32 torch.compile, tiny VAE, RCFG self']:.3f} s/frame", file=sys.stderr)

    ref_spf, calls, batch_sizes = time_diffusers_img2img(unet, text_encoder, tokenizer, frames[: args.frames + 1])
    print(f"diffusers img2img fp32 eager: {ref_spf:.3f} s/frame ({calls:.0f} UNet calls/frame, batch {batch_sizes})",
          file=sys.stderr)
    best_name = min(settings, key=settings.get)
    results.update(
        settings_seconds_per_frame=settings,
        best_settings=best_name,
        diffusers_img2img_seconds_per_frame=ref_spf,
        diffusers_unet_calls_per_frame=calls,
        vs_diffusers_img2img=ref_spf / settings[best_name],
        vs_diffusers_img2img_same_settings=ref_spf / spf,
    )
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
