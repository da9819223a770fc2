"""The stream's noise, as pure functions of (seed, ...): reproducible on every device.

StreamDiffusion (Sec. 3.2) keeps one fixed noise tensor per step slot, the same for every
frame, which keeps a static scene static. Live2Diff's reference instead draws fresh
noise for every frame and every re-noise, which is what its motion modules were trained
with. Both are drawn here on the CPU from generators seeded by the stream's seed and the
draw's coordinates, then moved to the model's device, so a run is the same on CPU, CUDA
and MPS and does not depend on how frames are batched.
"""

from __future__ import annotations

import torch


def mix_seed(seed: int, *keys: int) -> int:
    """A 63-bit generator seed from the stream's seed and integer coordinates (frame, step...).

    Distinct coordinates give distinct seeds (a polynomial in a large odd constant, so
    (seed, 1, 0) and (seed, 0, 1) differ); the same coordinates always give the same one.
    """
    mixed = int(seed) % (2**63)
    for key in keys:
        mixed = (mixed * 0x9E3779B97F4A7C15 + int(key) + 1) % (2**63)
    return mixed


def slot_noise(seed: int, steps: int, shape: tuple[int, ...], device=None, dtype=None) -> torch.Tensor:
    """StreamDiffusion's fixed noise: (steps, *shape), slot k noises for step k of every frame."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn((steps, *shape), generator=generator).to(device=device, dtype=dtype)


def frame_noise(seed: int, frame: int, steps: int, shape: tuple[int, ...], device=None, dtype=None) -> torch.Tensor:
    """Live2Diff's per-frame noise for frame `frame`: (steps, *shape); entry k noises the
    frame's latent for step k (entry 0: the SDEdit start, k > 0: the re-noise after step k-1)."""
    generator = torch.Generator().manual_seed(mix_seed(seed, frame))
    return torch.randn((steps, *shape), generator=generator).to(device=device, dtype=dtype)


def frame_generator(seed: int, frame: int, purpose: int) -> torch.Generator:
    """A CPU generator for one frame's other draws (`purpose` keeps them apart: e.g. 1 for
    the VAE posterior sample), independent of the noise of `frame_noise`."""
    return torch.Generator().manual_seed(mix_seed(seed, frame, -1 - int(purpose)))
