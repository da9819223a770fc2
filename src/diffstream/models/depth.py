"""The depth model: monocular depth for frames, shared by Live2Diff's depth prior and the depth metric.

`DepthEstimator` wraps any transformers depth-estimation checkpoint (DPT / MiDaS v3,
Ranftl et al. 2021, by default, the estimator Live2Diff cites; Depth Anything works too).
These models predict *relative inverse depth* (disparity), defined only up to an unknown
scale and shift, so `normalise_depth` min-max normalises each map to [0, 1] before any
two maps are compared or a map is used as an image.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from diffstream.frames import Frame

__all__ = ["DEFAULT_DEPTH_MODEL", "DepthEstimator", "normalise_depth"]

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


def _load_depth(name: str, local_files_only: Optional[bool]):
    """(model, image_processor) from a hub id or folder, or ModelLoadError."""
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    from diffstream.models.hub import load_pretrained_parts

    return load_pretrained_parts(name, (AutoModelForDepthEstimation, AutoImageProcessor), "depth model",
                                 "--depth-model", local_files_only)
