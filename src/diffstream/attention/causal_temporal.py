"""Live2Diff: uni-directional temporal attention with warmup frames and a KV cache.

Xing et al., "Live2Diff: Live Stream Translation via Uni-directional Attention in Video
Diffusion Models", Sec. 3.3-3.4 and Appendix A.2. A video UNet (SD 1.5 + AnimateDiff
motion modules) normally attends over a whole clip in both directions; a live stream
has no future. Here every temporal self-attention layer

- denoises the first W "warmup" frames together with bidirectional attention (they
  have no past to lean on, Sec. 3.3), then
- lets each later frame attend to the W warmup frames, the most recent frames up to a
  window of `window` frames in all, and itself (the mask of Fig. 1 (d));
- keeps one KV cache per (temporal layer, denoising step, guidance branch), so keys and
  values of past frames are never recomputed (Sec. 3.4). With the stream batch each
  row of a UNet call is a different frame at a different step and reads and writes its
  own step's cache.

Positions (Appendix A.2): AnimateDiff adds a sinusoidal encoding P to the layer input,
K = W_K (x + P[pos]). A frame's position in the window changes every time the window
rolls, so the cache keeps the position-free part W_K x (+ bias) and adds W_K P[pos] at
read time; the same for values and for the current frame's query. Because the layer
is linear in P, this equals recomputing K and V with the rolled positions.

In streaming each UNet row holds one frame, so the motion block sees sequences of
length 1 and adds P[0]; the processor removes that term and adds the window position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from diffstream.attention.base import AttentionInputs, BatchLayout, Mechanism, attention_output, install_processors


@dataclass(frozen=True)
class CausalTemporalConfig:
    """Settings of Live2Diff's temporal attention.

    Attributes:
        warmup_frames: W, frames denoised together with bidirectional attention before
            streaming starts; they stay visible to every later frame (the paper's 8).
        window: frames each streamed frame attends to in all (warmup + recent + itself;
            the paper's 16).
        depth: add Live2Diff's depth prior (Sec. 3.2): each frame's depth map, VAE-encoded
            and mapped by the checkpoint's depth module, is added after the UNet's conv_in.
        depth_model: transformers depth-estimation model for `depth` (hub id or folder;
            DPT/MiDaS as in the paper, or Depth Anything); "tiny" builds a random one.
    """

    warmup_frames: int = 8
    window: int = 16
    depth: bool = False
    depth_model: str = "Intel/dpt-hybrid-midas"

    def __post_init__(self):
        from diffstream.errors import ConfigError

        if self.warmup_frames < 1:
            raise ConfigError(f"--warmup-frames must be >= 1, got {self.warmup_frames}")
        if self.window < self.warmup_frames + 1:
            raise ConfigError(
                f"--window must be at least warmup frames + 1 = {self.warmup_frames + 1}, got {self.window}"
            )

    @property
    def recent(self) -> int:
        """Past streamed frames kept besides the warmup frames."""
        return self.window - self.warmup_frames - 1


def is_temporal(name: str) -> bool:
    """Processor names of AnimateDiff motion modules in diffusers' UNetMotionModel."""
    return ".motion_modules." in name


def warmup_clip_length(layout: BatchLayout) -> int:
    """Frames per clip in a warmup call: the conditional rows are exactly one clip
    (a stream shorter than W frames warms up with the frames it has)."""
    return layout.branches.count("cond")


class StepCache:
    """Position-free keys/values of one (layer, step, branch).

    warm_*: (N, W, C) for the warmup frames; ring_*: (N, R, C) for the R most recent
    streamed frames, oldest first. N = batch rows of a frame x spatial tokens (H*W).
    """

    def __init__(self):
        self.warm_k = self.warm_v = None
        self.ring_k = self.ring_v = None

    def append(self, key: torch.Tensor, value: torch.Tensor, keep: int) -> None:
        """Add one frame's (N, 1, C) keys/values; keep at most `keep` recent frames."""
        if keep == 0:
            return
        if self.ring_k is None:
            self.ring_k, self.ring_v = key, value
        else:
            self.ring_k = torch.cat([self.ring_k, key], dim=1)[:, -keep:]
            self.ring_v = torch.cat([self.ring_v, value], dim=1)[:, -keep:]

    def window(self, key: torch.Tensor, value: torch.Tensor):
        """The window's position-free keys/values [warmup, recent, current]: (N, S, C)."""
        parts_k, parts_v = [self.warm_k], [self.warm_v]
        if self.ring_k is not None:
            parts_k.append(self.ring_k)
            parts_v.append(self.ring_v)
        return torch.cat(parts_k + [key], dim=1), torch.cat(parts_v + [value], dim=1)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.warm_k, self.warm_v, self.ring_k, self.ring_v)
                   if t is not None)


class CausalTemporalState:
    """Every KV cache of the stream, and the layout of the current UNet call."""

    def __init__(self, config: CausalTemporalConfig):
        self.config = config
        self.reset()

    def reset(self) -> None:
        """Drop every cache (a new stream: the next frames are warmup frames again)."""
        self.caches: dict[tuple[str, int, str], StepCache] = {}
        self.layout: BatchLayout | None = None

    def cache(self, layer: str, step: int, branch: str) -> StepCache:
        key = (layer, step, branch)
        cache = self.caches.get(key)
        if cache is None:
            cache = self.caches[key] = StepCache()
        return cache

    def nbytes(self) -> int:
        """Bytes held by all caches (constant once the window is full)."""
        return sum(c.nbytes() for c in self.caches.values())


class CausalTemporalAttnProcessor:
    """Temporal self-attention of one motion-module layer with the warmup mask and KV cache.

    Args:
        state: the stream's caches and current layout.
        name: processor name (cache key).
        pos_embedding: (max_len, C) the sinusoidal table the motion block adds to its input.
    """

    def __init__(self, state: CausalTemporalState, name: str, pos_embedding: torch.Tensor):
        self.state = state
        self.name = name
        self.pe = pos_embedding
        self._proj = None  # (Wq P, Wk P, Wv P), each (max_len, C), built on first use

    def _position_terms(self, attn, like: torch.Tensor):
        """W_q P, W_k P, W_v P for every position: the linear part only (no bias)."""
        if self._proj is None or self._proj[0].dtype != like.dtype or self._proj[0].device != like.device:
            pe = self.pe.to(device=like.device, dtype=like.dtype)
            self._proj = tuple(F.linear(pe, lin.weight) for lin in (attn.to_q, attn.to_k, attn.to_v))
        return self._proj

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        layout = self.state.layout
        if layout is None:
            raise RuntimeError("causal temporal attention used outside a stream (no layout published)")
        # hidden_states: (rows * HW, F, C); F = W frames in warmup, 1 frame per row in streaming
        qp, kp, vp = self._position_terms(attn, hidden_states)
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        frames = hidden_states.shape[1]
        # Position-free parts: the block added P[0..F-1] before this layer.
        key0, value0 = key - kp[:frames], value - vp[:frames]
        heads = attn.heads
        if layout.phase == "warmup":
            out = self._attend(attn, query, key, value, heads)  # bidirectional over the W frames
            self._store_warmup(layout, key0, value0)
        else:
            out = self._stream(attn, layout, query, key0, value0, qp, kp, vp, heads)
        inputs = AttentionInputs(query, key, value, residual=hidden_states, input_shape=None)
        return attention_output(attn, out, inputs)

    @staticmethod
    def _attend(attn, query, key, value, heads, mask=None):
        """(N, Lq, C) x (N, Lk, C) -> (N, Lq, C) multi-head SDPA."""
        n, lq, c = query.shape
        d = c // heads
        q = query.view(n, lq, heads, d).transpose(1, 2)  # (N, heads, Lq, d)
        k = key.view(n, key.shape[1], heads, d).transpose(1, 2)
        v = value.view(n, value.shape[1], heads, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(n, lq, c)

    def _store_warmup(self, layout: BatchLayout, key0, value0) -> None:
        """Warmup: each branch's rows are one clip of W frames; cache its keys/values."""
        frames = warmup_clip_length(layout)
        n_videos = layout.batch_size // frames
        per_video = key0.shape[0] // n_videos  # HW tokens of one video
        for v in range(n_videos):
            row = v * frames
            cache = self.state.cache(self.name, layout.steps[row], layout.branches[row])
            cache.warm_k = key0[v * per_video : (v + 1) * per_video]  # (HW, W, C)
            cache.warm_v = value0[v * per_video : (v + 1) * per_video]
            cache.ring_k = cache.ring_v = None

    def _stream(self, attn, layout: BatchLayout, query, key0, value0, qp, kp, vp, heads):
        """One frame per row; each row reads and extends its own step's cache."""
        rows = layout.batch_size
        tokens = query.shape[0] // rows  # HW
        keep = self.state.config.recent
        outs = []
        for r in range(rows):
            sl = slice(r * tokens, (r + 1) * tokens)
            cache = self.state.cache(self.name, layout.steps[r], layout.branches[r])
            if cache.warm_k is None:
                raise RuntimeError("streaming before the warmup frames were processed")
            k_win, v_win = cache.window(key0[sl], value0[sl])  # (HW, S, C), position-free
            s = k_win.shape[1]
            # Window positions 0..S-1; the current frame is the last one (A.2).
            k_win = k_win + kp[:s]
            v_win = v_win + vp[:s]
            q = query[sl] + (qp[s - 1] - qp[0])  # move the query from position 0 to S-1
            outs.append(self._attend(attn, q, k_win, v_win, heads))
            cache.append(key0[sl], value0[sl], keep)
        return torch.cat(outs, dim=0) if rows > 1 else outs[0]


class CausalTemporal(Mechanism):
    """Live2Diff as a stream-engine mechanism (the UNet must be a UNetMotionModel).

    Args:
        config: warmup and window sizes.
        conditioner: with `depth_prior`, Live2Diff's depth conditioning (Sec. 3.2): pixels
            (B, 3, H, W) in [-1, 1] -> depth latents (B, 4, h, w), computed once per frame
            when it enters (`models.depth.DepthConditioner`, built by the pipeline factory:
            the mechanism itself runs no model besides the UNet it is attached to).
        depth_prior: module mapping those latents to a residual of the UNet's conv_in
            output (`models.motion.DepthPrior`); None: no depth conditioning.
    """

    name = "live2diff"

    def __init__(self, config: CausalTemporalConfig | None = None,
                 conditioner: Callable[[torch.Tensor], torch.Tensor] | None = None, depth_prior=None):
        if (conditioner is None) != (depth_prior is None):
            raise ValueError("depth conditioning needs both a conditioner and a depth prior")
        self.config = config or CausalTemporalConfig()
        self.state = CausalTemporalState(self.config)
        self.warmup_frames = self.config.warmup_frames
        self.conditioner = conditioner
        self.depth_prior = depth_prior
        self._residual = None  # depth-prior output for the rows of the current UNet call

    def condition(self, pixels: torch.Tensor) -> torch.Tensor | None:
        """The frame's depth latent (1, 4, h, w) from its pixels (1, 3, H, W), or None without --depth."""
        if self.conditioner is None:
            return None
        return self.conditioner(pixels)

    def attach(self, unet):
        """Install the causal processors (and the depth prior's hook on conv_in)."""
        import contextlib

        stack = contextlib.ExitStack()
        stack.enter_context(self._install(unet))
        if self.depth_prior is not None:
            self.depth_prior.to(device=unet.device, dtype=unet.dtype)
            handle = unet.conv_in.register_forward_hook(self._add_depth)
            stack.callback(handle.remove)
        return stack

    def _add_depth(self, module, inputs, output):
        """conv_in output (B*F, C0, h, w) + the depth prior's residual for the same rows."""
        return output if self._residual is None else output + self._residual

    def _install(self, unet):
        """The causal processors on every motion-module attention layer."""
        if not any(is_temporal(n) for n in unet.attn_processors):
            from diffstream.errors import ConfigError

            raise ConfigError("--method live2diff needs a UNet with motion modules (pass --motion-adapter)")

        def make(name, proc):
            if not is_temporal(name):
                return None
            block = unet.get_submodule(name.rsplit(".", 2)[0])  # ...transformer_blocks.N
            pe = block.pos_embed.pe[0]  # (max_len, C)
            if pe.shape[0] < self.config.window:
                from diffstream.errors import ConfigError

                raise ConfigError(f"--window {self.config.window} exceeds the motion module's {pe.shape[0]} positions")
            return CausalTemporalAttnProcessor(self.state, name, pe)

        return install_processors(unet, make)

    def reset(self) -> None:
        self.state.reset()

    def before_unet(self, layout: BatchLayout) -> None:
        self.state.layout = layout

    def call_unet(self, unet, sample, timesteps, encoder_hidden_states, layout: BatchLayout, cond=None):
        """Add the frame axis: one frame per row while streaming, W-frame clips in warmup.

        Args:
            sample: (B, C, h, w); timesteps: (B,); encoder_hidden_states: (B, 77, D).
        """
        frames = warmup_clip_length(layout) if layout.phase == "warmup" else 1
        b, c, h, w = sample.shape
        videos = b // frames
        # (videos * F, C, h, w) -> (videos, C, F, h, w)
        video = sample.view(videos, frames, c, h, w).transpose(1, 2)
        # Rows are frames, in the (video, frame) order UNetMotionModel folds them into.
        self._residual = self.depth_prior(cond) if (cond is not None and self.depth_prior is not None) else None
        try:
            # Current diffusers expects the text embeddings once per frame.
            out = unet(video, timesteps[::frames], encoder_hidden_states=encoder_hidden_states,
                       return_dict=False)[0]
        finally:
            self._residual = None
        return out.transpose(1, 2).reshape(b, c, h, w)

    def cache_bytes(self) -> int:
        return self.state.nbytes()
