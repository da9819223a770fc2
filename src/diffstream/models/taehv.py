"""TAEHV: the tiny autoencoder of Wan 2.1's latent space (`taew2_1`), whole clips and streamed.

Issue #18 ("a tiny VAE option for Wan if one can be loaded"). TAEHV (madebyollin/taehv,
MIT) is a distilled stand-in for a video model's VAE: per-frame 2-D convolutions, with
time handled by three kinds of block (its `taehv.py`):

- `MemBlock`: a residual block whose first convolution also sees the block's input at the
  previous time step (zeros before the first): act(conv([x_t, x_{t-1}]) + x_t).
- `TPool(stride s)`: s consecutive time steps, stacked on channels, to one (a 1x1 conv).
- `TGrow(stride s)`: one time step to s consecutive ones (a 1x1 conv to s x channels).

For Wan 2.1 (`taew2_1.pth`): 16 latent channels, no pixel patching, 8x spatial
compression (three stride-2 convolutions / nearest 2x up-samplings) and 4x temporal (two
`TPool(2)` in the encoder, two `TGrow(2)` in the decoder; the third of each has stride 1).

How its latents and frames map onto Wan's (`models.wan.WanVAEStream`):

- Latent space: TAEHV encodes/decodes the latents the DiT works in, i.e. Wan's
  *normalised* latents (z - latents_mean) / latents_std: its README ("TAEHV does not use
  any latent scales / shifts ... whereas Diffusers requires explicitly applying a
  latents_mean and latents_std"), its Wan 2.1 diffusers demo (a wrapper declaring
  latents_mean 0 and latents_std 1), StreamDiffusionV2's `taehv_wrapper.py` and
  Self-Forcing's demo (the DiT's latents go to `decode_video` untouched, where their Wan
  decoders first undo the normalisation). (seraena's example training notebook distils
  onto diffusers' unnormalised latents instead; without the released weights here, which
  one `taew2_1` learned is the integrations' word.) `TAEHVStream` can convert to and
  from the Wan VAE's raw space (its `latents_mean` / `latents_std`).
- Frames: TAEHV's pixels are in [0, 1], NTCHW (Wan's: [-1, 1], NCTHW).
- Time: the encoder groups frames 4j..4j+3 into latent j, from frame 0 (a clip of
  1 + 4k frames is padded at its end with copies of its last frame: `encode_video`),
  and was distilled so that this latent is Wan's latent j, which Wan's causal encoder
  makes from frames 4j-3..4j (frame 0 alone for j = 0): seraena's TAEHV training
  notebook compares `encode_video(x)` with Wan's `encode(x)` index by index. The
  decoder turns latent j into 4 frames and drops the stream's first 3
  (`frames_to_trim`), so latent 0 gives frame 0 and latent j >= 1 frames 4j-3..4j:
  exactly Wan's decoder. The encoder so looks 3 frames further ahead than Wan's: latent
  j needs frame 4j+3, and a stream's first latent needs 4 frames (Wan's: 1).

- `TAEHV`: the Wan 2.1 configuration, with `state_dict()` keys and shapes those of the
  reference's `TAEHV` (its class docstring lists the key layout), so `taew2_1.pth`
  loads strictly; `encode_video` / `decode_video` over a whole clip, parallel over time
  (the reference's `apply_model_with_memblocks_parallel`).
- `load_taehv`: a `.pth` or `.safetensors` file, strictly, or a one-line `ModelLoadError`.
- `SequentialStream`: the encoder or decoder driven a few time steps per call, with each
  MemBlock's last input and each TPool's waiting inputs kept between calls.
- `TAEHVStream`: `WanVAEStream`'s interface (`frames_needed`, `encode`, `push`,
  `decode`, `reset`) over TAEHV; equal to `encode_video` / `decode_video` on the whole
  clip (tests/models/test_taehv.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffstream.errors import ModelLoadError, one_line

# Wan 2.1's TAEHV (taew2_1): the reference TAEHV's defaults, less its other models' options.
TAEHV_LATENT_CHANNELS = 16
TAEHV_IMAGE_CHANNELS = 3
ENCODER_WIDTH = 64
DECODER_WIDTHS = (256, 128, 64, 64)
# Per stage: a TPool(2) before the encoder's stage / a TGrow(2) after the decoder's (else stride 1).
ENCODER_TIME_DOWNSCALE = (True, True, False)
DECODER_TIME_UPSCALE = (False, True, True)

# What to pass when the weights are missing or wrong (the CLI's --tiny-vae for a Wan model).
TAEHV_HINT = ("pass --tiny-vae the path of Wan 2.1's TAEHV weights, taew2_1.pth or taew2_1.safetensors "
              "(github.com/madebyollin/taehv)")


def _conv3x3(n_in: int, n_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    """A 3x3 convolution that keeps the size (or halves it at stride 2): every TAEHV conv but the 1x1s."""
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class Clamp(nn.Module):
    """A soft clamp of the latents to (-3, 3): 3 tanh(x / 3), the decoder's first block."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """A residual block that also sees the previous time step.

    out_t = relu(conv([x_t, past_t]) + x_t), past_t the block's input at step t - 1 (zeros at
    the first step). Input and output widths are equal in every TAEHV, so the reference's
    `skip` is an `nn.Identity` (no weights); its `conv` is conv3x3(2C, C), ReLU, conv3x3(C, C),
    ReLU, conv3x3(C, C), at Sequential indices 0 to 4 (weights at 0, 2, 4).

    Args:
        channels: C.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(_conv3x3(2 * channels, channels), nn.ReLU(inplace=True),
                                  _conv3x3(channels, channels), nn.ReLU(inplace=True),
                                  _conv3x3(channels, channels))
        self.skip = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        """x, past: (M, C, H, W), M time steps (of one or more streams) side by side -> (M, C, H, W)."""
        return self.act(self.conv(torch.cat([x, past], dim=1)) + self.skip(x))


class TPool(nn.Module):
    """`stride` consecutive time steps to one: stacked on channels (oldest first), then a 1x1 conv.

    Args:
        channels: C.
        stride: time steps per output; 1 is a plain 1x1 conv.
    """

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels * stride, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N * T, C, H, W), stream-major, T a multiple of `stride` -> (N * T / stride, C, H, W)."""
        m, c, h, w = x.shape
        return self.conv(x.reshape(m // self.stride, self.stride * c, h, w))


class TGrow(nn.Module):
    """One time step to `stride` consecutive ones: a 1x1 conv to stride x C channels, the first
    C of them the earliest step.

    Args:
        channels: C.
        stride: time steps out per step in; 1 is a plain 1x1 conv.
    """

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N * T, C, H, W) -> (N * T * stride, C, H, W), each input's steps in order."""
        m, c, h, w = x.shape
        return self.conv(x).reshape(m * self.stride, c, h, w)


class TAEHV(nn.Module):
    """The tiny autoencoder for Wan 2.1 (`taew2_1`), randomly initialised (`load_taehv` loads weights).

    Our own implementation of the reference architecture (madebyollin/taehv `taehv.py`,
    `TAEHV(encoder_time_downscale=(True, True, False), decoder_time_upscale=(False, True,
    True), decoder_space_upscale=(True, True, True), patch_size=1, latent_channels=16)`),
    whose `state_dict()` it matches key for key and shape for shape. The key layout
    (c3 = 3x3 conv with bias, c3s2 = 3x3 stride-2 conv without bias, c3nb = 3x3 conv
    without bias; MB(C) = MemBlock: `i.conv.{0,2,4}.{weight,bias}` of shapes (C, 2C, 3, 3),
    (C, C, 3, 3), (C, C, 3, 3); TPool / TGrow: `i.conv.weight` only; ReLU, Clamp and
    Upsample have none):

        encoder  0 c3(3->64)  1 ReLU  2 TPool(64, 2)  3 c3s2  4-6 MB(64)
                 7 TPool(64, 2)  8 c3s2  9-11 MB(64)  12 TPool(64, 1)  13 c3s2  14-16 MB(64)
                 17 c3(64->16)
        decoder  0 Clamp  1 c3(16->256)  2 ReLU  3-5 MB(256)  6 Upsample(2)  7 TGrow(256, 1)
                 8 c3nb(256->128)  9-11 MB(128)  12 Upsample(2)  13 TGrow(128, 2)
                 14 c3nb(128->64)  15-17 MB(64)  18 Upsample(2)  19 TGrow(64, 2)
                 20 c3nb(64->64)  21 ReLU  22 c3(64->3)

    TPool(C, s).conv.weight is (C, sC, 1, 1), TGrow(C, s).conv.weight (sC, C, 1, 1).

    Attributes:
        t_downscale: frames per latent frame (4).
        t_upscale: decoded frames per latent frame before the trim (4).
        frames_to_trim: decoded frames dropped at a stream's start (3), so 1 + 4k frames
            come out of 1 + k latent frames, as from Wan's VAE.
    """

    def __init__(self):
        super().__init__()
        w, (d0, d1, d2, d3) = ENCODER_WIDTH, DECODER_WIDTHS

        def encoder_stage(pool: bool) -> list[nn.Module]:
            return [TPool(w, 2 if pool else 1), _conv3x3(w, w, stride=2, bias=False),
                    MemBlock(w), MemBlock(w), MemBlock(w)]

        def decoder_stage(c_in: int, c_out: int, grow: bool) -> list[nn.Module]:
            return [MemBlock(c_in), MemBlock(c_in), MemBlock(c_in), nn.Upsample(scale_factor=2),
                    TGrow(c_in, 2 if grow else 1), _conv3x3(c_in, c_out, bias=False)]

        pool, grow = ENCODER_TIME_DOWNSCALE, DECODER_TIME_UPSCALE
        self.encoder = nn.Sequential(
            _conv3x3(TAEHV_IMAGE_CHANNELS, w), nn.ReLU(inplace=True),
            *encoder_stage(pool[0]), *encoder_stage(pool[1]), *encoder_stage(pool[2]),
            _conv3x3(w, TAEHV_LATENT_CHANNELS),
        )
        self.decoder = nn.Sequential(
            Clamp(), _conv3x3(TAEHV_LATENT_CHANNELS, d0), nn.ReLU(inplace=True),
            *decoder_stage(d0, d1, grow[0]), *decoder_stage(d1, d2, grow[1]), *decoder_stage(d2, d3, grow[2]),
            nn.ReLU(inplace=True), _conv3x3(d3, TAEHV_IMAGE_CHANNELS),
        )
        self.t_downscale = 2 ** sum(b.stride == 2 for b in self.encoder if isinstance(b, TPool))
        self.t_upscale = 2 ** sum(b.stride == 2 for b in self.decoder if isinstance(b, TGrow))
        self.frames_to_trim = self.t_upscale - 1

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """Encode a whole clip at once (parallel over time), as the reference's `encode_video`.

        Args:
            frames: (N, T, 3, H, W) in [0, 1], H and W multiples of 8.
        Returns:
            (N, ceil(T / 4), 16, H/8, W/8): latent j from frames 4j..4j+3 (and all before it);
            the clip is padded at its end with copies of its last frame to a multiple of 4.
        """
        short = -frames.shape[1] % self.t_downscale
        if short:
            frames = torch.cat([frames, frames[:, -1:].expand(-1, short, -1, -1, -1)], dim=1)  # (N, 4k', 3, H, W)
        return apply_parallel(self.encoder, frames)

    @torch.no_grad()
    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode a whole clip's latents at once (parallel over time), as the reference's `decode_video`.

        Args:
            latents: (N, T, 16, h, w), Wan's normalised latents.
        Returns:
            (N, 4T - 3, 3, 8h, 8w) in [0, 1]: 4 frames per latent frame, the first 3 dropped.
        """
        frames = apply_parallel(self.decoder, latents).clamp_(0, 1)  # (N, 4T, 3, 8h, 8w)
        return frames[:, self.frames_to_trim:]


def apply_parallel(blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Run a TAEHV encoder or decoder over a whole sequence, parallel over time, block by block.

    Adapted from madebyollin/taehv `apply_model_with_memblocks_parallel`: every block sees
    all time steps at once; a MemBlock's past is its own input shifted one step later in
    time, zeros at the first step; TPool / TGrow change the number of steps.

    Args:
        blocks: `TAEHV.encoder` or `TAEHV.decoder`.
        x: (N, T, C, H, W).
    Returns:
        (N, T', C', H', W').
    """
    n = x.shape[0]
    h = x.flatten(0, 1)  # (N * T, C, H, W), stream-major
    for block in blocks:
        if isinstance(block, MemBlock):
            steps = h.unflatten(0, (n, -1))  # (N, T, C, H, W)
            past = F.pad(steps, (0, 0, 0, 0, 0, 0, 1, 0))[:, :-1]  # (N, T, C, H, W): step t-1, zeros at t = 0
            h = block(h, past.flatten(0, 1))
        else:
            h = block(h)
    return h.unflatten(0, (n, -1))


class SequentialStream:
    """One stream through a TAEHV encoder or decoder: time steps in, a few per call, in order.

    The streamed form of `apply_parallel`: each call runs its steps through the blocks in
    parallel over those steps, with what the sequence before them left:

    - each MemBlock's input at the last step so far (`_memory[i]`, (N, C, H, W), zeros
      before the stream's first step: the parallel path's zero padding);
    - each TPool's inputs still short of a whole group (`_waiting[i]` of them in
      `_pool[i]`, (N, stride, C, H, W)); a call whose steps all end up waiting in a TPool
      returns nothing yet;
    - TGrow needs nothing: each input step's `stride` outputs come out together, in order.

    The buffers are allocated when a block first sees a stream's steps, and kept (the
    memories zeroed) by `reset`. Several streams can share one model: the state is here.

    Args:
        blocks: `TAEHV.encoder` or `TAEHV.decoder`.
    """

    def __init__(self, blocks: nn.Sequential):
        self.blocks = blocks
        self._memory: dict[int, torch.Tensor] = {}
        self._pool: dict[int, torch.Tensor] = {}
        self._waiting = [0] * len(blocks)
        self._seen = [False] * len(blocks)  # block i has had steps of this stream
        self.steps_in = 0
        self.steps_out = 0

    def reset(self) -> None:
        """A new stream: no past at any MemBlock, nothing waiting in any TPool."""
        for memory in self._memory.values():
            memory.zero_()
        self._waiting = [0] * len(self.blocks)
        self._seen = [False] * len(self.blocks)
        self.steps_in = 0
        self.steps_out = 0

    def _buffer(self, store: dict, i: int, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        """Block i's buffer of `shape`: allocated (zeros) when block i first sees a stream's steps,
        or again then if a new stream's steps differ in size or type."""
        buffer = store.get(i)
        if buffer is None or buffer.shape != shape or buffer.dtype != like.dtype or buffer.device != like.device:
            if self._seen[i]:
                raise ValueError(f"the stream's steps changed size or type mid-stream (now {tuple(shape)}): "
                                 "reset() before a new stream")
            buffer = store[i] = like.new_zeros(shape)
        self._seen[i] = True
        return buffer

    @torch.no_grad()
    def step(self, x: torch.Tensor) -> torch.Tensor | None:
        """Feed the stream's next T time steps.

        Args:
            x: (N, T, C, H, W), the steps after those of the previous calls.
        Returns:
            (N, T', C', H', W') the outputs they complete, or None if every step is still
            waiting in a TPool for the rest of its group.
        """
        n, t = x.shape[:2]
        self.steps_in += t
        h = x.flatten(0, 1)  # (N * t, C, H, W), stream-major
        for i, block in enumerate(self.blocks):
            if isinstance(block, MemBlock):
                steps = h.unflatten(0, (n, t))  # (N, t, C, H, W)
                memory = self._buffer(self._memory, i, steps.shape[:1] + steps.shape[2:], h)  # (N, C, H, W)
                past = torch.cat([memory.unsqueeze(1), steps[:, :-1]], dim=1)  # (N, t, C, H, W): each step's previous
                memory.copy_(steps[:, -1])
                h = block(h, past.flatten(0, 1))
            elif isinstance(block, TPool) and block.stride > 1:
                s = block.stride
                steps = h.unflatten(0, (n, t))  # (N, t, C, H, W)
                pool = self._buffer(self._pool, i, (n, s) + steps.shape[2:], h)  # (N, s, C, H, W)
                waiting = self._waiting[i]
                if waiting:
                    steps = torch.cat([pool[:, :waiting], steps], dim=1)  # (N, waiting + t, C, H, W)
                groups = steps.shape[1] // s
                rest = steps.shape[1] - groups * s
                if rest:
                    pool[:, :rest].copy_(steps[:, groups * s:])
                self._waiting[i] = rest
                if groups == 0:
                    return None
                h = block(steps[:, :groups * s].flatten(0, 1))  # (N * groups, C, H, W)
                t = groups
            else:
                h = block(h)
                t = h.shape[0] // n  # TGrow: stride x the steps
        self.steps_out += t
        return h.unflatten(0, (n, t))


class TAEHVStream:
    """One stream through a TAEHV, with `models.wan.WanVAEStream`'s interface.

    Frames in, a group of `frames_needed` at a time (or one at a time: `push`), one latent
    frame out per group; latent frames in, one at a time, frames out. Encoder and decoder
    each run as a `SequentialStream` (this stream's own MemBlock memories and TPool
    buffers), so the latents and frames are those of `TAEHV.encode_video` /
    `decode_video` on the whole clip (tests/models/test_taehv.py).

    What differs from `WanVAEStream` (module docstring: how TAEHV's time maps onto Wan's):

    - `frames_needed` is 4 for every group, the first too (Wan's VAE: 1, then 4): latent j
      is made from frames 4j..4j+3. It is Wan's latent j, which Wan makes from frames
      4j-3..4j: the encoder waits for 3 frames more than Wan's.
    - `decode` is Wan's: 1 frame for the stream's first latent frame (the decoder's first 3
      frames dropped), then 4. So a stream of 4m frames decodes to 4m - 3: decoded frame
      t is input frame t, and the last 3 inputs come out with the next latent frame.

    Latent space: with `latents_mean` / `latents_std` (the Wan VAE's config), `encode`
    returns and `decode` takes the Wan VAE's raw latents (z * std + mean of TAEHV's), so
    `WanComponents.normalize_latents` / `denormalize_latents` apply as with the Wan VAE;
    without them, TAEHV's own latents, which are already the DiT's (normalised) ones.

    Args:
        taehv: a `TAEHV` (its device and dtype are the stream's).
        latents_mean, latents_std: 16 floats each, or None (see above).
    """

    def __init__(self, taehv: TAEHV, latents_mean: Sequence[float] | None = None,
                 latents_std: Sequence[float] | None = None):
        if (latents_mean is None) != (latents_std is None):
            raise ValueError("give both latents_mean and latents_std (the Wan VAE's), or neither")
        self.taehv = taehv
        param = next(taehv.parameters())
        self._stats = None
        if latents_mean is not None:
            shape = (1, TAEHV_LATENT_CHANNELS, 1, 1, 1)
            self._stats = (torch.as_tensor(latents_mean, dtype=param.dtype, device=param.device).view(shape),
                           torch.as_tensor(latents_std, dtype=param.dtype, device=param.device).view(shape))
        self._encoder = SequentialStream(taehv.encoder)
        self._decoder = SequentialStream(taehv.decoder)
        self.reset()

    def reset(self) -> None:
        """A new stream: the next frame is frame 0, the next latent latent frame 0."""
        self._encoder.reset()
        self._decoder.reset()
        self.frames_in = 0  # frames encoded so far
        self.latents_decoded = 0  # latent frames decoded so far
        self._decoded_raw = 0  # decoder output frames so far, the trimmed ones included

    @property
    def frames_needed(self) -> int:
        """Frames the next `encode` call needs: 4, every group (TAEHV's `t_downscale`)."""
        return self.taehv.t_downscale

    @property
    def lookahead_frames(self) -> int:
        """Frames the encoder waits for beyond Wan's VAE before a latent frame (3)."""
        return self.taehv.frames_to_trim

    def _to_model(self, x: torch.Tensor) -> torch.Tensor:
        param = next(self.taehv.parameters())
        return x.to(device=param.device, dtype=param.dtype)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Encode the next group of frames into one latent frame.

        Args:
            frames: (B, 3, 4, H, W) in [-1, 1], H and W multiples of 8.
        Returns:
            (B, 16, 1, H/8, W/8): TAEHV's latent (the DiT's), or the Wan VAE's raw one if
            the stream has `latents_mean` / `latents_std`.
        """
        n = frames.shape[2]
        if n != self.frames_needed:
            raise ValueError(f"TAEHV encodes {self.frames_needed} frames per latent frame, the first group too: "
                             f"got {n}")
        latent = self._feed(frames)
        assert latent is not None and latent.shape[2] == 1, "a whole group makes one latent frame"
        return latent

    @torch.no_grad()
    def push(self, frame: torch.Tensor) -> torch.Tensor | None:
        """Push one frame through the encoder now; return a latent frame when one is complete
        (after frames 3, 7, 11, ...). The work of a group is spread over its frames: each
        frame runs up to the first TPool still waiting for the rest of its pair.

        Args:
            frame: (B, 3, H, W) in [-1, 1].
        Returns:
            (B, 16, 1, H/8, W/8) as `encode`'s, or None.
        """
        return self._feed(frame.unsqueeze(2))

    def _feed(self, frames: torch.Tensor) -> torch.Tensor | None:
        """(B, 3, n, H, W) in [-1, 1] -> (B, 16, k, h, w) the latent frames they complete, or None."""
        unit = ((self._to_model(frames) + 1) / 2).clamp(0, 1)  # TAEHV's pixels: [0, 1]
        latents = self._encoder.step(unit.transpose(1, 2))  # (B, k, 16, h, w) NTCHW, or None
        self.frames_in += frames.shape[2]
        if latents is None:
            return None
        latents = latents.transpose(1, 2)  # (B, 16, k, h, w)
        if self._stats is not None:
            mean, std = self._stats
            latents = latents * std + mean  # the Wan VAE's raw latents
        return latents

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Decode the next latent frame.

        Args:
            latent: (B, 16, 1, h, w): TAEHV's (the DiT's), or the Wan VAE's raw one if the
                stream has `latents_mean` / `latents_std`.
        Returns:
            (B, 3, n, 8h, 8w) in [-1, 1]: n = 1 for the stream's first latent frame, else 4.
        """
        if latent.shape[2] != 1:
            raise ValueError(f"decode one latent frame at a time, got {latent.shape[2]}")
        latent = self._to_model(latent)
        if self._stats is not None:
            mean, std = self._stats
            latent = (latent - mean) / std  # TAEHV's latents are the normalised ones
        raw = self._decoder.step(latent.transpose(1, 2))  # (B, 4, 3, 8h, 8w) NTCHW in ~[0, 1]
        drop = min(max(self.taehv.frames_to_trim - self._decoded_raw, 0), raw.shape[1])
        self._decoded_raw += raw.shape[1]
        self.latents_decoded += 1
        frames = raw[:, drop:].clamp(0, 1)  # (B, n, 3, 8h, 8w)
        return (frames * 2 - 1).transpose(1, 2)  # (B, 3, n, 8h, 8w) in [-1, 1]


# --- weights ---------------------------------------------------------------------------

def random_taehv(seed: int = 0) -> TAEHV:
    """A TAEHV with random weights whose activations neither vanish nor blow up (tests, benchmarks).

    PyTorch's default conv init shrinks the signal at every layer. Here each conv weight
    is normal with std sqrt(g / fan_in), g = 2 before a ReLU (He) and 1 elsewhere, each
    MemBlock's last conv at half that (its residual adds to the input), biases normal
    with std 0.1, and the decoder's output conv small with bias 0.5: on random frames the
    latents and the decoded frames' pre-clamp values are of order 1, centred in [0, 1].
    """
    gen = torch.Generator().manual_seed(seed)
    model = TAEHV()
    last = f"decoder.{len(model.decoder) - 1}."
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (0.5 if name.startswith(last) else 0.0))
                continue
            gain = 2.0 if name.endswith(("conv.0.weight", "conv.2.weight")) or name in (
                "encoder.0.weight", "decoder.1.weight", f"decoder.{len(model.decoder) - 3}.weight") else 1.0
            scale = (gain / p[0].numel()) ** 0.5
            scale *= 0.5 if name.endswith("conv.4.weight") else 0.2 if name.startswith(last) else 1.0
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval().requires_grad_(False)


def _read_state_dict(path: Path) -> dict:
    """The tensors of a `.pth` (torch.load, weights_only) or `.safetensors` file, or ModelLoadError."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (pickle and safetensors errors come in many types)
        raise ModelLoadError(f"TAEHV weights {path}: unreadable ({type(exc).__name__}: {one_line(exc, 100)}); "
                             f"{TAEHV_HINT}") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"TAEHV weights {path}: not a state dict of tensors; {TAEHV_HINT}")
    return state


def _mismatch(state: dict, expected: dict) -> str:
    """One line on how `state`'s keys and shapes differ from `expected`'s ("" if they do not)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} of another shape (e.g. {k} {tuple(state[k].shape)}, "
                     f"expected {tuple(expected[k].shape)})")
    return ", ".join(parts)


def load_taehv(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> TAEHV:
    """Load Wan 2.1's TAEHV (`taew2_1.pth` or `.safetensors`) strictly.

    Every key and shape of the file must be `TAEHV`'s (its class docstring): weights of
    another TAEHV (`taehv`, `taehv1_5`, `taew2_2`, ...: other latent widths or patch
    sizes) are refused, not half-loaded.

    Args:
        path: the weights file.
        device, dtype: where the model goes.
    Returns:
        the TAEHV in eval mode, without gradients.
    Raises:
        ModelLoadError: one line saying what is wrong and what to pass.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"TAEHV weights {path} do not exist; {TAEHV_HINT}")
    if path.suffix not in (".pth", ".pt", ".safetensors"):
        raise ModelLoadError(f"TAEHV weights {path}: not a .pth or .safetensors file; {TAEHV_HINT}")
    state = _read_state_dict(path)
    with torch.device("meta"):
        model = TAEHV()  # no init: every weight comes from the file
    wrong = _mismatch(state, model.state_dict())
    if wrong:
        raise ModelLoadError(one_line(f"TAEHV weights {path} are not Wan 2.1's TAEHV (taew2_1): {wrong}; "
                                      f"{TAEHV_HINT}", 400))
    model = model.to_empty(device="cpu")
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
