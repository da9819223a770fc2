"""`diffstream run INPUT -o OUTPUT --prompt "..."`: restyle a stream frame by frame.

Order of work, so nothing expensive happens before a cheap check fails: options are
parsed into typed configs (one line, exit 2), both ends are checked (input readable,
output of a supported kind, writable and not the input), the input is opened, a Wan
model's GPU memory is estimated from configs for the input's size (on CUDA: said in one
line, refused in one line when it will not fit; `common.check_memory`), then the model
loads. Exit codes: 0 done, 2 bad option/input/output/model, 130 interrupted
(Ctrl-C or SIGTERM; the output is finalised and holds every frame produced).

With `--osc PORT`, OSC messages change the settings while the run goes
(`diffstream.server.osc`): the port is bound before the model loads, changes are taken
between two frames and apply from the next one.
"""

from __future__ import annotations

import argparse
import sys
import time

from diffstream.attention.causal_temporal import CausalTemporalConfig
from diffstream.commands import common
from diffstream.config import (
    CFG_TYPES,
    METHOD_DEFAULTS,
    METHODS,
    NOISE_MODES,
    VAE_ENCODINGS,
    IOConfig,
    RunConfig,
    StreamConfig,
)


def add_arguments(run: argparse.ArgumentParser) -> None:
    """`diffstream run`'s own options, the model options and the engine's options."""
    run.add_argument("input", help="video file, image folder, webcam:N, rtsp/rtmp/http(s) URL, or ndi:SOURCE_NAME "
                                   "(needs pip install 'diffstream[ndi]')")
    run.add_argument("-o", "--output", required=True,
                     help="output .mp4/.mkv/.mov file, PNG folder, 'window', ndi:NAME (an NDI sender; "
                          "pip install 'diffstream[ndi]') or virtualcam[:DEVICE] (a virtual webcam; pip install "
                          "'diffstream[virtualcam]'). An existing file is replaced only "
                          "when the run has written its first frame (it is written under a temporary name and "
                          "renamed into place); an output that is the input is refused")
    run.add_argument("--max-frames", type=int, default=None, help="process only the first N frames (default: all)")
    run.add_argument("--fps", type=float, default=None,
                     help="frame rate of an image-folder input (default: 30; videos keep their own rate)")
    run.add_argument("--keep-size", action="store_true", help="scale outputs back to the input size")
    run.add_argument("--queue-size", type=int, default=8, help="capacity of the input/output queues (default: 8)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    common.add_osc_options(run, "run")
    common.add_model_options(run)
    common.add_memory_options(run)
    common.add_control_options(run)
    add_stream_options(run)


def add_stream_options(p: argparse.ArgumentParser) -> None:
    """Denoising options of the streaming engine."""
    g = p.add_argument_group("denoising")
    g.add_argument("--prompt", required=True, help="text to restyle towards (required; \"\" for none)")
    g.add_argument("--negative-prompt", default="",
                   help="unconditional text for --cfg-type initialize/full (default: empty)")
    g.add_argument("--method", default="streamdiffusion", choices=METHODS,
                   help="temporal-consistency method (default: streamdiffusion)")
    g.add_argument("--strength", type=float, default=None,
                   help="SDEdit noise strength in (0, 1] (default: 0.4, StreamV2V's; causal-video 0.7, "
                        "StreamDiffusionV2's noise scale)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: 4, turbo: 1, causal-video: 2)")
    g.add_argument("--t-index-list", type=common.int_list, default=None, metavar="I,J,...",
                   help="explicit indices into the 50-step LCM table, e.g. 32,45 (overrides --strength/--steps)")
    g.add_argument("--guidance", type=float, default=None,
                   help="CFG scale; <= 1 disables guidance (default: each method's paper setting: 1.2 for "
                        "streamdiffusion, 1.0 = none for streamv2v and live2diff)")
    g.add_argument("--delta", type=float, default=1.0, help="RCFG residual-noise moderation (default: 1.0)")
    g.add_argument("--cfg-type", default=None, choices=CFG_TYPES,
                   help="none | self (RCFG, no extra call) | initialize (RCFG, 1 extra call/frame) | full (CFG) "
                        "(default: self, none for turbo or --guidance <= 1)")
    g.add_argument("--noise", default=None, choices=NOISE_MODES,
                   help="fixed (one noise tensor per step slot, StreamDiffusion) | per-frame (fresh noise per "
                        "frame and re-noise, from the seed; Live2Diff's reference) (default: per-frame for "
                        "live2diff, fixed otherwise)")
    g.add_argument("--vae-encode", default="mean", choices=VAE_ENCODINGS,
                   help="mean (the VAE posterior mean: deterministic) | sample (a posterior sample per frame, "
                        "as the references draw) (default: mean)")
    g.add_argument("--prompt-blend", action="append", type=common.weighted(str), default=[], metavar="TEXT:WEIGHT",
                   help="mix several prompts instead of --prompt, e.g. --prompt-blend 'a cat:0.7' --prompt-blend "
                        "'a dog:0.3'; repeatable (default: --prompt alone)")
    g.add_argument("--blend", default="linear", choices=("linear", "slerp"),
                   help="how --prompt-blend mixes the text embeddings (default: linear)")
    g.add_argument("--seed-blend", action="append", type=common.weighted(int), default=[], metavar="SEED:WEIGHT",
                   help="mix the noise of several seeds (unit variance kept) instead of --seed's; repeatable")
    g.add_argument("--seed", type=int, default=2, help="seeds the fixed noise and every random draw; -1 picks a random seed and prints it (default: 2)")
    g.add_argument("--similarity-filter", type=float, default=None, metavar="THRESHOLD",
                   help="skip near-identical frames (cosine >= THRESHOLD skips for sure), e.g. 0.98 (default: off)")
    g.add_argument("--max-skip", type=int, default=10, help="longest run of skipped frames (default: 10)")
    g.add_argument("--no-stream-batch", action="store_true",
                   help="denoise each frame to completion before the next (same frames, slower)")
    g.add_argument("--size", type=int, default=512,
                   help="longer side of the processing size; the aspect ratio is kept (default: 512)")
    b = p.add_argument_group("feature bank (--method streamv2v)")
    b.add_argument("--bank", default="dyme", metavar="dyme|queue:K",
                   help="dynamic merging into a fixed-size bank (default), or a FIFO of K frames (the paper's ablation)")
    b.add_argument("--bank-size", type=int, default=None,
                   help="bank capacity in frames of tokens (default: 1, queue: K)")
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
    common.add_video_options(p)


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
    """The StreamConfig of parsed engine options (raises ConfigError)."""
    strength = args.strength if args.strength is not None else METHOD_DEFAULTS.get(args.method, {}).get("strength", 0.4)
    video = common.video_config(args)
    return StreamConfig(
        prompt=args.prompt, negative_prompt=args.negative_prompt, strength=strength, steps=args.steps,
        t_index_list=args.t_index_list, guidance=args.guidance, delta=args.delta, cfg_type=args.cfg_type,
        noise=args.noise, vae_encode=args.vae_encode,
        seed=common.resolve_seed(args.seed), similarity_threshold=args.similarity_filter, max_skip=args.max_skip,
        stream_batch=not args.no_stream_batch, size=args.size, method=args.method,
        feature_bank=feature_bank_config(args),
        causal=CausalTemporalConfig(warmup_frames=args.warmup_frames, window=args.window, depth=args.depth,
                                    depth_model=args.depth_model),
        video=video,
        control_scales=common.control_scales(args),
        ip_adapter_image=common.image_prompt(args), ip_adapter_scale=args.ip_adapter_scale,
        prompt_blend=tuple(args.prompt_blend) or None, blend=args.blend, seed_blend=tuple(args.seed_blend) or None,
    )


def run_config(args) -> RunConfig:
    """Build the typed config of `diffstream run` (raises ConfigError)."""
    io = IOConfig(input=args.input, output=args.output, max_frames=args.max_frames, keep_size=args.keep_size,
                  queue_size=args.queue_size, progress=not args.no_progress, fps=getattr(args, "fps", None))
    return RunConfig(model=common.model_config(args), stream=stream_config(args), io=io)


def command(args) -> int:
    """Entry point of `diffstream run` (parsed args)."""
    return cmd_run(run_config(args), osc=common.osc_address(args),
                   memory=dict(estimate_only=args.vram_estimate, check=not args.no_vram_check))


def cmd_run(config: RunConfig, osc: tuple[str, int] | None = None, memory: dict | None = None) -> int:
    """`diffstream run`: stream frames through the engine into the sink.

    Args:
        config: the run's typed settings.
        osc: (host, port) to take OSC control messages on, or None.
        memory: `common.check_memory`'s estimate_only / check (a Wan model's GPU memory is
            estimated from the input's size before it loads; None: the defaults).
    """
    from diffstream.io.queues import ThreadedReader, ThreadedWriter
    from diffstream.io.sinks import check_output, open_sink
    from diffstream.io.sources import open_source

    io = config.io
    check_output(io.output, inputs=(io.input,))
    common.check_device(config.model)
    source = open_source(io.input, max_frames=io.max_frames, fps=io.fps)
    sink = reader = writer = pipe = control = None
    bar = common.progress_bar(None, False)
    written = [0]
    skipped_before = 0  # similarity-filter skips of streams an OSC /reset ended
    status = 0
    start = time.perf_counter()
    try:
        if osc is not None:
            control = common.open_osc(*osc, progress=io.progress)
        common.quiet_libraries()
        from diffstream.models.loading import load_components
        from diffstream.pipelines.factory import make_pipeline

        if common.check_memory(config.model, *_work_size(config, source), config.stream.video.block_causal,
                               rows=config.stream.video_cache_rows, **(memory or {})):
            return 0  # --vram-estimate: printed, nothing loaded
        if io.progress:
            common.say(common.loading_message(config.model))
        components = load_components(config.model)
        common.warn_long_prompts(components, config.stream.prompt, config.stream.negative_prompt)
        pipe = make_pipeline(components, config.stream)
        pipe.on_notice.append(common.say_above_bar if io.progress else common.say)
        work_size = pipe.processing_size(source.width, source.height)
        out_size = (source.width, source.height) if io.keep_size else work_size
        sink = open_sink(io.output, fps=source.fps, size=out_size, audio_path=source.audio_path)
        total = source.num_frames
        if io.max_frames is not None and total is not None:
            total = min(total, io.max_frames)
        bar = common.progress_bar(total, io.progress)
        reader = ThreadedReader(source, maxsize=io.queue_size, drop_oldest=source.is_live)
        writer = ThreadedWriter(sink, maxsize=io.queue_size)
        start = time.perf_counter()
        if control is None:
            for frame in reader:
                common.write_frames(pipe.process(frame), writer.write, bar, written)
        else:
            from diffstream.models.tokenizer import TruncationWarner

            def write(outputs):
                common.write_frames(outputs, writer.write, bar, written)

            warn_prompt = TruncationWarner(components.tokenizer, common.warn)
            control.start(pipe.config, turbo=components.turbo)
            for frame in reader:
                controls = control.poll()
                if controls:
                    skipped_before += apply_controls(pipe, controls, write, warn_prompt)
                write(pipe.process(frame))
        common.write_frames(pipe.flush(), writer.write, bar, written)
    except KeyboardInterrupt:
        status = 130
    finally:
        if control is not None:
            control.close()
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
            if pipe is not None:
                pipe.close()
    elapsed = time.perf_counter() - start
    common.print_warnings(source, sink)
    extras = []
    skipped = skipped_before + (pipe.skipped if pipe is not None else 0)
    if skipped:
        extras.append(f"{skipped} skipped by the similarity filter")
    if reader is not None and reader.dropped:
        extras.append(f"{reader.dropped} live frames dropped to keep latency bounded")
    written_frames = sink.frames_written if sink is not None else 0
    common.say(common.closing_line(status, written_frames if status else written[0], io.output, elapsed,
                                   extras=extras))
    return status


def _work_size(config: RunConfig, source) -> tuple[int, int]:
    """(width, height) a Wan stream processes the source at: --size on the longer side,
    the source's aspect ratio, multiples of 16 (`CausalVideoPipeline.processing_size`)."""
    from diffstream import frames as F

    return F.fit_size(source.width, source.height, config.stream.size, 16)


def apply_controls(pipe, controls, write, warn_prompt) -> int:
    """Carry out accepted OSC changes between two frames; they apply from the next one.

    Args:
        pipe: the StreamPipeline.
        controls: `diffstream.server.osc.Control` items, oldest first.
        write: called with a list of output frames to write.
        warn_prompt: called with each new prompt (warns once if CLIP would cut it).
    Returns:
        the similarity-filter skips of the streams a reset ended (the pipeline's own
        count starts over with the new stream).
    """
    from diffstream.errors import ConfigError, one_line

    ended = 0
    for control in controls:
        if control.reset:
            # The output holds one frame per input frame: finish the frames in flight
            # under the stream they started in, then start the new one.
            write(pipe.flush())
            ended += pipe.skipped
            pipe.reset()
            continue
        for name in ("prompt", "negative_prompt"):
            warn_prompt(control.changes.get(name))
        try:
            pipe.update(**control.changes)
        except ConfigError as err:  # checked against the same settings already; never stop the stream for it
            common.warn(one_line(f"OSC change {control.changes} not applied: {err}"))
    return ended
