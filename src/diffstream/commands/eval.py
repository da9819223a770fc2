"""`diffstream eval --source IN --output OUT`: every quality metric of one result."""

from __future__ import annotations

import argparse
import sys

from diffstream.commands import common
from diffstream.errors import ConfigError, DiffstreamError
from diffstream.metrics.clip import DEFAULT_CLIP_MODEL
from diffstream.metrics.evaluate import FLOW_PRESETS, evaluate_files, load_clip_scorer, load_depth_estimator, plot_report
from diffstream.metrics.report import check_output_path, write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `diffstream eval` (adds --device too unless the parser has one)."""
    parser.add_argument("--source", required=True, help="the input video (file or image folder)")
    parser.add_argument("--output", required=True, help="the result to judge (file or image folder)")
    parser.add_argument("--prompt", default=None, help="target prompt: adds the CLIP text score")
    parser.add_argument("--source-prompt", default=None,
                        help="prompt describing the source: adds CLIP frame accuracy (needs --prompt)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write every field as JSON")
    parser.add_argument("--plot", default=None, metavar="FILE.png", help="plot per-pair warp error to a PNG")
    parser.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL, metavar="ID_OR_PATH",
                        help=f"CLIP checkpoint: hub id or local folder, or 'none' (default: {DEFAULT_CLIP_MODEL})")
    parser.add_argument("--depth-model", default=None, metavar="ID_OR_PATH",
                        help="depth-estimation checkpoint (e.g. Intel/dpt-hybrid-midas or a folder): adds depth MSE "
                             "(default: none)")
    parser.add_argument("--max-frames", type=int, default=None, help="compare only the first N frames (default: all)")
    parser.add_argument("--flow-preset", default="medium", choices=FLOW_PRESETS,
                        help="optical-flow quality for warp error (default: medium)")
    if "--device" not in getattr(parser, "_option_string_actions", {}):
        parser.add_argument("--device", default="auto",
                            help="device of the CLIP/depth models: auto, cpu, cuda, ... (default: auto)")


def eval_command(args: argparse.Namespace, *, clip=None, depth=None) -> int:
    """`diffstream eval`: print the metrics table; optionally write JSON and a plot.

    Args:
        args: parsed options of `add_arguments`.
        clip: a prebuilt `ClipScorer` used instead of loading --clip-model.
        depth: a prebuilt `DepthEstimator` used instead of loading --depth-model.
    Returns:
        exit code: 0, or 2 after printing a one-line error (bad option/input/output).
    """
    try:
        if args.max_frames is not None and args.max_frames < 1:
            raise ConfigError(f"--max-frames must be >= 1, got {args.max_frames}")
        if args.source_prompt is not None and args.prompt is None:
            raise ConfigError("--source-prompt needs --prompt as well (frame accuracy compares the two)")
        check_output_path(args.json, "--json")
        check_output_path(args.plot, "--plot", (".png",))
        from diffstream.io.sources import open_source

        # Open both inputs before any model loads, so a bad path fails at once.
        for spec in (args.source, args.output):
            open_source(spec, max_frames=1).close()
        common.quiet_libraries()
        device = getattr(args, "device", "auto")
        notes = []
        if clip is None:
            clip, note = load_clip_scorer(args.clip_model, device)
            notes.append(note)
        if depth is None:
            depth, note = load_depth_estimator(args.depth_model, device)
            notes.append(note)
        for note in notes:
            if note:
                common.warn(note)
        report = evaluate_files(
            args.source, args.output, max_frames=args.max_frames, prompt=args.prompt,
            source_prompt=args.source_prompt, clip=clip, depth=depth, flow_preset=args.flow_preset,
        )
        for note in report.warnings:
            common.warn(note)
        report.warnings[:0] = [n for n in notes if n]
        print(report.table(), flush=True)
        if args.json:
            write_json(args.json, report.to_dict())
        if args.plot:
            plot_report(report, args.plot)
        return 0
    except DiffstreamError as err:
        print(f"diffstream: error: {err}", file=sys.stderr)
        return err.exit_code


command = eval_command
