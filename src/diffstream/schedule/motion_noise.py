"""Motion-aware noise strength: the more a chunk moves, the less SDEdit noise (StreamDiffusionV2).

Issue #18, an option of the causal video pipeline (`--motion-noise`). StreamDiffusionV2's
"motion-aware noise controller" (Feng et al. 2025) lowers the noise a chunk is started
from when the input moves fast: a fixed strength that suits a slow scene lets a fast one
tear and ghost, while a static scene keeps the full strength for the style. The rule, as
its reference code computes it (streamv2v/inference.py, `compute_noise_scale_and_step`),
on pixels in [-1, 1], for a chunk of frames x_1..x_T and the frame before it x_0:

    d       = clamp( max_t sqrt( mean_(C, H, W) (x_t - x_{t-1})^2 ) / reference_motion, 0, 1 )
    sigma_n = (init - max_drop * d) * (1 - momentum) + sigma_{n-1} * momentum      (sigma_{-1} = init)

(reference_motion 0.2, max_drop 0.1, momentum 0.1 there): per-frame RMS differences, the
largest of the chunk, normalised and clamped; the noise drops by at most `max_drop` from
`init` (the sigma the strength gives) and is smoothed by an exponential moving average
over chunks. The chunk is then noised at sigma_n (SDEdit for flow matching: x = (1 - sigma)
z0 + sigma noise).

Deliberate deviations from StreamDiffusionV2:
- the first denoising step runs at timestep 1000 sigma_n, as every step of our pipeline
  (its timestep is 1000 sigma). StreamDiffusionV2 passes `int(1000 * scale) - 100`, a
  timestep 0.1 below (and truncated from) the sigma it noised the chunk at;
- the stream's first chunk: StreamDiffusionV2 noises it at `init` and starts the rule at
  the second chunk. Here the first chunk already follows the rule, its differences taken
  within the chunk only (no frame before it; a single frame: d = 0, sigma = init);
- the differences are taken in float32 whatever the frames' dtype (StreamDiffusionV2: in
  the video's bfloat16);
- sigma stays on the device: `MotionNoise.step` returns a 0-dim float32 tensor and never
  reads a value on the host (StreamDiffusionV2's `.item()` waits for the GPU once per
  chunk), so the pipeline's hot loop does not sync. It is clamped at 0 (an initial sigma
  below `max_drop * (1 - momentum)` would otherwise go negative).

The EMA is written sigma_n = init - (1 - momentum) max_drop d + momentum (sigma_{n-1} - init),
the same number up to rounding, so that a static input keeps sigma at init exactly
(float32(init), not a rounding away from it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffstream.errors import ConfigError


@dataclass(frozen=True)
class MotionNoiseConfig:
    """The motion-aware noise's constants (defaults: StreamDiffusionV2's).

    Attributes:
        reference_motion: the RMS frame difference (pixels in [-1, 1]) that counts as full
            motion, d = 1 (StreamDiffusionV2: 0.2); > 0.
        max_drop: how far sigma drops below the initial sigma at full motion, before the
            EMA (StreamDiffusionV2: 0.1); in [0, 1], 0 keeps sigma at init.
        momentum: the EMA's weight of the previous chunk's sigma (StreamDiffusionV2: 0.1);
            in [0, 1) (1 would freeze sigma at its initial value).
    """

    reference_motion: float = 0.2
    max_drop: float = 0.1
    momentum: float = 0.1

    def __post_init__(self):
        if not (math.isfinite(self.reference_motion) and self.reference_motion > 0):
            raise ConfigError(f"--motion-reference must be > 0 (an RMS pixel difference in [-1, 1] units), "
                              f"got {self.reference_motion}")
        if not 0.0 <= self.max_drop <= 1.0:
            raise ConfigError(f"--motion-max-drop is a drop in sigma, in [0, 1], got {self.max_drop}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"--motion-momentum must be in [0, 1) (1 freezes sigma), got {self.momentum}")


def _check_init(init_sigma: float) -> float:
    init = float(init_sigma)
    if not 0.0 <= init <= 1.0:
        raise ConfigError(f"the motion-aware noise's initial sigma (from --strength) must be in [0, 1], got {init}")
    return init


class MotionNoise:
    """One stream's motion-aware sigma, chunk after chunk (module docstring).

    State: the previous chunk's last frame (a preallocated (3, H, W) float32 buffer on the
    frames' device, copied into), whether it holds one, and the previous sigma (a 0-dim
    tensor, or None at the stream's start: then init). `reset` forgets both; a chunk of
    another frame size or device than the kept frame starts without a previous frame
    (the EMA goes on).
    """

    def __init__(self, config: MotionNoiseConfig, init_sigma: float):
        self.config = config
        self.init = _check_init(init_sigma)
        self._previous: torch.Tensor | None = None  # (3, H, W) float32, allocated at the first chunk
        self._has_previous = False  # host-side: whether `_previous` holds the last chunk's last frame
        self._sigma: torch.Tensor | None = None  # () float32 on the device: sigma_{n-1}; None: init
        self.reset()

    def reset(self) -> None:
        """A new stream: forget the previous frame and the previous sigma (the buffer stays allocated)."""
        self._has_previous = False
        self._sigma = None

    def set_init(self, init_sigma: float) -> None:
        """The initial sigma changed (a new strength): used from the next chunk, the EMA continues."""
        self.init = _check_init(init_sigma)

    # Adapted from StreamDiffusionV2 (streamv2v/inference.py, compute_noise_scale_and_step).
    def step(self, frames: torch.Tensor) -> torch.Tensor:
        """The sigma to noise this chunk at, from its motion; keeps its last frame for the next chunk.

        Args:
            frames: (T, 3, H, W) the chunk's pixels in [-1, 1], T >= 1, any float dtype, on
                the model's device.
        Returns:
            () float32 on the frames' device: sigma_n (module docstring). A new tensor every
            call (never updated in place), computed without a host sync.
        """
        if frames.ndim != 4 or frames.shape[0] < 1:
            raise ValueError(f"MotionNoise.step takes (T, 3, H, W) frames with T >= 1, got {tuple(frames.shape)}")
        c = self.config
        x = frames.to(torch.float32)  # (T, 3, H, W)
        if self._previous is None or self._previous.shape != x.shape[1:] or self._previous.device != x.device:
            self._previous = torch.empty_like(x[0])  # (3, H, W): a stream's first chunk (or another frame size)
            self._has_previous = False
        diffs = [x[1:] - x[:-1]]  # (T - 1, 3, H, W) within the chunk
        if self._has_previous:
            diffs.insert(0, x[:1] - self._previous[None])  # (1, 3, H, W) x_1 - x_0
        diff = torch.cat(diffs)  # (T', 3, H, W), T' = T, or T - 1 without a frame before the chunk
        if diff.shape[0] > 0:  # a shape, known on the host
            rms = diff.square().mean(dim=(1, 2, 3)).sqrt()  # (T',) per-frame RMS difference
            d = (rms.max() / c.reference_motion).clamp(0.0, 1.0)  # ()
        else:  # one frame, nothing before it: no motion to see
            d = x.new_zeros(())
        drop = d * ((1.0 - c.momentum) * c.max_drop)  # ()
        if self._sigma is None:  # sigma_{-1} = init: the EMA term vanishes
            sigma = self.init - drop
        else:
            sigma = self.init - drop + c.momentum * (self._sigma - self.init)
        sigma = sigma.clamp_min(0.0)  # () float32
        self._previous.copy_(x[-1])  # the chunk's last frame is the next chunk's x_0
        self._has_previous = True
        self._sigma = sigma
        return sigma
