"""ControlNets in the stream engine: condition images per frame, residuals per UNet call.

Every frame's condition images are computed once, when the frame enters
(`ControlStack.maps`), and travel with it through the stream batch the way Live2Diff's
depth latent does (`schedule.stream_batch`), so a row of a stream-batched UNet call always
meets its own frame's edges or depth, whatever step it is at. At each UNet call every
active ControlNet runs once on all rows and their residuals are summed (diffusers'
`MultiControlNetModel` sums them too), then handed to the UNet as
`down_block_additional_residuals` / `mid_block_additional_residual`.

Scales are plain floats read at each call, so a change through `StreamPipeline.update`
applies from the next frame without touching any other state; a ControlNet at scale 0 is
not run at all (off costs nothing, and gives exactly the stream without it).
"""

from __future__ import annotations

import numpy as np
import torch

from diffstream.errors import ConfigError


def check_scales(scales, count: int) -> tuple[float, ...]:
    """The per-ControlNet scales to use: `scales` (validated by `StreamConfig`), or 1.0 for
    each (diffusers' default).

    Raises:
        ConfigError: a count that differs from the loaded ControlNets'.
    """
    if scales is None:
        return (1.0,) * count
    if len(scales) != count:
        raise ConfigError(f"control_scales needs one scale per loaded ControlNet ({count}), got {len(scales)}")
    return tuple(scales)


class ControlStack:
    """The ControlNets of a loaded model (`Components.controlnets`), as the engine uses them.

    Args:
        units: `models.controlnet.ControlUnit`s, in `--controlnet` order.
    """

    def __init__(self, units=()):
        self.units = tuple(units)

    def __len__(self) -> int:
        return len(self.units)

    def maps(self, frame: np.ndarray, pixels: torch.Tensor) -> torch.Tensor | None:
        """Every ControlNet's condition image of one frame, or None without ControlNets.

        Computed for every ControlNet, also one at scale 0, so a frame already in flight
        has its maps when a scale is raised mid-stream.

        Args:
            frame: (H, W, 3) uint8 RGB at processing size.
            pixels: (1, 3, H, W) the same frame in [-1, 1] on the model's device.
        Returns:
            (1, K, 3, H, W) in [0, 1], K = number of ControlNets.
        """
        if not self.units:
            return None
        return torch.stack([unit.preprocess(frame, pixels) for unit in self.units], dim=1)  # (1, K, 3, H, W)

    def residuals(self, sample: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor,
                  maps: torch.Tensor | None, scales: tuple[float, ...], added_cond_kwargs: dict | None = None) -> dict:
        """The UNet keyword arguments of one call: summed ControlNet residuals, or {}.

        Args:
            sample: (B, C, h, w) the rows' noisy latents; timesteps: (B,);
            encoder_hidden_states: (B, 77, D) — exactly what the UNet gets.
            maps: (B, K, 3, H, W) each row's own frame's condition images.
            scales: K floats; a ControlNet at 0 is skipped.
            added_cond_kwargs: SDXL's pooled text embeddings and size ids, as the UNet gets them.
        Returns:
            {"down_block_additional_residuals": tuple of (B, C_i, h_i, w_i),
             "mid_block_additional_residual": (B, C_mid, h_mid, w_mid)}, or {} when every
            scale is 0.
        """
        down = mid = None
        for k, (unit, scale) in enumerate(zip(self.units, scales)):
            if scale == 0.0:
                continue
            d, m = unit.model(sample, timesteps, encoder_hidden_states=encoder_hidden_states,
                              controlnet_cond=maps[:, k], conditioning_scale=scale,
                              added_cond_kwargs=added_cond_kwargs, return_dict=False)
            if down is None:
                down, mid = list(d), m
            else:  # several ControlNets: their residuals add up (diffusers' MultiControlNetModel)
                down = [a + b for a, b in zip(down, d)]
                mid = mid + m
        if down is None:
            return {}
        return {"down_block_additional_residuals": tuple(down), "mid_block_additional_residual": mid}
