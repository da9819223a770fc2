"""`diffstream edit INPUT -o OUTPUT --method fairy|fatezero`: edit a whole recorded clip.

The options every editing method shares (--prompt, --steps, --guidance, --strength,
--negative-prompt, --seed, --size) are defined once here, with None defaults so each
method applies its own; each method's module adds its own group.
"""

from __future__ import annotations

import argparse

from diffstream.commands import common, edit_fairy, edit_fatezero

METHODS = {"fairy": edit_fairy, "fatezero": edit_fatezero}


def add_arguments(edit: argparse.ArgumentParser) -> None:
    """All options of `diffstream edit`."""
    edit.add_argument("input", help="video file or image folder")
    edit.add_argument("-o", "--output", required=True,
                      help="output .mp4/.mkv/.mov file or PNG folder. An existing file is replaced only when "
                           "the first edited frame is written (temporary name, renamed into place); an output "
                           "that is the input is refused")
    edit.add_argument("--method", required=True, choices=tuple(METHODS), help="editing method")
    edit.add_argument("--prompt", default="", help="target text (fatezero, fairy's SDEdit mode)")
    edit.add_argument("--negative-prompt", default="", help="text of the unconditional guidance branches")
    edit.add_argument("--steps", type=int, default=None,
                      help=f"denoising steps (default: fairy {edit_fairy.DEFAULT_STEPS_HELP}; "
                           f"fatezero {edit_fatezero.DEFAULT_STEPS} DDIM steps of inversion and editing)")
    edit.add_argument("--guidance", type=float, default=None,
                      help=f"text guidance scale (default: fairy {edit_fairy.DEFAULT_GUIDANCE_HELP}; "
                           f"fatezero {edit_fatezero.DEFAULT_GUIDANCE})")
    edit.add_argument("--strength", type=float, default=None,
                      help=f"SDEdit noise strength in (0, 1] for fairy --prompt (default: {edit_fairy.DEFAULT_STRENGTH})")
    edit.add_argument("--seed", type=int, default=2, help="seed of every random draw; -1 picks a random one and prints it (default: 2)")
    edit.add_argument("--size", type=int, default=512,
                      help="longer side of the processing size; the aspect ratio is kept (default: 512)")
    edit.add_argument("--max-frames", type=int, default=None, help="edit only the first N frames (default: all)")
    edit.add_argument("--fps", type=float, default=None,
                      help="frame rate of an image-folder input (default: 30; videos keep their own rate)")
    edit.add_argument("--no-progress", action="store_true", help="no progress bar")
    common.add_model_options(edit)
    edit_fairy.add_arguments(edit.add_argument_group("fairy (--method fairy)"))
    edit_fatezero.add_arguments(edit.add_argument_group("fatezero (--method fatezero)"))


def command(args) -> int:
    """Entry point of `diffstream edit` (parsed args): the method's edit command."""
    return METHODS[args.method].edit_command(args)
