"""What warp error costs next to the diffusion it judges, on this CPU.

Warp error (two DIS flows, the occlusion check, a remap) per frame pair at 512x512 on a
real clip (benchmark_clip, resized square), against one streamed diffusion frame of a
full-size random SD 1.5 UNet + TAESD-size VAE (`models.tiny.sd15_random_components`) at
256 px with 2 denoising steps, timed after warm-up. Random weights time exactly like
trained ones. The target is ratio = warp / diffusion < 0.10: scoring a run must cost a
small fraction of making it.

    python benchmarks/metrics_speed.py --json [--pairs 8] [--frames 3] [--flow-preset medium]

Prints human-readable lines on stderr and, with --json, one JSON object on stdout:
warp_seconds_per_pair, diffusion_seconds_per_frame, ratio, plus the settings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from diffstream.frames import resize
from diffstream.metrics.warp import WarpErrorMeter
from diffstream.testing import benchmark_clip


def time_warp(pairs: int, size: int, preset: str) -> tuple[float, str]:
    """Mean seconds per (input, output) pair of streaming warp error.

    The 'output' is the input with mild per-frame noise: the flow is computed on the
    input either way, so the cost does not depend on what the output shows.
    """
    import numpy as np

    frames, origin = benchmark_clip(pairs + 2, size)
    frames = [resize(f, (size, size)) for f in frames]  # 16:9 clip -> the papers' 512x512
    rng = np.random.default_rng(0)
    outputs = [np.clip(f.astype(np.int16) + rng.integers(-8, 9, f.shape), 0, 255).astype(np.uint8) for f in frames]
    meter = WarpErrorMeter(preset)
    meter.update(frames[0], outputs[0])
    meter.update(frames[1], outputs[1])  # warm-up pair: DIS buffers, the sampling grid
    start = time.perf_counter()
    for a, b in zip(frames[2:], outputs[2:]):
        meter.update(a, b)
    return (time.perf_counter() - start) / pairs, origin


def time_diffusion(frames_timed: int, size: int, steps: int) -> float:
    """Seconds per streamed frame in steady state (stream batch full, kernels warm)."""
    from diffstream.config import StreamConfig
    from diffstream.models.tiny import sd15_random_components
    from diffstream.pipelines.stream import StreamPipeline

    frames, _ = benchmark_clip(steps + 1 + frames_timed, size)
    cfg = StreamConfig(prompt="a watercolor painting", size=size, steps=steps, strength=0.5)
    pipe = StreamPipeline(sd15_random_components(), cfg)
    try:
        for f in frames[: steps + 1]:  # fill the stream batch, plus one steady-state frame
            pipe.push(f)
        start = time.perf_counter()
        for f in frames[steps + 1:]:
            assert pipe.push(f) is not None
        return (time.perf_counter() - start) / frames_timed
    finally:
        pipe.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--pairs", type=int, default=8, help="frame pairs timed for warp error")
    parser.add_argument("--warp-size", type=int, default=512)
    parser.add_argument("--flow-preset", default="medium", choices=("ultrafast", "fast", "medium"))
    parser.add_argument("--frames", type=int, default=3, help="diffusion frames timed after warm-up")
    parser.add_argument("--size", type=int, default=256, help="diffusion processing size")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    import cv2
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # dtype-cast notes about the random model
    torch.set_num_threads(os.cpu_count() or 1)
    threads = {"torch_threads": torch.get_num_threads(), "opencv_threads": cv2.getNumThreads()}
    warp, origin = time_warp(args.pairs, args.warp_size, args.flow_preset)
    print(f"warp error: {warp * 1000:.1f} ms per pair at {args.warp_size}x{args.warp_size} "
          f"({origin}, DIS {args.flow_preset})", file=sys.stderr)
    diffusion = time_diffusion(args.frames, args.size, args.steps)
    print(f"diffusion: {diffusion:.2f} s per frame (random SD 1.5 UNet, {args.size} px, {args.steps} steps)",
          file=sys.stderr)
    ratio = warp / diffusion
    print(f"ratio: {ratio:.4f} (target < 0.10)", file=sys.stderr)
    if args.json:
        print(json.dumps({
            "warp_seconds_per_pair": round(warp, 5),
            "diffusion_seconds_per_frame": round(diffusion, 4),
            "ratio": round(ratio, 5),
            "warp_size": [args.warp_size, args.warp_size],
            "flow_preset": args.flow_preset,
            "clip": origin,
            "diffusion_size": args.size,
            "diffusion_steps": args.steps,
            **threads,
        }))


if __name__ == "__main__":
    main()
