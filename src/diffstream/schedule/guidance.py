"""Classifier-free guidance and StreamDiffusion's residual CFG (RCFG), as pure functions.

Ordinary CFG (Ho & Salimans): eps = eps_u + gamma * (eps_c - eps_u), which costs an
unconditional UNet call per step.

RCFG (StreamDiffusion, Kodaira et al. 2023, Sec. 3.3) replaces eps_u by a *virtual
residual noise*: the noise that would carry a known clean latent x0_ref to x_t,
    eps'(x_t) = (x_t - sqrt(abar_t) * x0_ref) / sqrt(1 - abar_t),
moderated by delta:  eps = delta * eps' + gamma * (eps_c - delta * eps').
- Self-negative RCFG: x0_ref is the input frame's own latent, so no extra call.
  At the first step eps' is exactly the noise that was added to the input.
- Onetime-negative RCFG ("initialize"): one real unconditional call at the first step
  gives eps_u; x0_ref = (x_t - sqrt(1 - abar) eps_u) / sqrt(abar) is then reused for
  the later steps of that frame.

Deviates on purpose from StreamDiffusion's code, which carries eps' from step to step in
a running `stock_noise` buffer: here eps' is the closed form above, recomputed at every
step from x_t and x0_ref, so guidance needs no state of its own. At a frame's first step
the two are the same (eps' is then exactly the added noise); at later steps, by the
algebra of the architecture review (issue #11), they differ by a term proportional to
(c_skip * alpha + c_out - 1) * x0_ref: zero for turbo models (c_skip = 0, c_out = 1)
and tiny at LCM's timesteps (c_skip ~ 0, c_out ~ 1).
"""

from __future__ import annotations


def cfg(eps_cond, eps_uncond, guidance: float):
    """Classifier-free guidance: eps_u + gamma (eps_c - eps_u). Shapes (B, C, h, w)."""
    return eps_uncond + guidance * (eps_cond - eps_uncond)


def virtual_residual_noise(x_t, x0_ref, alpha_sqrt, beta_sqrt):
    """RCFG's eps' = (x_t - alpha * x0_ref) / beta. Shapes (B, C, h, w), coefficients (B, 1, 1, 1)."""
    return (x_t - alpha_sqrt * x0_ref) / beta_sqrt


def residual_cfg(eps_cond, eps_residual, guidance: float, delta: float):
    """RCFG: delta eps' + gamma (eps_c - delta eps'). Shapes (B, C, h, w)."""
    return cfg(eps_cond, delta * eps_residual, guidance)
