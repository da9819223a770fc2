"""Causal video-to-video on a Wan DiT: StreamDiffusionV2's loop behind the stream API.

    pipe = make_pipeline(load_components(ModelConfig(model="tiny-wan")), StreamConfig(method="causal-video", ...))
    for frame in frames:
        for out in pipe.process(frame): write(out)   # [] until a chunk completes
    for out in pipe.flush(): write(out)

Issue #18; shared/notes/field-2026-12.md Sec. 1, 2, 5. Frames come in one at a time and
are grouped as Wan's causal VAE takes them: frame 0 alone, then 4 frames per latent
frame. A chunk is `chunk_frames` latent frames (StreamDiffusionV2: 1), so chunk 0 is
1 + 4 (F - 1) frames and every later chunk 4 F frames. Per chunk (StreamDiffusionV2's
`inference_wo_batch`, Self-Forcing's inference loop):

1. VAE-encode the chunk's frames through the stream's own VAE feature caches
   (`models.wan.WanVAEStream`), normalised as Wan's pipelines do: z0 (1, 16, F, h, w);
2. SDEdit for flow matching: x = (1 - sigma_0) z0 + sigma_0 noise_0;
3. each denoising step k: one "attend" call of the block-causal transformer at timestep
   1000 sigma_k predicts the flow v; x0 = x - sigma_k v; before the next step the
   prediction is noised again with fresh noise, x = (1 - sigma_k+1) x0 + sigma_k+1 noise_k+1
   (the few-step DMD sampler of CausVid / Self-Forcing / StreamDiffusionV2);
4. one "record" call on the clean x0 at timestep 0 puts the chunk's keys/values in the
   KV cache (sinks + rolling window, `attention.block_causal`);
5. VAE-decode x0 one latent frame at a time through the decoder's caches; the chunk's
   frames are emitted in input order.

Outputs are 1:1 with inputs: `push` returns None (and `process` []) until the chunk
completes; `flush` finishes a partial last chunk by repeating its last frame up to a
whole chunk and drops the padded frames' outputs (the caches then hold the padding, so
the next frame after such a flush starts a new stream). The noise of a stream comes from
one CPU generator seeded by the stream's seed, drawn once per chunk in a fixed order
(steps x latent shape), so two runs give the same frames; `reset` seeds it again.

A prompt switch (`update(prompt=...)`, a new blend) recaches, as LongLive does on its
prompt switches (`recache`, default `RECACHE`): before the next chunk, the cached chunks'
keys/values, made under the old text, are rebuilt under the new one by record calls on
those chunks' stored clean latents (a preallocated ring of S + W + 1 chunks' latents
beside the KV cache, at the same slots), in stream order, each at its own chunk index
(absolute positions as first recorded) and attending to the sinks and the window chunks
recached before it: exactly a fresh stream under the new prompt fed the cached chunks
(the chunks evicted before the switch are gone). S + W extra transformer calls, once.
Without it the next chunks attend to keys/values made with the old text (the "smear").

The KV cache policy of StreamDiffusionV2 (`CausalVideoConfig.kv_record = "steps"`): no
record call; every denoising step k's call writes the chunk's keys/values to step k's own
cache (`BlockCausalState.begin_rows`: the buffers hold one stream per step), so step k
of chunk n attends to chunks < n as they were at step k. It is what makes its stream
batch possible (`stream_batch`): the K steps of K consecutive chunks in one call, row k =
chunk n - k at step k (its `inference_stream`), each row with its own text and noise, so
the frames equal the same policy run one call per step (proved against the stock model
over the whole clip, step by step) and come K - 1 chunks later. The recache is not
available there (each step's cache would need that step's noisy inputs re-run): a prompt
switch then says so once (`on_notice`). A change of strength or steps first finishes
the chunks in flight under their old schedule; a change of the number of steps then
starts a new KV stream (one cache per step), with a notice.

With `CausalVideoConfig.motion_noise` (StreamDiffusionV2's motion-aware noise,
`schedule.motion_noise`), each chunk's first sigma comes from its input's motion: the
largest RMS difference between consecutive frames (the previous chunk's last frame
included) lowers it by up to `max_drop`, smoothed over chunks. It stays a device tensor
(no host sync): the chunk is noised at it, its first step runs at timestep 1000 sigma and
takes x0 = x - sigma v; the later steps keep their levels.

Deliberate deviations from StreamDiffusionV2: its first chunk is 1 + 4 frames (2 latent
frames) and later ones 1; ours are all `chunk_frames` latent frames (the block-causal
cache's chunks are uniform), so the first output comes after the first frame.
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from diffstream import frames as F
from diffstream.attention.base import BatchLayout, ProcessorLease
from diffstream.attention.block_causal import BlockCausal
from diffstream.config import StreamConfig
from diffstream.errors import ConfigError
from diffstream.models.wan import WAN_TEMPORAL_FACTOR, WanComponents, WanVAEStream
from diffstream.pipelines.outputs import OrderedOutputs
from diffstream.schedule.blend import blend_embeddings
from diffstream.schedule.motion_noise import MotionNoise

# One chunk call of one stream (one row): the mechanism's per-call channel.
ATTEND = BatchLayout.branch_major("attend", 0, ("cond",), 1, 1)
RECORD = BatchLayout.branch_major("record", 0, ("cond",), 1, 1)


@functools.lru_cache(maxsize=None)
def _rows_layout(rows: int) -> BatchLayout:
    """A stream-batch call of `rows` step rows."""
    return BatchLayout.branch_major("record", 0, ("cond",), rows, 1)


# What `update` may change (from the next chunk).
UPDATABLE = ("prompt", "negative_prompt", "strength", "steps", "seed", "guidance", "prompt_blend", "blend", "noise",
             "cfg_type", "delta", "recache")
# LongLive's recache on a prompt switch: on where the cache policy has it (fixed sinks, clean records)
# unless the pipeline is made (or updated) with recache=False.
RECACHE = True


class CausalVideoPipeline(OrderedOutputs):
    """Restyles a stream of frames chunk by chunk with a block-causal Wan DiT; one instance per stream.

    The same interface as `pipelines.stream.StreamPipeline` (`push` / `pop` / `process` /
    `flush` / `reset` / `update` / `close`, `processing_size`, counters, callbacks), so
    `diffstream run`, the server and the bench treat it alike.

    Args:
        components: a Wan model (`models.wan.WanComponents`).
        config: the stream's settings (`config.video`: chunks, cache, steps).
        mechanism: the block-causal attention (`pipelines.factory.make_mechanism`).
        recache: rebuild the KV cache under the new text on a prompt switch (LongLive;
            module docstring); False keeps the old prompt's keys/values; None: on where
            the cache policy has it (fixed sinks and clean records), else off.
    Attributes:
        on_push, on_output: callbacks called with the frame index when a frame enters /
            leaves the pipeline.
        on_notice: callbacks for one-line notices (StreamPipeline's interface): a prompt
            switch without recache, a KV stream restarted by a change of steps.
        frames_in, frames_out, unet_calls, chunks: counters since the last reset.
    """

    def __init__(self, components: WanComponents, config: StreamConfig, mechanism: BlockCausal | None = None,
                 recache: bool | None = None):
        if not getattr(components, "is_wan", False):
            raise ConfigError("--method causal-video runs on a Wan video model: pass --model tiny-wan or a Wan "
                              "diffusers folder")
        if config.method != "causal-video":
            raise ConfigError(f"a Wan video model runs --method causal-video only, not {config.method}")
        self.components = components
        self.config = config
        self.mechanism = mechanism or BlockCausal(config.video.block_causal)
        self.vae = WanVAEStream(components.vae)
        # What decodes: the Wan VAE's stream, or TAEHV's (`--tiny-vae`), which takes the same raw
        # latents (the Wan VAE's statistics undo `denormalize_latents` inside) and gives the same
        # frames per latent frame (1, then 4).
        self.decoder = self.vae
        if getattr(components, "tiny_vae", None) is not None:
            from diffstream.models.taehv import TAEHVStream

            cfg = components.vae.config
            self.decoder = TAEHVStream(components.tiny_vae, cfg.latents_mean, cfg.latents_std)
        self.on_push: list[Callable[[int], None]] = []
        self.on_output: list[Callable[[int], None]] = []
        # Notices for the person watching (StreamPipeline's interface).
        self.on_notice: list[Callable[[str], None]] = []
        if recache is None:  # the config's, and where it leaves it out: on where the cache policy has it
            recache = config.video.recache if config.video.recache is not None else RECACHE
            recache = recache and self._recache_available()
        self.recache = bool(recache)
        self._check_recache()
        # (S + W + 1, 1, 16, F, h, w) the clean latents of the cached chunks, at their cache slots
        # (allocated at a stream's first chunk, reused after), for the recache.
        self._clean: torch.Tensor | None = None
        self._pending: dict = {}
        self._told_no_recache = False
        self._rows_x: torch.Tensor | None = None  # stream batch: (K, 16, F, h, w) each row's input, allocated once
        self._motion: MotionNoise | None = None  # the motion-aware noise (config.video.motion_noise)
        self._prompt_key = None
        self._schedule_key = None
        self._seed = None
        self.reset()

    # --- lifecycle ----------------------------------------------------------------
    def close(self) -> None:
        """Restore the transformer's original attention processors (if this stream's are on it)."""
        ProcessorLease.release(self.components.unet, self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _own_model(self) -> None:
        """This stream's processors on the (possibly shared) transformer (see StreamPipeline)."""
        ProcessorLease.acquire(self.components.unet, self, self.mechanism.attach)

    def reset(self) -> None:
        """Start a new stream: drop buffered frames and queued outputs, clear the KV cache,
        the VAE's caches and the noise generator."""
        self._row_chunk: list[int | None] = []  # stream batch: no chunk in flight to finish
        self.chunks = 0  # a new stream: nothing to tell about the old one's caches
        self._apply_pending()
        self._ready: deque = deque()  # (index, frame) ready to return, in order
        self.frames_in = 0
        self.frames_out = 0
        self.unet_calls = 0
        self._new_stream()

    def _new_stream(self) -> None:
        """Temporal state of a new stream: chunk 0 next, empty caches, the seed's first noise."""
        self._frames: list[tuple[int, np.ndarray]] = []  # (index, frame) of the chunk being filled
        self._size: tuple[int, int] | None = None  # (width, height) of the stream's frames
        self.chunks = 0
        self._recache_due = False  # a prompt switch since the last chunk: recache before the next
        self._kv_chunk = 0  # the next chunk's index in the KV stream (row calls: kv_record "steps")
        if self._motion is not None:
            self._motion.reset()  # no frame before the stream's first
        self._sigma0 = self._sigmas[0]  # the current chunk's first sigma (a device tensor with motion noise)
        k = len(self._sigmas)
        self._row_chunk = [None] * k  # stream batch: the KV chunk at each step row, None: empty
        self._row_frames: list = [None] * k  # stream batch: the frame indices of each row's chunk
        self._row_text: list = [None] * k  # stream batch: the text (1, L, D) each row's chunk began with
        self.vae.reset()
        if self.decoder is not self.vae:
            self.decoder.reset()
        self.mechanism.reset()
        self._generator = torch.Generator().manual_seed(self.config.seed)
        self._seed = self.config.seed

    @property
    def skipped(self) -> int:
        """Frames skipped by a similarity filter: causal-video has none."""
        return 0

    @property
    def chunk_frames(self) -> int:
        """Latent frames per chunk."""
        return self.config.video.block_causal.chunk_frames

    def frames_per_chunk(self, chunk: int) -> int:
        """Video frames of chunk `chunk`: 1 + 4 (F - 1) for the first, 4 F after."""
        f = self.chunk_frames
        return 1 + WAN_TEMPORAL_FACTOR * (f - 1) if chunk == 0 else WAN_TEMPORAL_FACTOR * f

    @property
    def latency_frames(self) -> int:
        """Pushes a frame can wait for its output: the frames after it in a steady chunk (4 F - 1),
        and with the stream batch the K - 1 chunks after it; the stream's first output comes
        after 1 + 4 (F - 1) frames (and K - 1 chunks)."""
        chunk = WAN_TEMPORAL_FACTOR * self.chunk_frames
        return chunk - 1 + (chunk * (self.num_steps - 1) if self.config.video.stream_batch else 0)

    @property
    def num_steps(self) -> int:
        return len(self._sigmas)

    def processing_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) at which an input of that size is processed."""
        return F.fit_size(width, height, self.config.size, self.components.size_multiple)

    def update(self, **changes) -> None:
        """Change prompt, negative_prompt, strength, steps, seed, prompt_blend, blend (and
        the guidance / noise / cfg type / delta / size values causal-video accepts) from the
        next chunk: a chunk already begun finishes under the settings it began with. A new
        prompt is encoded once and, with `recache` on, the KV cache is rebuilt under it
        before the next chunk (module docstring); a new seed reseeds the stream's noise.
        `recache=` (bool) sets the policy for the switches applied from then on. Invalid
        values raise ConfigError now.
        """
        unknown = sorted(set(changes) - set(UPDATABLE))
        if unknown:
            raise ConfigError(f"causal-video cannot change {', '.join(unknown)} while streaming "
                              f"(it can: {', '.join(UPDATABLE)}); start a new pipeline")
        if "recache" in changes:
            changes = dict(changes)
            recache = changes.pop("recache")
            if not isinstance(recache, bool):
                raise ConfigError(f"recache is True or False, got {recache!r}")
            was, self.recache = self.recache, recache
            try:
                self._check_recache()
            except ConfigError:
                self.recache = was
                raise
        self.config.replace(**{**self._pending, **changes})  # validates
        self._pending.update(changes)

    # --- the stream API -------------------------------------------------------------
    def push(self, frame: np.ndarray) -> np.ndarray | None:
        """Feed one frame; return the oldest finished output frame, or None.

        Args:
            frame: (H, W, C) uint8 RGB/RGBA/gray image of any size.
        Returns:
            (h, w, 3) uint8 output at processing size, or None until its chunk completes.
        """
        assert frame.ndim in (2, 3) and frame.shape[0] > 0 and frame.shape[1] > 0, f"{frame.shape=}"
        if not self._frames and self._pending:
            self._apply_pending()  # changes apply from the next chunk
        index = self.frames_in
        self.frames_in += 1
        for callback in self.on_push:
            callback(index)
        frame = F.to_rgb(frame)
        if self._size is None:  # every frame of a stream at its first frame's processing size (the caches' size)
            self._size = self.processing_size(frame.shape[1], frame.shape[0])
        self._frames.append((index, F.resize(frame, self._size)))
        if len(self._frames) == self.frames_per_chunk(self.chunks):
            self._own_model()
            self._run_chunk()
        return self._pop()

    def flush(self) -> list[np.ndarray]:
        """Finish a partial last chunk and return every remaining output, in order.

        The chunk is completed by repeating its last frame; the padded frames' outputs are
        dropped. The caches then hold the padding, so the next pushed frame starts a new
        stream (as after `reset`, counters kept).
        """
        padded = bool(self._frames)
        if padded:
            last = self._frames[-1][1]
            while len(self._frames) < self.frames_per_chunk(self.chunks):
                self._frames.append((-1, last))  # index -1: padding, never emitted
            self._own_model()
            self._run_chunk()
        if self._rows_busy():  # the stream batch's chunks in flight finish (the caches stay consistent)
            self._own_model()
            self._drain()
        if padded:
            self._new_stream()
        return self._take_ready()

    # --- internals ----------------------------------------------------------------
    def _apply_pending(self) -> None:
        if self._pending and self._rows_busy():
            new = self.config.replace(**self._pending)
            if (new.strength, new.steps, new.video) != self._schedule_key:
                self._own_model()
                self._drain()  # the chunks in flight finish under the schedule they began with
        if self._pending:
            self.config = self.config.replace(**self._pending)
            self._pending = {}
            if self.config.seed != self._seed:  # a new seed: the stream's noise from this chunk on
                self._generator = torch.Generator().manual_seed(self.config.seed)
                self._seed = self.config.seed
        c = self.config
        prompt_key = (c.prompt, c.prompt_blend, c.blend)
        if prompt_key != self._prompt_key:
            # Encoded once per prompt, never per chunk.
            prompts = [p for p, _ in c.prompt_blend] if c.prompt_blend else [c.prompt]
            emb = self.components.encode_text(prompts)  # (K, L, D)
            self._text = emb if not c.prompt_blend else blend_embeddings(emb, [w for _, w in c.prompt_blend], c.blend)
            self._text = self._text[:1].contiguous()  # (1, L, D)
            # A switch in the middle of a stream: its cache holds the old text's keys/values.
            switch = self._prompt_key is not None and self.chunks > 0
            self._recache_due = self.recache and switch
            if switch and not self.recache and not self._recache_available() and not self._told_no_recache:
                self._told_no_recache = True
                self._notice("prompt switch: the KV cache keeps the old prompt's keys/values until they leave the "
                             "window (no recache with this cache policy: it needs fixed sinks and clean records)")
            self._prompt_key = prompt_key
        schedule_key = (c.strength, c.steps, c.video)
        if schedule_key != self._schedule_key:
            comp = self.components
            previous = self._sigmas if self._schedule_key is not None else None
            self._sigmas = c.video.sigmas(c.strength, c.steps, comp.shift)  # host floats: no sync per chunk
            scale = float(comp.num_train_timesteps)
            # (steps, 1) model timesteps of the attend calls and (1,) the record call's 0, preallocated
            self._timesteps = torch.tensor([[s * scale] for s in self._sigmas], device=comp.device, dtype=comp.dtype)
            self._record_t = torch.zeros(1, device=comp.device, dtype=comp.dtype)
            # (K, 1, 1, 1, 1) each step row's sigma (stream batch)
            self._row_sigmas = torch.tensor(self._sigmas, device=comp.device, dtype=comp.dtype).view(-1, 1, 1, 1, 1)
            steps_changed = previous is not None and len(previous) != len(self._sigmas)
            self._schedule_key = schedule_key
            motion = c.video.motion_noise
            if motion is None or self._motion is None or self._motion.config != motion:
                self._motion = MotionNoise(motion, self._sigmas[0]) if motion is not None else None
            else:
                self._motion.set_init(self._sigmas[0])  # a new strength: the EMA goes on from it
            if steps_changed and c.video.kv_record == "steps" and self.chunks > 0:
                # one KV cache per step: a new number of steps starts a new KV stream (positions from 0)
                self.mechanism.reset()
                self._kv_chunk = 0
                self._notice(f"--steps changed to {len(self._sigmas)}: the KV cache (one per denoising step) "
                             "starts again from the next chunk")
            if len(self._row_chunk) != len(self._sigmas):
                self._row_chunk = [None] * len(self._sigmas)
                self._row_frames = [None] * len(self._sigmas)
                self._row_text = [None] * len(self._sigmas)

    @torch.no_grad()
    def _run_chunk(self) -> None:
        """Encode the buffered chunk, denoise it (with the stream batch: start it, and
        finish the chunk K - 1 calls ahead), record it, decode what finished; queue outputs."""
        comp = self.components
        indices = [i for i, _ in self._frames]
        vae_dtype = next(comp.vae.parameters()).dtype
        pixels = F.frames_to_tensor([f for _, f in self._frames], device=comp.device, dtype=vae_dtype)  # (n, 3, H, W)
        self._frames = []
        # the chunk's first sigma: its motion's (a device tensor, no sync) or the schedule's
        self._sigma0 = self._motion.step(pixels).to(comp.dtype) if self._motion is not None else self._sigmas[0]
        video = pixels.permute(1, 0, 2, 3).unsqueeze(0)  # (1, 3, n, H, W)
        groups, start = [], 0
        while start < video.shape[2]:  # the VAE's groups: frame 0 alone, then 4 per latent frame
            size = self.vae.frames_needed
            groups.append(self.vae.encode(video[:, :, start:start + size]))  # (1, 16, 1, h, w)
            start += size
        z0 = comp.normalize_latents(torch.cat(groups, dim=2)).to(comp.dtype)  # (1, 16, F, h, w)
        if self.config.video.stream_batch:
            for x0, done in self._batch_call(z0, indices):
                self._decode(x0, done)
        else:
            self._decode(self._denoise(z0), indices)
        self.chunks += 1

    def _decode(self, x0: torch.Tensor, indices: list[int]) -> None:
        """Decode a finished chunk's latents (1, 16, F, h, w) one latent frame at a time through
        the decoder's caches; queue its frames (index -1: padding, dropped)."""
        comp = self.components
        vae_dtype = next(comp.vae.parameters()).dtype
        latents = comp.denormalize_latents(x0).to(vae_dtype)  # (1, 16, F, h, w)
        decoded = torch.cat([self.decoder.decode(latents[:, :, i:i + 1]) for i in range(latents.shape[2])], dim=2)
        outputs = F.tensor_to_frames(decoded[0].permute(1, 0, 2, 3))  # n frames (H, W, 3)
        for index, frame in zip(indices, outputs):
            if index >= 0:
                self._ready.append((index, frame))

    def _chunk_noise(self, z0: torch.Tensor) -> torch.Tensor:
        """A chunk's noise in one draw, in a fixed order: (steps, 1, 16, F, h, w) on the CPU
        generator (the same numbers on every device), then moved."""
        comp = self.components
        noise = torch.randn((len(self._sigmas), *z0.shape), generator=self._generator)
        return noise.to(device=comp.device, dtype=comp.dtype)

    def _denoise(self, z0: torch.Tensor) -> torch.Tensor:
        """SDEdit-noise a chunk's latents, denoise them with the block-causal DiT, record them
        (`kv_record` "clean": one record call on the result; "steps": every step's call
        writes that step's cache).

        Args:
            z0: (1, 16, F, h, w) the chunk's normalised latents.
        Returns:
            (1, 16, F, h, w) the denoised latents.
        """
        comp, mech = self.components, self.mechanism
        if self._recache_due:
            self._recache()
        sigmas = (self._sigma0, *self._sigmas[1:])  # the first: the chunk's own with motion noise
        steps = self.config.video.kv_record == "steps"
        noise = self._chunk_noise(z0)
        x = (1 - sigmas[0]) * z0 + sigmas[0] * noise[0]
        x0 = x
        for k, sigma in enumerate(sigmas):
            if steps:
                mech.before_rows([self._kv_chunk], k, len(sigmas))  # step k's own cache
            else:
                mech.before_unet(ATTEND)
            timestep = self._timesteps[k] if k or self._motion is None else self._timestep_of(sigma).view(1)
            flow = mech.call_unet(comp.unet, x, timestep, self._text, ATTEND)  # v = noise - x0
            self.unet_calls += 1
            x0 = x - sigma * flow
            if k + 1 < len(sigmas):
                x = (1 - sigmas[k + 1]) * x0 + sigmas[k + 1] * noise[k + 1]
        self._kv_chunk += 1
        if not steps:
            mech.before_unet(RECORD)  # the clean chunk joins the cache at t = 0
            mech.call_unet(comp.unet, x0, self._record_t, self._text, RECORD)
            self.unet_calls += 1
            self._keep_clean(x0, mech.state.slot)
        return x0

    # --- the stream batch over denoising steps (StreamDiffusionV2) ---------------------
    def _rows_busy(self) -> bool:
        """A chunk is in flight in the stream batch."""
        return any(c is not None for c in self._row_chunk)

    def _batch_call(self, z0: torch.Tensor | None, indices: list[int] | None) -> list:
        """One stream-batch call: a new chunk enters step row 0 (None: drain), every chunk in
        flight takes one denoising step in one transformer call, and moves on a row.

        Row k holds chunk n - k at step k (StreamDiffusionV2's `inference_stream`): its input,
        its text (the prompt it began with; host-side, one tensor per prompt) and its noise,
        drawn as the sequential loop draws it, at arrival. Each row writes its step's KV cache (`BlockCausal.before_rows`).

        Args:
            z0: (1, 16, F, h, w) the new chunk's latents, or None.
            indices: its frame indices.
        Returns:
            [(x0 (1, 16, F, h, w), frame indices)] of the chunk that finished, or [].
        """
        comp, mech = self.components, self.mechanism
        k = len(self._sigmas)
        if z0 is not None:
            noise = self._chunk_noise(z0)  # (K, 1, 16, F, h, w)
            shape = (k, *z0.shape[1:])
            if self._rows_x is None or self._rows_x.shape != shape or self._rows_x.dtype != z0.dtype:
                self._rows_x = z0.new_zeros(shape)  # (K, 16, F, h, w) each row's input
                self._row_noise = z0.new_zeros((k, *shape))  # (K, K, 16, F, h, w) each row's chunk's noise
            self._rows_x[0] = ((1 - self._sigma0) * z0 + self._sigma0 * noise[0])[0]
            self._row_noise[0] = noise[:, 0]
            self._row_text[0] = self._text  # (1, L, D) the prompt it begins with
            self._row_chunk[0], self._row_frames[0] = self._kv_chunk, indices
            self._kv_chunk += 1
        active = [r for r in range(k) if self._row_chunk[r] is not None]
        if not active:
            return []
        lo, hi = active[0], active[-1] + 1  # contiguous: rows fill from 0 and drain towards K - 1
        mech.before_rows(self._row_chunk[lo:hi], lo, k)
        x = self._rows_x[lo:hi]  # (R, 16, F, h, w)
        texts = self._row_text[lo:hi]
        # one prompt in flight (the usual case): the same tensor every call, so the cross-attention
        # cache keeps its keys/values; a switch in flight: the rows' own texts side by side
        text = texts[0].expand(hi - lo, -1, -1) if all(t is texts[0] for t in texts) else torch.cat(texts)  # (R, L, D)
        sigmas, timesteps = self._row_sigmas[lo:hi], self._timesteps[lo:hi, 0]  # (R, 1, 1, 1, 1), (R,)
        if self._motion is not None and lo == 0:  # row 0: the new chunk at its own first sigma
            sigmas = torch.cat([self._sigma0.view(1, 1, 1, 1, 1), sigmas[1:]])
            timesteps = torch.cat([self._timestep_of(self._sigma0).view(1), timesteps[1:]])
        flow = mech.call_unet(comp.unet, x, timesteps, text, _rows_layout(hi - lo))
        self.unet_calls += 1
        x0 = x - sigmas * flow  # (R, 16, F, h, w)
        finished = [(x0[-1:], self._row_frames[k - 1])] if hi == k else []
        # Each chunk moves to the next step's row, re-noised with its own noise for that step
        # (from the last row, so no row is overwritten before it has moved).
        for r in range(min(hi, k - 1) - 1, lo - 1, -1):
            sigma = self._sigmas[r + 1]
            self._rows_x[r + 1] = (1 - sigma) * x0[r - lo] + sigma * self._row_noise[r, r + 1]
            self._row_noise[r + 1] = self._row_noise[r]
        self._row_chunk = [None] + self._row_chunk[:-1]
        self._row_text = [None] + self._row_text[:-1]
        self._row_frames = [None] + self._row_frames[:-1]
        return finished

    def _timestep_of(self, sigma: torch.Tensor) -> torch.Tensor:
        """The model timestep of a sigma: 1000 sigma, as every step's (a () device tensor in, () out)."""
        return sigma * float(self.components.num_train_timesteps)

    def _drain(self) -> None:
        """Finish every chunk in flight in the stream batch (no new chunk), decoding each."""
        with torch.no_grad():
            while self._rows_busy():
                for x0, done in self._batch_call(None, None):
                    self._decode(x0, done)

    def _notice(self, message: str) -> None:
        for callback in self.on_notice:
            callback(message)

    def _keep_clean(self, x0: torch.Tensor, slot: int) -> None:
        """Keep a recorded chunk's clean latents (1, 16, F, h, w) at its cache slot (for the recache)."""
        slots = self.mechanism.config.slots
        if self._clean is None or self._clean.shape[1:] != x0.shape or self._clean.dtype != x0.dtype:
            self._clean = x0.new_zeros(slots, *x0.shape)  # a stream's first chunk (or one of another size)
        self._clean[slot].copy_(x0)

    def _recache_available(self) -> bool:
        """`CausalVideoConfig.recache_available`, for the cache policy this pipeline runs."""
        return (getattr(self.mechanism.config, "sink_policy", "fixed") == "fixed"
                and self.config.video.kv_record == "clean")

    def _check_recache(self) -> None:
        if self.recache and not self._recache_available():
            raise ConfigError("the recache on a prompt switch needs the fixed sink policy and clean records "
                              "(--kv-record clean, no --video-stream-batch): pass recache=False (--no-recache)")

    def _recache(self) -> None:
        """LongLive's recache (module docstring): rebuild the KV cache under the new text.

        Before chunk n, the cached chunks are the sinks 0..min(S, n)-1 and the window
        max(S, n-W)..n-1 (`BlockCausalState.cached`). `BlockCausalState.rerecord` makes the
        next record calls those chunks, in order: each at its own positions and slot,
        attending to the cached chunks up to it (those recached before it, with the new
        text's keys/values) and itself; the state's counter does not move. Each is fed its
        clean latents, kept at its slot (`_keep_clean`). S + W calls, once per switch.
        """
        comp, mech = self.components, self.mechanism
        state = mech.state
        kept = state.rerecord()  # every cached chunk, once the stream's chunk n - 1 is committed
        for _ in kept:  # the state knows which chunk each call is (and its slot)
            mech.before_unet(RECORD)
            mech.call_unet(comp.unet, self._clean[state.slot], self._record_t, self._text, RECORD)
            self.unet_calls += 1
        self._recache_due = False

