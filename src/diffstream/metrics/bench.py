"""`diffstream bench`: several methods on the same clip, model and seed, side by side.

    diffstream bench IN.mp4 --prompt "..." --methods streamdiffusion,streamv2v,live2diff,fairy,fatezero
                     [--model ...] [--frames N] [--json FILE] [--plot FILE.png]

For each method: quality (warp error on both scales; CLIP temporal consistency and text
score when a CLIP model loads), speed (fps, per-frame latency p50/p95, first-output
latency) and peak memory (CUDA allocator peak on a GPU, sampled process RSS on the CPU;
see `metrics.timing.PeakMemory`). The clip is decoded and resized to the processing size
once, before anything is timed, so every method sees identical pixels and decoding is
not charged to anyone. Measurements attach from outside: streaming pipelines report
through their `on_push` / `on_output` callbacks into a `FrameTimer`; offline methods
report finished frames through a `progress` callback. Quality is computed after all
methods have been timed, and the CLIP model is loaded only then, so it neither slows
nor adds to the memory of any timed run.

Method registry
---------------
`REGISTRY` maps a name to a `BenchMethod`. Two kinds:

- ``"stream"``: runs through `pipelines.factory.make_pipeline` with
  ``StreamConfig(method=name)``. Each stream first runs `warmup` frames, is `reset()`,
  then is timed. Latency of frame i = time from push of input i to output of output i.
- ``"offline"``: an adapter function with the signature

      adapter(model, frames, *, prompt, seed, size, progress=None) -> list[Frame]

  model: the loaded `Components` (``takes="components"``, the same model the streams
  use) or the `ModelConfig` (``takes="model_config"``, for methods that load their own
  checkpoint); frames: list of N RGB uint8 (h, w, 3) frames already at the processing
  size; size: (w, h); progress: optional callable(i) the adapter calls when output
  frame i is finished. Returns N RGB uint8 (h, w, 3) frames. Latency per frame is the
  amortised total / N (an offline method has no per-frame latency); first-output
  latency is the time to the first `progress` call, or the total if it never calls it.
  `fairy_adapter` and `fatezero_adapter` below are the two offline methods; a new
  method is one `register_method(BenchMethod(...))` call.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from diffstream.errors import ConfigError, InputError, one_line
from diffstream.frames import fit_size, resize
from diffstream.metrics.clip import ClipResult
from diffstream.metrics.report import (
    WARP_ERROR_LABEL,
    finite_or_none,
    fmt,
    legend_beside,
    markdown_table,
    new_figure,
    save_figure,
    wide_range,
)
from diffstream.metrics.style import StyleAccuracyMeter
from diffstream.metrics.timing import FrameTimer, PeakMemory
from diffstream.metrics.warp import WarpErrorMeter, WarpErrorResult

__all__ = [
    "BenchMethod",
    "REGISTRY",
    "register_method",
    "resolve_methods",
    "MethodResult",
    "BenchReport",
    "run_benchmark",
    "load_clip_frames",
]

STREAM, OFFLINE = "stream", "offline"


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class BenchMethod:
    """One benchmarkable method.

    Attributes:
        name: what --methods calls it.
        kind: "stream" (through make_pipeline) or "offline" (through an adapter).
        adapter: the offline adapter (see the module docstring for its signature).
        takes: what an offline adapter gets as its first argument: "components" or
            "model_config".
    """

    name: str
    kind: str
    adapter: Optional[Callable] = None
    takes: str = "components"

    def __post_init__(self):
        if self.kind not in (STREAM, OFFLINE):
            raise ValueError(f"kind must be {STREAM!r} or {OFFLINE!r}, got {self.kind!r}")
        if self.takes not in ("components", "model_config"):
            raise ValueError(f"takes must be 'components' or 'model_config', got {self.takes!r}")
        if self.kind == OFFLINE and self.adapter is None:
            raise ValueError(f"offline method {self.name!r} needs adapter=")

    def resolve(self) -> Optional[Callable]:
        """Check the method can run here; return its adapter (None for a stream method).

        Raises:
            ConfigError: one line naming the method when it is not available yet.
        """
        if self.kind == STREAM:
            from diffstream.config import METHODS

            if self.name not in METHODS:
                raise ConfigError(
                    f"method {self.name!r} is not available in this version of diffstream yet "
                    f"(streaming methods here: {', '.join(METHODS)})"
                )
            return None
        return self.adapter


REGISTRY: dict[str, BenchMethod] = {}


def register_method(method: BenchMethod) -> None:
    """Add (or replace) a method of `diffstream bench`."""
    REGISTRY[method.name] = method


register_method(BenchMethod("streamdiffusion", STREAM))
register_method(BenchMethod("streamv2v", STREAM))
register_method(BenchMethod("live2diff", STREAM))
register_method(BenchMethod("causal-video", STREAM))  # on a Wan model (--model tiny-wan)


def fairy_adapter(components, frames, *, prompt, seed, size, progress=None):
    """Fairy in SDEdit mode (--prompt) on the bench's model.

    Args:
        frames: list of (H, W, 3) uint8 frames; size: (width, height) of the bench clip.
        progress: called with each finished frame's index (first-output latency).
    Returns:
        the edited frames, in order.
    """
    from diffstream.pipelines.fairy import FairyConfig, FairyPipeline

    pipe = FairyPipeline(components, FairyConfig(prompt=prompt, seed=seed, size=max(size)))
    try:
        outs = []
        for i, out in enumerate(pipe.edit(list(frames))):
            outs.append(out)
            if progress is not None:
                progress(i)
        return outs
    finally:
        pipe.close()


def fatezero_adapter(components, frames, *, prompt, seed, size, progress=None):
    """FateZero on the bench's model. The bench has no source prompt, so the clip is
    inverted and edited under `prompt` (inversion + fused editing: the method's full
    cost; use `diffstream edit` for real edits).

    Args:
        frames: list of (H, W, 3) uint8 frames; seed is unused (DDIM is deterministic).
        progress: called with each finished frame's index.
    Returns:
        the edited frames, in order.
    """
    from diffstream.pipelines.fatezero import FateZeroEditConfig, edit_frames

    outs = []
    config = FateZeroEditConfig(source_prompt=prompt, prompt=prompt)
    for i, (_, frame) in enumerate(edit_frames(components, list(frames), config)):
        outs.append(frame)
        if progress is not None:
            progress(i)
    return outs


register_method(BenchMethod("fairy", OFFLINE, adapter=fairy_adapter))
register_method(BenchMethod("fatezero", OFFLINE, adapter=fatezero_adapter))


def resolve_methods(spec: str | Sequence[str]) -> list[tuple[BenchMethod, Optional[Callable]]]:
    """Parse --methods and check every name before any model loads.

    Args:
        spec: "a,b,c" or a list of names (case-insensitive; duplicates dropped).
    Returns:
        [(method, adapter or None)] in the order given.
    Raises:
        ConfigError: an empty list, an unknown name, or a method not available yet.
    """
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = list(dict.fromkeys(n.strip().lower() for n in names if n and n.strip()))
    if not names:
        raise ConfigError(f"--methods is empty; choose from {', '.join(REGISTRY)}")
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        listed = ", ".join(repr(n) for n in unknown)
        raise ConfigError(f"unknown method {listed} in --methods; choose from {', '.join(REGISTRY)}")
    return [(REGISTRY[n], REGISTRY[n].resolve()) for n in names]


# ---------------------------------------------------------------------------- results


@dataclass
class MethodResult:
    """Measurements of one method.

    Attributes:
        name, kind: the method.
        timing: `FrameTimer.summary()`-style dict (fps, seconds_per_frame, wall_seconds,
            wall_fps, latency_mean/p50/p95/max, first_output_latency, frames_pushed,
            frames_output); seconds.
        per_frame_latency: latency of each output frame in order, seconds.
        memory: `PeakMemory.summary()` (memory_kind, peak_bytes, delta_bytes, ...).
        unet_calls: UNet forward passes (streams only).
        warp, clip: quality results (None before `score`, or when CLIP is unavailable).
        error: one line if the method failed (its other fields are then empty).
        outputs: the output frames, kept until scored (not serialised).
    """

    name: str
    kind: str
    timing: dict = field(default_factory=dict)
    per_frame_latency: list = field(default_factory=list)
    memory: dict = field(default_factory=dict)
    unet_calls: Optional[int] = None
    warp: Optional[WarpErrorResult] = None
    clip: Optional[ClipResult] = None
    style_accuracy: Optional[float] = None
    error: Optional[str] = None
    outputs: Optional[list] = field(default=None, repr=False)

    def to_dict(self) -> dict:
        """Every field, JSON-ready (undefined values are None)."""
        t, m = self.timing, self.memory
        clip = self.clip.to_dict() if self.clip is not None else {}
        return {
            "kind": self.kind,
            "error": self.error,
            "frames_in": t.get("frames_pushed"),
            "frames_out": t.get("frames_output"),
            "unet_calls": self.unet_calls,
            "warp_error_255": finite_or_none(self.warp.mean_255) if self.warp else None,
            "warp_error_01": finite_or_none(self.warp.mean_01) if self.warp else None,
            "per_pair_warp_255": [finite_or_none(e) for e in self.warp.per_pair_255] if self.warp else [],
            "clip_temporal_consistency": clip.get("clip_temporal_consistency"),
            "clip_temporal_consistency_x100": clip.get("clip_temporal_consistency_x100"),
            "clip_text_score": clip.get("clip_text_score"),
            "clip_text_score_x100": clip.get("clip_text_score_x100"),
            "style_accuracy": finite_or_none(self.style_accuracy),
            "fps": finite_or_none(t.get("fps")),
            "seconds_per_frame": finite_or_none(t.get("seconds_per_frame")),
            "wall_seconds": finite_or_none(t.get("wall_seconds")),
            "wall_fps": finite_or_none(t.get("wall_fps")),
            "latency_mean": finite_or_none(t.get("latency_mean")),
            "latency_p50": finite_or_none(t.get("latency_p50")),
            "latency_p95": finite_or_none(t.get("latency_p95")),
            "latency_max": finite_or_none(t.get("latency_max")),
            "first_output_latency": finite_or_none(t.get("first_output_latency")),
            "per_frame_latency": [float(x) for x in self.per_frame_latency],
            "memory_kind": m.get("memory_kind"),
            "peak_memory_bytes": m.get("peak_bytes"),
            "memory_delta_bytes": m.get("delta_bytes"),
        }


@dataclass
class BenchReport:
    """All methods' results plus what they were run on.

    Attributes:
        results: one `MethodResult` per method, in the order asked.
        reference: warp error / CLIP of the input clip itself (the flow's noise floor:
            a perfectly consistent output would score about this).
        info: clip, size, model, device, seed, prompt, schedule, CLIP model.
        warnings: one-line notes (CLIP unavailable, a method that failed).
    """

    results: list[MethodResult]
    reference: MethodResult
    info: dict
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Run info, then per method every field of `MethodResult.to_dict`, JSON-ready."""
        return {
            **self.info,
            "methods": {r.name: r.to_dict() for r in self.results},
            "input_reference": {
                k: v for k, v in self.reference.to_dict().items()
                if k.startswith(("warp", "per_pair", "clip"))
            },
            "warnings": list(self.warnings),
        }

    def table(self) -> str:
        """One markdown row per method (and the input as reference)."""
        header = ["method", "warp err (0-255)", "warp err (0-1)", "CLIP cons. x100", "CLIP text x100",
                  "style acc.", "fps", "latency p50 s", "latency p95 s", "first output s", "peak mem MiB"]
        rows = []
        for r in [*self.results, self.reference]:
            d = r.to_dict()
            if r.error:
                rows.append([r.name, f"failed: {r.error}"[:60]] + [""] * (len(header) - 2))
                continue
            mib = d["peak_memory_bytes"] / 2**20 if d["peak_memory_bytes"] is not None else None
            rows.append([
                r.name, fmt(d["warp_error_255"]), fmt(d["warp_error_01"]),
                fmt(d["clip_temporal_consistency_x100"]), fmt(d["clip_text_score_x100"]),
                fmt(d["style_accuracy"]), fmt(d["fps"], 4), fmt(d["latency_p50"], 4), fmt(d["latency_p95"], 4),
                fmt(d["first_output_latency"], 4), "n/a" if mib is None else f"{mib:.0f}",
            ])
        return markdown_table(header, rows)

    def figure(self):
        """The bench figure, three panels sharing one colour per method.

        1. Per-pair warp error of every method and of the input (reference); a log axis
           when the values span more than 30x, so a method far off does not squash the
           others onto zero.
        2. Per-frame latency (push of input i -> output i) of the streaming methods. An
           offline method has no per-frame latency (every frame waits for the whole
           clip), so it gets no curve here.
        3. Every method's seconds per frame (streams: 1 / steady fps; offline: wall time
           / frames, amortised, labelled so) and first-output latency, as bars.

        Legends sit beside the axes, so they never cover data. The title names the clip,
        frame count, size, model, schedule, seed, device and prompt.

        Returns:
            a matplotlib Figure (Agg canvas), laid out.
        """
        from matplotlib.ticker import MaxNLocator

        fig, (ax_warp, ax_lat, ax_time) = new_figure(3, width=11.0, row_height=3.0)
        info = self.info
        colors = {r.name: f"C{i}" for i, r in enumerate(self.results)}
        ok = [r for r in self.results if r.error is None]
        frames = int(info.get("frames") or max((len(r.per_frame_latency) for r in ok), default=2))

        warp_values = []
        for r in ok:
            if r.warp is not None and r.warp.num_pairs:
                ax_warp.plot(range(1, r.warp.num_pairs + 1), r.warp.per_pair_255, marker=".", label=r.name,
                             color=colors[r.name])
                warp_values += list(r.warp.per_pair_255)
        ref = self.reference.warp
        if ref is not None and ref.num_pairs:
            ax_warp.plot(range(1, ref.num_pairs + 1), ref.per_pair_255, color="gray", linestyle="--",
                         label="input (reference)")
            warp_values += list(ref.per_pair_255)
        log_warp = wide_range(warp_values)
        if log_warp:
            ax_warp.set_yscale("log")
        ax_warp.set_ylabel(WARP_ERROR_LABEL + ("\n(log scale)" if log_warp else ""))
        ax_warp.set_xlabel("frame t (pair t-1 -> t); lower = more consistent")
        size = f"{info.get('width')}x{info.get('height')}" if info.get("width") else "?"
        run = [f"{info.get('steps')} steps" if info.get("steps") else None,
               f"strength {info.get('strength')}" if info.get("strength") is not None else None,
               f"seed {info.get('seed')}" if info.get("seed") is not None else None,
               info.get("device"), info.get("dtype")]
        line1 = (f"{info.get('input_name', 'clip')}: {frames} frames at {size}, model {info.get('model', '?')}"
                 + "".join(f", {part}" for part in run if part))
        prompt = str(info.get("prompt", ""))
        line2 = f'prompt "{prompt if len(prompt) <= 90 else prompt[:89] + "…"}"'
        ax_warp.set_title(f"{line1}\n{line2}", fontsize=10)

        streams = [r for r in ok if r.kind != OFFLINE and r.per_frame_latency]
        offline = [r.name for r in ok if r.kind == OFFLINE]
        for r in streams:
            ax_lat.plot(range(len(r.per_frame_latency)), r.per_frame_latency, marker=".", color=colors[r.name],
                        label=f"{r.name} (latency per frame)")
        if not streams:
            ax_lat.text(0.5, 0.5, "no streaming method in this run", transform=ax_lat.transAxes,
                        ha="center", va="center", color="gray")
        title = "per-frame latency of the streaming methods: push of input i -> output i"
        if offline:
            title += f"\n{', '.join(offline)}: offline, no per-frame latency (each frame waits for the clip): see below"
        ax_lat.set_title(title, fontsize=9)
        ax_lat.set_ylabel("latency (s)")
        ax_lat.set_xlabel("output frame")
        for ax in (ax_warp, ax_lat):
            ax.set_xlim(-0.4, frames - 0.6)  # frame t sits above output frame t
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))

        _time_bars(ax_time, self.results, colors)
        for ax in (ax_warp, ax_lat, ax_time):
            ax.grid(alpha=0.3)
        legend_beside(ax_warp)
        legend_beside(ax_lat)
        fig.tight_layout()
        return fig

    def plot(self, path: str) -> None:
        """Write `figure()` as a PNG at `path` (OutputError if it cannot be written)."""
        save_figure(self.figure(), path)


def _time_bars(ax, results: list, colors: dict) -> None:
    """Horizontal bars per method: seconds per frame (solid) and first-output latency
    (hatched); offline seconds per frame are the amortised wall time / frames."""
    from matplotlib.patches import Patch

    labels, values = [], []
    rows = list(reversed(results))  # the first method on top
    for k, r in enumerate(rows):
        if r.error is not None:
            labels.append(f"{r.name} (failed)")
            continue
        offline = r.kind == OFFLINE
        labels.append(f"{r.name}\n(offline)" if offline else r.name)
        color = colors.get(r.name, "gray")
        per_frame = finite_or_none(r.timing.get("seconds_per_frame"))
        first = finite_or_none(r.timing.get("first_output_latency"))
        if per_frame:
            fps = finite_or_none(r.timing.get("fps"))
            note = "offline: amortised, wall / frames" if offline else f"1 / {fps:.3g} fps" if fps else ""
            ax.barh(k + 0.2, per_frame, 0.38, color=color)
            ax.annotate(f" {per_frame:.3g} s/frame" + (f" ({note})" if note else ""), (per_frame, k + 0.2),
                        va="center", fontsize=8)
            values.append(per_frame)
        if first:
            ax.barh(k - 0.2, first, 0.38, facecolor="white", edgecolor=color, hatch="///")
            ax.annotate(f" first output {first:.3g} s", (first, k - 0.2), va="center", fontsize=8)
            values.append(first)
    ax.set_yticks(range(len(rows)), labels, fontsize=9)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    log = wide_range(values)
    if values:
        if log:
            ax.set_xscale("log")
            ax.set_xlim(min(values) / 2, max(values) * 10)  # room for the value labels
        else:
            ax.set_xlim(0, max(values) * 1.6)
    ax.set_xlabel("seconds" + (" (log scale)" if log else ""))
    ax.set_title("time per frame and to the first output, every method", fontsize=9)
    legend_beside(ax, handles=[Patch(color="gray"), Patch(facecolor="white", edgecolor="gray", hatch="///")],
                  labels=["seconds per frame\n(streams: 1 / steady fps;\noffline: amortised)",
                          "first-output latency"])


# ----------------------------------------------------------------------------- runner


def _release_memory(device) -> None:
    """Free what the previous method left, so the next one's peak starts low."""
    gc.collect()
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _with_motion_modules(components, model_config):
    """The same model with motion modules inserted (live2diff needs a video UNet)."""
    import dataclasses

    from diffstream.config import DEFAULT_MOTION_ADAPTER
    from diffstream.models.motion import load_motion_adapter, motion_unet

    spec = getattr(model_config, "motion_adapter", None)
    if spec is None and components.name == "toy":
        raise ConfigError("the toy model has no trained motion modules: pass --motion-adapter tiny (random "
                          "modules: plumbing only) or a real checkpoint, or leave live2diff out of --methods")
    spec = spec or ("tiny" if components.name == "tiny" else DEFAULT_MOTION_ADAPTER)
    adapter, depth_state, _ = load_motion_adapter(spec, components.unet.config.block_out_channels)
    return dataclasses.replace(components, unet=motion_unet(components.unet, adapter), depth_prior_state=depth_state)


def _run_stream(name: str, components, stream_config, frames: list, warmup: int) -> MethodResult:
    from diffstream.pipelines.factory import make_pipeline

    pipe = make_pipeline(components, stream_config.replace(method=name))
    try:
        if warmup > 0:
            # First calls pay for kernel selection and allocations; reset() then drops
            # every trace of the warm-up frames (in-flight latents, banks, noise batch).
            for frame in frames[:warmup]:
                pipe.push(frame)
            pipe.flush()
            pipe.reset()
        timer = FrameTimer()
        pipe.on_push.append(timer.on_push)
        pipe.on_output.append(timer.on_output)
        outputs = []
        _release_memory(components.device)
        with PeakMemory(components.device) as mem:
            for frame in frames:
                outputs.extend(pipe.process(frame))
            outputs.extend(pipe.flush())
        return MethodResult(name, STREAM, timer.summary(), timer.latencies(), mem.summary(),
                            unet_calls=pipe.unet_calls, outputs=outputs)
    finally:
        pipe.close()


def _run_offline(name: str, adapter: Callable, model, frames: list, prompt: str, seed: int,
                 size: tuple[int, int], device) -> MethodResult:
    first: list[float] = []

    def progress(_index: int) -> None:
        if not first:
            first.append(time.perf_counter())

    _release_memory(device)
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        outputs = list(adapter(model, frames, prompt=prompt, seed=seed, size=size, progress=progress))
        total = time.perf_counter() - start
    if len(outputs) != len(frames):
        raise ValueError(f"{name} returned {len(outputs)} frames for {len(frames)} inputs")
    outputs = [np.asarray(o) for o in outputs]
    n = len(outputs)
    per_frame = total / n
    timing = {
        "frames_pushed": n,
        "frames_output": n,
        "fps": n / total if total > 0 else None,
        "seconds_per_frame": per_frame,
        "wall_seconds": total,
        "wall_fps": n / total if total > 0 else None,
        # No per-frame latency exists offline: every frame waits for the whole clip.
        # The amortised time per frame is reported in its place (see module docstring).
        "latency_mean": per_frame,
        "latency_p50": per_frame,
        "latency_p95": per_frame,
        "latency_max": per_frame,
        "first_output_latency": (first[0] - start) if first else total,
    }
    return MethodResult(name, OFFLINE, timing, [per_frame] * n, mem.summary(), outputs=outputs)


def _score(result: MethodResult, inputs: list, clip, prompt: Optional[str], flow_preset: str) -> None:
    """Quality metrics of `result.outputs` against `inputs`; then the outputs are dropped."""
    outputs = result.outputs or []
    meter = WarpErrorMeter(flow_preset)
    style = StyleAccuracyMeter(prompt)  # the toy model's styles only; None otherwise
    for a, b in zip(inputs, outputs):
        meter.update(a, b)
        style.update(a, b)
    result.warp = meter.result()
    result.style_accuracy = style.result()
    if clip is not None and outputs:
        result.clip = clip.evaluate(outputs, prompt or None)
    result.outputs = None


def run_benchmark(
    frames: list,
    methods: Sequence,
    *,
    prompt: str,
    stream_config=None,
    components=None,
    model_config=None,
    clip=None,
    clip_loader: Optional[Callable] = None,
    warmup: int = 1,
    flow_preset: str = "medium",
    info: Optional[dict] = None,
    log: Optional[Callable[[str], None]] = None,
) -> BenchReport:
    """Run `methods` on the same frames, model and seed; then score every output.

    Args:
        frames: N >= 2 RGB uint8 frames (h, w, 3), already at the processing size.
        methods: names, or the (BenchMethod, adapter) pairs of `resolve_methods`.
        prompt: the target prompt (also the CLIP text-score prompt).
        stream_config: base `StreamConfig` of the streaming methods (method replaced per
            run); default: `StreamConfig(prompt=prompt, size=max(h, w))`.
        components: loaded `Components` (streams and offline methods that take them).
        model_config: `ModelConfig` for offline methods with takes="model_config".
        clip: a `ClipScorer`, or None; `clip_loader` is then called (after all timing)
            and returns (scorer or None, warning or None).
        warmup: frames pushed (then reset) before timing each stream.
        flow_preset: DIS preset of warp error.
        info: extra fields for the report (clip name, model, ...).
        log: called with a one-line progress message per method (e.g. print to stderr).
    Returns:
        a `BenchReport`. A method that raises is recorded with `error` and the others
        still run.
    """
    from diffstream.config import StreamConfig

    if len(frames) < 2:
        raise InputError(f"the benchmark needs at least 2 frames, got {len(frames)}")
    if not methods or isinstance(methods[0], str):
        methods = resolve_methods(list(methods))
    h, w = frames[0].shape[:2]
    seed = stream_config.seed if stream_config is not None else 2
    if stream_config is None:
        stream_config = StreamConfig(prompt=prompt, size=max(h, w), seed=seed)
    device = components.device if components is not None else "cpu"
    results: list[MethodResult] = []
    warnings: list[str] = []
    for method, adapter in methods:
        try:
            if method.kind == STREAM:
                if components is None:
                    raise ValueError("streaming methods need loaded components")
                model = components
                if method.name == "live2diff" and not components.is_video_unet:
                    model = _with_motion_modules(components, model_config)
                elif method.name != "live2diff" and components.is_video_unet:
                    raise ValueError(f"{method.name} needs an image UNet, the loaded model has motion modules")
                result = _run_stream(method.name, model, stream_config, frames, warmup)
            else:
                model = components if method.takes == "components" else model_config
                if model is None:
                    raise ValueError(f"{method.name} needs {method.takes.replace('_', ' ')}")
                result = _run_offline(method.name, adapter, model, frames, prompt, seed, (w, h), device)
        except Exception as exc:  # one broken method must not lose the others' results
            message = one_line(f"{type(exc).__name__}: {exc}", 200)
            result = MethodResult(method.name, method.kind, error=message)
            warnings.append(f"{method.name} failed: {message}")
        results.append(result)
        if log is not None and result.error is None:
            fps = result.timing.get("fps")
            log(f"{method.name}: {result.timing.get('frames_output')} frames"
                + (f", {fps:.3g} fps" if fps else ""))
    if clip is None and clip_loader is not None:
        clip, note = clip_loader()
        if note:
            warnings.append(note)
    for result in results:
        if result.error is None:
            _score(result, frames, clip, prompt, flow_preset)
    reference = MethodResult("input (reference)", "reference", outputs=list(frames))
    _score(reference, frames, clip, prompt, flow_preset)
    report_info = {
        "frames": len(frames),
        "width": w,
        "height": h,
        "prompt": prompt,
        "seed": seed,
        "steps": len(stream_config.t_indices(bool(getattr(components, "turbo", False)))),
        "strength": stream_config.strength,
        "device": str(device),
        "dtype": str(getattr(components, "dtype", "")).replace("torch.", "") or None,
        "model": getattr(components, "name", None) or getattr(model_config, "model", None),
        "warmup_frames": warmup,
        "flow_preset": flow_preset,
        "clip_model": getattr(clip, "name", None),
        "memory_kind": "cuda" if str(device).startswith("cuda") else "rss",
        **(info or {}),
    }
    return BenchReport(results, reference, report_info, warnings)


def load_clip_frames(spec: str, max_frames: int, size: int, multiple: int = 64) -> tuple[list, tuple[int, int]]:
    """Decode the first `max_frames` frames of `spec`, resized to the processing size.

    Args:
        spec: anything `io.sources.open_source` opens.
        size: longer side of the processing size; multiple: rounding of both sides
            (the model's `size_multiple`).
    Returns:
        (list of (h, w, 3) uint8 frames, (w, h)).
    """
    from diffstream.io.sources import open_source

    with open_source(spec, max_frames=max_frames) as src:
        target = fit_size(src.width, src.height, size, multiple)
        frames = [resize(f, target) for f in src]
    return frames, target
