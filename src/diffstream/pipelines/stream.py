"""The streaming img2img engine (StreamDiffusion), with pluggable temporal mechanisms.

    pipe = StreamPipeline(load_components(ModelConfig(model="tiny")), StreamConfig(prompt="..."))
    for frame in frames:
        out = pipe.push(frame)       # None until the stream batch has filled
        if out is not None: write(out)
    for out in pipe.flush(): write(out)

Per frame (Kodaira et al. 2023): VAE-encode, SDEdit-noise to the first step with the
slot's fixed noise (Live2Diff: the frame's own noise, `schedule.noise`), one UNet call for all in-flight frames (stream batch), guidance
(none / RCFG self / RCFG onetime / full CFG), consistency step, VAE-decode the frame
that finished. Output i always belongs to input i: the first n-1 pushes return None,
`flush()` runs the remaining steps of the tail, and a frame skipped by the similarity
filter repeats the output of the frame it resembled, in its own position.

Follows StreamDiffusion's `StreamDiffusion` class (cumulo-autumn/StreamDiffusion,
`src/streamdiffusion/pipeline.py`) in what it computes; deliberate deviations: RCFG is
the closed form of Sec. 3.3 (`schedule/guidance.py`) instead of the reference's
`stock_noise` recursion, and outputs are aligned 1:1 with inputs (the reference returns
a warm-up frame per early push).
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import numpy as np
import torch

from diffstream import frames as F
from diffstream.attention.base import BatchLayout, Mechanism, ProcessorLease, take_backend_notice
from diffstream.config import StreamConfig
from diffstream.errors import ConfigError
from diffstream.models.components import Components
from diffstream.pipelines.control import ControlStack, check_scales
from diffstream.pipelines.outputs import OrderedOutputs
from diffstream.pipelines.similarity import SimilarityFilter
from diffstream.schedule import guidance as G
from diffstream.schedule import noise as N
from diffstream.schedule.blend import blend_embeddings, blend_noise
from diffstream.schedule.stream_batch import StreamBatch, map_rows
from diffstream.schedule.timesteps import add_noise, denoise, eps_to_x0, make_step_table, model_output_to_eps


class StreamPipeline(OrderedOutputs):
    """Restyles a stream of frames; one instance per stream.

    Args:
        components: the loaded model (see `diffstream.models.loading.load_components`).
        config: the stream's settings.
        mechanism: a temporal-consistency mechanism; None is the per-frame baseline.
    Attributes:
        on_push, on_output: callbacks called with the frame index when a frame enters /
            leaves the pipeline (timing and metrics attach here, outside the hot path).
        frames_in, frames_out, unet_calls: counters.
    """

    def __init__(self, components: Components, config: StreamConfig, mechanism: Mechanism | None = None):
        self.components = components
        self.config = config
        self.mechanism = mechanism or Mechanism()
        self.controls = ControlStack(getattr(components, "controlnets", ()))
        check_scales(config.control_scales, len(self.controls))
        self._ip = getattr(components, "ip_adapter", None)
        self._ip_images: dict = {}  # image prompt -> (H, W, 3) uint8, read when first given
        self._ip_key = ()
        self._check_ip(config)
        self.on_push: list[Callable[[int], None]] = []
        self.on_output: list[Callable[[int], None]] = []
        # One-line notices for the user (not per frame): a compiled model building graphs
        # for batch shapes it has not run yet (`_notice_compiles`).
        self.on_notice: list[Callable[[str], None]] = []
        self._compile_noticed = False
        self._prompt_key = None
        self._schedule_key = None
        self._pending: dict = {}
        self.reset()

    # --- lifecycle ----------------------------------------------------------------
    def close(self) -> None:
        """Restore the UNet's original attention processors (if this stream's are on it)."""
        ProcessorLease.release(self.components.unet, self)

    def _own_unet(self) -> None:
        """Make sure this stream's processors are the ones installed on the shared UNet.

        Several streams may share one loaded model (the web server does); each installs
        its mechanism's processors when it runs and the previous holder's are restored
        first, so streams never see each other's processors. The record of the holder is
        kept on the UNet (`ProcessorLease`); with one stream this is an attribute lookup
        per frame. A backend that fell back as the processors went on (OpenVINO with a
        stateful mechanism: `attention.base.check_backend`) is told to `on_notice`.
        """
        ProcessorLease.acquire(self.components.unet, self, self.mechanism.attach)
        notice = take_backend_notice(self.components.unet)
        if notice is not None:
            for callback in self.on_notice:
                callback(notice)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def reset(self) -> None:
        """Start a new stream: drop in-flight frames, queued outputs and temporal state."""
        self._apply_pending()
        self._batch: StreamBatch | None = None
        self._latent_hw: tuple[int, int] | None = None
        self._ready: deque = deque()  # (index, frame) ready to return, in order
        self._done: dict[int, np.ndarray] = {}  # finished out of order (never, but cheap)
        self._skipped: set[int] = set()
        self._next_out = 0
        self._last_out: np.ndarray | None = None
        self._warm: list = []  # (index, latent, cond, noise) of warmup frames not yet denoised
        self._warmed = self.mechanism.warmup_frames == 0
        self._warm_uncond = 0  # unconditional slots the warmup filled (`_uncond_slots`)
        self.frames_in = 0
        self.frames_out = 0
        self.unet_calls = 0
        self._skipped_earlier = 0  # skips of filters replaced by an update since the reset
        self._filter = (
            SimilarityFilter(self.config.similarity_threshold, self.config.max_skip, seed=self.config.seed)
            if self.config.similarity_threshold is not None
            else None
        )
        self.mechanism.reset()

    @property
    def skipped(self) -> int:
        """Frames the similarity filter skipped since the last reset."""
        return self._skipped_earlier + (self._filter.skipped if self._filter is not None else 0)

    @property
    def latency_frames(self) -> int:
        """Pushes before the first output: n - 1 with stream batch, else 0."""
        return self.num_steps - 1 if self.config.stream_batch else 0

    @property
    def num_steps(self) -> int:
        return len(self._t_indices)

    def processing_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) at which an input of that size is processed."""
        return F.fit_size(width, height, self.config.size, self.components.size_multiple)

    def update(self, **changes) -> None:
        """Change settings (prompt, negative_prompt, strength, steps, t_index_list, seed,
        guidance, delta, cfg_type, noise, vae_encode, similarity_threshold, max_skip,
        control_scales, ip_adapter_image, ip_adapter_scale, prompt_blend, blend,
        seed_blend); they take effect from the next pushed frame. Invalid values raise
        ConfigError now, not at the next frame.

        Temporal state is kept, except where it cannot be: a new schedule (strength,
        steps, t_index_list) or, for Live2Diff, guidance that needs unconditional KV
        caches its warmup did not fill (cfg_type initialize/full after none/self) warms up
        again on the next W frames (their outputs arrive together, still one per input).
        """
        new = self.config.replace(**{**self._pending, **changes})
        new.t_indices(self.components.turbo)  # validates steps against strength
        check_scales(new.control_scales, len(self.controls))
        self._check_ip(new)
        self._pending.update(changes)

    def _check_ip(self, config: StreamConfig) -> None:
        """Read a new IP-Adapter image now, so a bad one fails in `update`, not at a frame."""
        image = config.ip_adapter_image
        if image is not None and self._ip is None:
            raise ConfigError("ip_adapter_image needs a model loaded with an IP-Adapter (--ip-adapter)")
        if image is not None and image not in self._ip_images:
            from diffstream.io.image_prompt import read_image_prompt

            self._ip_images = {image: read_image_prompt(image)}  # only the current one is kept

    # --- the stream API -------------------------------------------------------------
    def push(self, frame: np.ndarray) -> np.ndarray | None:
        """Feed one frame; return the oldest finished output frame, or None.

        Args:
            frame: (H, W, C) uint8 RGB/RGBA/gray image of any size.
        Returns:
            (h, w, 3) uint8 output at processing size, or None while the stream batch fills.
        """
        assert frame.ndim in (2, 3) and frame.shape[0] > 0 and frame.shape[1] > 0, f"{frame.shape=}"
        self._own_unet()
        if self._pending:
            self._apply_pending()
        index = self.frames_in
        self.frames_in += 1
        for callback in self.on_push:
            callback(index)
        frame = F.to_rgb(frame)
        frame = F.resize(frame, self.processing_size(frame.shape[1], frame.shape[0]))
        if self._filter is not None and self._filter.should_skip(frame):
            self._skipped.add(index)
        else:
            self._process(index, frame)
        self._collect()
        return self._pop()

    def flush(self) -> list[np.ndarray]:
        """Finish every in-flight frame and return all remaining outputs, in order."""
        self._own_unet()
        self._drain()
        self._collect()
        return self._take_ready()

    # --- internals ----------------------------------------------------------------
    def _notice_compiles(self, shape: torch.Size) -> None:
        """Tell `on_notice` once that the compiled UNet builds graphs for new batch shapes.

        A compiled model (`models.backends`, static shapes) builds its graphs the first
        time it meets each UNet batch shape: at a stream's first frames (the stream batch
        grows row by row) and after a change of steps, strength or guidance type. Those
        frames are slow (seconds to minutes); later ones, and any shape met before in this
        process, are not; the kernels are cached on disk for the next start. The shapes
        met are kept on the shared model, so streams sharing it are told only about
        shapes new to all of them; one notice per schedule, not one per shape.

        Args:
            shape: (B, C, h, w) the batch about to run.
        """
        seen = self.components.__dict__.setdefault("_compiled_shapes", set())
        key = tuple(shape)
        if key in seen:
            return
        seen.add(key)
        self._compile_noticed = True
        from diffstream.models.backends import cache_root

        message = (f"the {self.components.backend} backend is building graphs for a new batch shape "
                   f"({key[0]} rows of {key[2]}x{key[3]} latents): this and the next frames are slow, once "
                   f"per shape (kernels cached under {cache_root()})")
        for callback in self.on_notice:
            callback(message)

    def _apply_pending(self) -> None:
        if self._pending:
            old = self.config
            self.config = self.config.replace(**self._pending)
            self._pending = {}
            if self._filter is not None and (
                old.similarity_threshold != self.config.similarity_threshold or old.max_skip != self.config.max_skip
            ):
                self._skipped_earlier += self._filter.skipped  # a new filter counts from 0
                self._filter = None
            if self._filter is None and self.config.similarity_threshold is not None:
                self._filter = SimilarityFilter(
                    self.config.similarity_threshold, self.config.max_skip, seed=self.config.seed
                )
        c = self.config
        turbo = self.components.turbo
        prompt_key = (c.prompt, c.negative_prompt, c.prompt_blend, c.blend)
        if prompt_key != self._prompt_key:
            # Encoded once per prompt, not per frame: the reference re-encodes every frame.
            prompts = [p for p, _ in c.prompt_blend] if c.prompt_blend else [c.prompt]
            emb, pooled = self.components.encode_text([*prompts, c.negative_prompt])  # (K + 1, 77, D), (K + 1, P)
            self._uncond = emb[-1:]
            self._cond = (emb[:1] if not c.prompt_blend
                          else blend_embeddings(emb[:-1], [w for _, w in c.prompt_blend], c.blend))  # (1, 77, D)
            self._pooled = None
            if pooled is not None:  # SDXL: pooled text embeddings, blended like the hidden states
                pooled_c = (pooled[:1] if not c.prompt_blend else
                            blend_embeddings(pooled[:-1, None], [w for _, w in c.prompt_blend], c.blend)[:, 0])
                pooled_u = pooled[-1:]
                if not c.negative_prompt and self.components.force_zeros_for_empty_prompt:
                    # SDXL's pipelines: no negative prompt is zeros, not the encoding of "".
                    self._uncond, pooled_u = torch.zeros_like(self._uncond), torch.zeros_like(pooled_u)
                self._pooled = (pooled_c, pooled_u)  # (1, P) each
            self._emb_cache: dict = {}
            self._prompt_key = prompt_key
        schedule_key = (c.t_indices(turbo), c.size, c.resolved_noise)
        uncond = self._uncond_slots(c.resolved_cfg_type(turbo))
        rewarm = (bool(self.mechanism.warmup_frames) and getattr(self, "_warmed", False)
                  and uncond > getattr(self, "_warm_uncond", 0))
        if schedule_key != self._schedule_key or rewarm:
            self._compile_noticed = False  # new shapes may follow: say so once more
            if getattr(self, "_batch", None) is not None and self._batch.in_flight:
                self._drain()  # finish in-flight frames under the schedule they started with
            if (self._schedule_key is not None and self.mechanism.warmup_frames) or rewarm:
                # Live2Diff's caches hold keys/values of the old steps' noise levels: the
                # next frames warm up again, and so do they when guidance needs unconditional
                # caches the warmup did not fill. (A feature bank keeps its features; it
                # drops them itself when the number of step slots changes.)
                self.mechanism.reset()
                self._warmed = False
            self._t_indices = schedule_key[0]
            comp = self.components
            table = make_step_table(
                comp.alphas_cumprod,
                self._t_indices,
                sampler="x0" if turbo else "lcm",
                prediction_type=comp.prediction_type,
                num_train_timesteps=comp.num_train_timesteps,
            )
            self._table = table.to(device=comp.device, dtype=comp.dtype)
            self._batch = None  # rebuilt with fresh noise at the next frame
            self._layouts: dict = {}
            self._schedule_key = schedule_key
            self._seed = (c.seed, c.seed_blend)
        elif (c.seed, c.seed_blend) != self._seed:
            # A new seed only changes the fixed noise: in-flight frames keep going and
            # take the new noise at their remaining steps; nothing is reset.
            self._seed = (c.seed, c.seed_blend)
            if self._batch is not None and self._batch.noise is not None:
                self._batch.noise = self._slot_noise(tuple(self._batch.noise.shape[-2:]))
        self._cfg_type = c.resolved_cfg_type(turbo)
        self._guidance = c.resolved_guidance
        # Read at every UNet call: in-flight frames take new scales at their remaining steps,
        # like a new prompt; nothing else is reset.
        self._control_scales = check_scales(c.control_scales, len(self.controls))
        if self._ip is not None and c.ip_adapter_image != self._ip_key:
            # Encoded once per image prompt; without an image the adapter is off (scale 0).
            image = None if c.ip_adapter_image is None else self._ip_images[c.ip_adapter_image]
            self._ip_pos, self._ip_neg = self._ip.embeds(image)  # (1, 1, ...) each
            self._ip_rows: dict = {}
            self._ip_key = c.ip_adapter_image
        self._ip_scale = c.ip_adapter_scale if c.ip_adapter_image is not None else 0.0

    @staticmethod
    def _uncond_slots(cfg_type: str) -> int:
        """How many unconditional step slots a guidance type runs: 0 (none, self), 1
        (initialize: the first step) or 2 (full: every step); ordered by inclusion."""
        return {"initialize": 1, "full": 2}.get(cfg_type, 0)

    def _ensure_batch(self, latent_hw: tuple[int, int]) -> StreamBatch:
        if self._batch is not None and self._latent_hw == latent_hw:
            return self._batch
        if self._batch is not None and self._batch.in_flight:
            self._drain()
        fixed = self.config.resolved_noise == "fixed"
        self._batch = StreamBatch(self._table, self._slot_noise(latent_hw) if fixed else None)
        self._latent_hw = latent_hw
        return self._batch

    def _slot_noise(self, latent_hw: tuple[int, int]) -> torch.Tensor:
        """Fixed noise per step slot (num_steps, C, h, w), drawn on the CPU from the seed so
        every device gets the same numbers."""
        comp = self.components
        return self._seeded(lambda seed: N.slot_noise(seed, self.num_steps, (comp.latent_channels, *latent_hw),
                                                      device=comp.device, dtype=comp.dtype))

    def _seeded(self, draw) -> torch.Tensor:
        """`draw(seed)` for the stream's seed, or the unit-variance mix of its seed blend's."""
        blend = self.config.seed_blend
        if not blend:
            return draw(self.config.seed)
        return blend_noise([draw(seed) for seed, _ in blend], [w for _, w in blend])

    def _frame_noise(self, index: int, latent_hw: tuple[int, int]) -> torch.Tensor | None:
        """Frame `index`'s own noise (num_steps, C, h, w) in per-frame mode, else None."""
        if self.config.resolved_noise == "fixed":
            return None
        comp = self.components
        return self._seeded(lambda seed: N.frame_noise(seed, index, self.num_steps,
                                                       (comp.latent_channels, *latent_hw),
                                                       device=comp.device, dtype=comp.dtype))

    def _process(self, index: int, frame: np.ndarray) -> None:
        comp = self.components
        pixels = F.frames_to_tensor(frame, device=comp.device, dtype=comp.dtype)  # (1, 3, H, W)
        # The posterior mean by default (deterministic); a sample per frame on request,
        # drawn from (seed, frame) as the references draw a new one every frame.
        sampler = N.frame_generator(self.config.seed, index, 1) if self.config.vae_encode == "sample" else None
        z0 = comp.encode_image(pixels, generator=sampler)  # (1, C, h, w)
        # (mechanism's conditioning, ControlNet condition images (1, K, 3, H, W)): both travel
        # with the frame through the stream batch.
        cond = (self.mechanism.condition(pixels), self.controls.maps(frame, pixels))
        noise = self._frame_noise(index, tuple(z0.shape[-2:]))
        if not self._warmed:
            self._warm.append((index, z0, cond, noise))
            if len(self._warm) == self.mechanism.warmup_frames:
                self._warmup()
            return
        batch = self._ensure_batch(tuple(z0.shape[-2:]))
        batch.admit(z0, index, cond, noise)
        if self.config.stream_batch:
            self._emit(self._step(batch))
        else:
            while batch.in_flight:
                self._emit(self._step(batch))

    def _drain(self) -> None:
        if self._warm:  # a stream shorter than the warmup: denoise what there is, together
            self._warmup()
        batch = self._batch
        while batch is not None and batch.in_flight:
            self._emit(self._step(batch))

    def _embeddings(self, key: tuple, builder) -> torch.Tensor:
        emb = self._emb_cache.get(key)
        if emb is None:
            emb = self._emb_cache[key] = builder()
        return emb

    def _layout(self, key: tuple, steps: tuple, branches: tuple, phase: str) -> BatchLayout:
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = BatchLayout(steps, branches, self.num_steps, phase)
        return layout

    def _guided_eps(self, x, rows, ref, first: int, steps: tuple, phase: str = "stream", cond=None):
        """One UNet call and guidance for rows `x`.

        Args:
            x: (m, C, h, w) noisy latents; rows: their coefficients (m or 1, 1, 1, 1).
            ref: (m, C, h, w) RCFG reference latents.
            first: how many leading rows are at their first step (they get the real
                unconditional pass of onetime-negative RCFG).
            steps: step index of each row.
            cond: the rows' per-frame conditioning, (mechanism's (m, ...) or None,
                ControlNet condition images (m, K, 3, H, W) or None).
        Returns:
            (eps (m, C, h, w), new reference latents for the first `first` rows or None).
        """
        m = x.shape[0]
        cfg = self._cfg_type
        u = first if cfg == "initialize" else (m if cfg == "full" else 0)  # unconditional rows
        t = rows.timesteps.expand(m) if rows.timesteps.shape[0] != m else rows.timesteps
        key = (cfg, u, m, steps, phase)
        if u:
            x_in = torch.cat([x[:u], x])  # (u + m, C, h, w): unconditional rows first
            t_in = torch.cat([t[:u], t])
            emb = self._embeddings(key, lambda: torch.cat([self._uncond.expand(u, -1, -1), self._cond.expand(m, -1, -1)]))
        else:
            x_in, t_in = x, t
            emb = self._embeddings(key, lambda: self._cond.expand(m, -1, -1).contiguous())
        layout = self._layout(key, steps[:u] + steps, ("uncond",) * u + ("cond",) * m, phase)

        if u:  # the unconditional rows see the same frames' conditioning
            cond = map_rows(lambda c: torch.cat([c[:u], c]), cond)
        mechanism_cond, control_maps = cond if cond is not None else (None, None)
        added = {}  # the UNet's added conditioning: SDXL's pooled text and size ids, IP-Adapter images
        if self._pooled is not None:
            added.update(self._embeddings(key + ("sdxl", *x.shape[-2:]), lambda: self._sdxl_rows(u, m, x.shape[-2:])))
        extra = ({} if control_maps is None else self.controls.residuals(
            x_in, t_in, emb, control_maps, self._control_scales, added_cond_kwargs=dict(added) or None))
        if self._ip is not None:
            added["image_embeds"] = [self._ip_embeds(u, m)]
        if added:
            extra["added_cond_kwargs"] = added
        if not self._compile_noticed and self.components.backend != "eager":
            self._notice_compiles(x_in.shape)
        self.mechanism.before_unet(layout)
        out = self.mechanism.call_unet(self.components.unet, x_in, t_in, emb, layout, mechanism_cond, **extra)
        self.mechanism.after_unet(layout)
        self.unet_calls += 1

        a, b, ptype = rows.alpha_sqrt, rows.beta_sqrt, rows.prediction_type
        eps = model_output_to_eps(out[u:], x, a, b, ptype)
        new_ref = None
        if cfg == "full":
            eps = G.cfg(eps, model_output_to_eps(out[:u], x, a, b, ptype), self._guidance)
        elif cfg in ("self", "initialize"):
            if u:
                au, bu = (a[:u], b[:u]) if a.shape[0] == m else (a, b)
                eps_u = model_output_to_eps(out[:u], x[:u], au, bu, ptype)
                # Onetime-negative RCFG: the real unconditional prediction fixes x0_ref
                # for all later steps of these frames.
                new_ref = eps_to_x0(eps_u, x[:u], au, bu)
                ref = torch.cat([new_ref, ref[u:]])
            residual = G.virtual_residual_noise(x, ref, a, b)
            eps = G.residual_cfg(eps, residual, self._guidance, self.config.delta)
        return eps, new_ref

    def _sdxl_rows(self, u: int, m: int, latent_hw) -> dict:
        """SDXL's added conditioning of a call's rows (diffusers' layout: unconditional rows
        first): pooled text embeddings (u + m, P) and size ids (u + m, 6) of the processing size."""
        pooled_c, pooled_u = self._pooled
        scale = self.components.vae_scale_factor
        ids = self.components.time_ids(latent_hw[0] * scale, latent_hw[1] * scale)  # (1, 6)
        return {"text_embeds": torch.cat([pooled_u.expand(u, -1), pooled_c.expand(m, -1)]),
                "time_ids": ids.expand(u + m, -1)}

    def _ip_embeds(self, u: int, m: int) -> torch.Tensor:
        """The IP-Adapter image embeddings of a call's rows: the negative for the `u`
        unconditional rows, the positive for the `m` conditional ones ((u + m, 1, ...)),
        as diffusers' pipelines lay them out; and this stream's scale on the UNet, which
        other streams of a shared model may have changed (set only when it differs)."""
        unet = self.components.unet
        if getattr(unet, "_diffstream_ip_scale", None) != self._ip_scale:
            from diffstream.models.ip_adapter import set_scale

            set_scale(unet, self._ip_scale)
            unet._diffstream_ip_scale = self._ip_scale
        rows = self._ip_rows.get((u, m))
        if rows is None:
            neg, pos = self._ip_neg, self._ip_pos
            rows = self._ip_rows[(u, m)] = torch.cat([neg.expand(u, *neg.shape[1:]), pos.expand(m, *pos.shape[1:])])
        return rows

    @torch.no_grad()
    def _step(self, batch: StreamBatch):
        """One UNet call that advances every in-flight frame by one step."""
        x = batch.x  # (m, C, h, w), newest frame first
        rows = batch.rows()  # coefficients, (m, 1, 1, 1)
        eps, new_ref = self._guided_eps(x, rows, batch.ref, first=int(batch.lo == 0), steps=tuple(batch.steps()),
                                        cond=batch.cond)
        if new_ref is not None:
            batch.set_newest_ref(new_ref)
        return batch.advance(denoise(eps, x, rows))

    @torch.no_grad()
    def _warmup(self) -> None:
        """Denoise the buffered warmup frames together, through every step (Live2Diff's
        warmup stage, Sec. 3.4): the mechanism sees phase "warmup" and one video of W frames."""
        indices = [i for i, _, _, _ in self._warm]
        z0 = torch.cat([z for _, z, _, _ in self._warm])  # (W, C, h, w)
        cond = map_rows(lambda *c: torch.cat(c), *[c for _, _, c, _ in self._warm])  # (W, ...) per part
        batch = self._ensure_batch(tuple(z0.shape[-2:]))
        if batch.noise is not None:  # the stream's slot noise, every frame: (n, 1, C, h, w)
            noise = batch.noise[:, None]
        else:  # each frame's own: (n, W, C, h, w)
            noise = torch.stack([fn for _, _, _, fn in self._warm], dim=1)
        self._warm = []
        table, n = self._table, self.num_steps
        rows = table.rows(0, 1)
        x = add_noise(z0, noise[0], rows.alpha_sqrt, rows.beta_sqrt)
        ref = z0
        for k in range(n):
            rows = table.rows(k, k + 1)
            eps, new_ref = self._guided_eps(x, rows, ref, first=len(indices) if k == 0 else 0,
                                            steps=(k,) * len(indices), phase="warmup", cond=cond)
            if new_ref is not None:
                ref = new_ref
            x = denoise(eps, x, rows)
            if k + 1 < n:
                nxt = table.rows(k + 1, k + 2)
                x = add_noise(x, noise[k + 1], nxt.alpha_sqrt, nxt.beta_sqrt)
        for i, index in enumerate(indices):
            self._emit((index, x[i : i + 1]))
        self._warmed = True
        self._warm_uncond = self._uncond_slots(self._cfg_type)

    def _emit(self, finished) -> None:
        if finished is None:
            return
        index, latent = finished
        pixels = self.components.decode_latents(latent)  # (1, 3, H, W)
        self._done[index] = F.tensor_to_frames(pixels)[0]

    def _collect(self) -> None:
        """Move outputs that are next in input order to the ready queue."""
        while True:
            i = self._next_out
            if i in self._done:
                frame = self._done.pop(i)
            elif i in self._skipped and (self._last_out is not None):
                # A skipped frame repeats the output of the last processed frame before it,
                # which is exactly the previous output in order.
                self._skipped.discard(i)
                frame = self._last_out
            else:
                return
            self._last_out = frame
            self._ready.append((i, frame))
            self._next_out += 1
