"""What every subcommand shares: the one-line-error parser, the model options, quieting
library chatter, warnings, progress bars and the closing line of a run."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Iterable, Iterator

from diffstream.config import (BACKENDS, CausalVideoConfig, DEFAULT_MODEL, DEFAULT_MOTION_ADAPTER, DTYPES, MODEL_PRESETS, ModelConfig,
                               check_control_scale)


class Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line with exit code 2 (its default code) and
    shows every option's default in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"diffstream: error: {message}\n")


class DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless it already names its default or
    the default says nothing (None, False, an empty string or list)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, "", [], argparse.SUPPRESS):
            return text
        if action.option_strings and action.nargs != 0:
            return f"{text} (default: %(default)s)"
        return text


def int_list(text: str) -> tuple[int, ...]:
    """Parse "32,45" or "32 45" into (32, 45) (argparse type)."""
    try:
        return tuple(int(x) for x in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 32,45, got {text!r}") from None


def lora_spec(text: str) -> tuple[str, float]:
    """Parse "PATH[:SCALE]" into (path, scale); a Windows drive colon is not a scale."""
    path, sep, scale = text.rpartition(":")
    if sep:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return text, 1.0


def weighted(kind):
    """argparse type for "VALUE:WEIGHT" (the last colon splits; the prompt may hold colons)."""

    def parse(text: str):
        value, sep, weight = text.rpartition(":")
        try:
            if not sep:
                raise ValueError
            return kind(value), float(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected VALUE:WEIGHT like {'a cat' if kind is str else 7}:0.5, "
                                             f"got {text!r}") from None

    return parse


def controlnet_spec(text: str) -> tuple[str, str | None, float | None]:
    """Parse "KIND[:MODEL][:SCALE]" into (kind, model or None, scale or None) (argparse type).

    "canny", "canny:0.6", "canny:tiny", "depth:lllyasviel/control_v11f1p_sd15_depth:0.8",
    "canny:/models/cn.safetensors".
    """
    kind, _, rest = text.partition(":")
    kind = kind.strip().lower()
    from diffstream.errors import ConfigError
    from diffstream.models.controlnet import check_kind

    try:
        check_kind(kind)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    model, scale = rest or None, None
    if rest:
        head, sep, tail = rest.rpartition(":")
        try:
            scale = float(tail)
            model = head if sep else None
        except ValueError:
            pass
    if scale is not None:
        try:
            check_control_scale(scale)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(f"--controlnet {text!r}: {exc}") from None
    return kind, model, scale


def add_control_options(p: argparse.ArgumentParser) -> None:
    """ControlNet options of the stream commands (run, serve)."""
    g = p.add_argument_group("control")
    g.add_argument("--controlnet", action="append", type=controlnet_spec, default=[], metavar="KIND[:MODEL][:SCALE]",
                   help="a ControlNet with its per-frame preprocessor; repeatable (their residuals add up). KIND: "
                        "canny or depth; MODEL: hub id, folder or .safetensors (default: SD 1.5's v1.1 ControlNet "
                        "of that kind; with --model tiny/toy a random test one, also 'tiny'); SCALE: conditioning "
                        "scale, changeable while streaming, 0 = off (default: 1.0)")
    g.add_argument("--control-depth-model", default=None, metavar="ID_OR_PATH",
                   help="depth estimator of depth ControlNets: transformers hub id or folder (default: "
                        "Intel/dpt-hybrid-midas; 'tiny' = random)")
    g.add_argument("--ip-adapter", default=None, metavar="SPEC",
                   help="IP-Adapter (an image as a prompt): sd15 or plus-sd15 (h94/IP-Adapter), a local "
                        ".safetensors/.bin with its CLIP image encoder in image_encoder/ beside it, "
                        "OWNER/REPO/PATH/FILE.safetensors, or tiny / tiny-plus (random, for tests)")
    g.add_argument("--ip-adapter-image", default=None, metavar="FILE_OR_URL",
                   help="the image prompt: a JPEG/PNG/WebP file, an http(s) URL or a base64 data: URI "
                        "(changeable while streaming; without it the IP-Adapter is off)")
    g.add_argument("--ip-adapter-scale", type=float, default=1.0,
                   help="weight of the image prompt, 0 = off, changeable while streaming (default: 1.0)")


def image_prompt(args) -> str | None:
    """`--ip-adapter-image`, a local file checked now (one line, before any model loads)."""
    image = getattr(args, "ip_adapter_image", None)
    if image and not image.startswith(("http://", "https://", "data:")):
        from diffstream.io.image_prompt import read_image_prompt

        read_image_prompt(image)
    return image


def control_scales(args) -> tuple[float, ...] | None:
    """The StreamConfig.control_scales of `--controlnet` options (None without any)."""
    specs = getattr(args, "controlnet", None) or []
    return tuple(1.0 if scale is None else scale for _, _, scale in specs) or None


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Model options shared by every subcommand that runs a model."""
    g = p.add_argument_group("model")
    presets = ", ".join(f"{k} ({v['model']})" for k, v in MODEL_PRESETS.items())
    from diffstream.models.toy import TOY_STYLES

    TOY_PROMPTS = ", ".join(f"'{p}'" for p in TOY_STYLES)
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"preset [{presets}], 'toy' (trained offline toy model; its styles: {TOY_PROMPTS}), "
                        f"'tiny' (random offline test model: produces noise), 'tiny-sdxl' (the same for SDXL), "
                        f"'tiny-wan' (a random Wan video model for --method causal-video), a Wan diffusers folder, "
                        f"a hub id, a local diffusers folder, or a .safetensors file (default: {DEFAULT_MODEL})")
    g.add_argument("--lcm-lora", default=None,
                   help="LCM-LoRA to fuse (hub id, folder, file) or 'none' (default: the preset's)")
    g.add_argument("--lora", action="append", type=lora_spec, default=[], metavar="PATH[:SCALE]",
                   help="extra LoRA to fuse; repeatable (default: none)")
    g.add_argument("--tiny-vae", default=None,
                   help="AutoencoderTiny instead of the full VAE: 'taesd', a hub id or folder; for a Wan model "
                        "(causal-video) TAEHV's taew2_1.pth / .safetensors, which decodes (default: full VAE)")
    g.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cuda, cuda:1, mps, cpu (default: auto)")
    g.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: fp16 on GPU, fp32 on CPU (default: auto)")
    g.add_argument("--turbo", default=None, action=argparse.BooleanOptionalAction,
                   help="turbo model handling (1 step, no CFG) (default: detected from the model name)")
    g.add_argument("--backend", default="eager", choices=BACKENDS,
                   help="how the UNet and VAE run: eager; compile (PyTorch inductor: on CPU with weight freezing, "
                        "on CUDA max-autotune; the first start builds for minutes, later starts read the on-disk "
                        "cache); openvino (CPU, streamdiffusion only; pip install 'diffstream[openvino]'); auto "
                        "(compile on CPU/CUDA, eager on MPS) (default: eager)")
    g.add_argument("--compile", dest="backend", action="store_const", const="compile",
                   help="the same as --backend compile")
    g.add_argument("--motion-adapter", default=None,
                   help="motion modules for --method live2diff: hub id or folder (diffusers MotionAdapter), an "
                        "AnimateDiff or Live2Diff checkpoint file (default: "
                        f"{DEFAULT_MOTION_ADAPTER}; with --model tiny a random tiny adapter)")


def model_config(args) -> ModelConfig:
    """The ModelConfig of parsed model options (`add_model_options`)."""
    motion = getattr(args, "motion_adapter", None)
    if motion is None and getattr(args, "method", None) == "live2diff":
        if args.model == "toy":
            from diffstream.errors import ConfigError

            raise ConfigError("--model toy has no trained motion modules for --method live2diff: pass "
                              "--motion-adapter tiny (random modules: plumbing only) or a real checkpoint")
        motion = "tiny" if args.model == "tiny" else DEFAULT_MOTION_ADAPTER
    controlnets = tuple((kind, model) for kind, model, _ in getattr(args, "controlnet", None) or [])
    return ModelConfig(model=args.model, lcm_lora=args.lcm_lora, loras=tuple(args.lora), tiny_vae=args.tiny_vae,
                       device=args.device, dtype=args.dtype, turbo=args.turbo, backend=args.backend,
                       motion_adapter=motion, controlnets=controlnets,
                       control_depth_model=getattr(args, "control_depth_model", None),
                       ip_adapter=getattr(args, "ip_adapter", None), transformer=getattr(args, "transformer", None),
                       text_encoder_offload=bool(getattr(args, "text_encoder_offload", False)),
                       quantize=getattr(args, "quantize", None))


def compile_for_stateful(model: ModelConfig, method: str) -> ModelConfig:
    """An offline edit's model options with `--backend openvino` swapped for `compile`, said in one line.

    Fairy's anchors and FateZero's attention store keep state in the attention layers,
    which OpenVINO cannot run (`attention.base.check_backend`; a stream falls back as its
    processors attach and its pipeline tells it): the edit loads on inductor instead.
    """
    if model.backend != "openvino":
        return model
    say(f"--backend openvino cannot run {method}'s attention (it keeps state in the attention layers): the model "
        f"runs on --backend compile (inductor) instead")
    return dataclasses.replace(model, backend="compile")


def add_video_options(p: argparse.ArgumentParser) -> None:
    """Causal-video's chunk, KV cache and schedule options (run, serve)."""
    v = p.add_argument_group("causal video (--method causal-video, a Wan model: --model tiny-wan or a Wan folder)")
    v.add_argument("--chunk-frames", type=int, default=1,
                   help="latent frames per chunk, 4 video frames each; the first chunk is 1 + 4 (N - 1) frames "
                        "(default: 1, StreamDiffusionV2's)")
    v.add_argument("--sink-chunks", type=int, default=3, help="first chunks kept in the KV cache for ever (default: 3)")
    v.add_argument("--window-chunks", type=int, default=2,
                   help="most recent chunks kept in the KV cache besides the sinks (default: 2)")
    v.add_argument("--video-timesteps", type=int_list, default=None, metavar="T,T,...",
                   help="model timesteps of the denoising steps, decreasing in (0, 1000], e.g. 700,500 "
                        "(StreamDiffusionV2's 2 steps); overrides --strength/--steps (default: --steps levels "
                        "evenly spaced from --strength down)")
    v.add_argument("--warp-timesteps", action="store_true",
                   help="shift the steps' noise levels by the model's timestep shift (Self-Forcing's "
                        "warp_denoising_step; StreamDiffusionV2 runs without)")
    v.add_argument("--sink-policy", choices=("fixed", "adaptive"), default="fixed",
                   help="which chunks stay in the KV cache for ever: the first ones (fixed) or StreamDiffusionV2's "
                        "adaptive sink, which replaces a sink the stream drifted away from (default: fixed)")
    v.add_argument("--adapt-sink-threshold", type=float, default=0.2,
                   help="--sink-policy adaptive: replace a sink when the new chunk's pooled keys/values fall below "
                        "this cosine similarity to it (default: 0.2, StreamDiffusionV2's)")
    v.add_argument("--kv-record", choices=("clean", "steps"), default=None,
                   help="what the KV cache holds: each chunk once more at timestep 0 after denoising (clean, "
                        "Self-Forcing's; one extra call per chunk) or every denoising step's keys in a cache per step "
                        "(steps, StreamDiffusionV2's) (default: steps with --video-stream-batch, else clean)")
    v.add_argument("--video-stream-batch", action="store_true",
                   help="StreamDiffusionV2's stream batch: the denoising steps of consecutive chunks in one model "
                        "call (the same frames as --kv-record steps, steps - 1 chunks later)")
    v.add_argument("--motion-noise", action="store_true",
                   help="StreamDiffusionV2's motion-aware noise: each chunk's first noise level lowered by up to "
                        "--motion-max-drop as its input moves (RMS frame difference / --motion-reference), "
                        "smoothed over chunks (--motion-momentum)")
    v.add_argument("--motion-reference", type=float, default=0.2,
                   help="--motion-noise: the RMS frame difference (pixels in [-1, 1]) that counts as full motion "
                        "(default: 0.2)")
    v.add_argument("--motion-max-drop", type=float, default=0.1,
                   help="--motion-noise: the noise level's drop at full motion (default: 0.1)")
    v.add_argument("--motion-momentum", type=float, default=0.1,
                   help="--motion-noise: the previous chunk's weight in the smoothing (default: 0.1)")
    v.add_argument("--no-recache", action="store_true",
                   help="keep the old prompt's keys/values in the KV cache after a prompt change instead of "
                        "re-recording the cached chunks under the new one (LongLive's recache; it needs "
                        "--sink-policy fixed and --kv-record clean)")


def video_config(args) -> CausalVideoConfig:
    """The CausalVideoConfig of parsed `add_video_options` options (raises ConfigError)."""
    from diffstream.attention.block_causal import BlockCausalConfig
    from diffstream.schedule.motion_noise import MotionNoiseConfig

    return CausalVideoConfig(
        block_causal=BlockCausalConfig(chunk_frames=args.chunk_frames, sink_chunks=args.sink_chunks,
                                       window_chunks=args.window_chunks, sink_policy=args.sink_policy,
                                       adapt_sink_threshold=args.adapt_sink_threshold),
        timesteps=tuple(args.video_timesteps) if args.video_timesteps else None, warp=args.warp_timesteps,
        kv_record=args.kv_record, stream_batch=args.video_stream_batch, recache=False if args.no_recache else None,
        motion_noise=MotionNoiseConfig(reference_motion=args.motion_reference, max_drop=args.motion_max_drop,
                                       momentum=args.motion_momentum) if args.motion_noise else None)


def add_memory_options(p: argparse.ArgumentParser) -> None:
    """A Wan model's own options (run, serve): `--transformer`, `--text-encoder-offload`,
    and the GPU-memory check (`check_memory`)."""
    g = p.add_argument_group("Wan models (--method causal-video): checkpoint and GPU memory")
    g.add_argument("--transformer", default=None, metavar="PATH",
                   help="a Wan 2.1 transformer checkpoint replacing --model's (a Wan diffusers folder, which still "
                        "gives the VAE, UMT5 and tokenizer): StreamDiffusionV2's wan_causal_dmd_v2v/model.pt, "
                        "Self-Forcing's self_forcing_dmd.pt, CausVid's .pt, an original Wan or ComfyUI .safetensors")
    g.add_argument("--text-encoder-offload", action="store_true",
                   help="keep a Wan model's text encoder (UMT5-XXL, 11 GB) on the CPU: prompts are encoded there "
                        "(slower per new prompt), only their embeddings go to the GPU, cached per prompt")
    q = g.add_mutually_exclusive_group()
    q.add_argument("--int8", dest="quantize", action="store_const", const="int8",
                   help="int8 weight-only Linear weights in the transformer and text encoder (torchao: pip install "
                        "'diffstream[quant]'): about half the weight memory of bf16, on any device")
    q.add_argument("--fp8", dest="quantize", action="store_const", const="fp8",
                   help="fp8 weight-only Linear weights (torchao; a CUDA GPU of compute capability 8.9+)")
    g.add_argument("--vram-estimate", action="store_true",
                   help="print the GPU memory a Wan model's stream would need, item by item, and exit without "
                        "loading it (on CUDA the one-line estimate is printed before every load anyway)")
    g.add_argument("--no-vram-check", action="store_true",
                   help="load a Wan model on CUDA even when the estimate exceeds the free GPU memory (the "
                        "estimate's activation terms are rough)")


def cuda_free_bytes(device) -> int | None:
    """Free memory of a CUDA `device` in bytes (`torch.cuda.mem_get_info`), None for other devices."""
    import torch

    if device.type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(device)[0])


def check_memory(config: ModelConfig, width: int, height: int, block_causal, *, rows: int = 1,
                 flags: tuple[str, ...] = ("--text-encoder-offload", "--int8", "--window-chunks", "--size"),
                 more: dict | None = None, estimate_only: bool = False, check: bool = True) -> bool:
    """Before a Wan model loads: estimate its stream's GPU memory, say it, refuse when it will not fit.

    On CUDA, one line (`wan_memory.summary_line`: total, largest items, free memory), then
    `wan_checkpoints.check_fits` against `cuda_free_bytes`. On CPU/MPS nothing, unless
    `estimate_only` (`--vram-estimate`): then the item table (`format_estimate`) on any
    device (for the run on a CUDA GPU: `--dtype auto` counts fp16), and the caller stops. Models that are not Wan models: nothing (False).

    Args:
        config: the model options.
        width, height: the processing size in pixels (fitted to multiples of 16 here).
        block_causal: chunk / sink / window (`BlockCausalConfig`).
        rows: streams held at once (run 1; serve --max-clients).
        flags: the options the command has that `check_fits` may name.
        more: further options to name, {label: estimate settings it changes}.
        estimate_only: print the table and return True (the caller exits 0, nothing loads).
        check: refuse when it does not fit (False: `--no-vram-check`).
    Returns:
        True when the caller should stop (`estimate_only`), else False.
    Raises:
        ConfigError: the estimate exceeds the free CUDA memory (one line naming what to lower).
    """
    from diffstream import frames as F
    from diffstream.models.loading import is_wan_model, precheck_wan, resolve_device, resolve_dtype

    resolved = config.resolved()
    if not is_wan_model(resolved.model):
        return False
    precheck_wan(resolved)
    device = resolve_device(resolved.device)
    free = cuda_free_bytes(device)
    if free is None and not estimate_only:
        return False
    from diffstream.models.wan_checkpoints import check_fits, format_estimate
    from diffstream.models.wan_memory import stream_estimate, summary_line, wan_parts

    parts = wan_parts(resolved)
    if parts is None:
        warn(f"no GPU memory estimate: the configs of {resolved.model} are not available before loading")
        return estimate_only
    import torch

    width, height = F.fit_size(width, height, max(width, height), 16)
    # Elsewhere than on CUDA, the estimate is for the run on a CUDA GPU (--dtype auto: fp16 there).
    dtype = resolve_dtype(resolved.dtype, device if device.type == "cuda" else torch.device("cuda"))
    estimate = stream_estimate(parts, width, height, block_causal, dtype_bytes=dtype.itemsize,
                               text_encoder_offload=resolved.text_encoder_offload, rows=rows,
                               weights_int8=resolved.quantize is not None)
    if estimate_only:
        title = f"GPU memory estimate, {width}x{height}, {rows} KV cache row(s), {str(dtype).removeprefix('torch.')}"
        print(format_estimate(estimate, title), flush=True)
        if free is not None:
            say(summary_line(estimate, free))
        return True
    say(summary_line(estimate, free))
    if check:
        from diffstream.errors import ConfigError

        try:
            check_fits(estimate, free, parts.transformer, flags=flags, more=more)
        except ConfigError as exc:
            raise ConfigError(f"{resolved.model} at {width}x{height} {exc} (--no-vram-check loads it anyway)") from None
    return False


def check_device(config: ModelConfig) -> None:
    """Fail in one line, before any input is opened or weights load, when --device
    names a device this machine or this torch build does not have (ModelLoadError), or
    when --transformer / --text-encoder-offload cannot apply (ConfigError: not a Wan
    model, no such checkpoint)."""
    from diffstream.models.loading import precheck_wan, resolve_device

    precheck_wan(config.resolved())
    resolve_device(config.device)


def out_of_memory_message(err: BaseException) -> str | None:
    """The one line for an accelerator out-of-memory error, or None for other errors."""
    text = str(err)
    if type(err).__name__ != "OutOfMemoryError" and "out of memory" not in text.lower():
        return None
    return ("out of memory on the GPU: lower --size, use --dtype fp16, --tiny-vae taesd, or (edit) a smaller "
            "--chunk-size / --fz-window; close other programs using the GPU")


def quiet_libraries() -> None:
    """Library chatter (deprecations, config notes, "Loading weights" bars) is not for CLI
    users. Download progress stays on: a first run fetching gigabytes must not look hung."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("diffusers", "transformers", "torch", "torchao", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        dlog.set_verbosity_error()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
        dlog.disable_progress_bar()
        # transformers' switch also turns off huggingface_hub's bars, which are the
        # download progress (file names and sizes) of a first run: turn those back on.
        from huggingface_hub.utils import enable_progress_bars

        enable_progress_bars()
    except Exception:
        pass


def warn_long_prompts(components, *prompts) -> None:
    """Warn once per prompt that CLIP's 77 tokens would cut (saying where)."""
    from diffstream.models.tokenizer import TruncationWarner

    warner = TruncationWarner(components.tokenizer, warn)
    for prompt in prompts:
        warner(prompt)


def resolve_seed(seed: int) -> int:
    """`--seed -1` asks for a random seed (as the web page's -1 does): pick one and say
    which, so the run can be repeated."""
    from diffstream.server.protocol import resolve_seed as pick

    chosen = pick(int(seed))
    if chosen != seed:
        say(f"--seed -1: using seed {chosen}")
    return chosen


def say(message: str) -> None:
    """A status line for the person at the terminal (stderr, flushed)."""
    print(f"diffstream: {message}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """A one-line warning on stderr."""
    print(f"diffstream: warning: {message}", file=sys.stderr, flush=True)


def print_warnings(*sources) -> None:
    """Print the `warnings` list of each source/sink/clip given (None is skipped), once each."""
    seen = []
    for source in sources:
        for warning in getattr(source, "warnings", None) or []:
            if warning not in seen:
                seen.append(warning)
                warn(warning)


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass


def progress_bar(total: int | None, enabled: bool, unit: str = "frame", desc: str | None = None):
    """A tqdm bar on stderr, or an object with the same methods that draws nothing."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True, file=sys.stderr)


def write_frames(outputs: Iterable, write, bar, counter: list[int]) -> None:
    """The loop every command shares: write each output frame, count it, tick the bar.

    Args:
        outputs: an iterable of (H, W, 3) uint8 frames, in input order.
        write: called with each frame (a sink's or a writer thread's `write`).
        bar: from `progress_bar`.
        counter: a one-element list holding the frames written so far, so the count
            survives a KeyboardInterrupt raised mid-loop.
    """
    for frame in outputs:
        write(frame)
        counter[0] += 1
        bar.update(1)


def closing_line(status: int, written: int, output: str, elapsed: float, total: int | None = None,
                 extras: Iterable[str] = ()) -> str:
    """The last line of `run` / `edit`: what was written where, and at what rate.

    An interrupted run that wrote nothing says the output was not created (the sink only
    creates its file with the first frame, and an existing file is left as it was).
    """
    if status and not written:
        return f"interrupted before the first frame: {output} was not written"
    parts = list(extras)
    if status == 0 and written:
        parts.insert(0, f"{written / max(elapsed, 1e-9):.2f} fps")
    count = f"{written} of {total}" if total is not None else f"{written}"
    verb = "interrupted: wrote" if status else "wrote"
    return f"{verb} {count} frames to {output}" + (f" ({', '.join(parts)})" if parts else "")


def raise_interrupt(signum, frame):
    """SIGTERM handler: stop like Ctrl-C, so outputs are finalised."""
    raise KeyboardInterrupt


def loading_message(config: ModelConfig) -> str:
    """"loading model X on DEVICE" for the line printed before a model loads."""
    resolved = config.resolved()
    name = str(resolved.model)
    where = "" if config.device == "auto" else f" on {config.device}"
    local = (os.path.exists(os.path.expanduser(name)) or name.startswith(("/", ".", "~"))
             or name.endswith((".safetensors", ".ckpt")) or name in ("tiny", "tiny-sdxl", "tiny-wan", "toy"))
    return f"loading model {name}{where}" + ("" if local else " (downloaded on first use, with progress)")


def iter_with_close(outputs) -> Iterator:
    """Iterate `outputs` and close it (a generator) when done or interrupted."""
    try:
        yield from outputs
    finally:
        close = getattr(outputs, "close", None)
        if close is not None:
            close()


def say_above_bar(line: str) -> None:
    """`say` while a progress bar draws (from any thread): tqdm.write keeps the bar intact."""
    from tqdm import tqdm

    tqdm.write(f"diffstream: {line}", file=sys.stderr)


def add_osc_options(p: argparse.ArgumentParser, what: str) -> None:
    """`--osc PORT` and `--osc-host HOST` (`diffstream.server.osc`) for the command `what`
    ("run": its one stream; "serve": every stream the server serves, /method too)."""
    from diffstream.server.osc import ADDRESSES, METHOD, RESET

    addresses = [*ADDRESSES, *((METHOD,) if what == "serve" else ()), RESET]
    kinds = {"/prompt": "s", "/negative_prompt": "s", "/method": "s", "/steps": "i", "/seed": "i", "/reset": ""}
    listed = ", ".join(f"{a} {kinds.get(a, 'f')}".strip() for a in addresses)
    target = "every stream the server serves (and the settings new streams start with)" if what == "serve" else \
        "the run"
    o = p.add_argument_group("live control")
    o.add_argument("--osc", type=int, default=None, metavar="PORT",
                   help=f"take OSC messages on this UDP port that change {target} from the next frame: {listed}; "
                        f"0 picks a free port (needs python-osc: pip install 'diffstream[osc]')")
    o.add_argument("--osc-host", default=None, metavar="HOST",
                   help=f"address the OSC port listens on (default: 127.0.0.1, this machine only; any other "
                        f"address lets whoever reaches it change the {'streams' if what == 'serve' else 'run'}, "
                        f"without authentication)")


def osc_address(args) -> tuple[str, int] | None:
    """(host, port) of `--osc-host` / `--osc`, or None without `--osc` (raises ConfigError)."""
    from diffstream.errors import ConfigError

    if args.osc is None:
        if args.osc_host is not None:
            raise ConfigError("--osc-host needs --osc PORT (the UDP port to listen on)")
        return None
    return (args.osc_host if args.osc_host is not None else "127.0.0.1"), args.osc


def open_osc(host: str, port: int, progress: bool = False, addresses: list[str] | None = None):
    """Bind the OSC port (before the model loads: a taken port costs no load) and say
    where it listens, warning when that is not this machine only.

    Args:
        progress: a progress bar is drawn: report lines through tqdm.write.
        addresses: the addresses to list (default: those of a run).
    Returns:
        the bound, not yet started `diffstream.server.osc.OSCControl`.
    """
    from diffstream.server.osc import ADDRESSES, RESET, OSCControl, host_warning

    control = OSCControl(port, host, say=say_above_bar if progress else None)
    warning = host_warning(host)
    if warning:
        warn(warning)
    say(f"OSC control on udp {host}:{control.port} ({', '.join(addresses or [*ADDRESSES, RESET])})")
    return control
