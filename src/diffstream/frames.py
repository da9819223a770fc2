"""Every frame conversion in diffstream lives here.

Conventions used across the package:
- a *frame* is a numpy array of dtype uint8, shape (H, W, 3), RGB, C-contiguous;
- a *pixel tensor* is float, shape (B, 3, H, W), values in [-1, 1] (what the VAE expects);
- sizes are given as (width, height), like PIL and OpenCV.
"""

from __future__ import annotations

import math

import numpy as np

Frame = np.ndarray  # (H, W, 3) uint8 RGB


def to_rgb(image: np.ndarray) -> Frame:
    """Normalise any decoded image to an RGB uint8 frame.

    Args:
        image: (H, W) grayscale, (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA; uint8, or
            uint16 / float in [0, 1] (converted).
    Returns:
        (H, W, 3) uint8 RGB. RGBA is composited over black (alpha multiplies colour),
        which is what a viewer shows for transparent PNG regions on a dark background.
    """
    arr = np.asarray(image)
    if arr.dtype == np.uint16:
        arr = (arr // 257).astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"expected an image of shape (H, W[, C]), got {arr.shape}")
    channels = arr.shape[2]
    if channels == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif channels == 2:  # gray + alpha
        gray, alpha = arr[:, :, :1].astype(np.uint16), arr[:, :, 1:].astype(np.uint16)
        arr = np.repeat((gray * alpha // 255).astype(np.uint8), 3, axis=2)
    elif channels == 4:
        rgb, alpha = arr[:, :, :3].astype(np.uint16), arr[:, :, 3:].astype(np.uint16)
        arr = (rgb * alpha // 255).astype(np.uint8)
    elif channels != 3:
        raise ValueError(f"unsupported channel count {channels}")
    return np.ascontiguousarray(arr)


def fit_size(width: int, height: int, longer_side: int, multiple: int) -> tuple[int, int]:
    """Processing size for an input of `width` x `height`.

    Both sides must be multiples of `multiple`. The longer side becomes the multiple
    nearest to `longer_side` (at least one multiple); the shorter side is then the
    multiple whose aspect ratio is closest to the input's (compared as ratios, so
    neither rounding direction is favoured), which is never more than half a multiple
    away from the exact side. The coarser `multiple`, the coarser the aspect: 1280x720
    at 128 is 128x72 (exact) with a multiple of 8, 128x80 with 16, 128x64 with 64.

    Returns:
        (width, height) of the processing size.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"invalid frame size {width}x{height}")
    if multiple < 1 or longer_side < 1:
        raise ValueError(f"invalid size rule: longer side {longer_side}, multiple {multiple}")
    longer = max(multiple, int(math.floor(longer_side / multiple + 0.5)) * multiple)
    exact = longer * min(width, height) / max(width, height)  # the shorter side, unrounded
    below = max(multiple, int(math.floor(exact / multiple)) * multiple)
    candidates = (below, below + multiple) if below < exact else (below,)
    shorter = min(candidates, key=lambda side: abs(math.log(side / exact)))
    return (longer, shorter) if width >= height else (shorter, longer)


def resize(frame: Frame, size: tuple[int, int]) -> Frame:
    """Resize an RGB frame to `size` = (width, height).

    Area interpolation when shrinking (no aliasing), bicubic when enlarging.
    """
    import cv2

    w, h = size
    if frame.shape[1] == w and frame.shape[0] == h:
        return frame
    shrinking = w * h < frame.shape[0] * frame.shape[1]
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC
    return np.ascontiguousarray(cv2.resize(frame, (w, h), interpolation=interp))


def letterbox(frame: Frame, size: tuple[int, int]) -> Frame:
    """Fit an RGB frame into `size` = (width, height) keeping its aspect ratio.

    The frame is scaled (see `resize`) to the largest size that fits inside `size`, then
    centred and padded with black bars (left/right for a narrower frame, top/bottom for
    a wider one). A frame that already has the target aspect ratio is just resized.
    """
    w, h = size
    fh, fw = frame.shape[:2]
    if (fw, fh) == (w, h):
        return frame
    scale = min(w / fw, h / fh)
    inner_w = min(w, max(1, int(math.floor(fw * scale + 0.5))))
    inner_h = min(h, max(1, int(math.floor(fh * scale + 0.5))))
    scaled = resize(frame, (inner_w, inner_h))
    if (inner_w, inner_h) == (w, h):
        return scaled
    out = np.zeros((h, w, frame.shape[2]), dtype=frame.dtype)
    top, left = (h - inner_h) // 2, (w - inner_w) // 2
    out[top : top + inner_h, left : left + inner_w] = scaled
    return out


def even_size(size: tuple[int, int]) -> tuple[int, int]:
    """Round (width, height) down to even numbers (H.264 with 4:2:0 chroma needs them)."""
    w, h = size
    return max(2, w - w % 2), max(2, h - h % 2)


def frames_to_tensor(frames, device=None, dtype=None):
    """Stack frames into a pixel tensor.

    Args:
        frames: one frame (H, W, 3) uint8 or a list of B frames of equal size.
    Returns:
        (B, 3, H, W) tensor in [-1, 1] on `device` with `dtype`.
    """
    import torch

    if isinstance(frames, np.ndarray) and frames.ndim == 3:
        frames = [frames]
    batch = torch.from_numpy(np.stack(frames))  # (B, H, W, 3) uint8
    batch = batch.to(device=device).permute(0, 3, 1, 2)  # (B, 3, H, W)
    batch = batch.to(dtype=dtype or torch.float32)
    return batch / 127.5 - 1.0


def tensor_to_frames(pixels) -> list[Frame]:
    """Inverse of `frames_to_tensor`.

    Args:
        pixels: (B, 3, H, W) tensor in [-1, 1] (values outside are clipped).
    Returns:
        list of B frames (H, W, 3) uint8.
    """
    import torch

    with torch.no_grad():
        pixels = ((pixels.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
        array = pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # (B, H, W, 3)
    return [array[i] for i in range(array.shape[0])]


def av_frame_to_frame(av_frame) -> Frame:
    """A decoded PyAV VideoFrame (any pixel format) to an RGB frame."""
    return np.ascontiguousarray(av_frame.to_ndarray(format="rgb24"))


def frame_to_av_frame(frame: Frame):
    """An RGB frame to a PyAV VideoFrame in rgb24 (the encoder converts to yuv420p)."""
    import av

    return av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")


def bgr_to_rgb(frame: np.ndarray) -> Frame:
    """OpenCV's BGR(A) or gray capture to an RGB frame."""
    if frame.ndim == 3 and frame.shape[2] >= 3:
        frame = frame[:, :, [2, 1, 0] + ([3] if frame.shape[2] == 4 else [])]
    return to_rgb(frame)


def rgb_to_bgr(frame: Frame) -> np.ndarray:
    """An RGB frame to OpenCV's BGR order."""
    return np.ascontiguousarray(frame[:, :, ::-1])


def load_image(path) -> Frame:
    """Read an image file (PNG, JPEG, WebP, ...; RGB, RGBA, gray, 16-bit) as an RGB frame."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img).astype(np.float32)
            arr = arr / (65535.0 if arr.max() > 255 else 255.0)
            return to_rgb(arr)
        if img.mode == "P":
            img = img.convert("RGBA")
        elif img.mode not in ("RGB", "RGBA", "L", "LA"):
            img = img.convert("RGB")
        return to_rgb(np.asarray(img))


def save_image(path, frame: Frame) -> None:
    """Write an RGB frame as an image file (format from the suffix)."""
    from PIL import Image

    Image.fromarray(frame).save(path)


def encode_jpeg(frame: Frame, quality: int = 85) -> bytes:
    """Compress an RGB frame to JPEG bytes (for the web demo)."""
    import cv2

    ok, buf = cv2.imencode(".jpg", rgb_to_bgr(frame), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def decode_image_bytes(data: bytes) -> Frame:
    """Decode JPEG/PNG/WebP bytes to an RGB frame; ValueError if they are not an image."""
    import cv2

    arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ValueError("not a decodable image")
    return bgr_to_rgb(arr)
