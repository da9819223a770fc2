"""`diffstream edit --method fairy`: Fairy's options and its edit command."""

from __future__ import annotations

import argparse
import dataclasses
import time

from diffstream.commands import common
from diffstream.config import DEFAULT_MODEL, NOISE_MODES, uses_lcm, uses_turbo
from diffstream.errors import ConfigError
from diffstream.pipelines.fairy import (
    DEFAULT_ANCHORS,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_DDIM_STEPS,
    DEFAULT_EULER_STEPS,
    DEFAULT_GUIDANCE,
    DEFAULT_IMAGE_GUIDANCE,
    DEFAULT_LCM_GUIDANCE,
    DEFAULT_LCM_STEPS,
    DEFAULT_STRENGTH,  # noqa: F401  (shown by commands.edit)
    INSTRUCT_DEFAULT_MODEL,
    SAMPLERS,
    FairyConfig,
    FairyPipeline,
)

DEFAULT_STEPS_HELP = f"{DEFAULT_EULER_STEPS} Euler a / {DEFAULT_DDIM_STEPS} DDIM, {DEFAULT_LCM_STEPS} LCM, 1 turbo"
DEFAULT_GUIDANCE_HELP = f"{DEFAULT_GUIDANCE}, LCM {DEFAULT_LCM_GUIDANCE}"


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """Fairy-only options (the shared --prompt/--steps/--guidance/--strength come from
    `commands.edit`)."""
    group.add_argument("--instruction", default="",
                       help="edit instruction, e.g. \"Turn into a marble Roman sculpture\" (InstructPix2Pix-style "
                            f"model; with the default --model this uses {INSTRUCT_DEFAULT_MODEL})")
    group.add_argument("--anchors", type=int, default=DEFAULT_ANCHORS,
                       help=f"anchor frames for cross-frame attention; 0 edits frames independently "
                            f"(default: {DEFAULT_ANCHORS})")
    group.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                       help=f"frames per UNet batch; memory grows with it, not with video length "
                            f"(default: {DEFAULT_CHUNK_SIZE})")
    group.add_argument("--image-guidance", type=float, default=DEFAULT_IMAGE_GUIDANCE,
                       help=f"InstructPix2Pix image guidance scale (default: {DEFAULT_IMAGE_GUIDANCE})")
    group.add_argument("--sampler", default="auto", choices=SAMPLERS,
                       help="euler-a (Euler ancestral, Fairy's sampler) | ddim (eta 0) | lcm (SDEdit with "
                            "LCM-LoRA/turbo models) | auto: euler-a for --instruction, lcm for LCM/turbo models, "
                            "else ddim (default: auto)")
    group.add_argument("--noise", default="fixed", choices=NOISE_MODES,
                       help="fixed (default: every frame starts from the same noise, temporally stable) | "
                            "per-frame (frame i's own noise from (seed, i))")
    group.add_argument("--workers", type=int, default=None,
                       help="split the frames across N local Ray worker processes (needs diffstream[ray]) "
                            "(default: one process, no Ray)")
    group.add_argument("--ray-address", default=None,
                       help="run the workers on this Ray cluster (e.g. ray://head:10001 or auto); "
                            "--workers defaults to one per GPU of the cluster")
    group.add_argument("--anchor-transfer", default="recompute", choices=("recompute", "object-store"),
                       help="each worker recomputes the anchors (default: cheap, no GBs to ship) or receives "
                            "them through Ray's object store")


def fairy_config(args) -> FairyConfig:
    """The FairyConfig of parsed `diffstream edit` arguments (raises ConfigError)."""
    return FairyConfig(
        instruction=getattr(args, "instruction", "") or "",
        prompt=getattr(args, "prompt", "") or "",
        negative_prompt=getattr(args, "negative_prompt", "") or "",
        anchors=args.anchors,
        chunk_size=args.chunk_size,
        steps=getattr(args, "steps", None),
        guidance=getattr(args, "guidance", None),
        image_guidance=args.image_guidance,
        strength=getattr(args, "strength", None),
        sampler=getattr(args, "sampler", "auto"),
        noise=getattr(args, "noise", "fixed") or "fixed",
        seed=common.resolve_seed(getattr(args, "seed", 0)),
        size=getattr(args, "size", 512),
    )


def edit_model_config(args, config: FairyConfig):
    """The ModelConfig for an edit: `tiny` becomes the 8-channel instruction model and the
    default preset becomes InstructPix2Pix when an instruction is given."""
    model = common.model_config(args)
    if config.instructing:
        if model.model == DEFAULT_MODEL:
            model = dataclasses.replace(model, model=INSTRUCT_DEFAULT_MODEL)
        if model.model in ("tiny", "toy"):  # toy refuses it in one line when it loads
            model = dataclasses.replace(model, instruct=True)
    return model


def edit_command(args) -> int:
    """`diffstream edit --method fairy`: edit a whole clip into an output file.

    Order of failures: bad options (ConfigError) and an unusable output before anything
    is opened; a bad input (InputError) before the model loads. Ctrl-C finalises the
    output with every frame done so far and returns 130.
    """
    from diffstream.io.clip import Clip
    from diffstream.io.sinks import check_output, open_sink
    from diffstream.pipelines.distributed import RayConfig

    config = fairy_config(args)
    model = edit_model_config(args, config)
    config = config.resolve(lcm=uses_lcm(model), turbo=uses_turbo(model))
    ray_config = RayConfig(
        workers=getattr(args, "workers", None),
        address=getattr(args, "ray_address", None),
        anchor_transfer=getattr(args, "anchor_transfer", "recompute").replace("-", "_"),
    )
    ray_config.check_available()
    max_frames = getattr(args, "max_frames", None)
    if max_frames is not None and max_frames < 1:
        raise ConfigError(f"--max-frames must be >= 1, got {max_frames}")
    check_output(args.output, inputs=(args.input,), live_ok=False)
    common.check_device(model)

    clip = Clip(args.input, max_frames=max_frames, fps=getattr(args, "fps", None))
    num_frames = len(clip)
    sink = outputs = pipe = job = None
    bar = common.progress_bar(None, False)
    written, status = [0], 0
    start = time.perf_counter()
    try:
        common.quiet_libraries()
        model = common.compile_for_stateful(model, "fairy")  # the workers load it too
        if ray_config.enabled:
            from diffstream.pipelines.distributed import DistributedEdit

            job = DistributedEdit(model, config, clip, ray_config)
            size = job.start()
            outputs = iter(job)
        else:
            from diffstream.models.loading import load_components

            if not getattr(args, "no_progress", False):
                common.say(common.loading_message(model))
            components = load_components(model)
            common.warn_long_prompts(components, config.instruction, config.prompt, config.negative_prompt)
            pipe = FairyPipeline(components, config, lcm=uses_lcm(model))
            size = pipe.processing_size(clip.width, clip.height)
            outputs = pipe.edit(clip)
        sink = open_sink(args.output, fps=clip.fps, size=size, audio_path=clip.audio_path)
        bar = common.progress_bar(num_frames, not getattr(args, "no_progress", False))
        start = time.perf_counter()
        common.write_frames(outputs, sink.write, bar, written)
    except KeyboardInterrupt:
        status = 130
    finally:
        bar.close()
        try:
            if outputs is not None and hasattr(outputs, "close"):
                outputs.close()
            if job is not None:
                job.close()  # stops the workers (and a local Ray cluster started for this run)
            if pipe is not None:
                pipe.close()
        finally:
            if sink is not None:
                sink.close()
    common.print_warnings(clip, sink)
    common.say(common.closing_line(status, written[0], args.output, time.perf_counter() - start, total=num_frames))
    return status
