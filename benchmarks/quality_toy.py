#!/usr/bin/env python
"""Quality of every method on the trained toy model (issue #14): warp error, style accuracy, fps.

    .venv/bin/python benchmarks/quality_toy.py [--json] [--size 256] [--prompts all|"a sepia photo",...]

Clips the toy model was not trained on: frames 40-49 of `examples/bunny.mp4` (training
used frames 0-39) and the held-out procedural clip (`models.toy.held_out_clip`, 24 frames).
Every method runs on both clips for every style prompt at its default settings
(streamdiffusion: RCFG self 1.2, fixed noise; streamv2v: the feature bank, no guidance;
fairy: SDEdit mode, its default sampler; fatezero: DDIM inversion under "a photo" and the
fused edit to the style prompt). Rows named "method/key=value" change one setting, to
isolate a mechanism (see METHODS). live2diff is left out: the toy model has no trained
motion modules. Per method the table gives the mean warp error over clips and prompts,
style accuracy per style, the PSNR of the output to its prompt's target (mean over
styles: style accuracy only says the output is nearer its target than the other four),
"a photo" PSNR, and fps (frames / wall seconds of the whole
run, model calls included). The input clips' own warp error is the flow's noise floor.
The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
# "method/key=value" rows are the method with one setting changed: they isolate a
# mechanism (streamdiffusion at streamv2v's guidance 1.0 is streamv2v without its feature
# bank; fairy without anchors; fairy with per-frame noise).
METHODS = ("streamdiffusion", "streamdiffusion/guidance=1.0", "streamv2v", "fairy", "fairy/anchors=0",
           "fairy/noise=per-frame", "fatezero")


def parse_method(name: str) -> tuple[str, dict]:
    """("fairy", {"anchors": 0}) for "fairy/anchors=0"."""
    method, *settings = name.split("/")
    overrides = {}
    for item in settings:
        key, value = item.split("=", 1)
        try:
            overrides[key] = int(value)
        except ValueError:
            try:
                overrides[key] = float(value)
            except ValueError:
                overrides[key] = value
    return method, overrides


def bunny_held_out(size: tuple[int, int]) -> list:
    import av

    from diffstream.frames import resize

    with av.open(str(ROOT / "examples" / "bunny.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    return [resize(f, size) for f in frames[40:]]


def run_method(components, name: str, frames: list, prompt: str, seed: int = 2) -> list:
    """Outputs of method row `name` (see `parse_method`) on `frames` (already at the
    processing size), in order."""
    from diffstream.config import StreamConfig

    method, overrides = parse_method(name)
    h, w = frames[0].shape[:2]
    if method in ("streamdiffusion", "streamv2v"):
        from diffstream.pipelines.factory import make_pipeline

        pipe = make_pipeline(components, StreamConfig(prompt=prompt, size=max(h, w), method=method, seed=seed,
                                                         **overrides))
        outs = []
        for f in frames:
            outs += pipe.process(f)
        return outs + pipe.flush()
    if method == "fairy":
        from diffstream.pipelines.fairy import FairyConfig, FairyPipeline

        pipe = FairyPipeline(components, FairyConfig(prompt=prompt, seed=seed, size=max(h, w), **overrides))
        try:
            return list(pipe.edit(list(frames)))
        finally:
            pipe.close()
    if method == "fatezero":
        from diffstream.pipelines.fatezero import FateZeroEditConfig, edit_frames

        config = FateZeroEditConfig(source_prompt="a photo", prompt=prompt, **overrides)
        return [frame for _, frame in edit_frames(components, list(frames), config)]
    raise ValueError(method)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--prompts", default="all")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from diffstream import ModelConfig, load_components
    from diffstream.metrics.style import psnr, style_accuracy
    from diffstream.models.toy import TOY_STYLES, held_out_clip

    components = load_components(ModelConfig(model="toy", device="cpu"))
    prompts = list(TOY_STYLES) if args.prompts == "all" else [p.strip() for p in args.prompts.split(",")]
    w = args.size
    h = args.size * 9 // 16 // components.size_multiple * components.size_multiple
    clips = {"bunny 40-49": bunny_held_out((w, h)), "procedural": held_out_clip(24, (w, h))}

    reference = {name: warp_pairs(frames, frames) for name, frames in clips.items()}
    results = {}
    for method in args.methods.split(","):
        rows = {}
        frames_done, seconds = 0, 0.0
        for prompt in prompts:
            for clip_name, frames in clips.items():
                t0 = time.perf_counter()
                outs = run_method(components, method, frames, prompt)
                seconds += time.perf_counter() - t0
                frames_done += len(frames)
                entry = dict(warp_error_255=warp_pairs(frames, outs), style_accuracy=style_accuracy(frames, outs, prompt),
                             # how close to the prompted target, not only nearer than the other four
                             target_psnr=float(np.mean([psnr(TOY_STYLES[prompt](a), b) for a, b in zip(frames, outs)])))
                if prompt == "a photo":
                    entry["psnr"] = float(np.mean([psnr(a, b) for a, b in zip(frames, outs)]))
                rows[f"{clip_name}: {prompt}"] = entry
                print(f"{method:28s} {clip_name:12s} {prompt:22s} {entry}", file=sys.stderr, flush=True)
        results[method] = dict(
            fps=frames_done / seconds,
            warp_error_255=float(np.mean([r["warp_error_255"] for r in rows.values()])),
            style_accuracy={p: float(np.mean([rows[f"{c}: {p}"]["style_accuracy"] for c in clips])) for p in prompts},
            target_psnr=float(np.mean([r["target_psnr"] for r in rows.values()])),
            photo_psnr=float(np.mean([rows[f"{c}: a photo"]["psnr"] for c in clips])) if "a photo" in prompts else None,
            runs=rows,
        )

    print(f"\n{len(prompts)} prompts x {len(clips)} held-out clips ({', '.join(clips)}) at {w}x{h}")
    head = ["method", "warp err 0-255", *[p.replace("a ", "", 1) for p in prompts], "target PSNR dB", "photo PSNR dB",
            "fps"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for method, r in results.items():
        cells = [method, f"{r['warp_error_255']:.2f}", *[f"{r['style_accuracy'][p]:.2f}" for p in prompts],
                 f"{r['target_psnr']:.1f}", "n/a" if r["photo_psnr"] is None else f"{r['photo_psnr']:.1f}", f"{r['fps']:.2f}"]
        print("| " + " | ".join(cells) + " |")
    print(f"| input clips (flow noise floor) | {np.mean(list(reference.values())):.2f} |")
    print(json.dumps(dict(size=[w, h], prompts=prompts, input_warp_error_255=reference, methods=results)))
    return 0


def warp_pairs(inputs: list, outputs: list) -> float:
    """Mean warp error (0-255) of `outputs`, the flow taken from the inputs."""
    from diffstream.metrics.warp import WarpErrorMeter

    meter = WarpErrorMeter("medium")
    for a, b in zip(inputs, outputs, strict=True):
        meter.update(a, b)
    return float(meter.result().mean_255)


if __name__ == "__main__":
    sys.exit(main())
