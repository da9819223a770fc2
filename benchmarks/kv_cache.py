"""Live2Diff's KV cache against recomputing the window, side by side, on the CPU.

A UNetMotionModel at full SD 1.5 width and depth (random SD 1.5 UNet + a random
MotionAdapter with AnimateDiff v1.5's configuration), 512 px (the paper's size), one denoising step,
warmup 8 frames, window 16:
- seconds_per_frame_cached: the UNet time per frame of our stream (causal temporal
  attention, per-step KV cache), timed by hooks around the UNet call (like for like
  with the recompute side, which times the UNet alone); `..._end_to_end` adds the VAE;
- seconds_per_frame_recompute: what a cache-less implementation pays to give a new frame
  the same context: the UNet runs over all 16 window frames (their latents kept) every
  frame, since keys/values of every temporal layer depend on every earlier layer. The
  attention mask changes which scores count, not the cost, so diffusers' own temporal
  attention stands in for the masked one here;
- speedup = recompute / cached (target >= 10 at window 16);
- speedup_ceiling = recompute / (the UNet on one frame with no temporal context): what a
  cache with zero overhead would give. On a CPU the 16-frame batch runs more efficiently
  per frame than one frame does, so the ceiling is below 16 and grows with the size;
- rss_growth_100_to_n: the tiny model streaming `--rss-frames` frames, RSS at the last frame
  relative to frame 100 (the cache must not grow).

    python benchmarks/kv_cache.py --json [--frames 1] [--size 512] [--rss-frames 1000]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

from diffstream import frames as F
from diffstream.attention.causal_temporal import CausalTemporalConfig
from diffstream.config import ModelConfig, StreamConfig
from diffstream.metrics.timing import stream_rss_growth
from diffstream.models.loading import load_components
from diffstream.models.motion import motion_unet
from diffstream.models.tiny import sd15_random_components
from diffstream.pipelines.factory import make_pipeline
from diffstream.testing import benchmark_clip, make_frames


def sd15_motion_components():
    """Random SD 1.5 + AnimateDiff-v1.5-shaped motion modules (MotionAdapter defaults)."""
    import dataclasses

    from diffusers import MotionAdapter

    base = sd15_random_components()
    torch.manual_seed(5)
    adapter = MotionAdapter(block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2,
                            motion_num_attention_heads=8, motion_max_seq_length=32, use_motion_mid_block=False)
    return dataclasses.replace(base, unet=motion_unet(base.unet, adapter))


def cached_seconds(components, frames, window: int, warmup: int, timed: int) -> tuple[float, float]:
    """(end-to-end s/frame, UNet s/frame) of the cached stream once its window is full.

    The UNet time is measured with forward hooks around the UNet call (the temporal
    attention, its cache reads and writes included), so it compares like for like with
    `recompute_seconds`, which times the UNet alone; end to end adds the VAE.
    """
    cfg = StreamConfig(prompt="a watercolor painting", size=max(frames[0].shape[:2]), steps=1, strength=0.5,
                       guidance=1.0, method="live2diff",
                       causal=CausalTemporalConfig(warmup_frames=warmup, window=window))
    spent: list[float] = []
    hooks = [components.unet.register_forward_pre_hook(lambda *a: spent.append(-time.perf_counter())),
             components.unet.register_forward_hook(lambda *a: spent.__setitem__(-1, spent[-1] + time.perf_counter()))]
    try:
        with make_pipeline(components, cfg) as pipe:
            fill = warmup + (window - warmup - 1)  # warmup, then enough frames to fill the window
            for f in frames[:fill]:
                pipe.process(f)
            spent.clear()
            start = time.perf_counter()
            for f in frames[fill : fill + timed]:
                pipe.process(f)
            return (time.perf_counter() - start) / timed, sum(spent) / timed
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def recompute_seconds(components, frames, window: int, timed: int) -> float:
    """UNet over the whole window of latents, once per new frame."""
    pixels = F.frames_to_tensor(frames[:window])
    latents = components.encode_image(pixels)  # (S, 4, h, w)
    video = latents.transpose(0, 1)[None]  # (1, 4, S, h, w)
    emb = components.encode_prompt(["a watercolor painting"]).expand(window, -1, -1)
    t = torch.tensor([499])
    components.unet(video, t, encoder_hidden_states=emb)  # warm-up
    start = time.perf_counter()
    for _ in range(timed):
        components.unet(video, t, encoder_hidden_states=emb)
    return (time.perf_counter() - start) / timed


def rss_growth(n: int = 1000):
    tiny = load_components(ModelConfig(model="tiny", motion_adapter="tiny", device="cpu"))
    cfg = StreamConfig(prompt="x", size=64, steps=2, strength=0.5, method="live2diff")
    with make_pipeline(tiny, cfg) as pipe:
        growth, at_100, at_n = stream_rss_growth(pipe, make_frames(50, 64, 64), n)
        return growth, at_100, at_n, pipe.mechanism.cache_bytes()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--frames", type=int, default=1, help="frames timed per mode")
    parser.add_argument("--size", type=int, default=512, help="longer side (the paper's 512)")
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--rss-frames", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    frames, origin = benchmark_clip(args.window + args.frames + 1, args.size)
    print(f"clip: {origin}, {frames[0].shape[1]}x{frames[0].shape[0]}, window {args.window}", file=sys.stderr)
    components = sd15_motion_components()
    cached, cached_unet = cached_seconds(components, frames, args.window, args.warmup, args.frames)
    print(f"cached: {cached:.2f} s/frame end to end, UNet {cached_unet:.2f}", file=sys.stderr)
    recompute = recompute_seconds(components, frames, args.window, args.frames)
    print(f"recompute: {recompute:.2f} s/frame (UNet)", file=sys.stderr)
    single = recompute_seconds(components, frames, 1, args.frames)
    print(f"one frame without temporal context: {single:.2f} s (UNet)", file=sys.stderr)
    del components
    gc.collect()
    torch.set_num_threads(1)
    growth, at_100, at_n, cache = rss_growth(args.rss_frames)
    result = {
        "clip": origin,
        "window": args.window,
        "size": args.size,
        "threads": os.cpu_count() or 1,
        "seconds_per_frame_cached": cached_unet,
        "seconds_per_frame_recompute": recompute,
        "speedup": recompute / cached_unet,
        "seconds_one_frame_no_context": single,
        "speedup_ceiling": recompute / single,
        "seconds_per_frame_cached_end_to_end": cached,
        "speedup_end_to_end": (recompute + cached - cached_unet) / cached,
        "rss_frames": args.rss_frames,
        "rss_growth_100_to_n": growth,
        "tiny_cache_bytes": cache,
    }
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
