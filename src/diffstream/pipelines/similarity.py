"""Stochastic similarity filter (StreamDiffusion, Sec. 3.4).

When the input barely changes (a static camera), denoising it again only burns power.
The filter compares each frame with the last frame that was actually processed and
skips it with probability
    P(skip) = max(0, 1 - (1 - cos) / (1 - threshold)),
where cos is the cosine similarity of the two frames as vectors in [-1, 1]. A hard
threshold would make the output stutter between "frozen" and "moving"; the smooth
probability ramps skipping up as frames become more similar. `max_skip` bounds the
number of consecutive skips so a slow drift is still followed.

Deliberate deviation: the reference compares the full-resolution input tensors on the
GPU; here the cosine is taken on every 4th pixel of every 4th row of the host-side
uint8 frame, so the decision never waits on the GPU. For natural video the subsampled
cosine tracks the full one closely (neighbouring pixels are strongly correlated), and
the filter is a probability ramp, not a cut, so small differences in cos only shift
the skip probability slightly; `stride=1` gives the reference's comparison.
"""

from __future__ import annotations

import random

import numpy as np


class SimilarityFilter:
    """Decides per frame whether the diffusion step can be skipped.

    Args:
        threshold: cosine similarity at which skipping becomes certain (in [0, 1)).
        max_skip: the longest run of consecutive skips.
        seed: seeds the random draws, so a run is reproducible.
        stride: spatial subsampling of frames before comparing (speed only).
    """

    def __init__(self, threshold: float, max_skip: int = 10, seed: int = 0, stride: int = 4):
        self.threshold = float(threshold)
        self.max_skip = int(max_skip)
        self.stride = int(stride)
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        """Forget the reference frame and restart the random stream."""
        self._rng = random.Random(self.seed)
        self._reference: np.ndarray | None = None
        self._run = 0
        self.skipped = 0
        self.last_similarity: float | None = None

    def skip_probability(self, similarity: float) -> float:
        """P(skip) for a cosine similarity."""
        return max(0.0, 1.0 - (1.0 - similarity) / (1.0 - self.threshold))

    def should_skip(self, frame: np.ndarray) -> bool:
        """Whether `frame` (H, W, 3) uint8 may reuse the previous output."""
        vec = frame[:: self.stride, :: self.stride].astype(np.float32).ravel() / 127.5 - 1.0
        ref = self._reference
        if ref is None or ref.shape != vec.shape:
            self._reference, self._run = vec, 0
            return False
        denom = float(np.linalg.norm(vec) * np.linalg.norm(ref))
        similarity = float(vec @ ref) / denom if denom > 0 else float(np.array_equal(vec, ref))
        self.last_similarity = similarity
        if self._run < self.max_skip and self._rng.random() < self.skip_probability(similarity):
            self._run += 1
            self.skipped += 1
            return True
        self._reference, self._run = vec, 0
        return False
