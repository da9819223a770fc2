"""`diffstream edit --method fatezero`: FateZero's options and its edit command."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

from diffstream.attention.fatezero import FRAME_ATTENTION, REFERENCE_FRAMES, FateZeroConfig
from diffstream.attention.store import parse_size
from diffstream.commands import common
from diffstream.config import DEFAULT_MODEL
from diffstream.errors import ConfigError, OutputError
from diffstream.models.video_unet import read_video_model_info
from diffstream.pipelines import fatezero
from diffstream.pipelines.fatezero import (
    FUSION_SOURCES,
    P2P_MODES,
    SHAPE_EDIT,
    STORE_DTYPES,
    FateZeroEditConfig,
    read_inversion_meta,
)

DEFAULT_STEPS = 50  # the paper's DDIM steps for inversion and editing (and of 2 of the reference's 3 shape configs)
DEFAULT_GUIDANCE = 7.5  # the paper's CFG scale of the editing pass
# The fusion schedule of style and attribute edits: FateZeroConfig's own defaults (Sec. 4.1
# and the reference's style configs); --video-model switches to SHAPE_EDIT.
DEFAULT_SCHEDULE = {f.name: f.default for f in fields(FateZeroConfig) if f.name in SHAPE_EDIT}


def _reweight(text: str) -> tuple[str, float]:
    word, sep, value = text.rpartition("=")
    try:
        if sep and word.strip():
            return word.strip(), float(value)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected WORD=FACTOR like watercolor=5, got {text!r}")


def add_arguments(group) -> None:
    """FateZero-only options (an argparse group); --steps, --guidance and
    --negative-prompt are the shared ones of `commands.edit`."""
    group.add_argument("--source-prompt", default=None,
                       help="text describing the input clip, e.g. \"a black swan swimming in a river\" "
                            "(fatezero; optional with --load-inversion)")
    group.add_argument("--blend-words", nargs=2, default=None, metavar=("SOURCE_WORDS", "TARGET_WORDS"),
                       help="edited object in the source and target prompt, e.g. swan duck: blends self-attention "
                            "with the source cross-attention mask (Eqs. 6-7) for shape/local edits")
    group.add_argument("--video-model", default=None, metavar="DIR",
                       help="a video UNet tuned on this clip by `diffstream tune video` (its final/ folder): shape "
                            "edits (FateZero Sec. 4 with Tune-A-Video). Its base model is loaded unless --model is "
                            "given, and the shape-edit schedule becomes the default: --cross-replace 0.0 "
                            "--self-replace 0.5 --blend-threshold 0.2 --frame-attention previous+first "
                            "--reference-frame previous --cross-frame-min-downsample 1 (explicit options win)")
    group.add_argument("--blend-threshold", type=float, default=None,
                       help="tau of the blend mask (default: 0.3; 0.2 with --video-model)")
    group.add_argument("--cross-replace", type=float, default=None,
                       help="fraction of the editing steps (from the noisiest) whose cross-attention of shared words "
                            "comes from the inversion (default: 0.8, i.e. t in [0.2T, T]; 0.0 with --video-model)")
    group.add_argument("--self-replace", type=float, default=None,
                       help="fraction of the editing steps whose self-attention comes from the inversion "
                            "(default: 0.8; 0.5 with --video-model)")
    group.add_argument("--fz-reweight", action="append", type=_reweight, default=[], metavar="WORD=FACTOR",
                       help="scale a target word's cross-attention during fusion, e.g. watercolor=5; repeatable")
    group.add_argument("--cross-replace-word", action="append", type=_reweight, default=[],
                       metavar="WORD=FRACTION",
                       help="Prompt-to-Prompt per-word schedule: fuse this target word's cross-attention for this "
                            "fraction of the steps instead of --cross-replace's, e.g. duck=0.4; repeatable")
    group.add_argument("--p2p", default="auto", choices=P2P_MODES,
                       help="cross-attention fusion: replace (word swap: target token j takes source token j's map; "
                            "prompts of equal token count), refine (shared words aligned, new words keep their own "
                            "maps) or auto (replace when the token counts are equal, else refine; default)")
    group.add_argument("--store-dtype", default="model", choices=tuple(STORE_DTYPES),
                       help="dtype of the stored attention inputs: model (default: the model's, so maps are "
                            "recomputed exactly), fp16 (half the store of an fp32 model; maps from rounded "
                            "inputs) or fp32")
    group.add_argument("--frame-attention", default=None, choices=FRAME_ATTENTION,
                       help="what each frame's self-attention sees: own+reference (the paper's Eq. 8), "
                            "reference (the reference frame only: the reference code's style/attribute configs, "
                            "with --reference-frame middle; default), previous+first (the reference code's default, "
                            "sparse-causal attention; needs --reference-frame previous; default with --video-model)")
    group.add_argument("--cross-frame-min-downsample", type=int, default=None,
                       help="only self-attention layers at least this many times coarser than the latent attend "
                            "across frames (default 2: the reference's style configs, plain per-frame "
                            "attention at SD 1.5's 64x64 layers; 1: every layer, the paper, and the default with "
                            "--video-model)")
    group.add_argument("--reference-frame", default=None, choices=REFERENCE_FRAMES,
                       help="frame every frame also attends to (Eq. 8; default: middle; previous with --video-model)")
    # Earlier names of the shared options, kept so old command lines still work.
    group.add_argument("--fz-steps", dest="steps", type=int, help=argparse.SUPPRESS)
    group.add_argument("--fz-guidance", dest="guidance", type=float, help=argparse.SUPPRESS)
    group.add_argument("--fz-negative-prompt", dest="negative_prompt", help=argparse.SUPPRESS)
    group.add_argument("--fz-window", type=int, default=8,
                       help="frames per window; longer clips are edited in windows sharing the reference frame "
                            "(default: 8)")
    group.add_argument("--fz-fuse-min-downsample", type=int, default=2,
                       help="fuse only attention layers at least this many times coarser than the latent "
                            "(default: 2, the reference's <= 32x32 at 512 px; 1 = every layer)")
    group.add_argument("--store-budget", default="4GB",
                       help="RAM for the attention store; the rest is memory-mapped on disk (default: 4GB; 0, inf)")
    group.add_argument("--store-dir", default=None, help="folder for the store's spill file (default: system temp)")
    group.add_argument("--fusion-source", default="store", choices=FUSION_SOURCES,
                       help="store: keep the inversion's attention; recompute: keep only its latents and re-run "
                            "the source branch at each fused step (MiBs instead of GiBs, one extra UNet call "
                            "per fused step) (default: store)")
    group.add_argument("--save-inversion", default=None, metavar="DIR",
                       help="save the inversion to DIR (a new or empty folder) to edit again later")
    group.add_argument("--load-inversion", default=None, metavar="DIR",
                       help="edit from an inversion saved with --save-inversion (same input and settings)")


def edit_config(args) -> FateZeroEditConfig:
    """Typed config from parsed CLI options; every check that needs no model (ConfigError/InputError)."""
    source_prompt = args.source_prompt
    if args.save_inversion and args.load_inversion:
        raise ConfigError("--save-inversion and --load-inversion exclude each other")
    if args.load_inversion:
        meta = read_inversion_meta(args.load_inversion)
        if source_prompt is None:
            source_prompt = meta.get("source_prompt", "")
        elif source_prompt != meta.get("source_prompt"):
            raise ConfigError(f"--source-prompt differs from the one the inversion in {args.load_inversion} "
                              f"was made with ({meta.get('source_prompt')!r})")
    if args.save_inversion:
        target = Path(args.save_inversion)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise OutputError(f"--save-inversion {args.save_inversion} exists and is not an empty folder: "
                              f"choose a new folder")
    steps = args.steps if args.steps is not None else DEFAULT_STEPS
    # The schedule: explicit options, else FateZero's shape-edit schedule with a video
    # model (`pipelines.fatezero.SHAPE_EDIT`), else its style/attribute defaults.
    defaults = dict(DEFAULT_SCHEDULE)
    if getattr(args, "video_model", None):
        read_video_model_info(args.video_model)  # a bad folder fails before anything else
        defaults.update(SHAPE_EDIT)
    schedule = {key: value if (value := getattr(args, key, None)) is not None else defaults[key]
                for key in defaults}
    fz = FateZeroConfig(steps=steps, fuse_min_downsample=args.fz_fuse_min_downsample, **schedule)
    return FateZeroEditConfig(
        source_prompt=source_prompt or "", prompt=getattr(args, "prompt", "") or "",
        guidance=args.guidance if args.guidance is not None else DEFAULT_GUIDANCE,
        negative_prompt=args.negative_prompt or "", blend_words=tuple(args.blend_words) if args.blend_words else None,
        reweight=tuple(args.fz_reweight), word_replace=tuple(getattr(args, "cross_replace_word", [])), window=args.fz_window, store_budget=parse_size(args.store_budget),
        fusion_source=args.fusion_source, spill_dir=args.store_dir, fatezero=fz,
        store_dtype=getattr(args, "store_dtype", "model"), p2p=getattr(args, "p2p", "auto"),
    )


def model_config(args):
    """The shared model options; the preset's LCM-LoRA is not fused (FateZero runs 50
    DDIM steps with CFG 7.5 on the base checkpoint) unless --lcm-lora is given.

    With --video-model the base model is the one the video model was tuned from (its
    checkpoint, LCM-LoRA and LoRAs): --model may be left out, and a different one is
    refused (the video UNet replaces the base UNet, but the text encoder and VAE must be
    the ones it was tuned with)."""
    video = getattr(args, "video_model", None)
    if video and getattr(args, "motion_adapter", None):
        raise ConfigError("--video-model brings its own temporal layers: leave out --motion-adapter")
    config = common.model_config(args)
    if args.lcm_lora is None:
        config = replace(config, lcm_lora="none")
    if not video:
        return config
    info = read_video_model_info(video)
    config = replace(config, video_model=video)
    if args.model == DEFAULT_MODEL:  # --model left out: the base the video model was tuned from
        config = replace(config, model=info["base_model"],
                         lcm_lora=args.lcm_lora if args.lcm_lora is not None else (info.get("lcm_lora") or "none"),
                         loras=config.loras or tuple((p, float(s)) for p, s in info.get("loras", [])))
    resolved = config.resolved()
    lcm = resolved.lcm_lora if resolved.lcm_lora and str(resolved.lcm_lora).lower() != "none" else None
    have = (resolved.model, lcm, [[str(p), float(s)] for p, s in resolved.loras])
    wanted = (info.get("base_model"), info.get("lcm_lora"), info.get("loras", []))
    if have != wanted:
        def options(model, lcm_lora, loras):
            return (f"--model {model}" + (f" --lcm-lora {lcm_lora}" if lcm_lora else "")
                    + "".join(f" --lora {p}:{s:g}" for p, s in loras))
        raise ConfigError(f"--video-model {video} was tuned from {options(*wanted)}, not {options(*have)}: leave "
                          f"out --model, --lcm-lora and --lora to load its base model")
    return config


def edit_command(args) -> int:
    """`diffstream edit INPUT -o OUTPUT --method fatezero ...`.

    Validates every option and the output before the model loads, opens the input,
    loads the model, edits window by window and writes frames as windows finish (with
    the input's audio). Ctrl-C / SIGTERM finalise the output with every frame done
    (exit 130). Returns 0 when done; DiffstreamErrors propagate as one-line errors.
    """
    from diffstream.frames import fit_size, resize
    from diffstream.io.clip import FrameFile
    from diffstream.io.sinks import check_output, open_sink
    from diffstream.io.sources import open_source

    config = edit_config(args)
    model = model_config(args)
    if args.load_inversion:
        meta = read_inversion_meta(args.load_inversion)
        if meta.get("model") != model.resolved().model:
            raise ConfigError(f"--load-inversion {args.load_inversion} was made with model {meta.get('model')!r}, "
                              f"not {model.resolved().model!r}")
    if int(getattr(args, "size", 512)) < 8:
        raise ConfigError(f"--size must be at least 8 pixels, got {args.size}")
    check_output(args.output, inputs=(args.input,), live_ok=False)
    common.check_device(model)
    progress_on = not getattr(args, "no_progress", False)
    source = open_source(args.input, max_frames=getattr(args, "max_frames", None), fps=getattr(args, "fps", None))
    buffer = sink = None
    bar = common.progress_bar(None, False)
    written, status = [0], 0
    start = time.perf_counter()
    try:
        common.quiet_libraries()
        from diffstream.models.loading import load_components

        if progress_on:
            common.say(common.loading_message(model))
        components = load_components(common.compile_for_stateful(model, "fatezero"))
        common.warn_long_prompts(components, config.source_prompt, config.prompt, config.negative_prompt)
        size = fit_size(source.width, source.height, int(getattr(args, "size", 512)), components.size_multiple)
        buffer = FrameFile(size, config.spill_dir)
        for frame in source:
            buffer.append(resize(frame, size))
        frames = buffer.array()
        windows = fatezero.plan_windows(len(frames), config.window, config.fatezero.reference_frame,
                                        first=config.fatezero.frame_attention == "previous+first")
        per_window = config.fatezero.steps * (1 if args.load_inversion else 2)
        bars = []

        def progress():
            # created on the first step, so the plan line printed before it stays readable
            if not bars:
                bars.append(common.progress_bar(per_window * len(windows), True, unit="step", desc="fatezero"))
            bars[0].update(1)

        def log(text):
            print(f"diffstream: fatezero: {text}", file=sys.stderr)

        # validates a saved inversion completely before the output is touched
        edits = fatezero.edit_frames(components, frames, config, save_inversion=args.save_inversion,
                                     load_inversion=args.load_inversion, progress=progress if progress_on else None,
                                     log=log, model_config=model)
        sink = open_sink(args.output, fps=source.fps, size=size, audio_path=source.audio_path)
        start = time.perf_counter()
        for _, frame in edits:
            sink.write(frame)
            written[0] += 1
            if bars:
                bars[0].set_postfix(frames=written[0], refresh=False)
    except KeyboardInterrupt:
        status = 130
    finally:
        for b in locals().get("bars") or []:
            b.close()
        try:
            if sink is not None:
                sink.close()
        finally:
            source.close()
            if buffer is not None:
                buffer.close()
    common.print_warnings(source, sink)
    common.say(common.closing_line(status, written[0], args.output, time.perf_counter() - start))
    return status
