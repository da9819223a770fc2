"""The `diffstream` command line: the parser and the dispatcher, nothing else.

    diffstream run INPUT -o OUTPUT --prompt "..." [options]
    diffstream edit INPUT -o OUTPUT --method fairy|fatezero ...
    diffstream serve | eval | bench ...
    diffstream tune equivariant|video ...

Each subcommand is one module of `diffstream.commands`. Options are parsed into typed
configs first (a bad option fails in one line before any model loads). Exit codes:
0 done, 1 a benchmarked method failed, 2 bad option/input/output/model, 130 interrupted
(Ctrl-C or SIGTERM; outputs are finalised and hold every frame produced).
"""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import signal
import sys

from diffstream import __version__
from diffstream.commands import bench, common, edit, eval as eval_cmd, run, serve, tune
from diffstream.errors import DiffstreamError

COMMANDS = {"run": run.command, "edit": edit.command, "serve": serve.command, "eval": eval_cmd.command,
            "bench": bench.command, "tune": tune.command}


def build_parser() -> argparse.ArgumentParser:
    """The whole `diffstream` parser, every subcommand included."""
    parser = common.Parser(prog="diffstream",
                           description="Text-driven video-to-video translation with diffusion models.")
    parser.add_argument("--version", action="version", version=f"diffstream {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=common.Parser, metavar="COMMAND")
    run.add_arguments(sub.add_parser(
        "run", help="restyle a video, image folder, webcam or network stream frame by frame",
        description="Restyle a stream frame by frame with the streaming engine."))
    edit.add_arguments(sub.add_parser(
        "edit", help="edit a whole recorded clip (fairy, fatezero)",
        description="Edit every frame of a recorded clip; output frames 1:1 with input, audio kept."))
    srv = sub.add_parser("serve", help="live web demo: your webcam restyled in the browser",
                         description="Serve the live demo page (FastAPI + WebSocket) on 127.0.0.1.")
    common.add_model_options(srv)
    common.add_memory_options(srv)
    common.add_control_options(srv)
    serve.add_arguments(srv)
    eval_cmd.add_arguments(sub.add_parser(
        "eval", help="quality metrics of a result video against its source",
        description="Warp error, CLIP consistency / text score / frame accuracy, depth error."))
    bn = sub.add_parser("bench", help="run several methods on one clip side by side: quality, speed, memory",
                        description="Run methods on the same clip, model and seed; print one table.")
    common.add_model_options(bn)
    bench.add_arguments(bn)
    tune.add_arguments(sub.add_parser(
        "tune", help="fine-tune: Fairy's equivariant InstructPix2Pix, a one-shot video model for FateZero",
        description="Fine-tuning runs with checkpoints, resume and validation (accelerate)."))
    return parser


def _exit_quietly_on_broken_pipe() -> int:
    """`diffstream eval ... | head -1`: the reader left; stop without a traceback."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
    return 0


def _cheap_teardown() -> None:
    """atexit hook: make the interpreter's teardown after the last line cheap.

    A process that imported torch, diffusers and transformers holds ~3,300 modules and
    ~410,000 objects the garbage collector tracks; CPython's teardown runs several full
    collections over all of them while it clears the modules, which kept every command
    alive 0.9-1.5 s (measured on 2 CPU cores) after its last line. One collection here
    still finalises whatever is garbage (what teardown's first collection would do);
    freezing the rest keeps teardown's later collections from traversing it again.
    atexit runs the last-registered hook first, so the hooks libraries register later
    (tqdm's monitor, Ray) still run before this one.
    """
    gc.collect()
    gc.freeze()


_teardown_registered = False


def main(argv=None) -> int:
    """Entry point of the `diffstream` command; returns the exit code."""
    global _teardown_registered
    if not _teardown_registered:
        atexit.register(_cheap_teardown)
        _teardown_registered = True
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, common.raise_interrupt)
    try:
        return COMMANDS[args.command](args)
    except DiffstreamError as err:
        print(f"diffstream: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("diffstream: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _exit_quietly_on_broken_pipe()
    except (RuntimeError, MemoryError) as err:
        message = common.out_of_memory_message(err)
        if message is None:
            raise
        print(f"diffstream: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
