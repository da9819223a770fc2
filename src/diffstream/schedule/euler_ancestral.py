"""The Euler ancestral sampler ("Euler a") as pure functions (no models, no generators here).

Fairy (Wu et al., CVPR 2024) samples with Euler ancestral, 10 steps (see
/work/shared/notes/field-offline-editing.md); it is also the scheduler the
`timbrooks/instruct-pix2pix` checkpoint ships. In the sigma parametrisation of Karras et
al. (2022), x = x0 + sigma eps with sigma_t = sqrt((1 - abar_t) / abar_t), one step from
sigma to sigma' (< sigma) is Euler's method down to sigma_down, plus fresh noise of size
sigma_up so that the marginal noise level at the end is sigma' again:

    sigma_up   = sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2)
    sigma_down = sqrt(sigma'^2 - sigma_up^2)
    x0_hat     = x - sigma eps                                  (epsilon prediction)
    x'         = x + (x - x0_hat) / sigma * (sigma_down - sigma) + sigma_up z,   z ~ N(0, I)

The UNet sees x / sqrt(sigma^2 + 1) (the variance-preserving latent it was trained on).
The noise z is an argument: the caller draws it per (seed, frame, step), so a frame's
randomness never depends on which batch it is in.

Adapted from diffusers/src/diffusers/schedulers/scheduling_euler_ancestral_discrete.py
(EulerAncestralDiscreteScheduler, diffusers 0.42.1): the same timesteps, sigmas and
float32 operation order, so a step equals diffusers' step bit for bit for the same model
output and noise (tests/schedule/test_euler_ancestral.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class EulerAncestralSchedule:
    """The n steps of an Euler ancestral schedule, noisiest first.

    Attributes:
        timesteps: (n,) float32, the UNet timestep of each step (diffusers' `timesteps`).
        sigmas: (n + 1,) float32, sigma of each step's input; the last entry is 0.
        init_noise_sigma: () float32, the standard deviation of the initial latent
            (sqrt(sigma_max^2 + 1) for "leading" spacing, sigma_max otherwise: diffusers').
    """

    timesteps: torch.Tensor
    sigmas: torch.Tensor
    init_noise_sigma: torch.Tensor

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def tail(self, start: int) -> "EulerAncestralSchedule":
        """The schedule from step `start` on (SDEdit starts part-way down: diffusers' img2img)."""
        return EulerAncestralSchedule(self.timesteps[start:], self.sigmas[start:], self.init_noise_sigma)


def euler_ancestral_schedule(alphas_cumprod: torch.Tensor, num_steps: int, spacing: str = "leading",
                             steps_offset: int = 0) -> EulerAncestralSchedule:
    """diffusers' Euler ancestral schedule of `num_steps` steps.

    Args:
        alphas_cumprod: (T,) float32, the checkpoint's abar_t (T training timesteps).
        spacing: "leading" (SD 1.x: 0, r, 2r, ... plus `steps_offset`), "trailing" or
            "linspace" (Table 2 of Lin et al. 2023).
    Returns:
        the schedule; sigmas are interpolated at the (possibly fractional) timesteps.
    """
    T = int(alphas_cumprod.shape[0])
    if not 1 <= num_steps <= T:
        raise ValueError(f"Euler ancestral steps must be in [1, {T}], got {num_steps}")
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, num_steps, dtype=np.float32)[::-1].copy()
    elif spacing == "leading":
        ratio = T // num_steps
        ts = (np.arange(0, num_steps) * ratio).round()[::-1].copy().astype(np.float32)
        ts += steps_offset
    elif spacing == "trailing":
        ratio = T / num_steps
        ts = np.arange(T, 0, -ratio).round().copy().astype(np.float32)
        ts -= 1
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
    abar = alphas_cumprod.detach().cpu().float()
    table = (((1 - abar) / abar) ** 0.5).numpy()  # (T,) float32 sigma of every training timestep
    sigmas = np.concatenate([np.interp(ts, np.arange(0, T), table), [0.0]]).astype(np.float32)
    sigmas = torch.from_numpy(sigmas)
    init = sigmas.max() if spacing in ("linspace", "trailing") else (sigmas.max() ** 2 + 1) ** 0.5
    return EulerAncestralSchedule(torch.from_numpy(ts), sigmas, init)


def scale_model_input(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The UNet's input at noise level `sigma`: x / sqrt(sigma^2 + 1). x: (B, C, h, w); sigma: ()."""
    return x / ((sigma**2 + 1) ** 0.5)


def euler_ancestral_step(model_output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor,
                         sigma_next: torch.Tensor, noise: torch.Tensor,
                         prediction_type: str = "epsilon") -> torch.Tensor:
    """One Euler ancestral step from `sigma` to `sigma_next` (module docstring).

    Args:
        model_output: (B, C, h, w) the guided UNet prediction (epsilon or v).
        x: (B, C, h, w) the latent at `sigma` (unscaled).
        sigma, sigma_next: () float32, this step's and the next step's sigma.
        noise: (B, C, h, w) standard-normal noise of this step (each row its frame's own).
    Returns:
        (B, C, h, w) the latent at `sigma_next`, in `model_output`'s dtype (computed in fp32).
    """
    sample = x.to(torch.float32)  # diffusers upcasts the step
    if prediction_type == "epsilon":
        x0 = sample - sigma * model_output
    elif prediction_type == "v_prediction":
        x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
    else:
        raise ValueError(f"Euler ancestral supports epsilon and v_prediction models, not {prediction_type!r}")
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    derivative = (sample - x0) / sigma
    out = sample + derivative * (sigma_down - sigma)
    out = out + noise * sigma_up
    return out.to(model_output.dtype)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 noised to level `sigma` (SDEdit's start): x0 + sigma noise. (B, C, h, w) each; sigma ()."""
    return x0 + noise * sigma.to(x0.dtype)
