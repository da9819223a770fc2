"""Blending prompts and seeds: weighted mixes of text embeddings and of noise.

Prompt blending mixes the CLIP hidden states of several prompts, token by token:
- "linear": the weighted mean, sum_i w_i e_i / sum_i w_i;
- "slerp": spherical interpolation (Shoemake 1985) of the flattened embeddings, which keeps
  their norm where a linear mix of two dissimilar prompts shrinks it; several prompts are
  folded in one at a time, each with its share of the weight so far (for two prompts,
  slerp(e_1, e_2, w_2 / (w_1 + w_2))).

Seed blending mixes the Gaussian noise the seeds draw: sum_i w_i n_i / sqrt(sum_i w_i^2),
a unit-variance Gaussian again when the n_i are independent, so the sampler's noise level
is kept whatever the weights (a plain weighted mean would shrink it).
"""

from __future__ import annotations

import torch

BLEND_MODES = ("linear", "slerp")


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-6) -> torch.Tensor:
    """Spherical interpolation from `a` (t=0) to `b` (t=1) of the flattened tensors.

    Args:
        a, b: tensors of one shape (e.g. (77, D) embeddings).
        t: in [0, 1].
    Returns:
        a tensor of that shape; the linear interpolation when a and b are (anti)parallel
        within `eps`, where the spherical one is undefined.
    """
    af, bf = a.flatten().double(), b.flatten().double()
    cos = torch.dot(af, bf) / (af.norm() * bf.norm()).clamp_min(1e-12)
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    if torch.sin(theta).abs() < eps:
        out = (1 - t) * af + t * bf
    else:
        out = (torch.sin((1 - t) * theta) * af + torch.sin(t * theta) * bf) / torch.sin(theta)
    return out.reshape(a.shape).to(a.dtype)


def blend_embeddings(embeddings: torch.Tensor, weights, mode: str = "linear") -> torch.Tensor:
    """Mix K prompts' embeddings.

    Args:
        embeddings: (K, 77, D) one row per prompt.
        weights: K non-negative numbers, not all 0.
        mode: "linear" or "slerp" (see the module docstring).
    Returns:
        (1, 77, D).
    """
    weights = [float(w) for w in weights]
    assert embeddings.shape[0] == len(weights) and sum(weights) > 0, f"{embeddings.shape=} {weights=}"
    if mode == "linear":
        w = torch.tensor(weights, dtype=embeddings.dtype, device=embeddings.device).view(-1, 1, 1)
        return (w * embeddings).sum(0, keepdim=True) / sum(weights)
    assert mode == "slerp", mode
    out, total = None, 0.0
    for e, w in zip(embeddings, weights):
        if w == 0:
            continue
        out = e if out is None else slerp(out, e, w / (total + w))
        total += w
    return out[None]


def blend_noise(noises, weights) -> torch.Tensor:
    """Mix independent unit Gaussians keeping unit variance: sum w_i n_i / sqrt(sum w_i^2).

    Args:
        noises: K tensors of one shape; weights: K non-negative numbers, not all 0.
    """
    weights = [float(w) for w in weights]
    norm = sum(w * w for w in weights) ** 0.5
    assert len(noises) == len(weights) and norm > 0, f"{len(noises)=} {weights=}"
    out = sum(w * n for w, n in zip(weights, noises) if w)
    return out / norm
