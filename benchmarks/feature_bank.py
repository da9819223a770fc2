"""Cost of StreamV2V's feature bank over the per-frame baseline, side by side, on the CPU.

Same full-size random SD 1.5-architecture UNet + TAESD-size VAE as stream_overhead.py,
256 px, 2 steps, stream batch, RCFG self, on a real clip (generated if absent):
- seconds_per_frame_baseline (streamdiffusion) / seconds_per_frame_bank (streamv2v,
  bank defaults, the same RCFG self) -> time_ratio, medians of A/B interleaved rounds;
- peak_rss_ratio: peak RSS while streaming with the bank / without (each phase sampled);
- rss_growth_100_to_n: the tiny model streaming `--rss-frames` frames with the bank, RSS at
  frame 1,000 relative to frame 100 (the bank must not grow);
- warp error (Lai et al.) of both methods' outputs on the clip with the tiny model: a
  smoke check of the plumbing only (random weights make noise, not a result).

    python benchmarks/feature_bank.py --json [--frames 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

from diffstream.config import ModelConfig, StreamConfig
from diffstream.metrics.timing import PeakMemory, stream_rss_growth
from diffstream.models.loading import load_components
from diffstream.models.tiny import sd15_random_components
from diffstream.pipelines.factory import make_pipeline
from diffstream.testing import benchmark_clip, make_frames


def time_method(components, frames, method: str, steps: int):
    """(seconds per frame in steady state, peak RSS bytes) of one method on the clip."""
    # One guidance setting for both (the methods' own defaults differ): RCFG self costs no
    # UNet call, so the ratio is the bank's cost alone.
    cfg = StreamConfig(prompt="a watercolor painting", size=max(frames[0].shape[:2]), steps=steps, strength=0.5,
                       method=method, guidance=1.2, cfg_type="self")
    gc.collect()
    with PeakMemory() as mem:
        with make_pipeline(components, cfg) as pipe:
            warm = steps + 4  # fill the stream batch and the bank (first update at call 0)
            for f in frames[:warm]:
                pipe.push(f)
            start = time.perf_counter()
            for f in frames[warm:]:
                pipe.push(f)
            elapsed = time.perf_counter() - start
            pipe.flush()
    return elapsed / len(frames[warm:]), mem.peak_bytes


def rss_growth(n: int = 1000):
    """RSS growth from frame 100 to frame n, tiny model, streamv2v with its defaults."""
    tiny = load_components(ModelConfig(model="tiny", device="cpu"))
    cfg = StreamConfig(prompt="x", size=64, steps=2, strength=0.5, method="streamv2v")
    with make_pipeline(tiny, cfg) as pipe:
        return stream_rss_growth(pipe, make_frames(50, 64, 64), n)


def tiny_warp_errors(clip_frames):
    """Warp error of both methods' outputs with the tiny model (plumbing smoke check)."""
    from diffstream.metrics.warp import warp_error

    tiny = load_components(ModelConfig(model="tiny", device="cpu"))
    out = {}
    for method in ("streamdiffusion", "streamv2v"):
        cfg = StreamConfig(prompt="x", size=max(clip_frames[0].shape[:2]), steps=2, strength=0.5, method=method)
        with make_pipeline(tiny, cfg) as pipe:
            outputs = [o for o in (pipe.push(f) for f in clip_frames) if o is not None] + pipe.flush()
        out[method] = warp_error(clip_frames, outputs).mean_255
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--frames", type=int, default=4, help="frames timed per method")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="A/B interleaved rounds (medians)")
    parser.add_argument("--rss-frames", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    frames, origin = benchmark_clip(args.steps + 4 + args.frames, args.size)
    print(f"clip: {origin}, {frames[0].shape[1]}x{frames[0].shape[0]}, {args.steps} steps", file=sys.stderr)
    components = sd15_random_components()
    # A/B interleaved rounds, medians: the first round also pays one-time kernel set-up,
    # and a slow moment of the machine hits both methods alike.
    runs: dict = {"streamdiffusion": [], "streamv2v": []}
    for _ in range(args.rounds):
        for method in runs:
            runs[method].append(time_method(components, frames, method, args.steps))
    base_spf = statistics.median(t for t, _ in runs["streamdiffusion"])
    bank_spf = statistics.median(t for t, _ in runs["streamv2v"])
    base_rss = max(m for _, m in runs["streamdiffusion"])
    bank_rss = max(m for _, m in runs["streamv2v"])
    print(f"streamdiffusion {base_spf:.3f} s/frame, streamv2v {bank_spf:.3f} s/frame", file=sys.stderr)
    del components
    gc.collect()

    torch.set_num_threads(1)
    growth, rss_100, rss_n = rss_growth(args.rss_frames)
    print(f"tiny streamv2v RSS: {rss_100 / 2**20:.1f} MiB at frame 100, {rss_n / 2**20:.1f} MiB at {args.rss_frames}",
          file=sys.stderr)
    warp_frames, _ = benchmark_clip(40, 128)
    warp = tiny_warp_errors(warp_frames)
    result = {
        "clip": origin,
        "rounds": args.rounds,
        "seconds_per_frame_baseline": base_spf,
        "seconds_per_frame_bank": bank_spf,
        "time_ratio": bank_spf / base_spf,
        "peak_rss_baseline": base_rss,
        "peak_rss_bank": bank_rss,
        "peak_rss_ratio": bank_rss / base_rss,
        "rss_frames": args.rss_frames,
        "rss_growth_100_to_n": growth,
        "tiny_warp_error_255": warp,
    }
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
