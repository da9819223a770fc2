"""The depth model: monocular depth for frames, shared by Live2Diff's depth prior and the depth metric.

`DepthEstimator` wraps any transformers depth-estimation checkpoint (DPT / MiDaS v3,
Ranftl et al. 2021, by default, the estimator Live2Diff cites; Depth Anything works too).
These models predict *relative inverse depth* (disparity), defined only up to an unknown
scale and shift, so `normalise_depth` min-max normalises each map to [0, 1] before any
two maps are compared or a map is used as an image.

Two ways in:

- `DepthEstimator.predict(frames)`: uint8 frames on the host through the checkpoint's own
  image processor, depth maps back on the host (the depth metric, `metrics.depth`);
- `DepthConditioner(estimator, encode_image)(pixels)`: Live2Diff's depth conditioning
  (Sec. 3.2) for a pixel batch already on the device, preprocessed in torch
  (`DepthEstimator.predict_pixels`), so a streamed frame never leaves the device.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np

from diffstream.frames import Frame

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_DEPTH_MODEL", "DepthConditioner", "DepthEstimator", "normalise_depth"]

DEFAULT_DEPTH_MODEL = "Intel/dpt-hybrid-midas"


def normalise_depth(depth):
    """Min-max normalise each map of `depth` ((H, W) or (N, H, W)) to [0, 1], float32.

    One torch implementation for both callers: a tensor stays on its device (the
    conditioning path, no host sync), a numpy array comes back as numpy (the metric).
    A constant map (max == min) becomes all zeros.
    """
    import torch

    if isinstance(depth, torch.Tensor):
        return _normalise(depth)
    return _normalise(torch.from_numpy(np.asarray(depth, dtype=np.float32))).numpy()


def _normalise(depth: "torch.Tensor") -> "torch.Tensor":
    import torch

    d = depth.float()
    single = d.ndim == 2
    if single:
        d = d[None]  # (1, H, W)
    lo = d.amin(dim=(1, 2), keepdim=True)  # (N, 1, 1)
    span = d.amax(dim=(1, 2), keepdim=True) - lo
    out = torch.where(span > 0, (d - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(d))
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
        self._pixel_stats = None  # (mean, std) as (1, 3, 1, 1) tensors on self.device, built on first use

    def to(self, device) -> "DepthEstimator":
        """Move the model to `device` (in place); returns self."""
        import torch

        self.device = torch.device(device)
        self.model = self.model.to(device=self.device)
        self._pixel_stats = None
        return self

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


    def predict_pixels(self, pixels: "torch.Tensor") -> "torch.Tensor":
        """Depth maps of a pixel batch, computed on the device (no host round trip).

        The checkpoint's image processor runs on host images; this path redoes its steps
        in torch (`_preprocess_pixels`): resize, rescale, normalise, pad. Resizing is
        torch's antialiased bicubic, as in transformers' torch image-processor backend,
        not PIL's, so the maps agree with `predict` closely but not bit for bit.

        Args:
            pixels: (B, 3, H, W) RGB in [-1, 1] (`frames.frames_to_tensor`), any device/dtype.
        Returns:
            (B, H, W) float32 on `self.device`: the model's raw output (relative inverse
            depth), bicubically resized to (H, W) as in `predict`.
        """
        import torch
        import torch.nn.functional as F

        assert pixels.ndim == 4 and pixels.shape[1] == 3, f"{pixels.shape=}"
        size = tuple(pixels.shape[-2:])
        with torch.no_grad():
            inputs = self._preprocess_pixels(pixels.to(device=self.device, dtype=torch.float32))
            depth = self.model(pixel_values=inputs.to(self.dtype)).predicted_depth  # (B, h, w)
            if depth.ndim == 4:  # (B, 1, h, w) from some heads
                depth = depth[:, 0]
            depth = F.interpolate(depth[:, None].float(), size=size, mode="bicubic", align_corners=False)[:, 0]
        return depth  # (B, H, W)

    def _preprocess_pixels(self, pixels: "torch.Tensor") -> "torch.Tensor":
        """The image processor's steps in torch. (B, 3, H, W) in [-1, 1] -> (B, 3, h, w) model input.

        Follows transformers' DPT image processor (also Depth Anything's): resize to
        `size` (optionally keeping the aspect ratio, sides multiples of
        `ensure_multiple_of`), rescale, normalise with `image_mean`/`image_std`, centre-pad
        to `size_divisor`.
        """
        import torch
        import torch.nn.functional as F

        proc = self.image_processor
        x = (pixels + 1.0) * 127.5  # (B, 3, H, W) on the 0..255 scale of uint8 frames
        if getattr(proc, "do_resize", True):
            height, width = _resize_output_size(proc, tuple(x.shape[-2:]))
            x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
        if getattr(proc, "do_rescale", True):
            x = x * float(getattr(proc, "rescale_factor", 1 / 255))
        if getattr(proc, "do_normalize", False):
            if self._pixel_stats is None:  # one host-to-device copy per estimator, not per frame
                stats = (proc.image_mean, proc.image_std)
                self._pixel_stats = tuple(torch.tensor(v, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
                                          for v in stats)
            mean, std = self._pixel_stats
            x = (x - mean) / std
        divisor = getattr(proc, "size_divisor", None)
        if getattr(proc, "do_pad", False) and divisor:
            h, w = x.shape[-2:]
            pad_h, pad_w = math.ceil(h / divisor) * divisor - h, math.ceil(w / divisor) * divisor - w
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return x


class DepthConditioner:
    """Live2Diff's depth conditioning (Sec. 3.2) as one torch function: pixels -> depth latent.

    Each frame's depth map is estimated, min-max normalised to [0, 1], quantised to an
    8-bit grey image (as a depth image file would be) and VAE-encoded like any frame;
    the checkpoint's depth module (`models.motion.DepthPrior`) then maps that latent to a
    residual of the UNet's conv_in. Everything stays on the device.

    Args:
        estimator: the depth model; put it on the pixels' device, or every call copies.
        encode_image: pixels (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/8, W/8),
            e.g. `Components.encode_image`.
    Raises:
        ConfigError: the estimator's image processor has no height/width target size
            (only DPT-style processors, DPT/MiDaS and Depth Anything, are supported).
    """

    def __init__(self, estimator: DepthEstimator, encode_image: Callable[["torch.Tensor"], "torch.Tensor"]):
        _resize_output_size(estimator.image_processor, (1, 1))  # fail at construction, not at the first frame
        self.estimator = estimator
        self.encode_image = encode_image

    def __call__(self, pixels: "torch.Tensor") -> "torch.Tensor":
        """(B, 3, H, W) pixels in [-1, 1] -> (B, C, H/8, W/8) latents of their depth images."""
        import torch

        assert pixels.ndim == 4 and pixels.shape[1] == 3, f"{pixels.shape=}"
        depth = normalise_depth(self.estimator.predict_pixels(pixels))  # (B, H, W) in [0, 1]
        levels = torch.floor(depth * 255.0 + 0.5)  # (B, H, W): the uint8 grey levels
        grey = levels.to(device=pixels.device, dtype=pixels.dtype) / 127.5 - 1.0  # as frames_to_tensor scales uint8
        return self.encode_image(grey[:, None].expand(-1, 3, -1, -1))  # (B, 3, H, W) grey -> (B, C, h, w)


# Adapted from transformers/models/dpt/image_processing_dpt.py (get_resize_output_image_size).
def _resize_output_size(processor, input_hw: tuple[int, int]) -> tuple[int, int]:
    """The (height, width) a DPT-style image processor resizes an (H, W) image to."""
    size = getattr(processor, "size", None)
    height = getattr(size, "height", None) if not isinstance(size, dict) else size.get("height")
    width = getattr(size, "width", None) if not isinstance(size, dict) else size.get("width")
    if height is None or width is None:
        from diffstream.errors import ConfigError

        raise ConfigError(f"depth conditioning needs a DPT-style image processor with a height/width size "
                          f"(DPT/MiDaS, Depth Anything); got {type(processor).__name__} with size {size!r}: "
                          f"pass another --depth-model")
    multiple = int(getattr(processor, "ensure_multiple_of", 1) or 1)
    in_h, in_w = input_hw
    scale_h, scale_w = height / in_h, width / in_w
    if getattr(processor, "keep_aspect_ratio", False):  # scale as little as possible
        if abs(1 - scale_w) < abs(1 - scale_h):
            scale_h = scale_w
        else:
            scale_w = scale_h

    return round(scale_h * in_h / multiple) * multiple, round(scale_w * in_w / multiple) * multiple


def _load_depth(name: str, local_files_only: Optional[bool]):
    """(model, image_processor) from a hub id or folder, or ModelLoadError."""
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    from diffstream.models.hub import load_pretrained_parts

    return load_pretrained_parts(name, (AutoModelForDepthEstimation, AutoImageProcessor), "depth model",
                                 "--depth-model", local_files_only)
