"""`diffstream eval`: every quality metric of one result video against its source.

    diffstream eval --source IN.mp4 --output OUT.mp4 [--prompt "..."] [--source-prompt "..."]
                    [--json FILE] [--plot FILE.png] [--clip-model ID_OR_PATH|none]
                    [--depth-model ID_OR_PATH] [--max-frames N]

Both videos are decoded in lockstep, one frame pair at a time, and every metric is a
streaming accumulator (`WarpErrorMeter`, `ClipMeter`, a batched depth accumulator), so
no video is ever held in memory. Source frames are resized to the output size
(`frames.resize`) when the two differ: an output made at the processing size (512 px
longer side) is judged against the source at that size.

Model-based metrics are optional extras: a CLIP or depth model that cannot be loaded
(no network, wrong path) produces a one-line warning naming the option to pass, and
those metrics are reported as null / "n/a" while the rest are still computed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np

from diffstream.errors import ConfigError, InputError, ModelLoadError
from diffstream.frames import Frame, resize
from diffstream.metrics.clip import ClipResult
from diffstream.metrics.report import (
    WARP_ERROR_LABEL,
    finite_or_none,
    fmt,
    legend_beside,
    markdown_table,
    new_figure,
    save_figure,
)
from diffstream.metrics.style import StyleAccuracyMeter
from diffstream.metrics.warp import WarpErrorMeter, WarpErrorResult

__all__ = [
    "EvalReport",
    "evaluate_frames",
    "evaluate_files",
    "load_clip_scorer",
    "load_depth_estimator",
    "FLOW_PRESETS",
]

FLOW_PRESETS = ("ultrafast", "fast", "medium")
# Value of --clip-model that skips the CLIP metrics without a warning.
NO_MODEL = "none"


# ------------------------------------------------------------------------------ depth


class _DepthAccumulator:
    """Streaming depth MSE: the procedure of `metrics.depth.depth_mse`, fed pair by pair.

    Pairs are buffered `batch_size` at a time (the estimator's batch), so memory stays
    bounded however long the video is.
    """

    def __init__(self, estimator, batch_size: int = 8):
        self.estimator = estimator
        self.batch_size = max(1, int(batch_size))
        self._inputs: list = []
        self._outputs: list = []
        self._total = 0.0
        self._count = 0

    def update(self, input_frame: Frame, output_frame: Frame) -> None:
        """Add one pair; `input_frame` must already have the output's size (H, W, 3)."""
        self._inputs.append(input_frame)
        self._outputs.append(output_frame)
        if len(self._outputs) >= self.batch_size:
            self._flush()

    def _flush(self) -> None:
        from diffstream.models.depth import normalise_depth

        if not self._outputs:
            return
        ins, outs = self._inputs, self._outputs
        self._inputs, self._outputs = [], []
        d_in = normalise_depth(self.estimator.predict(ins, batch_size=self.batch_size))
        d_out = normalise_depth(self.estimator.predict(outs, batch_size=self.batch_size))
        per_frame = ((d_in - d_out) ** 2).mean(axis=(1, 2), dtype=np.float64)
        self._total += float(per_frame.sum())
        self._count += len(per_frame)

    def result(self) -> float:
        """Depth MSE in [0, 1] over all pairs so far (NaN for none)."""
        self._flush()
        return self._total / self._count if self._count else float("nan")


# ----------------------------------------------------------------------------- report


@dataclass
class EvalReport:
    """Quality metrics of one output video against its source.

    Attributes:
        frames: number of frame pairs compared.
        size: (width, height) of the output (the size every metric is computed at).
        source_size: (width, height) of the source before resizing.
        warp: warp error per consecutive pair and its means (both scales).
        clip: CLIP metrics, or None when no CLIP model was available.
        depth_mse: depth MSE in [0, 1], or None without a depth model.
        style_accuracy: the toy model's style accuracy (`metrics.style`): the fraction of
            frames nearest to the prompted style's target; None for a non-toy prompt.
        source, output, prompt, source_prompt, clip_model, depth_model: what was compared
            and with which models (None when unused).
        warnings: one-line notes (a model that did not load, unequal frame counts).
    """

    frames: int
    size: tuple[int, int]
    source_size: tuple[int, int]
    warp: WarpErrorResult
    clip: Optional[ClipResult] = None
    depth_mse: Optional[float] = None
    style_accuracy: Optional[float] = None
    source: Optional[str] = None
    output: Optional[str] = None
    prompt: Optional[str] = None
    source_prompt: Optional[str] = None
    clip_model: Optional[str] = None
    depth_model: Optional[str] = None
    flow_preset: str = "medium"
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Every field, JSON-ready: metrics that could not be computed are None."""
        clip = self.clip.to_dict() if self.clip is not None else {}
        return {
            "source": self.source,
            "output": self.output,
            "frames": self.frames,
            "width": self.size[0],
            "height": self.size[1],
            "source_width": self.source_size[0],
            "source_height": self.source_size[1],
            "source_resized": tuple(self.size) != tuple(self.source_size),
            "prompt": self.prompt,
            "source_prompt": self.source_prompt,
            "flow_preset": self.flow_preset,
            "warp_error_255": finite_or_none(self.warp.mean_255),
            "warp_error_01": finite_or_none(self.warp.mean_01),
            "warp_pairs": self.warp.num_pairs,
            "per_pair_warp_255": [finite_or_none(e) for e in self.warp.per_pair_255],
            "warp_valid_fraction": [float(v) for v in self.warp.valid_fraction],
            "clip_model": self.clip_model if self.clip is not None else None,
            "clip_temporal_consistency": clip.get("clip_temporal_consistency"),
            "clip_temporal_consistency_x100": clip.get("clip_temporal_consistency_x100"),
            "clip_text_score": clip.get("clip_text_score"),
            "clip_text_score_x100": clip.get("clip_text_score_x100"),
            "clip_frame_accuracy": clip.get("clip_frame_accuracy"),
            "depth_model": self.depth_model if self.depth_mse is not None else None,
            "depth_mse": finite_or_none(self.depth_mse),
            "style_accuracy": finite_or_none(self.style_accuracy),
            "warnings": list(self.warnings),
        }

    def table(self) -> str:
        """The metrics as a markdown table (metric | value | better)."""
        d = self.to_dict()
        rows = [
            ["frames compared", str(d["frames"]), ""],
            ["warp error (0-255 scale)", fmt(d["warp_error_255"]), "lower"],
            ["warp error (0-1 scale)", fmt(d["warp_error_01"]), "lower"],
            ["CLIP temporal consistency (x100)", fmt(d["clip_temporal_consistency_x100"]), "higher"],
            ["CLIP text score (x100)", fmt(d["clip_text_score_x100"]), "higher"],
            ["CLIP frame accuracy (0-1)", fmt(d["clip_frame_accuracy"]), "higher"],
            ["depth MSE (0-1)", fmt(d["depth_mse"]), "lower"],
        ]
        if d["style_accuracy"] is not None:  # only for the toy model's style prompts
            rows.append(["toy style accuracy (0-1)", fmt(d["style_accuracy"]), "higher"])
        return markdown_table(["metric", "value", "better"], rows)


def evaluate_frames(
    inputs: Iterable[Frame],
    outputs: Iterable[Frame],
    *,
    prompt: Optional[str] = None,
    source_prompt: Optional[str] = None,
    clip=None,
    depth=None,
    flow_preset: str = "medium",
    clip_batch: int = 16,
    depth_batch: int = 8,
) -> EvalReport:
    """All metrics of `outputs` against `inputs` in one streaming pass.

    Args:
        inputs: source frames, RGB uint8 (H, W, 3), any size (resized to the output size).
        outputs: output frames, RGB uint8 (h, w, 3), all of one size.
        prompt: target prompt (CLIP text score; frame accuracy with `source_prompt`).
        source_prompt: prompt describing the source (frame accuracy); needs `prompt`.
        clip: a `ClipScorer`, or None to skip the CLIP metrics.
        depth: a `DepthEstimator`, or None to skip depth MSE.
        flow_preset: DIS preset of the warp-error flow ("ultrafast", "fast", "medium").
        clip_batch, depth_batch: frames per model forward pass.
    Returns:
        an `EvalReport` over the common prefix of the two sequences (a warning says so
        when their lengths differ).
    Raises:
        ConfigError: `source_prompt` without `prompt`.
        InputError: no frames, or output frames that change size.
    """
    if source_prompt is not None and prompt is None:
        raise ConfigError("--source-prompt needs --prompt as well (frame accuracy compares the two)")
    warp = WarpErrorMeter(flow_preset)
    clip_meter = clip.meter(prompt, source_prompt, batch_size=clip_batch) if clip is not None else None
    depth_acc = _DepthAccumulator(depth, depth_batch) if depth is not None else None
    style = StyleAccuracyMeter(prompt)  # inert unless the prompt is one of the toy styles
    warnings: list[str] = []
    it_in, it_out = iter(inputs), iter(outputs)
    n = 0
    size = source_size = None
    while True:
        a = next(it_in, None)
        b = next(it_out, None)
        if a is None or b is None:
            if a is not None:
                warnings.append(f"the source has more frames than the output: compared the first {n}")
            elif b is not None:
                warnings.append(f"the output has more frames than the source: compared the first {n}")
            break
        b = np.asarray(b)
        a = np.asarray(a)
        if size is None:
            size, source_size = (b.shape[1], b.shape[0]), (a.shape[1], a.shape[0])
        elif (b.shape[1], b.shape[0]) != size:
            raise InputError(
                f"output frame {n} is {b.shape[1]}x{b.shape[0]}, but earlier frames are {size[0]}x{size[1]}"
            )
        a = resize(a, size)  # the source at the output's size, so every metric shares one grid
        try:
            warp.update(a, b)
        except ValueError as exc:  # frames too small for optical flow, not RGB
            raise InputError(f"cannot compute warp error: {exc}") from None
        if clip_meter is not None:
            clip_meter.update(b)
        if depth_acc is not None:
            depth_acc.update(a, b)
        style.update(a, b)
        n += 1
    if n == 0:
        raise InputError("no frames to compare")
    return EvalReport(
        frames=n,
        size=size,
        source_size=source_size,
        warp=warp.result(),
        clip=clip_meter.result() if clip_meter is not None else None,
        depth_mse=depth_acc.result() if depth_acc is not None else None,
        style_accuracy=style.result(),
        prompt=prompt,
        source_prompt=source_prompt,
        clip_model=getattr(clip, "name", None),
        depth_model=getattr(depth, "name", None),
        flow_preset=flow_preset,
        warnings=warnings,
    )


def evaluate_files(
    source: str,
    output: str,
    *,
    max_frames: Optional[int] = None,
    **kwargs,
) -> EvalReport:
    """`evaluate_frames` on two videos (files, image folders), decoded frame by frame.

    Args:
        source, output: anything `io.sources.open_source` opens.
        max_frames: compare only the first N frames.
        **kwargs: passed to `evaluate_frames` (prompt, source_prompt, clip, depth, ...).
    Raises:
        InputError: an input that cannot be opened.
    """
    from diffstream.io.sources import open_source

    with open_source(source, max_frames=max_frames) as src, open_source(output, max_frames=max_frames) as out:
        report = evaluate_frames(iter(src), iter(out), **kwargs)
        notes = list(src.warnings) + list(out.warnings)
    report.source, report.output = str(source), str(output)
    report.warnings.extend(notes)
    return report


# ----------------------------------------------------------------------------- models


def _torch_device(device: Optional[str]):
    """None for "auto" (the metric classes pick cuda, else cpu), else the string."""
    return None if device in (None, "", "auto") else device


def load_clip_scorer(name: Optional[str], device: Optional[str] = None):
    """A `ClipScorer` for `name`, or (None, warning) when it cannot be loaded.

    Args:
        name: hub id or local folder; None or "none" skips CLIP without a warning.
        device: "auto"/None or a torch device string.
    Returns:
        (scorer or None, one-line warning or None).
    """
    if name is None or str(name).lower() == NO_MODEL:
        return None, None
    from diffstream.metrics.clip import ClipScorer

    try:
        return ClipScorer(str(name), device=_torch_device(device)), None
    except ModelLoadError as err:
        return None, f"CLIP metrics skipped: {err}"


def load_depth_estimator(name: Optional[str], device: Optional[str] = None):
    """A `DepthEstimator` for `name`, or (None, warning) when it cannot be loaded.

    Args:
        name: hub id or local folder; None skips depth MSE.
        device: "auto"/None or a torch device string.
    Returns:
        (estimator or None, one-line warning or None).
    """
    if name is None or str(name).lower() == NO_MODEL:
        return None, None
    from diffstream.models.depth import DepthEstimator

    try:
        return DepthEstimator(str(name), device=_torch_device(device)), None
    except ModelLoadError as err:
        return None, f"depth MSE skipped: {err}"


def report_figure(report: EvalReport):
    """The `eval --plot` figure: per-pair warp error (with its mean) and the share of
    non-occluded pixels each pair was scored on. The title names both videos, the frame
    count, the size the metrics were computed at and the flow preset.

    Returns:
        a matplotlib Figure (Agg canvas), laid out.
    """
    from matplotlib.ticker import MaxNLocator

    fig, (ax_err, ax_valid) = new_figure(2, width=10.0)
    pairs = list(range(1, report.warp.num_pairs + 1))
    ax_err.plot(pairs, report.warp.per_pair_255, marker=".", color="tab:red", label="per pair")
    mean = finite_or_none(report.warp.mean_255)
    if mean is not None:
        ax_err.axhline(mean, color="tab:red", linestyle=":", label=f"mean {mean:.4g}")
    ax_err.set_ylabel(WARP_ERROR_LABEL)
    w, h = report.size
    ax_err.set_title(
        f"{os.path.basename(report.output or 'output')} vs {os.path.basename(report.source or 'source')}: "
        f"{report.frames} frames at {w}x{h}, flow {report.flow_preset}", fontsize=10)
    ax_err.set_xlabel("frame t (pair t-1 -> t); lower = more consistent")
    ax_valid.plot(pairs, report.warp.valid_fraction, marker=".", color="tab:blue")
    ax_valid.set_ylabel("non-occluded share")
    ax_valid.set_xlabel("frame t (pair t-1 -> t)")
    ax_valid.set_ylim(0, 1.02)
    for ax in (ax_err, ax_valid):
        ax.grid(alpha=0.3)
        ax.set_xlim(0.6, max(len(pairs), 1) + 0.4)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    legend_beside(ax_err)
    fig.tight_layout()
    return fig


def plot_report(report: EvalReport, path: str) -> None:
    """`report_figure` as a PNG at `path` (OutputError if it cannot be written)."""
    save_figure(report_figure(report), path)
