"""Depth MSE: structure consistency between input and output video (Live2Diff §4.1).

Live2Diff §4.1 "measure[s] structure consistency as the mean squared difference between
the depth maps estimated [with DPT, Ranftl et al. 2021] for the input and output
frames". It does not say how the maps are normalised, nor the scale of its Table 1
values (1.12-5.50), so diffstream's numbers are comparable between diffstream runs,
not to that table. What diffstream does:

1. each frame's depth is estimated with a transformers depth-estimation model (DPT /
   MiDaS v3 by default, the estimator Live2Diff cites; Depth Anything works too) and
   upsampled (bicubic) to the frame's resolution; inputs are first resized to the
   output size (`frames.resize`) so both maps share one pixel grid;
2. these models predict *relative inverse depth* (disparity), defined only up to an
   unknown scale and shift, so each map is min-max normalised on its own to [0, 1]:
   ``(d - min d) / (max d - min d)`` (a constant map becomes all zeros);
3. depth MSE = mean over frames of the per-pixel mean squared difference of the two
   normalised maps, so it lies in [0, 1]; identical input and output give 0.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np

from diffstream.frames import Frame, resize

__all__ = ["DEFAULT_DEPTH_MODEL", "DepthEstimator", "depth_mse", "normalise_depth"]

DEFAULT_DEPTH_MODEL = "Intel/dpt-hybrid-midas"


def normalise_depth(depth: np.ndarray) -> np.ndarray:
    """Min-max normalise each map of `depth` ((H, W) or (N, H, W)) to [0, 1], float32.

    A constant map (max == min) becomes all zeros.
    """
    d = np.asarray(depth, dtype=np.float32)
    single = d.ndim == 2
    if single:
        d = d[None]
    lo = d.min(axis=(1, 2), keepdims=True)
    span = d.max(axis=(1, 2), keepdims=True) - lo
    out = np.where(span > 0, (d - lo) / np.where(span > 0, span, 1.0), 0.0).astype(np.float32)
    return out[0] if single else out


class DepthEstimator:
    """Monocular depth for RGB frames with any transformers depth-estimation model.

    Args:
        depth_model: hub id or local folder (AutoModelForDepthEstimation +
            AutoImageProcessor), default "Intel/dpt-hybrid-midas" (DPT-Hybrid, MiDaS
            v3.0). Depth Anything checkpoints work as well.
        device: torch device; default "cuda" when available, else "cpu".
        dtype: model dtype; default float32.
        local_files_only: passed to `from_pretrained` when not None.
    Raises:
        ModelLoadError: one line naming --depth-model PATH when the checkpoint cannot
            be loaded (no network, missing or incomplete folder).
    """

    def __init__(
        self,
        depth_model: str = DEFAULT_DEPTH_MODEL,
        device=None,
        dtype=None,
        *,
        local_files_only: Optional[bool] = None,
    ):
        import torch

        model, processor = _load_depth(str(depth_model), local_files_only)
        self._setup(model, processor, device, dtype or torch.float32)
        self.name = str(depth_model)

    @classmethod
    def from_components(cls, model, image_processor, device=None, dtype=None) -> "DepthEstimator":
        """Build from an already constructed model and image processor (tests)."""
        self = cls.__new__(cls)
        self._setup(model, image_processor, device, dtype)
        self.name = getattr(getattr(model, "config", None), "_name_or_path", "") or "<custom>"
        return self

    def _setup(self, model, image_processor, device, dtype) -> None:
        import torch

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.dtype = dtype if dtype is not None else next(model.parameters()).dtype
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.image_processor = image_processor

    def predict(self, frames: Sequence[Frame], batch_size: int = 8) -> np.ndarray:
        """Depth maps at frame resolution.

        Args:
            frames: RGB uint8 frames (H, W, 3), all the same size.
            batch_size: frames per forward pass.
        Returns:
            (N, H, W) float32, the model's raw output (relative inverse depth for
            DPT/MiDaS and Depth Anything: larger = nearer), bicubically resized to
            (H, W).
        """
        frames = [np.ascontiguousarray(f) for f in frames]
        if not frames:
            return np.zeros((0, 0, 0), dtype=np.float32)
        h, w = frames[0].shape[:2]
        if any(f.shape[:2] != (h, w) for f in frames):
            raise ValueError("all frames passed to DepthEstimator.predict must share one size")
        out = [
            self._predict_batch(frames[i : i + batch_size], (h, w))
            for i in range(0, len(frames), batch_size)
        ]
        return np.concatenate(out, axis=0)

    def _predict_batch(self, frames: list, size: tuple[int, int]) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        try:
            inputs = self.image_processor(
                images=frames, return_tensors="pt", input_data_format="channels_last"
            )
        except (TypeError, ValueError):
            inputs = self.image_processor(images=frames, return_tensors="pt")
        pixels = inputs["pixel_values"].to(device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            depth = self.model(pixel_values=pixels).predicted_depth  # (B, h, w)
            if depth.ndim == 4:  # (B, 1, h, w) from some heads
                depth = depth[:, 0]
            depth = F.interpolate(
                depth[:, None].float(), size=size, mode="bicubic", align_corners=False
            )[:, 0]
        return depth.cpu().numpy().astype(np.float32, copy=False)


def depth_mse(
    inputs: Sequence[Frame] | Iterable[Frame],
    outputs: Sequence[Frame] | Iterable[Frame],
    estimator: DepthEstimator,
    batch_size: int = 8,
) -> float:
    """Mean squared difference of normalised depth maps of input vs output frames.

    See the module docstring for the exact procedure (inputs resized to the output
    size; each depth map min-max normalised to [0, 1]; mean over pixels, then frames).
    The frames are consumed `batch_size` pairs at a time, so iterables of any length
    work without holding the video in memory.

    Returns:
        depth MSE in [0, 1] (0 for identical inputs and outputs); NaN for no frames.
    Raises:
        ValueError: if `inputs` and `outputs` differ in length.
    """
    total, count = 0.0, 0
    sentinel = object()
    it_in, it_out = iter(inputs), iter(outputs)
    done = False
    while not done:
        pairs_in, pairs_out = [], []
        while len(pairs_out) < batch_size:
            a, b = next(it_in, sentinel), next(it_out, sentinel)
            if a is sentinel or b is sentinel:
                if a is not b:
                    raise ValueError("inputs and outputs differ in length")
                done = True
                break
            b = np.asarray(b)
            pairs_out.append(b)
            pairs_in.append(resize(np.asarray(a), (b.shape[1], b.shape[0])))
        if not pairs_out:
            break
        # Depth maps are predicted per output size group (one video normally has one).
        for group_in, group_out in _same_size_groups(pairs_in, pairs_out):
            d_in = normalise_depth(estimator.predict(group_in, batch_size=batch_size))
            d_out = normalise_depth(estimator.predict(group_out, batch_size=batch_size))
            per_frame = ((d_in - d_out) ** 2).mean(axis=(1, 2), dtype=np.float64)
            total += float(per_frame.sum())
            count += len(per_frame)
    return total / count if count else float("nan")


def _same_size_groups(inputs: list, outputs: list):
    groups: dict = {}
    for a, b in zip(inputs, outputs):
        key = b.shape[:2]
        groups.setdefault(key, ([], []))
        groups[key][0].append(a)
        groups[key][1].append(b)
    return list(groups.values())


def _load_depth(name: str, local_files_only: Optional[bool]):
    """(model, image_processor) from a hub id or folder, or ModelLoadError."""
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    from diffstream.models.loading import load_pretrained_parts

    return load_pretrained_parts(name, (AutoModelForDepthEstimation, AutoImageProcessor), "depth model",
                                 "--depth-model", local_files_only)
