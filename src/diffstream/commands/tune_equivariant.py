"""`diffstream tune equivariant`: Fairy's equivariant fine-tuning of an InstructPix2Pix model.

    diffstream tune equivariant DATA -o OUT [--model timbrooks/instruct-pix2pix] [--lora-rank 16]

DATA holds (input, instruction, edited) triplets (`diffstream.tuning.equivariant`); the
result in OUT/final/ is what `diffstream edit --method fairy --model OUT/final` loads (or,
with --lora-rank, `--model BASE --lora OUT/final/pytorch_lora_weights.safetensors`).
"""

from __future__ import annotations

import argparse

from diffstream.commands import common
from diffstream.pipelines.fairy import (DEFAULT_EULER_STEPS, DEFAULT_GUIDANCE, DEFAULT_IMAGE_GUIDANCE,
                                        INSTRUCT_DEFAULT_MODEL)
from diffstream.tuning.equivariant import (
    FAIRY_CROP_RATIO,
    FAIRY_DEGREES,
    FAIRY_SCALE,
    FAIRY_SHEAR,
    FAIRY_SIZE,
    FAIRY_TRANSLATE,
    IP2P_CONDITIONING_DROPOUT,
    AffineRanges,
    EquivariantConfig,
)

HELP = "Fairy's equivariant fine-tuning of an InstructPix2Pix model on editing triplets"
DESCRIPTION = ("Fine-tune an InstructPix2Pix model so that editing a transformed frame equals transforming the "
               "edited frame (Fairy, Sec. 5.2): every training pair gets the same random affine transform and "
               "crop. DATA: a folder with input/, edited/ and instructions/ (or instruction.txt), or a "
               "manifest .json/.jsonl/.csv of input, instruction, edited.")
# InstructPix2Pix's learning rate (Brooks et al., Sec. 4: 1e-4, no warm-up).
LOOP_DEFAULTS = dict(steps=1000, learning_rate=1e-4, checkpoint_every=250, validate_every=250)


def scale_range(text: str) -> tuple[float, float]:
    """Parse "0.95,1.05" (argparse type)."""
    try:
        lo, hi = (float(v) for v in text.replace(" ", ",").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI like 0.95,1.05, got {text!r}") from None
    return lo, hi


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The task's own options (the loop's come from `commands.tune.add_loop_options`)."""
    parser.add_argument("data", help="triplet folder (input/, edited/, instructions/NAME.txt or instruction.txt) "
                                     "or manifest (.json/.jsonl/.csv: input, instruction, edited)")
    m = parser.add_argument_group("model")
    m.add_argument("--model", default=INSTRUCT_DEFAULT_MODEL,
                   help="InstructPix2Pix checkpoint to tune: hub id, diffusers folder or .safetensors; a "
                        "text-to-image SD 1.x/2.x model is widened to 8 input channels first (as InstructPix2Pix was made); 'toy' "
                        "(the shipped trained toy model, widened) or 'tiny' (random, for tests) "
                        f"(default: {INSTRUCT_DEFAULT_MODEL})")
    m.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps (default: auto)")
    m.add_argument("--lora-rank", type=int, default=None,
                   help="train a LoRA of this rank (attention projections and conv_in) instead of every UNet "
                        "weight; the result is a diffusers LoRA file for edit --lora (default: full fine-tuning)")
    d = parser.add_argument_group("data and augmentation (Fairy, Sec. 5.2)")
    d.add_argument("--instruction", default=None,
                   help="one instruction for every triplet (then no instruction files are needed)")
    d.add_argument("--size", type=int, default=FAIRY_SIZE,
                   help=f"training crop side in pixels (default: {FAIRY_SIZE})")
    d.add_argument("--crop-ratio", type=float, default=FAIRY_CROP_RATIO,
                   help="the shorter side is scaled to size x this before the random square crop "
                        f"(default: {FAIRY_CROP_RATIO:g}, Fairy's 288/256)")
    d.add_argument("--rotation", type=float, default=FAIRY_DEGREES,
                   help=f"random rotation in [-R, R] degrees (default: {FAIRY_DEGREES:g})")
    d.add_argument("--translate", type=float, default=FAIRY_TRANSLATE,
                   help=f"random shift in [-T, T] of the size (default: {FAIRY_TRANSLATE:g})")
    d.add_argument("--scale", type=scale_range, default=FAIRY_SCALE, metavar="LO,HI",
                   help=f"random zoom in [LO, HI] (default: {FAIRY_SCALE[0]:g},{FAIRY_SCALE[1]:g})")
    d.add_argument("--shear", type=float, default=FAIRY_SHEAR,
                   help=f"random shear in [-S, S] degrees on both axes (default: {FAIRY_SHEAR:g})")
    d.add_argument("--conditioning-dropout", type=float, default=IP2P_CONDITIONING_DROPOUT,
                   help="fraction of samples that lose the text, the image, and both, each (InstructPix2Pix's "
                        f"classifier-free guidance training) (default: {IP2P_CONDITIONING_DROPOUT:g})")
    v = parser.add_argument_group("validation")
    v.add_argument("--validation", default=None, metavar="DATA",
                   help="held-out triplets (folder or manifest) edited at every validation, with their "
                        "equivariance error (default: the first two training triplets)")
    v.add_argument("--validation-steps", type=int, default=DEFAULT_EULER_STEPS,
                   help=f"Euler ancestral steps of validation edits (default: {DEFAULT_EULER_STEPS})")
    v.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help=f"text guidance of validation edits (default: {DEFAULT_GUIDANCE})")
    v.add_argument("--image-guidance", type=float, default=DEFAULT_IMAGE_GUIDANCE,
                   help=f"image guidance of validation edits (default: {DEFAULT_IMAGE_GUIDANCE})")


def task_config(args) -> EquivariantConfig:
    """The EquivariantConfig of parsed options (raises ConfigError)."""
    return EquivariantConfig(
        affine=AffineRanges(degrees=args.rotation, translate=args.translate, scale=tuple(args.scale),
                            shear=args.shear),
        size=args.size, crop_ratio=args.crop_ratio, instruction=args.instruction, lora_rank=args.lora_rank,
        conditioning_dropout=args.conditioning_dropout, guidance=args.guidance, image_guidance=args.image_guidance,
        validation_steps=args.validation_steps,
    )


def command(args, loop) -> int:
    """Check options and every triplet, load the model, tune, print how to use the result.

    Order of failures: options (ConfigError), then the data (InputError naming the file),
    then the output folder / resume, all before the model loads.
    """
    from diffstream.tuning.equivariant import EquivariantTask, load_base, load_triplets
    from diffstream.tuning.loop import resolve_resume, tune

    config = task_config(args)
    triplets = load_triplets(args.data, config.instruction)
    validation = load_triplets(args.validation, config.instruction) if args.validation else None
    resolve_resume(loop)  # a folder holding a run, or a bad --resume, fails before the model loads
    common.quiet_libraries()
    if loop.progress:
        common.say(f"{len(triplets)} triplets; loading model {args.model}")
    components, widened = load_base(args.model, args.device)
    if widened and loop.progress:
        common.say(f"{args.model} is a text-to-image model: its UNet was widened to "
                   f"{components.unet_in_channels} input channels (new ones zero, as InstructPix2Pix starts)")
    task = EquivariantTask(components, triplets, config, base=None if widened else args.model, validation=validation)
    result = tune(task, loop)
    metrics = result.metrics
    if metrics:
        first, last = metrics[min(metrics)], metrics[max(metrics)]
        common.say(f"equivariance error {first['equivariance_error']:.2f} -> {last['equivariance_error']:.2f}, "
                   f"edit error {first['edit_error']:.2f} -> {last['edit_error']:.2f} (grey levels, validation)")
    print(task.usage(result.final_dir))
    return 0
