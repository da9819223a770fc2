"""Few-step SDEdit schedules as pure functions (no models here).

Notation (DDPM): x_t = sqrt(abar_t) * x_0 + sqrt(1 - abar_t) * eps. We write
`alpha_sqrt = sqrt(abar_t)` and `beta_sqrt = sqrt(1 - abar_t)` as StreamDiffusion does.

A denoising step from x_t (LCM, Luo et al. 2023, and StreamDiffusion's img2img loop):
    x0_hat   = (x_t - beta_sqrt * eps) / alpha_sqrt            (eps-prediction)
    denoised = c_skip(t) * x_t + c_out(t) * x0_hat              (consistency boundary scalings)
    x_next   = alpha_sqrt_next * denoised + beta_sqrt_next * noise_next
with a *fixed* noise tensor per step slot (StreamDiffusion), which keeps the stream
temporally stable. Turbo models (ADD) predict x_0 directly: c_skip = 0, c_out = 1.

Which steps run is StreamDiffusion's `t_index_list`: indices into the 50-entry LCM
timestep table, chosen here from an SDEdit strength and a step count (`t_indices`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffstream.errors import ConfigError

# Entries of the LCM timestep table; StreamDiffusion's t_index_list indexes this table.
TIMESTEP_TABLE_SIZE = 50


# Adapted from StreamV2V's vid2vid/main.py (Jeff-LiangF/streamv2v), which turns its
# --noise_strength and --diffusion_steps into StreamDiffusion's t_index_list: the start is
# int(50 (1 - strength)) and the stride int(50 strength) // steps, both truncated in
# floating point as written there. We keep that arithmetic exactly, quirks included
# (strength 0.9 starts at index 4, not 5, because 50 * (1 - 0.9) = 4.999...), so a
# setting means the same schedule here as in the reference; tests/schedule pins the table.
def _start_index(strength: float) -> int:
    """First table index for an SDEdit strength: strength 1 starts at pure noise (index 0)."""
    return int(TIMESTEP_TABLE_SIZE * (1 - float(strength)))


def _stride(strength: float, steps: int) -> int:
    """Table indices between consecutive steps: the strength's span split evenly, truncated."""
    return int(TIMESTEP_TABLE_SIZE * float(strength)) // int(steps)


def max_steps(strength: float) -> int:
    """The most denoising steps an SDEdit `strength` leaves room for in the table
    (every step needs a distinct index; a single step always fits)."""
    return max(1, int(TIMESTEP_TABLE_SIZE * float(strength)))


def t_indices(strength: float, steps: int | None = None, t_index_list=None, turbo: bool = False) -> tuple[int, ...]:
    """Indices into the 50-entry timestep table, one per denoising step.

    Args:
        strength: SDEdit noise strength in (0, 1]; the first step starts at index
            int(50 (1 - strength)).
        steps: denoising steps; None: 4 (LCM) or 1 (`turbo`).
        t_index_list: explicit indices (StreamDiffusion's convention); they win over
            strength and steps.
    Returns:
        increasing indices, StreamV2V's mapping: start + i * (int(50 strength) // steps).
        Strength 0.4 with 4 steps gives (30, 35, 40, 45), i.e. timesteps (399, 299, 199,
        99); with 3 steps (30, 36, 42).
    Raises:
        ConfigError: more steps than the strength leaves room for.
    """
    if t_index_list is not None:
        return tuple(int(i) for i in t_index_list)
    steps = steps if steps is not None else (1 if turbo else 4)
    most = max_steps(strength)
    if steps > most:
        raise ConfigError(f"{steps} steps is too many for strength {strength}: at most {most}")
    start = _start_index(strength)
    stride = _stride(strength, steps)
    return tuple(start + i * stride for i in range(steps))


# Adapted from diffusers/src/diffusers/schedulers/scheduling_lcm.py (LCMScheduler.set_timesteps
# with original_inference_steps = 50 and 50 inference steps; tests/schedule pins it).
def lcm_timestep_table(num_train_timesteps: int = 1000, size: int = TIMESTEP_TABLE_SIZE) -> list[int]:
    """The LCM timestep table that StreamDiffusion's `t_index_list` indexes.

    LCM distils on `size` evenly spaced training timesteps; index 0 is the noisiest.
    For 1000 training steps and size 50: [999, 979, ..., 39, 19].
    """
    stride = num_train_timesteps // size
    return [stride * (i + 1) - 1 for i in reversed(range(size))]


# Adapted from diffusers/src/diffusers/schedulers/scheduling_lcm.py
# (LCMScheduler.get_scalings_for_boundary_condition_discrete), for a tensor of timesteps.
def lcm_boundary_scalings(timesteps: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """LCM's consistency-model boundary conditions c_skip(t), c_out(t).

    They make the model an identity at t = 0 and a pure x_0 predictor at large t
    (c_skip = sigma_data^2 / ((s t)^2 + sigma_data^2), c_out = s t / sqrt((s t)^2 + sigma_data^2)).
    """
    scaled = timesteps.double() * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


@dataclass(frozen=True)
class StepTable:
    """Per-step coefficients of one SDEdit schedule, each a tensor of shape (num_steps,).

    Attributes:
        timesteps: training timesteps t_k, noisiest first (long).
        alpha_sqrt, beta_sqrt: sqrt(abar_{t_k}), sqrt(1 - abar_{t_k}).
        c_skip, c_out: boundary scalings of the step's output.
        prediction_type: "epsilon", "v_prediction" or "sample" (what the UNet outputs).
    """

    timesteps: torch.Tensor
    alpha_sqrt: torch.Tensor
    beta_sqrt: torch.Tensor
    c_skip: torch.Tensor
    c_out: torch.Tensor
    prediction_type: str = "epsilon"

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def to(self, device=None, dtype=None) -> "StepTable":
        """Move the float coefficients to `dtype`/`device` (timesteps stay integers)."""
        cast = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
        return StepTable(
            timesteps=self.timesteps.to(device=device),
            alpha_sqrt=cast(self.alpha_sqrt),
            beta_sqrt=cast(self.beta_sqrt),
            c_skip=cast(self.c_skip),
            c_out=cast(self.c_out),
            prediction_type=self.prediction_type,
        )

    def rows(self, lo: int, hi: int) -> "StepTable":
        """Coefficients of steps lo..hi-1, each shaped (hi - lo, 1, 1, 1) to broadcast over latents."""
        view = lambda x: x[lo:hi].view(-1, 1, 1, 1)  # noqa: E731
        return StepTable(
            timesteps=self.timesteps[lo:hi],
            alpha_sqrt=view(self.alpha_sqrt),
            beta_sqrt=view(self.beta_sqrt),
            c_skip=view(self.c_skip),
            c_out=view(self.c_out),
            prediction_type=self.prediction_type,
        )


def make_step_table(
    alphas_cumprod: torch.Tensor,
    t_indices,
    sampler: str = "lcm",
    prediction_type: str = "epsilon",
    num_train_timesteps: int = 1000,
) -> StepTable:
    """Build the coefficient table for a list of indices into the LCM timestep table.

    Args:
        alphas_cumprod: (num_train_timesteps,) abar_t of the model's noise schedule.
        t_indices: increasing indices into `lcm_timestep_table` (one per step).
        sampler: "lcm" (consistency boundary scalings) or "x0" (turbo / plain x_0 steps).
        prediction_type: what the UNet predicts.
    """
    table = lcm_timestep_table(num_train_timesteps)
    timesteps = torch.tensor([table[i] for i in t_indices], dtype=torch.long)
    abar = alphas_cumprod.double()[timesteps]
    if sampler == "lcm":
        c_skip, c_out = lcm_boundary_scalings(timesteps)
    elif sampler == "x0":
        c_skip, c_out = torch.zeros_like(abar), torch.ones_like(abar)
    else:
        raise ValueError(f"unknown sampler {sampler!r}")
    return StepTable(
        timesteps=timesteps,
        alpha_sqrt=abar.sqrt().float(),
        beta_sqrt=(1 - abar).sqrt().float(),
        c_skip=c_skip.float(),
        c_out=c_out.float(),
        prediction_type=prediction_type,
    )


def model_output_to_eps(model_output, x_t, alpha_sqrt, beta_sqrt, prediction_type: str):
    """Convert a UNet output to a noise prediction eps (guidance is done in eps space).

    Shapes: all (B, C, h, w) or broadcastable coefficients (B, 1, 1, 1).
    """
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":  # v = alpha eps - beta x0  =>  eps = alpha v + beta x_t
        return alpha_sqrt * model_output + beta_sqrt * x_t
    if prediction_type == "sample":  # x0 given: eps = (x_t - alpha x0) / beta
        return (x_t - alpha_sqrt * model_output) / beta_sqrt
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def eps_to_x0(eps, x_t, alpha_sqrt, beta_sqrt):
    """x0_hat = (x_t - beta * eps) / alpha."""
    return (x_t - beta_sqrt * eps) / alpha_sqrt


def add_noise(x0, noise, alpha_sqrt, beta_sqrt):
    """x_t = alpha * x0 + beta * noise (the forward process, also SDEdit's start)."""
    return alpha_sqrt * x0 + beta_sqrt * noise


def denoise(eps, x_t, rows: StepTable):
    """One consistency step's output for rows at the steps of `rows` (see module doc).

    Args:
        eps: (B, C, h, w) noise prediction (after guidance).
        x_t: (B, C, h, w) the noisy latents the UNet saw.
        rows: coefficients shaped (B, 1, 1, 1).
    Returns:
        (B, C, h, w) the denoised estimate c_skip * x_t + c_out * x0_hat.
    """
    x0 = eps_to_x0(eps, x_t, rows.alpha_sqrt, rows.beta_sqrt)
    return rows.c_skip * x_t + rows.c_out * x0
