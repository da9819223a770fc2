"""`diffstream tune video`: a Tune-A-Video-style video UNet tuned one-shot on a clip.

    diffstream tune video CLIP -o OUT --source-prompt "a black swan ..." --model runwayml/stable-diffusion-v1-5

The result (OUT/final/) is what `diffstream edit CLIP --method fatezero --video-model
OUT/final ...` uses for FateZero's shape edits. The shared loop's options (--steps,
--learning-rate, checkpoints, resume, precision) come from `commands.tune`.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from diffstream.commands import common
from diffstream.errors import ConfigError

HELP = "tune a video UNet one-shot on a clip (Tune-A-Video) for FateZero's shape edits"
DESCRIPTION = ("Inflate an SD 1.x/2.x UNet with temporal layers and tune it on one clip under its source prompt "
               "(Tune-A-Video, as FateZero does for shape edits); use the result with "
               "`diffstream edit --method fatezero --video-model OUT/final`.")
# FateZero's tune configs (config/tune/*.yaml): lr 1e-5, validation and checkpoints every
# 50 steps; its shape edits use the checkpoints of steps 150-250 (README: jeep_tuned_200,
# swan_150, man_skate_250) of a 1000-step run: 200 steps by default.
LOOP_DEFAULTS = dict(steps=200, learning_rate=1e-5, checkpoint_every=50, validate_every=50)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `tune video` (the loop's are added by `commands.tune`)."""
    parser.add_argument("input", help="the clip: a video file or an image folder")
    parser.add_argument("--source-prompt", required=True,
                        help="text describing the clip, e.g. \"a black swan swimming in a river\"; the edit's "
                             "--source-prompt should be the same")
    parser.add_argument("--max-frames", type=int, default=8,
                        help="tune on the first N frames (default: 8, FateZero's and Tune-A-Video's clip length)")
    parser.add_argument("--size", type=int, default=512,
                        help="longer side of the processing size; the aspect ratio is kept (default: 512)")
    parser.add_argument("--validation-steps", type=int, default=50,
                        help="DDIM steps of the validation inversion and reconstruction (default: 50)")
    common.add_model_options(parser)


def _model_config(args):
    """The base model: LCM-LoRA off unless asked for (as `edit --method fatezero`), fp32
    weights (the tuned ones must be). Its --device is the run's too (`commands.tune`); the
    task keeps the VAE and text encoder with the UNet wherever accelerate puts it."""
    if args.dtype not in ("auto", "fp32"):
        raise ConfigError(f"tune video keeps the tuned weights in fp32 (--dtype {args.dtype} refused): use "
                          f"--mixed-precision fp16/bf16 for half-precision compute")
    if getattr(args, "motion_adapter", None):
        raise ConfigError("tune video adds its own temporal layers: leave out --motion-adapter")
    config = common.model_config(args)
    return replace(config, lcm_lora=config.lcm_lora if args.lcm_lora is not None else "none", dtype="fp32")


def command(args, loop) -> int:
    """Entry point of `diffstream tune video` (parsed args, the loop's `TuneConfig`).

    Checks every option before the model loads, reads the clip, loads and inflates the
    model, tunes it and prints how to use the result. Returns 0 (Ctrl-C raises the
    loop's TuneInterrupted, exit 130, with the checkpoint to resume from).
    """
    from diffstream.tuning.loop import resolve_resume, tune
    from diffstream.tuning.video import VideoTuneConfig, VideoTuneTask, check_clip, read_clip

    config = VideoTuneConfig(source_prompt=args.source_prompt, input=args.input, max_frames=args.max_frames,
                             size=args.size, validation_steps=args.validation_steps)
    model = _model_config(args)
    resolve_resume(loop)  # a run folder that is taken fails now, not after the model loads
    common.check_device(model)
    check_clip(config.input)  # an unreadable clip fails before the model loads
    common.quiet_libraries()
    from diffstream.models.loading import load_components

    if loop.progress:
        common.say(common.loading_message(model))
    components = load_components(model)
    frames = read_clip(config.input, config.max_frames, config.size, components.size_multiple)
    common.warn_long_prompts(components, config.source_prompt)
    task = VideoTuneTask(components, config, frames=frames, model_config=model)
    del components  # the task holds what it needs; the image UNet can go
    try:
        result = tune(task, loop)
    finally:
        task.close()
    metrics = result.metrics
    first, last = metrics.get(0), metrics.get(result.steps)
    if first and last:
        common.say(f"tune video: reconstruction PSNR {first['psnr']:.2f} -> {last['psnr']:.2f} dB "
                   f"(step 0 -> {result.steps})")
    common.say(f"tune video: wrote {result.final_dir}; use it with:")
    print(task.usage(result.final_dir), flush=True)
    return 0
