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
  own step's cache. The caches of a layer are one preallocated ring buffer
  (`LayerRing`, one slot per step and branch): a frame is written once and read in
  place, and once the windows are full a layer is one SDPA call over all rows.

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

from diffstream.attention.base import (
    compiler_opaque,
    AttentionInputs,
    BatchLayout,
    Mechanism,
    attention_output,
    check_unet_batch,
    install_processors,
)


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
    """Position-free keys/values of one (layer, step, branch), for reading (tests, tools).

    warm_*: (N, W, C) for the W warmup frames; ring_*: (N, R + 1, C), the slot's part of
    its layer's ring buffer (`LayerRing`: R recent frames plus the current one, in ring
    order, not time order), None until streaming starts. N = spatial tokens (H*W). Once
    streaming, both are views into the ring, so they stay the same objects frame after
    frame.
    """

    def __init__(self):
        self.warm_k = self.warm_v = None
        self.ring_k = self.ring_v = None


class LayerRing:
    """The KV cache of one temporal layer for every slot, preallocated: a ring buffer.

    `key`, `value`: (slots, N, W + R + 1, C), per slot [warmup frames | ring of the R most
    recent streamed frames and the current one]. A frame's position-free keys/values are
    written once, at its slot's write index, and stay there until overwritten R + 1
    frames later; nothing grows or moves while streaming (Live2Diff Sec. 3.4).
    """

    def __init__(self, slots: int, tokens: int, warm: int, ring: int, like: torch.Tensor):
        shape = (slots, tokens, warm + ring, like.shape[-1])
        self.key = like.new_zeros(shape)
        self.value = like.new_zeros(shape)


@dataclass(frozen=True)
class RingPlan:
    """Where the rows of one streaming call read and write their rings (host side).

    Built once per call from the per-slot fill counts and write indices and shared by
    every temporal layer; `CausalTemporalState.plan_tensors(device)` holds its device
    indices, cached per plan, so a call copies nothing to the device once the rings
    have gone round once (the plans repeat every R + 1 frames).

    Attributes:
        slots: ring slot of each row.
        write: (rows,) buffer index (warm + ring index) the current frame is written at.
        lengths: S_r per row: keys/values the row attends to (warm + filled + current).
        order: per row, the buffer index of each of the first max(S_r) window positions,
            oldest first: the identity while the ring has not wrapped; once it has, the
            warmup frames, then the ring from the entry after `write` round to `write`
            (the current frame, position S_r - 1).
    """

    slots: tuple[int, ...]
    write: tuple[int, ...]
    lengths: tuple[int, ...]
    order: tuple[tuple[int, ...], ...]

    @property
    def length(self) -> int:
        return max(self.lengths)

    @property
    def in_order(self) -> bool:
        """Every row's entries are already in time order (no ring has wrapped yet)."""
        return all(o == tuple(range(len(o))) for o in self.order)


class _PlanTensors:
    """A `RingPlan` on one device: its index tensors, copied there once."""

    def __init__(self, plan: RingPlan, device):
        rows = len(plan.slots)
        packed = torch.tensor([plan.slots, plan.write, *zip(*plan.order)],
                              dtype=torch.long, device=device)  # one host-to-device copy: (2 + S, rows)
        self.slot_index, self.write_index = packed[0], packed[1]
        self.order = None if plan.in_order else packed[2:].T.contiguous()  # (rows, S)
        lo = plan.slots[0]
        self.slot_slice = slice(lo, lo + rows) if plan.slots == tuple(range(lo, lo + rows)) else None
        # Rings filling at different rates (the first frames after warmup, while the
        # stream batch fills): rows of each window length attend together.
        self.groups = None
        if len(set(plan.lengths)) > 1:
            self.groups = [(n, torch.tensor([r for r, m in enumerate(plan.lengths) if m == n], device=device))
                           for n in sorted(set(plan.lengths))]


class CausalTemporalState:
    """Every KV cache of the stream, and the layout of the current UNet call.

    Host-side bookkeeping per slot (a (step, branch) pair that was warmed up): how many
    ring entries are filled and where the next frame goes. The tensors are one
    `LayerRing` per temporal layer, allocated at the first streaming call.
    """

    def __init__(self, config: CausalTemporalConfig):
        self.config = config
        self.reset()

    @property
    def ring_size(self) -> int:
        """Ring entries per slot: the recent frames plus the current one."""
        return self.config.recent + 1

    def reset(self) -> None:
        """Drop every cache (a new stream: the next frames are warmup frames again)."""
        self.caches: dict[tuple[str, int, str], StepCache] = {}
        self.layout: BatchLayout | None = None
        self.warm_len: int | None = None  # frames of the warmup clip (W, or fewer for a short stream)
        self.warmed: dict[tuple[int, str], None] = {}  # (step, branch) slots with warmup keys, in order
        self.slots: dict[tuple[int, str], int] | None = None  # slot index of each, fixed when streaming starts
        self.filled: list[int] = []
        self.write: list[int] = []
        self.rings: dict[str, LayerRing] = {}
        self.plan: RingPlan | None = None
        self._plan_tensors: dict = {}

    def cache(self, layer: str, step: int, branch: str) -> StepCache:
        key = (layer, step, branch)
        cache = self.caches.get(key)
        if cache is None:
            cache = self.caches[key] = StepCache()
        return cache

    def begin_call(self, layout: BatchLayout) -> None:
        """Publish the layout; for a streaming call, plan each row's ring read and write.

        The previous streaming call wrote its frames into the rings; its write indices
        advance here, so `before_unet` stays the only per-call channel.
        """
        self._advance()
        self.layout = layout
        if layout.phase == "warmup":
            if self.slots is not None:  # a warmup after streaming: a new stream
                self.reset()
                self.layout = layout
            frames = warmup_clip_length(layout)
            self.warm_len = frames
            for row in range(0, layout.batch_size, frames):
                self.warmed[(layout.steps[row], layout.branches[row])] = None
            return
        if self.slots is None:
            if not self.warmed:
                raise RuntimeError("streaming before the warmup frames were processed")
            # Unconditional slots first, then by step: the stream batch's row order, so a
            # call's rows are usually consecutive slots (a view, no gather).
            order = sorted(self.warmed, key=lambda sb: (sb[1] != "uncond", sb[0]))
            self.slots = {sb: i for i, sb in enumerate(order)}
            self.filled = [0] * len(order)
            self.write = [0] * len(order)
        try:
            slots = tuple(self.slots[sb] for sb in zip(layout.steps, layout.branches))
        except KeyError:
            raise RuntimeError("streaming before the warmup frames were processed") from None
        warm, size = self.warm_len, self.ring_size
        write, lengths, order = [], [], []
        for slot in slots:
            filled, at = self.filled[slot], self.write[slot]
            write.append(warm + at)
            lengths.append(warm + min(filled + 1, size))
        longest = max(lengths)
        for slot in slots:
            if self.filled[slot] < size:  # not wrapped: entries are in time order
                order.append(tuple(range(longest)))
            else:  # oldest first: the entry after the write index, round to the current frame
                at = self.write[slot]
                order.append(tuple(range(warm)) + tuple(warm + (at + 1 + i) % size for i in range(size)))
        self.plan = RingPlan(slots, tuple(write), tuple(lengths), tuple(order))

    def _advance(self) -> None:
        """The last streaming call put every row's frame into its ring: move the write indices on."""
        if self.plan is None:
            return
        size = self.ring_size
        for slot in self.plan.slots:
            self.write[slot] = (self.write[slot] + 1) % size
            self.filled[slot] = min(self.filled[slot] + 1, size)
        self.plan = None

    def plan_tensors(self, device) -> _PlanTensors:
        """The current plan's device tensors (cached per plan and device: the rings'
        patterns repeat every R + 1 frames)."""
        key = (self.plan, device)
        tensors = self._plan_tensors.get(key)
        if tensors is None:
            if len(self._plan_tensors) > 256:  # bounded: only transients are ever new
                self._plan_tensors.clear()
            tensors = self._plan_tensors[key] = _PlanTensors(self.plan, device)
        return tensors

    def ring(self, layer: str, like: torch.Tensor) -> LayerRing:
        """This layer's ring buffer, allocated at its first streaming call: the warmup
        keys/values move in, and the layer's `StepCache`s become views of it.

        Args:
            like: (N, 1, C) this call's position-free keys of one row (shape, dtype, device).
        """
        ring = self.rings.get(layer)
        if ring is None:
            ring = self.rings[layer] = LayerRing(len(self.slots), like.shape[0], self.warm_len, self.ring_size, like)
            warm = self.warm_len
            for (step, branch), slot in self.slots.items():
                cache = self.cache(layer, step, branch)
                ring.key[slot, :, :warm] = cache.warm_k  # (N, W, C)
                ring.value[slot, :, :warm] = cache.warm_v
                cache.warm_k, cache.warm_v = ring.key[slot, :, :warm], ring.value[slot, :, :warm]
                cache.ring_k, cache.ring_v = ring.key[slot, :, warm:], ring.value[slot, :, warm:]
        return ring

    def nbytes(self) -> int:
        """Bytes of the storage behind all caches (constant once streaming has started).

        Counts each distinct storage once, whole, so a view pinning a larger buffer or a
        growing tensor would show.
        """
        storages = {}
        tensors = [t for ring in self.rings.values() for t in (ring.key, ring.value)]
        tensors += [t for c in self.caches.values() for t in (c.warm_k, c.warm_v) if t is not None]
        for t in tensors:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())


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

    @compiler_opaque  # stateful: the compiled graphs stop here (attention.base)
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        layout = self.state.layout
        if layout is None:
            raise RuntimeError("causal temporal attention used outside a stream (no layout published)")
        # hidden_states: (rows * HW, F, C); F = W frames in warmup, 1 frame per row in streaming
        q_pos, k_pos, v_pos = self._position_terms(attn, hidden_states)  # each (max_len, C)
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        frames = hidden_states.shape[1]
        # Position-free parts: the block added P[0..F-1] before this layer.
        key_free, value_free = key - k_pos[:frames], value - v_pos[:frames]
        if layout.phase == "warmup":
            out = self._attend(attn, query, key, value, attn.heads)  # bidirectional over the W frames
            self._store_warmup(layout, key_free, value_free)
        else:
            out = self._stream(attn, layout, query, key_free, value_free, q_pos, k_pos, v_pos)
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

    def _store_warmup(self, layout: BatchLayout, key_free, value_free) -> None:
        """Warmup: each branch's rows are one clip of W frames; cache its keys/values."""
        frames = warmup_clip_length(layout)
        n_videos = layout.batch_size // frames
        per_video = key_free.shape[0] // n_videos  # HW tokens of one video
        for v in range(n_videos):
            row = v * frames
            cache = self.state.cache(self.name, layout.steps[row], layout.branches[row])
            cache.warm_k = key_free[v * per_video : (v + 1) * per_video]  # (HW, W, C)
            cache.warm_v = value_free[v * per_video : (v + 1) * per_video]
            cache.ring_k = cache.ring_v = None

    def _stream(self, attn, layout: BatchLayout, query, key_free, value_free, q_pos, k_pos, v_pos):
        """One frame per row, all rows in one SDPA call: each row writes its frame into its
        slot's ring, then attends over [warmup, recent, current] with window positions (A.2).

        Args:
            query: (rows * HW, 1, C) with the block's position P[0] in it.
            key_free, value_free: (rows * HW, 1, C) position-free keys/values.
            q_pos, k_pos, v_pos: (max_len, C) the position terms W P (`_position_terms`).
        Returns:
            (rows * HW, 1, C) attention output.
        """
        state = self.state
        rows = layout.batch_size
        tokens = query.shape[0] // rows  # HW
        channels = query.shape[-1]
        ring = state.ring(self.name, key_free[:tokens])
        plan = state.plan_tensors(query.device)
        # The current frame goes to its ring entry first: the window is then the slot's
        # first S entries, whatever the row.
        ring.key[plan.slot_index, :, plan.write_index] = key_free.view(rows, tokens, channels)
        ring.value[plan.slot_index, :, plan.write_index] = value_free.view(rows, tokens, channels)
        length = state.plan.length  # S: the longest window of the call
        if plan.slot_slice is not None:
            keys, values = ring.key[plan.slot_slice], ring.value[plan.slot_slice]  # views
        else:
            keys, values = ring.key.index_select(0, plan.slot_index), ring.value.index_select(0, plan.slot_index)
        # (rows, HW, S, C), oldest first, window positions 0..S-1 added at read time (A.2)
        if plan.order is None:  # no ring has wrapped: the buffer is in time order
            keys, values = keys[:, :, :length] + k_pos[:length], values[:, :, :length] + v_pos[:length]
        else:  # read each row's ring round from its oldest entry (expanded index: no copy of it)
            index = plan.order[:, None, :, None].expand(rows, tokens, length, channels)
            keys = torch.gather(keys, 2, index).add_(k_pos[:length])
            values = torch.gather(values, 2, index).add_(v_pos[:length])
        # The query moves from the block's position 0 to the current frame's, S_r - 1.
        if plan.groups is None:  # every row attends over S entries: one SDPA for all rows
            query = query + (q_pos[length - 1] - q_pos[0])
            return self._attend(attn, query, keys.view(rows * tokens, length, channels),
                                values.view(rows * tokens, length, channels), attn.heads)
        query = query.view(rows, tokens, 1, channels)
        out = torch.empty_like(query)
        for n, index in plan.groups:  # one SDPA per window length while the rings fill
            m = index.shape[0]
            q = query.index_select(0, index) + (q_pos[n - 1] - q_pos[0])  # (m, HW, 1, C)
            k, v = keys.index_select(0, index)[:, :, :n], values.index_select(0, index)[:, :, :n]  # (m, HW, n, C)
            o = self._attend(attn, q.view(m * tokens, 1, channels), k.reshape(m * tokens, n, channels),
                             v.reshape(m * tokens, n, channels), attn.heads)
            out.index_copy_(0, index, o.view(m, tokens, 1, channels))
        return out.view(rows * tokens, 1, channels)


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
        self.state.begin_call(layout)

    def call_unet(self, unet, sample, timesteps, encoder_hidden_states, layout: BatchLayout, cond=None,
                  **unet_kwargs):
        """Add the frame axis: one frame per row while streaming, W-frame clips in warmup.

        Args:
            sample: (B, C, h, w); timesteps: (B,); encoder_hidden_states: (B, 77, D).
            unet_kwargs: passed on; per-row tensors (ControlNet residuals) stay in row
                order, which is the (video, frame) order UNetMotionModel folds frames into.
        """
        check_unet_batch(sample, timesteps, encoder_hidden_states, layout, cond)
        frames = warmup_clip_length(layout) if layout.phase == "warmup" else 1
        assert sample.shape[0] % frames == 0, f"{sample.shape=} {frames=}"
        b, c, h, w = sample.shape
        videos = b // frames
        # (videos * F, C, h, w) -> (videos, C, F, h, w)
        video = sample.view(videos, frames, c, h, w).transpose(1, 2)
        # Rows are frames, in the (video, frame) order UNetMotionModel folds them into.
        self._residual = self.depth_prior(cond) if (cond is not None and self.depth_prior is not None) else None
        try:
            # Current diffusers expects the text embeddings once per frame.
            out = unet(video, timesteps[::frames], encoder_hidden_states=encoder_hidden_states,
                       return_dict=False, **unet_kwargs)[0]
        finally:
            self._residual = None
        return out.transpose(1, 2).reshape(b, c, h, w)

    def cache_bytes(self) -> int:
        return self.state.nbytes()
