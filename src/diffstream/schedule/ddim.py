"""Deterministic DDIM sampling and DDIM inversion as pure functions (no models here).

FateZero (Qi et al., ICCV 2023), Sec. 3.1. With abar_t the cumulative product of the
noise schedule (DDPM notation; the paper writes alpha_t), one deterministic DDIM step
(eta = 0, Eq. 2) moves a latent from noise level t to level t-1 along the predicted noise:

    z_{t-1} = sqrt(abar_{t-1}) (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) + sqrt(1 - abar_{t-1}) eps

DDIM inversion (Eq. 3) is the same map run the other way, clean to noisy, with eps
predicted at the *target* timestep from the less noisy latent (the ODE approximation
that becomes exact in the limit of small steps):

    z_t = sqrt(abar_t) (z_{t-1} - sqrt(1 - abar_{t-1}) eps) / sqrt(abar_{t-1}) + sqrt(1 - abar_t) eps

Both are `ddim_transfer(x, eps, abar_from, abar_to)`. The schedule reproduces diffusers'
`DDIMScheduler` (denoising) and `DDIMInverseScheduler` (inversion) exactly: step k of
`DDIMSchedule` (k = 0 the noisiest) evaluates the UNet at `timesteps[k]` and moves
between the levels `abar[k]` and `abar_prev[k]`; inversion runs k = n-1, ..., 0 and
is the exact mirror of sampling, which is what lets reconstruction return to the input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class DDIMSchedule:
    """The n steps of a DDIM schedule, noisiest first.

    Attributes:
        timesteps: (n,) long, the UNet timestep of each step (diffusers' `timesteps`).
        abar: (n,) float32, abar at `timesteps[k]`: the noise level of the step's input
            when denoising, of its output when inverting.
        abar_prev: (n,) float32, the level one step cleaner (abar at t_k - T/n, or the
            final level for the last step): the denoising step's output, the inversion
            step's input.
    """

    timesteps: torch.Tensor
    abar: torch.Tensor
    abar_prev: torch.Tensor

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


# Adapted from diffusers/src/diffusers/schedulers/scheduling_ddim.py (DDIMScheduler.set_timesteps,
# its three `timestep_spacing` rules).
def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000, spacing: str = "leading", steps_offset: int = 0):
    """diffusers' DDIM timesteps for `num_steps` steps, noisiest first.

    Args:
        spacing: "leading" (SD 1.x/2.x: 0, r, 2r, ... plus `steps_offset`), "trailing"
            (ends at the last training timestep) or "linspace" (Table 2 of Lin et al. 2023).
    Returns:
        (num_steps,) long tensor.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"DDIM steps must be in [1, {num_train_timesteps}], got {num_steps}")
    if spacing == "linspace":
        ts = np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        ratio = num_train_timesteps // num_steps
        ts = (np.arange(0, num_steps) * ratio).round()[::-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ratio = num_train_timesteps / num_steps
        ts = np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
    return torch.from_numpy(ts.copy())


def ddim_schedule(
    alphas_cumprod: torch.Tensor,
    num_steps: int,
    num_train_timesteps: int = 1000,
    spacing: str = "leading",
    steps_offset: int = 0,
    set_alpha_to_one: bool = False,
) -> DDIMSchedule:
    """Build the schedule from a model's noise schedule.

    Args:
        alphas_cumprod: (num_train_timesteps,) abar of the checkpoint.
        num_steps: DDIM steps (FateZero: 50).
        spacing, steps_offset: as in diffusers' scheduler config.
        set_alpha_to_one: the final level is 1 (clean) if True, else abar[0], as in
            diffusers (`final_alpha_cumprod` / `initial_alpha_cumprod`).
    """
    abar_all = alphas_cumprod.detach().to("cpu", torch.float32)
    timesteps = ddim_timesteps(num_steps, num_train_timesteps, spacing, steps_offset)
    final = torch.tensor(1.0) if set_alpha_to_one else abar_all[0]
    # diffusers' "previous" timestep is always t - T // n, whatever the spacing.
    prev = timesteps - num_train_timesteps // num_steps
    abar_prev = torch.stack([abar_all[p] if p >= 0 else final for p in prev.tolist()])
    return DDIMSchedule(timesteps=timesteps, abar=abar_all[timesteps], abar_prev=abar_prev)


def ddim_schedule_from_config(config, alphas_cumprod: torch.Tensor, num_steps: int) -> DDIMSchedule:
    """`ddim_schedule` with the fields read from a diffusers scheduler config.

    SD checkpoints carry their DDIM settings (steps_offset=1, set_alpha_to_one=False,
    leading spacing) in `scheduler/scheduler_config.json`, whatever scheduler class
    loaded it, so `components.scheduler.config` is enough.
    """

    def get(name, default):  # a FrozenDict (`scheduler.config`) or a plain dict
        return config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)

    spacing = get("timestep_spacing", "leading") or "leading"
    return ddim_schedule(
        alphas_cumprod,
        num_steps,
        num_train_timesteps=int(get("num_train_timesteps", 1000)),
        spacing=spacing,
        steps_offset=int(get("steps_offset", 0) or 0),
        set_alpha_to_one=bool(get("set_alpha_to_one", False)),
    )


def ddim_transfer(x: torch.Tensor, eps: torch.Tensor, abar_from, abar_to) -> torch.Tensor:
    """Move `x` from noise level `abar_from` to `abar_to` along `eps` (Eqs. 2 and 3).

    Written in diffusers' operation order, so a step equals `DDIMScheduler.step`
    (eta = 0) bit for bit.

    Args:
        x, eps: (B, C, h, w).
        abar_from, abar_to: 0-dim tensors (or floats) in (0, 1].
    """
    x0 = (x - (1 - abar_from) ** 0.5 * eps) / abar_from**0.5
    return abar_to**0.5 * x0 + (1 - abar_to) ** 0.5 * eps


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, schedule: DDIMSchedule, k: int) -> torch.Tensor:
    """Denoising step k (Eq. 2): from level abar[k] to abar_prev[k]. Shapes (B, C, h, w)."""
    return ddim_transfer(x_t, eps, schedule.abar[k], schedule.abar_prev[k])


def ddim_inversion_step(x_prev: torch.Tensor, eps: torch.Tensor, schedule: DDIMSchedule, k: int) -> torch.Tensor:
    """Inversion step k (Eq. 3): from level abar_prev[k] to abar[k], eps from the UNet at timesteps[k]."""
    return ddim_transfer(x_prev, eps, schedule.abar_prev[k], schedule.abar[k])
