"""Depth MSE: structure consistency between input and output video (Live2Diff §4.1).

Live2Diff §4.1 "measure[s] structure consistency as the mean squared difference between
the depth maps estimated [with DPT, Ranftl et al. 2021] for the input and output
frames". It does not say how the maps are normalised, nor the scale of its Table 1
values (1.12-5.50), so diffstream's numbers are comparable between diffstream runs,
not to that table. What diffstream does:

1. each frame's depth is estimated with a transformers depth-estimation model
   (`models.depth.DepthEstimator`: DPT / MiDaS v3 by default, the estimator Live2Diff
   cites; Depth Anything works too) and
   upsampled (bicubic) to the frame's resolution; inputs are first resized to the
   output size (`frames.resize`) so both maps share one pixel grid;
2. these models predict *relative inverse depth* (disparity), defined only up to an
   unknown scale and shift, so each map is min-max normalised on its own to [0, 1]:
   ``(d - min d) / (max d - min d)`` (a constant map becomes all zeros);
3. depth MSE = mean over frames of the per-pixel mean squared difference of the two
   normalised maps, so it lies in [0, 1]; identical input and output give 0.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from diffstream.frames import Frame, resize
from diffstream.models.depth import DepthEstimator, normalise_depth

__all__ = ["depth_mse"]


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
