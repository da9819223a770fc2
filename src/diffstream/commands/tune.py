"""`diffstream tune equivariant|video`: fine-tuning runs (issue #15).

    diffstream tune equivariant DATA -o OUT --model timbrooks/instruct-pix2pix [--lora-rank 16]
    diffstream tune video CLIP -o OUT --source-prompt "a black swan ..." --model runwayml/stable-diffusion-v1-5

The options of the shared loop (`diffstream.tuning.loop`: steps, learning rate, seed,
checkpoints, resume, precision, device) are defined once here; each kind of run adds its
own in its module. Ctrl-C stops after the current step with a checkpoint (exit 130).
"""

from __future__ import annotations

import argparse

from diffstream.commands import common, tune_equivariant, tune_video
from diffstream.tuning.loop import DEVICES, MIXED_PRECISION, OPTIMIZERS, TuneConfig

KINDS = {"equivariant": tune_equivariant, "video": tune_video}


def add_loop_options(parser: argparse.ArgumentParser, steps: int, learning_rate: float,
                     checkpoint_every: int, validate_every: int) -> None:
    """The shared loop's options, with the kind's own defaults."""
    g = parser.add_argument_group("training loop")
    g.add_argument("-o", "--output", required=True,
                   help="folder of the run: checkpoints/, validation/, log.jsonl, metrics.json, loss.png, and the "
                        "result in final/. A folder that holds a run is refused unless --resume is given")
    g.add_argument("--steps", type=int, default=steps, help=f"optimisation steps in all (default: {steps})")
    g.add_argument("--learning-rate", type=float, default=learning_rate,
                   help=f"AdamW learning rate (default: {learning_rate:g})")
    g.add_argument("--batch-size", type=int, default=1, help="samples per micro-batch (default: 1)")
    g.add_argument("--gradient-accumulation", type=int, default=1,
                   help="micro-batches per optimisation step (default: 1)")
    g.add_argument("--seed", type=int, default=0, help="seed of the initialisation, batches and noise (default: 0)")
    g.add_argument("--checkpoint-every", type=int, default=checkpoint_every,
                   help=f"steps between checkpoints; 0: only at the end (default: {checkpoint_every})")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (default: 2)")
    g.add_argument("--validate-every", type=int, default=validate_every,
                   help=f"steps between validations (outputs in OUT/validation/); 0: only before and after "
                        f"(default: {validate_every})")
    g.add_argument("--mixed-precision", default="no", choices=MIXED_PRECISION,
                   help="accelerate's mixed precision: fp16 needs CUDA/MPS (default: no)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for activation memory")
    g.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS,
                   help="adamw, or adamw8bit (bitsandbytes, CUDA) (default: adamw)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping; 0: none (default: 1)")
    g.add_argument("--resume", default=None, metavar="latest|CHECKPOINT",
                   help="continue a run: 'latest' (the newest checkpoint in --output) or a checkpoint folder")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _loop_device(device: str) -> str:
    """The model option --device (auto, cpu, cuda, cuda:1, mps) as the loop's device kind;
    accelerate places the run on the process's CUDA device (CUDA_VISIBLE_DEVICES picks it)."""
    kind = str(device).split(":")[0]
    if kind not in DEVICES:
        from diffstream.errors import ConfigError

        raise ConfigError(f"--device must be auto, cpu, cuda[:N] or mps, got {device!r}")
    return kind


def loop_config(args) -> TuneConfig:
    """The loop's settings from parsed options (checked once, here at the edge)."""
    return TuneConfig(
        output_dir=args.output, steps=args.steps, learning_rate=args.learning_rate, batch_size=args.batch_size,
        gradient_accumulation=args.gradient_accumulation, seed=args.seed, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, validate_every=args.validate_every,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
        optimizer=args.optimizer, max_grad_norm=args.max_grad_norm, resume=args.resume,
        device=_loop_device(getattr(args, "device", "auto")),
        progress=not args.no_progress,
    )


def add_arguments(tune: argparse.ArgumentParser) -> None:
    """`diffstream tune KIND ...`: one sub-parser per kind of run."""
    kinds = tune.add_subparsers(dest="kind", parser_class=common.Parser, metavar="KIND", required=True)
    for name, module in KINDS.items():
        parser = kinds.add_parser(name, help=module.HELP, description=module.DESCRIPTION)
        module.add_arguments(parser)
        add_loop_options(parser, **module.LOOP_DEFAULTS)


def command(args) -> int:
    """Entry point of `diffstream tune` (parsed args)."""
    return KINDS[args.kind].command(args, loop_config(args))
