"""Style accuracy: does an output frame show the prompted toy style? (issue #14)

The toy model's styles are classical filters of the input (`models.toy.TOY_STYLES`), so
every output frame can be judged against every style's exact target: the frame is
classified as the style whose target is nearest (mean squared error over pixels, at the
output's size, the input resized to it), and the accuracy is the fraction of frames
classified as the prompted style. It is a metric of the toy model only: for a prompt
that is not one of its styles it is undefined (None).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from diffstream.frames import Frame, resize
from diffstream.models.toy import TOY_STYLES, style_targets

STYLE_NAMES = tuple(TOY_STYLES)


def style_distances(input_frame: Frame, output_frame: Frame) -> np.ndarray:
    """(S,) mean squared distance (0-1 scale) of `output_frame` to each style's target.

    Args:
        input_frame: (H0, W0, 3) uint8 source frame; resized to the output's size first.
        output_frame: (H, W, 3) uint8 result frame.
    """
    h, w = output_frame.shape[:2]
    source = input_frame if input_frame.shape[:2] == (h, w) else resize(input_frame, (w, h))
    targets = style_targets(source).astype(np.float32) / 255  # (S, H, W, 3)
    out = output_frame.astype(np.float32)[None] / 255  # (1, H, W, 3)
    return ((targets - out) ** 2).mean(axis=(1, 2, 3))


def nearest_style(input_frame: Frame, output_frame: Frame) -> str:
    """The toy style whose target is nearest to `output_frame` (see module doc)."""
    return STYLE_NAMES[int(np.argmin(style_distances(input_frame, output_frame)))]


def psnr(a: Frame, b: Frame) -> float:
    """Peak signal-to-noise ratio in dB of two (H, W, 3) uint8 frames of one size."""
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@dataclass
class StyleAccuracyMeter:
    """Streaming style accuracy for one prompt: `update` per frame pair, then `result`.

    Args:
        prompt: the prompt the output was made with; None or a non-toy prompt makes the
            meter inert (its result is None).
    """

    prompt: str | None
    counts: dict = field(default_factory=lambda: {name: 0 for name in STYLE_NAMES})

    @property
    def applies(self) -> bool:
        """Whether the prompt is one of the toy styles."""
        return self.prompt in TOY_STYLES

    def update(self, input_frame: Frame, output_frame: Frame) -> None:
        """Classify one output frame; (H0, W0, 3) and (H, W, 3) uint8."""
        if self.applies:
            self.counts[nearest_style(input_frame, output_frame)] += 1

    @property
    def frames(self) -> int:
        return sum(self.counts.values())

    def result(self) -> float | None:
        """Fraction of frames nearest to the prompted style; None when it does not apply."""
        if not self.applies or not self.frames:
            return None
        return self.counts[self.prompt] / self.frames


def style_accuracy(inputs, outputs, prompt: str) -> float | None:
    """Style accuracy of aligned frame lists (see module doc); None for a non-toy prompt."""
    meter = StyleAccuracyMeter(prompt)
    for a, b in zip(inputs, outputs, strict=True):
        meter.update(a, b)
    return meter.result()
