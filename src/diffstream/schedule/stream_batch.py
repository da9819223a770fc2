"""StreamBatch: the rolling buffer of in-flight latents (StreamDiffusion, Sec. 3.1).

With n denoising steps, frame f is at step k while frame f+1 is at step k-1, and so on:
one UNet call per new frame advances every in-flight frame by one step. The buffer
holds the latents of frames that have started but not finished, ordered newest first,
so their steps always form one contiguous range [lo, lo + m). Finished frames leave
the buffer after their last step; `drain` runs the remaining steps at the end of the
stream so no frame is lost (the reference implementation never flushes them).

Only tensor maths lives here: the caller runs the UNet on `x` and hands back the
denoised estimates, so the same object drives stream-batched and sequential denoising.
"""

from __future__ import annotations

import torch

from diffstream.schedule.timesteps import StepTable, add_noise


def map_rows(fn, *values):
    """Apply `fn` to per-row conditioning: a tensor, None (kept), or a tuple of these.

    The engine's per-frame conditioning is a tuple (the mechanism's, e.g. Live2Diff's depth
    latent; ControlNet condition images); every row operation on it goes through here.
    """
    first = values[0]
    if first is None:
        return None
    if isinstance(first, tuple):
        return tuple(map_rows(fn, *parts) for parts in zip(*values))
    return fn(*values)


def num_rows(value) -> int | None:
    """Rows of the first tensor in per-row conditioning (see `map_rows`), or None."""
    if isinstance(value, tuple):
        return next((n for n in map(num_rows, value) if n is not None), None)
    return None if value is None else value.shape[0]


class StreamBatch:
    """Owns the in-flight latents, their RCFG reference latents and their frame tags.

    Args:
        table: the schedule's per-step coefficients, already on the latents' device/dtype.
        noise: (num_steps, C, h, w) fixed noise, one tensor per step slot: slot 0 noises
            the input (SDEdit), slot k > 0 re-noises after step k - 1 (StreamDiffusion).
            None: every frame brings its own noise to `admit` (Live2Diff's reference).
    """

    def __init__(self, table: StepTable, noise: torch.Tensor | None):
        assert noise is None or (noise.ndim == 4 and noise.shape[0] == table.num_steps), (
            f"{noise.shape=} {table.num_steps=}")
        self.table = table
        self.noise = noise  # (n, C, h, w) or None
        self.reset()

    def reset(self) -> None:
        """Forget every in-flight frame."""
        self.x: torch.Tensor | None = None  # (m, C, h, w) noisy latents, newest first
        self.ref: torch.Tensor | None = None  # (m, C, h, w) RCFG reference x0 per frame
        self.cond = None  # (m, ...) per-frame conditioning (a tensor or a tuple, `map_rows`), or None
        self.tags: list = []  # caller's tag per in-flight frame, newest first
        self.frame_noise: list = []  # per-frame noise (n, C, h, w) per in-flight frame, newest first
        self.lo = 0  # step index of the newest in-flight frame

    @property
    def num_steps(self) -> int:
        return self.table.num_steps

    @property
    def in_flight(self) -> int:
        """How many frames have started but not finished."""
        return len(self.tags)

    def admit(self, z0: torch.Tensor, tag, cond: torch.Tensor | None = None,
              noise: torch.Tensor | None = None) -> None:
        """Start a new frame: SDEdit-noise its clean latent to the first step.

        Args:
            z0: (1, C, h, w) the frame's clean (VAE) latent.
            tag: anything that identifies the frame (returned when it finishes).
            cond: (1, ...) conditioning that travels with the frame (a tensor, or a tuple of
                tensors / None, `map_rows`), or None.
            noise: (n, C, h, w) this frame's own noise, one per step (required without
                slot noise, refused with it).
        """
        assert z0.ndim == 4 and z0.shape[0] == 1, f"{z0.shape=}"
        assert (noise is None) != (self.noise is None), "frame noise exactly when there is no slot noise"
        own = self.noise if noise is None else noise  # (n, C, h, w)
        assert own.shape == (self.num_steps, *z0.shape[1:]), f"{z0.shape=} {own.shape=}"
        assert num_rows(cond) in (None, 1), f"{num_rows(cond)=}"
        if self.in_flight and self.lo != 1:
            raise RuntimeError("a frame can join only when the newest in-flight frame is at step 1")
        rows = self.table.rows(0, 1)
        x_new = add_noise(z0, own[0:1], rows.alpha_sqrt, rows.beta_sqrt)  # (1, C, h, w)
        if noise is not None:
            self.frame_noise.insert(0, noise)
        if self.in_flight:
            self.x = torch.cat([x_new, self.x], dim=0)  # (m + 1, C, h, w), newest first
            self.ref = torch.cat([z0, self.ref], dim=0)  # (m + 1, C, h, w)
            self.cond = map_rows(lambda new, old: torch.cat([new, old], dim=0), cond, self.cond)  # (m + 1, ...)
        else:
            self.x, self.ref, self.cond = x_new, z0, cond
        self.tags.insert(0, tag)
        self.lo = 0

    def rows(self) -> StepTable:
        """Coefficients of the in-flight frames' current steps, each (m, 1, 1, 1)."""
        return self.table.rows(self.lo, self.lo + self.in_flight)

    def steps(self) -> range:
        """The current step index of each in-flight frame, newest first."""
        return range(self.lo, self.lo + self.in_flight)

    def set_newest_ref(self, x0_ref: torch.Tensor) -> None:
        """Replace the newest frame's RCFG reference (onetime-negative RCFG). (1, C, h, w)."""
        self.ref = torch.cat([x0_ref, self.ref[1:]], dim=0)

    def advance(self, denoised: torch.Tensor):
        """Take one step for every in-flight frame.

        Args:
            denoised: (m, C, h, w) the step outputs (c_skip x_t + c_out x0_hat) for `self.x`.
        Returns:
            (tag, latent (1, C, h, w)) of the frame that finished its last step, or None.
        """
        assert self.x is None or denoised.shape == self.x.shape, f"{denoised.shape=} {self.x.shape=}"
        m, n, lo = self.in_flight, self.num_steps, self.lo
        keep = min(m, n - 1 - lo)  # frames with steps left; at most one frame finishes
        finished = None
        if keep < m:
            finished = (self.tags[-1], denoised[keep:])
        if keep > 0:
            nxt = self.table.rows(lo + 1, lo + 1 + keep)
            if self.noise is not None:
                renoise = self.noise[lo + 1 : lo + 1 + keep]  # (keep, C, h, w): slot noise
            else:  # row r (at step lo + r) takes its own frame's noise for step lo + r + 1
                renoise = torch.stack([self.frame_noise[r][lo + 1 + r] for r in range(keep)])
                self.frame_noise = self.frame_noise[:keep]
            self.x = add_noise(denoised[:keep], renoise, nxt.alpha_sqrt, nxt.beta_sqrt)
            self.ref = self.ref[:keep]
            self.cond = map_rows(lambda c: c[:keep], self.cond)
            self.tags = self.tags[:keep]
            self.lo = lo + 1
        else:
            self.reset()
        return finished
