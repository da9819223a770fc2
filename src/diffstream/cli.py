"""The `diffstream` command line.

    diffstream run INPUT -o OUTPUT --prompt "..." [options]

Options are parsed into typed configs first (a bad option fails in one line before
any model loads), then the input is opened (a bad input fails before the model loads),
then the model loads. Exit codes: 0 done, 2 bad option/input/model, 130 interrupted
(Ctrl-C or SIGTERM; the output is finalised and holds every frame produced).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from diffstream.attention.causal_temporal import CausalTemporalConfig
from diffstream.config import (
    CFG_TYPES,
    DEFAULT_MODEL,
    DEFAULT_MOTION_ADAPTER,
    DTYPES,
    METHODS,
    MODEL_PRESETS,
    IOConfig,
    ModelConfig,
    RunConfig,
    StreamConfig,
)
from diffstream.errors import ConfigError, DiffstreamError


EDIT_METHODS = ("fairy", "fatezero")


def _float_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 32,45, got {text!r}") from None


def _lora(text: str) -> tuple[str, float]:
    path, sep, scale = text.rpartition(":")
    if sep:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return text, 1.0


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line with exit code 2 (its default code)."""

    def error(self, message):
        self.exit(2, f"diffstream: error: {message}\n")


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Model options shared by every subcommand that runs a model."""
    g = p.add_argument_group("model")
    presets = ", ".join(f"{k} ({v['model']})" for k, v in MODEL_PRESETS.items())
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"preset [{presets}], 'tiny' (random offline test model: produces noise), "
                        f"a hub id, a local diffusers folder, or a .safetensors file (default: {DEFAULT_MODEL})")
    g.add_argument("--lcm-lora", default=None, help="LCM-LoRA to fuse (hub id, folder, file) or 'none'")
    g.add_argument("--lora", action="append", type=_lora, default=[], metavar="PATH[:SCALE]",
                   help="extra LoRA to fuse; repeatable")
    g.add_argument("--tiny-vae", default=None, help="AutoencoderTiny instead of the full VAE: 'taesd', a hub id or folder")
    g.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cuda, cuda:1, mps, cpu")
    g.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: fp16 on GPU, fp32 on CPU")
    g.add_argument("--turbo", default=None, action=argparse.BooleanOptionalAction,
                   help="turbo model handling (1 step, no CFG); default: detected from the model name")
    g.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    g.add_argument("--motion-adapter", default=None,
                   help="motion modules for --method live2diff: hub id or folder (diffusers MotionAdapter), an "
                        "AnimateDiff or Live2Diff checkpoint file (default: "
                        "guoyww/animatediff-motion-adapter-v1-5-2; with --model tiny a random tiny adapter)")


def add_stream_options(p: argparse.ArgumentParser) -> None:
    """Denoising options of the streaming engine."""
    g = p.add_argument_group("denoising")
    g.add_argument("--prompt", default="", help="text to restyle towards")
    g.add_argument("--negative-prompt", default="", help="unconditional text for --cfg-type initialize/full")
    g.add_argument("--method", default="streamdiffusion", choices=METHODS, help="temporal-consistency method")
    g.add_argument("--strength", type=float, default=0.4,
                   help="SDEdit noise strength in (0, 1]; StreamV2V's default 0.4 (default: 0.4)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: 4, turbo: 1)")
    g.add_argument("--t-index-list", type=_float_list, default=None, metavar="I,J,...",
                   help="explicit indices into the 50-step LCM table, e.g. 32,45 (overrides --strength/--steps)")
    g.add_argument("--guidance", type=float, default=1.2, help="CFG scale; <= 1 disables guidance (default: 1.2)")
    g.add_argument("--delta", type=float, default=1.0, help="RCFG residual-noise moderation (default: 1.0)")
    g.add_argument("--cfg-type", default=None, choices=CFG_TYPES,
                   help="none | self (RCFG, no extra call) | initialize (RCFG, 1 extra call/frame) | full (CFG)")
    g.add_argument("--seed", type=int, default=2, help="seeds the fixed noise and every random draw")
    g.add_argument("--similarity-filter", type=float, default=None, metavar="THRESHOLD",
                   help="skip near-identical frames (cosine >= THRESHOLD skips for sure), e.g. 0.98")
    g.add_argument("--max-skip", type=int, default=10, help="longest run of skipped frames (default: 10)")
    g.add_argument("--no-stream-batch", action="store_true",
                   help="denoise each frame to completion before the next (same frames, slower)")
    g.add_argument("--size", type=int, default=512, help="longer side of the processing size (default: 512)")
    b = p.add_argument_group("feature bank (--method streamv2v)")
    b.add_argument("--bank", default="dyme", metavar="dyme|queue:K",
                   help="dynamic merging into a fixed-size bank (default), or a FIFO of K frames (the paper's ablation)")
    b.add_argument("--bank-size", type=int, default=None, help="bank capacity in frames of tokens (default: 1, queue: K)")
    b.add_argument("--bank-interval", type=int, default=4, help="update the bank every N frames (default: 4)")
    b.add_argument("--fusion-strength", type=float, default=0.75, help="alpha of feature fusion, Eq. 2 (default: 0.75)")
    b.add_argument("--fusion-threshold", type=float, default=0.98,
                   help="fuse only tokens whose nearest banked token has cosine >= this (default: 0.98)")
    b.add_argument("--fusion-blocks", default="mid_block,up_blocks.0,up_blocks.1",
                   help="UNet blocks whose self-attention outputs are fused (default: mid_block,up_blocks.0,up_blocks.1)")
    b.add_argument("--no-extended-attention", action="store_true", help="do not attend to banked keys/values")
    b.add_argument("--no-fusion", action="store_true", help="no feature fusion")
    c = p.add_argument_group("causal temporal attention (--method live2diff)")
    c.add_argument("--warmup-frames", type=int, default=8,
                   help="frames denoised together (bidirectionally) before streaming starts (default: 8)")
    c.add_argument("--window", type=int, default=16,
                   help="frames each streamed frame attends to: warmup + recent + itself (default: 16)")
    c.add_argument("--depth", action="store_true",
                   help="Live2Diff's depth prior (needs its checkpoint's depth module in --motion-adapter)")
    c.add_argument("--depth-model", default="Intel/dpt-hybrid-midas",
                   help="transformers depth-estimation model for --depth: hub id or folder (default: "
                        "Intel/dpt-hybrid-midas; 'tiny' = random, for tests)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffstream", description="Text-driven video-to-video translation with diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="restyle a video, image folder, webcam or network stream frame by frame",
                         description="Restyle a stream frame by frame with the streaming engine.")
    run.add_argument("input", help="video file, image folder, webcam:N, or rtsp/rtmp/http(s) URL")
    run.add_argument("-o", "--output", required=True, help="output .mp4 file, PNG folder, or 'window'")
    run.add_argument("--max-frames", type=int, default=None, help="process only the first N frames")
    run.add_argument("--keep-size", action="store_true", help="scale outputs back to the input size")
    run.add_argument("--queue-size", type=int, default=8, help="capacity of the input/output queues")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_options(run)
    add_stream_options(run)

    edit = sub.add_parser("edit", help="edit a whole recorded clip (fairy, fatezero)",
                          description="Edit every frame of a recorded clip; output frames 1:1 with input, audio kept.")
    edit.add_argument("input", help="video file or image folder")
    edit.add_argument("-o", "--output", required=True, help="output .mp4 file or PNG folder")
    edit.add_argument("--method", required=True, choices=EDIT_METHODS, help="editing method")
    edit.add_argument("--prompt", default="", help="target text")
    edit.add_argument("--seed", type=int, default=2, help="seed of every random draw")
    edit.add_argument("--size", type=int, default=512, help="longer side of the processing size (default: 512)")
    edit.add_argument("--max-frames", type=int, default=None, help="edit only the first N frames")
    edit.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_options(edit)
    from diffstream.pipelines import fairy, fatezero

    fairy.add_edit_arguments(edit.add_argument_group("fairy (--method fairy)"))
    fatezero.add_edit_arguments(edit.add_argument_group("fatezero (--method fatezero)"))

    from diffstream.metrics.bench import add_bench_arguments
    from diffstream.metrics.evaluate import add_eval_arguments
    from diffstream.server.serve import add_serve_arguments

    serve = sub.add_parser("serve", help="live web demo: your webcam restyled in the browser",
                           description="Serve the live demo page (FastAPI + WebSocket) on 127.0.0.1.")
    add_model_options(serve)
    add_serve_arguments(serve)

    ev = sub.add_parser("eval", help="quality metrics of a result video against its source",
                        description="Warp error, CLIP consistency / text score / frame accuracy, depth error.")
    add_eval_arguments(ev)
    bn = sub.add_parser("bench", help="run several methods on one clip side by side: quality, speed, memory",
                        description="Run methods on the same clip, model and seed; print one table.")
    add_model_options(bn)
    add_bench_arguments(bn)
    return parser


def model_config(args) -> ModelConfig:
    motion = getattr(args, "motion_adapter", None)
    if motion is None and getattr(args, "method", None) == "live2diff":
        motion = "tiny" if args.model == "tiny" else DEFAULT_MOTION_ADAPTER
    return ModelConfig(model=args.model, lcm_lora=args.lcm_lora, loras=tuple(args.lora), tiny_vae=args.tiny_vae,
                       device=args.device, dtype=args.dtype, turbo=args.turbo, compile=args.compile,
                       motion_adapter=motion)


def feature_bank_config(args):
    """The StreamV2V feature-bank settings from the CLI options."""
    from diffstream.attention.feature_bank import FeatureBankConfig, parse_bank

    kind, queue_frames = parse_bank(args.bank)
    size = args.bank_size if args.bank_size is not None else (queue_frames or (2 if kind == "queue" else 1))
    blocks = tuple(b.strip() for b in args.fusion_blocks.split(",") if b.strip())
    return FeatureBankConfig(
        extended_attention=not args.no_extended_attention, fusion=not args.no_fusion,
        fusion_strength=args.fusion_strength, fusion_threshold=args.fusion_threshold, fusion_blocks=blocks,
        bank=kind, bank_size=size, interval=args.bank_interval,
    )


def stream_config(args) -> StreamConfig:
    return StreamConfig(
        prompt=args.prompt, negative_prompt=args.negative_prompt, strength=args.strength, steps=args.steps,
        t_index_list=args.t_index_list, guidance=args.guidance, delta=args.delta, cfg_type=args.cfg_type,
        seed=args.seed, similarity_threshold=args.similarity_filter, max_skip=args.max_skip,
        stream_batch=not args.no_stream_batch, size=args.size, method=args.method,
        feature_bank=feature_bank_config(args),
        causal=CausalTemporalConfig(warmup_frames=args.warmup_frames, window=args.window, depth=args.depth,
                                    depth_model=args.depth_model),
    )


def run_config(args) -> RunConfig:
    """Build the typed config of `diffstream run` (raises ConfigError)."""
    io = IOConfig(input=args.input, output=args.output, max_frames=args.max_frames, keep_size=args.keep_size,
                  queue_size=args.queue_size, progress=not args.no_progress)
    return RunConfig(model=model_config(args), stream=stream_config(args), io=io)


def _quiet_libraries() -> None:
    """Library chatter (deprecations, config notes) is not for CLI users."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("diffusers", "transformers", "huggingface_hub", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        dlog.set_verbosity_error()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
        dlog.disable_progress_bar()
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except Exception:
        pass


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_run(config: RunConfig) -> int:
    """`diffstream run`: stream frames through the engine into the sink."""
    from diffstream.io.queues import ThreadedReader, ThreadedWriter
    from diffstream.io.sinks import open_sink
    from diffstream.io.sources import open_source

    io = config.io
    source = open_source(io.input, max_frames=io.max_frames)
    sink = reader = writer = bar = None
    written = 0
    start = time.perf_counter()
    try:
        _quiet_libraries()
        from diffstream.models.loading import load_components
        from diffstream.pipelines.factory import make_pipeline

        components = load_components(config.model)
        pipe = make_pipeline(components, config.stream)
        work_size = pipe.processing_size(source.width, source.height)
        out_size = (source.width, source.height) if io.keep_size else work_size
        sink = open_sink(io.output, fps=source.fps, size=out_size, audio_path=source.audio_path)
        if io.progress:
            from tqdm import tqdm

            total = source.num_frames
            if io.max_frames is not None and total is not None:
                total = min(total, io.max_frames)
            bar = tqdm(total=total, unit="frame", dynamic_ncols=True, file=sys.stderr)
        reader = ThreadedReader(source, maxsize=io.queue_size, drop_oldest=source.is_live)
        writer = ThreadedWriter(sink, maxsize=io.queue_size)
        start = time.perf_counter()
        for frame in reader:
            for out in pipe.process(frame):
                writer.write(out)
                written += 1
                if bar is not None:
                    bar.update(1)
        for out in pipe.flush():
            writer.write(out)
            written += 1
            if bar is not None:
                bar.update(1)
        status = 0
    except KeyboardInterrupt:
        status = 130
    finally:
        if bar is not None:
            bar.close()
        if reader is not None:
            reader.close()
        try:
            if writer is not None:
                writer.close()
        finally:
            if sink is not None:
                sink.close()
            source.close()
    elapsed = max(time.perf_counter() - start, 1e-9)
    for warning in list(getattr(source, "warnings", [])) + list(getattr(sink, "warnings", [])):
        print(f"diffstream: warning: {warning}", file=sys.stderr)
    extras = []
    if status == 0 and written:
        extras.append(f"{written / elapsed:.2f} fps")
    if "pipe" in locals() and pipe.skipped:
        extras.append(f"{pipe.skipped} skipped by the similarity filter")
    if reader is not None and reader.dropped:
        extras.append(f"{reader.dropped} live frames dropped to keep latency bounded")
    verb = "interrupted: wrote" if status else "wrote"
    print(f"diffstream: {verb} {written} frames to {io.output}" + (f" ({', '.join(extras)})" if extras else ""),
          file=sys.stderr)
    return status


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if args.command == "run":
            return cmd_run(run_config(args))
        if args.command == "serve":
            from diffstream.server.serve import serve_command

            return serve_command(args)
        if args.command == "edit":
            from diffstream.pipelines import fairy, fatezero

            return {"fairy": fairy, "fatezero": fatezero}[args.method].edit_command(args)
        if args.command == "eval":
            _quiet_libraries()
            from diffstream.metrics.evaluate import eval_command

            return eval_command(args)
        if args.command == "bench":
            _quiet_libraries()
            from diffstream.metrics.bench import bench_command

            return bench_command(args)
        raise ConfigError(f"unknown command {args.command!r}")
    except DiffstreamError as err:
        print(f"diffstream: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("diffstream: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
