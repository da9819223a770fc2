"""Equivariance error of an image editor under affine transforms (Fairy, Wu et al. 2024, Sec. 5.2).

Fairy fine-tunes its image-editing model so that editing a transformed frame equals
transforming the edited frame: if frame t differs from frame t-1 only by a camera
motion g, the edits should differ by g too. This module measures how far an editor is
from that:

    error(edit, x, T) = mean over valid pixels and channels of |edit(T(x)) - T(edit(x))|

in 0-255 grey levels, where T is an affine warp of the image plane and the valid pixels
are those whose source point T maps from inside the image (the border T brings in has
no counterpart in the other term, so it is masked out). A per-pixel colour map is
exactly equivariant (error 0); an editor that adds a fixed spatial pattern is not.

`warp_affine` is the one warp every equivariance computation of diffstream uses (the
tuning augmentation too), so the metric measures the very transform the model was
trained on: bilinear interpolation, constant black border (torchvision's RandomAffine
default, which Fairy's augmentation used).

    edit = fairy_edit_fn(components, "swap red and blue")
    err = equivariance_error(edit, images, [a.matrix(w, h) for a in transforms])
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from diffstream import frames as F

EditFn = Callable[[np.ndarray], np.ndarray]


def warp_affine(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Warp an image by a forward affine map of the pixel plane.

    Args:
        image: (H, W, C) or (H, W) array (uint8 or float32).
        matrix: (2, 3) forward map in pixel coordinates (OpenCV's convention: the pixel
            at p = (x, y) moves to matrix @ (x, y, 1)); pixel centres are integers.
    Returns:
        the warped image, same shape and dtype: bilinear interpolation; pixels whose
        source lies outside the image are black (0).
    """
    import cv2

    h, w = image.shape[:2]
    out = cv2.warpAffine(np.ascontiguousarray(image), np.asarray(matrix, dtype=np.float64), (w, h),
                         flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out.reshape(image.shape)  # cv2 drops a trailing channel axis of 1


def inside_mask(matrix: np.ndarray, height: int, width: int) -> np.ndarray:
    """The output pixels of a warp whose source point lies inside the image.

    Args:
        matrix: (2, 3) forward affine map (as for `warp_affine`).
        height, width: image size (the warp keeps it).
    Returns:
        (H, W) bool: True where the inverse map of the pixel centre falls in
        [0, W-1] x [0, H-1], so its bilinear interpolation reads image pixels only.
    """
    full = np.vstack([np.asarray(matrix, dtype=np.float64), [0.0, 0.0, 1.0]])  # (3, 3)
    inverse = np.linalg.inv(full)[:2]  # (2, 3)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)  # (H, W) each
    sx = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    sy = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    eps = 1e-6  # integer translations land exactly on the border pixels
    return (sx >= -eps) & (sx <= width - 1 + eps) & (sy >= -eps) & (sy <= height - 1 + eps)


def equivariance_errors(edit_fn: EditFn, images: Sequence[np.ndarray], transforms: Sequence[np.ndarray]) -> np.ndarray:
    """Per (image, transform) equivariance errors; see `equivariance_error`.

    Returns:
        (N, K) float64: entry (i, k) is the mean |edit(T_k(x_i)) - T_k(edit(x_i))| over
        the pixels T_k maps from inside the image and the 3 channels, in grey levels.
    """
    errors = np.zeros((len(images), len(transforms)), dtype=np.float64)
    for i, image in enumerate(images):
        h, w = image.shape[:2]
        edited = _checked(edit_fn(image), image)  # edit(x), reused for every transform
        for k, matrix in enumerate(transforms):
            a = _checked(edit_fn(warp_affine(image, matrix)), image).astype(np.float64)  # edit(T(x))
            b = warp_affine(edited, matrix).astype(np.float64)  # T(edit(x))
            mask = inside_mask(matrix, h, w)  # (H, W)
            if not mask.any():
                raise ValueError(f"transform {k} maps no pixel from inside a {w}x{h} image")
            errors[i, k] = float(np.abs(a - b)[mask].mean())
    return errors


def equivariance_error(edit_fn: EditFn, images: Sequence[np.ndarray], transforms: Sequence[np.ndarray]) -> float:
    """Mean equivariance error of an editor: mean |edit(T(x)) - T(edit(x))| in grey levels.

    Args:
        edit_fn: (H, W, 3) uint8 -> (H, W, 3) uint8, deterministic (the same input gives the
            same output: fixed noise), e.g. from `fairy_edit_fn`.
        images: N frames (H, W, 3) uint8 (sizes may differ between images).
        transforms: K forward affine maps (2, 3) in pixel coordinates, applied to every
            image with `warp_affine` (held-out: not the ones the model was tuned on).
    Returns:
        the mean over the N x K pairs of each pair's mean absolute difference over the
        valid pixels (those T maps from inside the image, `inside_mask`) and channels,
        0-255 scale. Every pair weighs the same whatever its valid area.
    """
    if not images or not len(transforms):
        raise ValueError("equivariance_error needs at least one image and one transform")
    return float(equivariance_errors(edit_fn, images, transforms).mean())


def _checked(output: np.ndarray, image: np.ndarray) -> np.ndarray:
    output = np.asarray(output)
    if output.shape != image.shape:
        raise ValueError(f"edit_fn returned shape {output.shape} for an input of shape {image.shape}")
    return output


def fairy_edit_fn(components, instruction: str, *, steps: int = 10, seed: int = 0, guidance: float = 7.5,
                  image_guidance: float = 1.5, sampler: str = "euler-a") -> EditFn:
    """An editor for `equivariance_error`: one image through Fairy's instruction mode.

    Each call edits a single image with `FairyPipeline` (no anchors: the metric is about
    the image model alone), fixed noise (frame index 0 for every call, so x and T(x) get
    the same noise and the difference is the model's), at the image's own size.

    Args:
        components: an InstructPix2Pix-style model (8-channel UNet).
        instruction: the edit instruction.
        steps, sampler: denoising steps and sampler (Fairy: 10 Euler ancestral steps).
        seed: seeds the (fixed) noise.
        guidance, image_guidance: InstructPix2Pix's text and image scales (Fairy's and the
            `edit` command's defaults); guidance <= 1 runs the conditional branch only.
    Returns:
        edit_fn: (H, W, 3) uint8 -> (H, W, 3) uint8. Sides that are not multiples of the
        model's `size_multiple` are edited at the nearest processing size and resized back.
    """
    from diffstream.pipelines.fairy import FairyConfig, FairyPipeline

    def edit(image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        config = FairyConfig(instruction=instruction, anchors=0, steps=steps, seed=seed, guidance=guidance,
                             image_guidance=image_guidance, sampler=sampler, noise="fixed", size=max(h, w))
        with FairyPipeline(components, config) as pipe:
            (out,) = list(pipe.edit([F.to_rgb(image)]))
        return F.resize(out, (w, h))

    return edit
