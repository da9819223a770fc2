"""`diffstream bench IN --prompt "..." --methods a,b,c`: methods side by side on one clip."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from diffstream.commands import common
from diffstream.errors import ConfigError, DiffstreamError
from diffstream.metrics.bench import REGISTRY, STREAM, load_clip_frames, resolve_methods, run_benchmark
from diffstream.metrics.clip import DEFAULT_CLIP_MODEL
from diffstream.metrics.evaluate import FLOW_PRESETS, load_clip_scorer
from diffstream.metrics.report import check_output_path, write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `diffstream bench` (the model options come from `common.add_model_options`)."""
    parser.add_argument("input", help="the clip to run every method on (video file or image folder)")
    parser.add_argument("--prompt", required=True, help="target prompt for every method (and the CLIP text score)")
    parser.add_argument("--methods", default="streamdiffusion,streamv2v",
                        help=f"comma-separated, from {', '.join(REGISTRY)} (default: streamdiffusion,streamv2v)")
    parser.add_argument("--max-frames", "--frames", dest="frames", type=int, default=16,
                        help="frames of the clip to use (default: 16)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write every field as JSON")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="PNG with per-frame warp error and latency curves per method")
    parser.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL, metavar="ID_OR_PATH",
                        help=f"CLIP checkpoint for the quality metrics, or 'none' (default: {DEFAULT_CLIP_MODEL})")
    parser.add_argument("--size", type=int, default=512, help="longer side of the processing size (default: 512)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps of the streams (default: 4, turbo: 1)")
    parser.add_argument("--strength", type=float, default=0.4, help="SDEdit strength (default: 0.4)")
    parser.add_argument("--seed", type=int, default=2, help="one seed for every method; -1 picks a random one (default: 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed frames per stream before timing (default: 1)")
    parser.add_argument("--flow-preset", default="medium", choices=FLOW_PRESETS,
                        help="optical-flow quality for warp error (default: medium)")


def bench_command(args: argparse.Namespace, *, clip=None, components=None) -> int:
    """`diffstream bench`: run, print the markdown table, write JSON / plot if asked.

    Args:
        args: parsed `common.add_model_options` + `add_arguments` options.
        clip: a prebuilt `ClipScorer` used instead of loading --clip-model.
        components: prebuilt `Components` used instead of loading --model.
    Returns:
        exit code: 0; 1 if a method failed (the others are still reported); 2 after a
        one-line error (bad option, input, model).
    """
    try:
        # Everything that can be checked without a model is checked first.
        methods = resolve_methods(args.methods)
        args.seed = common.resolve_seed(args.seed)
        if args.frames < 2:
            raise ConfigError(f"--max-frames must be at least 2 (warp error compares pairs), got {args.frames}")
        if args.warmup < 0:
            raise ConfigError(f"--warmup must be >= 0, got {args.warmup}")
        check_output_path(args.json, "--json")
        check_output_path(args.plot, "--plot", (".png",))
        from diffstream.config import StreamConfig

        stream_config = StreamConfig(prompt=args.prompt, seed=args.seed, size=args.size, steps=args.steps,
                                     strength=args.strength)
        model_config = common.model_config(args)
        from diffstream.io.sources import open_source

        open_source(args.input, max_frames=1).close()  # a bad input fails before the model loads
        common.quiet_libraries()
        needs_components = any(m.kind == STREAM or m.takes == "components" for m, _ in methods)
        if components is None and needs_components:
            from diffstream.models.loading import load_components

            common.say(common.loading_message(model_config))
            # Image UNet for every method; live2diff gets its motion modules inserted later.
            components = load_components(dataclasses.replace(model_config, motion_adapter=None))
        multiple = components.size_multiple if components is not None else 64
        frames, (w, h) = load_clip_frames(args.input, args.frames, args.size, multiple)
        common.say(f"bench {os.path.basename(args.input)}: {len(frames)} frames at {w}x{h}, "
                   f"model {model_config.model}, seed {args.seed}")
        report = run_benchmark(
            frames, methods, prompt=args.prompt, stream_config=stream_config, components=components,
            model_config=model_config, clip=clip,
            clip_loader=lambda: load_clip_scorer(args.clip_model, getattr(args, "device", "auto")),
            warmup=args.warmup, flow_preset=args.flow_preset,
            info={"input": str(args.input), "input_name": os.path.basename(str(args.input))},
            log=common.say,
        )
        for note in report.warnings:
            common.warn(note)
        print(report.table(), flush=True)
        if args.json:
            write_json(args.json, report.to_dict())
        if args.plot:
            report.plot(args.plot)
        # A method that crashed is in the table and JSON; the exit code says so too.
        return 1 if any(r.error for r in report.results) else 0
    except DiffstreamError as err:
        print(f"diffstream: error: {err}", file=sys.stderr)
        return err.exit_code


command = bench_command
