"""FateZero video editing: DDIM inversion with an attention store, then fused editing.

Qi et al., "FateZero: Fusing Attentions for Zero-shot Text-based Video Editing" (ICCV
2023). For a clip and a source prompt describing it:

1. the frames are encoded and inverted with DDIM under the source prompt at guidance
   1 (Sec. 3.1, Eq. 3), keeping what attention saw at each step (Eq. 4) and z_T;
2. from z_T, DDIM denoises under the target prompt with classifier-free guidance
   (7.5), fusing the inversion's attention into the conditional branch during the
   fusion interval (Eq. 5-7, `diffstream.attention.fatezero`);
3. every UNet call uses spatial-temporal self-attention to a reference frame (Eq. 8).

Windows. The UNet batch and the store grow with the number of frames, so a clip is
edited in windows of `window` frames (8, the paper's clip length). Each window's batch
also carries the reference frame when it lies outside the window. With the "middle"
or "first" reference this is exact, not an approximation: a frame's computation
depends only on itself and the reference frame (Eq. 8 is the only place frames meet;
every other UNet operation is per frame), and the reference frame depends only on
itself, so each window recomputes the very same reference trajectory and every frame
comes out as if the whole clip had been one batch (up to floating-point summation
order, which depends on the batch size: within one grey level in the tests). With the
"previous" reference, frame i depends on the whole chain before it; a window then
starts with the previous window's last frame as context, whose own reference is
itself, so consistency across a window boundary is carried by one overlapping frame
and is approximate.

Video models (shape edits, Sec. 4 of the paper; `--video-model`, `models.video_unet`):
with a Tune-A-Video-style video UNet tuned one-shot on the clip, each branch group of a
call is one clip of the window's rows (`FateZeroEditor._unet`), the spatial layers keep
FateZero's processors and the motion modules their own. Its temporal layers see only the
rows of one UNet call: within a window they are exact, but across windows frames never
meet in them. A clip longer than `window` is therefore not what the model was tuned on
(its temporal attention saw one clip of --max-frames frames); each later window's call
also carries frame 0 and the previous window's last frame (with previous+first frame
attention), which its temporal layers attend to like any other row (they are
position-free, so the row order does not matter to them). Keep `window` at the tuned
clip length; longer clips are edited window by window, joined by those carried frames.

Memory. Only what the fusion schedule reads is stored (see `FusionPlan`): attention
inputs (in the model's dtype by default) (not maps) of the fused layers at the fused steps, and one reduced
blend map per step when blending, in an `AttentionStore` that keeps `store_budget`
bytes in RAM and spills the rest to a memory-mapped file. `fusion_source="recompute"` stores
no attention at all: at each fused step it re-runs the UNet on the stored inversion
latent of that step, which reproduces the inversion's attention exactly, for one
extra UNet call of the frames per fused step.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from diffstream.attention.base import BatchLayout, ProcessorLease
from diffstream.attention.fatezero import (
    FateZero,
    FateZeroConfig,
    FusionPlan,
    TokenFusion,
    probe_layers,
)
from diffstream.attention.store import AttentionStore, format_bytes
from diffstream.errors import ConfigError, InputError, ModelLoadError, OutputError
from diffstream.models.video_unet import video_model_id
from diffstream.schedule.ddim import (
    DDIMSchedule,
    ddim_inversion_step,
    ddim_schedule_from_config,
    ddim_step,
)
from diffstream.schedule.guidance import cfg
from diffstream.schedule.timesteps import model_output_to_eps

FUSION_SOURCES = ("store", "recompute")
STORE_DTYPES = {"model": None, "fp16": torch.float16, "fp32": torch.float32}  # None: the model's own dtype
P2P_MODES = ("auto", "replace", "refine")
# FateZero's shape edits with a tuned video model (reference config/shape/swan_duck_flamingo.yaml,
# edit 1, swan -> duck: cross_replace_steps 0.0, self_replace_steps 0.5, blend_th [0.2, 0.2]; its
# model_config sets no SparseCausalAttention_index or least_sc_channel, so every layer attends
# to the previous and the first frame, the default [-1, 'first'] of video_diffusion/models/
# attention.py). The defaults of `edit --video-model`; explicit options win.
SPARSE_CAUSAL = dict(reference_frame="previous", frame_attention="previous+first", cross_frame_min_downsample=1)
SHAPE_EDIT = dict(cross_replace=0.0, self_replace=0.5, blend_threshold=0.2, **SPARSE_CAUSAL)
INVERSION_FORMAT = "diffstream-fatezero-inversion"
INVERSION_VERSION = 1
DEFAULT_STORE_BUDGET = 4 * 2**30


@dataclass(frozen=True)
class FateZeroEditConfig:
    """One FateZero edit.

    Attributes:
        source_prompt: text describing the input clip (inverted under it).
        prompt: the target text.
        guidance: classifier-free guidance of the editing pass (paper: 7.5).
        negative_prompt: unconditional text of the guidance.
        blend_words: (source words, target words) of the edited object: the blend mask
            of Eqs. 6-7 comes from the source words' inversion cross-attention; the
            target words are checked against the target prompt. None: self-attention
            maps are replaced outright (style / attribute edits).
        reweight: (target word, factor) pairs: Prompt-to-Prompt re-weighting of those
            words' cross-attention during fusion.
        word_replace: (target word, fraction) pairs: Prompt-to-Prompt's per-word
            cross-attention replacement schedule: that word's maps are fused for the
            first int(steps * fraction) editing steps instead of `cross_replace`'s.
        window: frames per window (the paper edits 8-frame clips).
        store_budget: bytes of attention store kept in RAM (None: no limit); the rest
            is memory-mapped on disk.
        store_dtype: storage of attention inputs: "model" (default: the model's dtype, so
            fused maps are recomputed from exactly the inputs the inversion saw), "fp16"
            (half the bytes of an fp32 model, maps from rounded inputs) or "fp32".
        p2p: cross-attention fusion of Prompt-to-Prompt: "replace" (word swap,
            `AttentionReplace`: target token j takes source token j's map, prompts of
            equal token count), "refine" (`AttentionRefine`: tokens aligned by the
            longest common subsequence take their source map, new tokens keep their
            own) or "auto" (replace when both prompts have the same token count, as
            Prompt-to-Prompt's word swap; refine otherwise).
        fusion_source: "store" (keep the inversion's attention) or "recompute"
            (keep the inversion latents, recompute its attention at each fused step).
        spill_dir: folder for the store's spill file (None: the system temp folder).
        fatezero: attention-fusion settings.
    """

    source_prompt: str
    prompt: str
    guidance: float = 7.5
    negative_prompt: str = ""
    blend_words: tuple[str, str] | None = None
    reweight: tuple[tuple[str, float], ...] = ()
    word_replace: tuple[tuple[str, float], ...] = ()
    window: int = 8
    store_budget: int | None = DEFAULT_STORE_BUDGET
    store_dtype: str = "model"
    p2p: str = "auto"
    fusion_source: str = "store"
    spill_dir: str | None = None
    fatezero: FateZeroConfig = field(default_factory=FateZeroConfig)

    def __post_init__(self):
        if not str(self.source_prompt).strip():
            raise ConfigError("--source-prompt is required for --method fatezero: describe the input clip "
                              "(e.g. \"a black swan swimming in a river\")")
        if not str(self.prompt).strip():
            raise ConfigError("--prompt is required: the target text of the edit")
        if float(self.guidance) < 1.0:
            raise ConfigError(f"--guidance must be >= 1, got {self.guidance}")
        if int(self.window) < 1:
            raise ConfigError(f"--fz-window must be at least 1 frame, got {self.window}")
        if self.store_dtype not in STORE_DTYPES:
            raise ConfigError(f"--store-dtype must be one of {', '.join(STORE_DTYPES)}, got {self.store_dtype!r}")
        if self.p2p not in P2P_MODES:
            raise ConfigError(f"--p2p must be one of {', '.join(P2P_MODES)}, got {self.p2p!r}")
        if self.fusion_source not in FUSION_SOURCES:
            raise ConfigError(f"--fusion-source must be one of {', '.join(FUSION_SOURCES)}, got {self.fusion_source!r}")
        if self.blend_words is not None:
            if len(self.blend_words) != 2 or not all(str(w).strip() for w in self.blend_words):
                raise ConfigError("--blend-words takes two non-empty arguments: SOURCE_WORDS TARGET_WORDS")
            _check_words(self.source_prompt, self.blend_words[0], "--blend-words", "--source-prompt")
            _check_words(self.prompt, self.blend_words[1], "--blend-words", "--prompt")
        for word, value in self.reweight:
            _check_words(self.prompt, word, "--fz-reweight", "--prompt")
            if not float(value) > 0:
                raise ConfigError(f"--fz-reweight factors must be positive, got {word}={value}")
        for word, value in self.word_replace:
            _check_words(self.prompt, word, "--cross-replace-word", "--prompt")
            if not 0.0 <= float(value) <= 1.0:
                raise ConfigError(f"--cross-replace-word fractions must be in [0, 1], got {word}={value}")

    def replace(self, **changes) -> "FateZeroEditConfig":
        return replace(self, **changes)


def _words(text: str) -> list[str]:
    return [w.strip(".,;:!?\"'()[]").lower() for w in str(text).split()]


def _check_words(prompt: str, words: str, option: str, prompt_option: str) -> None:
    """Word-level check before any model loads (the token-level check follows with the tokenizer)."""
    have, want = _words(prompt), [w for w in _words(words) if w]
    for start in range(len(have) - len(want) + 1):
        if have[start : start + len(want)] == want:
            return
    raise ConfigError(f"{option}: {words!r} does not occur in {prompt_option} {prompt!r}")


def build_token_fusion(tokenizer, config: FateZeroEditConfig) -> TokenFusion:
    """Token alignment, re-weighting and blend columns of the two prompts."""
    from diffstream.pipelines.prompt_align import align_prompts, prompt_length, reweighting, word_positions

    same = prompt_length(tokenizer, config.source_prompt) == prompt_length(tokenizer, config.prompt)
    if config.p2p == "replace" and not same:
        raise ConfigError(f"--p2p replace swaps words token for token: the prompts have "
                          f"{prompt_length(tokenizer, config.source_prompt)} and {prompt_length(tokenizer, config.prompt)}"
                          f" tokens; use --p2p refine")
    if config.p2p == "replace" or (config.p2p == "auto" and same):
        # Word swap (Hertz et al. Sec. 3.2; the reference's AttentionReplace): every target
        # position, the swapped word included, takes the source map at the same position.
        mapper = list(range(tokenizer.model_max_length))
    else:
        mapper = align_prompts(tokenizer, config.source_prompt, config.prompt)
    weights = tuple(reweighting(tokenizer, config.prompt, config.reweight)) if config.reweight else ()
    blend = ()
    if config.blend_words is not None:
        blend = tuple(word_positions(tokenizer, config.source_prompt, config.blend_words[0]))
        word_positions(tokenizer, config.prompt, config.blend_words[1])  # must exist too
    word_steps = ()
    if config.word_replace:
        fz = config.fatezero
        steps = [len(fz.cross_steps)] * tokenizer.model_max_length
        for words, fraction in config.word_replace:
            for pos in word_positions(tokenizer, config.prompt, words):
                steps[pos] = len(replace(fz, cross_replace=float(fraction)).cross_steps)
        word_steps = tuple(steps)
    return TokenFusion(mapper=tuple(mapper), weights=weights, blend_columns=blend, word_steps=word_steps)


def resolve_store_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The store's dtype for `--store-dtype name` on a model of `model_dtype` ("model":
    the model's own when the store can keep it (fp16/fp32), else fp32)."""
    dtype = STORE_DTYPES[name]
    if dtype is None:
        dtype = model_dtype if model_dtype in (torch.float16, torch.float32) else torch.float32
    return dtype


# --- windows -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """One UNet batch of a clip.

    Attributes:
        index: window number.
        rows: clip frame index of each batch row.
        ref_rows: Eq. 8 reference row of each row.
        out_rows: the rows whose edited frames this window outputs (in clip order).
    """

    index: int
    rows: tuple[int, ...]
    ref_rows: tuple[int, ...]
    out_rows: tuple[int, ...]

    @property
    def frames(self) -> tuple[int, ...]:
        """Clip frame indices this window outputs."""
        return tuple(self.rows[i] for i in self.out_rows)


def reference_index(num_frames: int, reference: str) -> int | None:
    """Clip index of Eq. 8's shared reference frame: the middle (round(n/2) of frames
    1..n, i.e. (n-1)//2 from 0, as the reference code) or the first; None for "previous"."""
    if reference == "middle":
        return (num_frames - 1) // 2
    if reference == "first":
        return 0
    return None


def plan_windows(num_frames: int, window: int, reference: str, first: bool = False) -> list[Window]:
    """Split a clip into windows that share the reference frame (see the module doc).
    `first` (frame attention "previous+first", reference "previous"): every window's row
    0 is clip frame 0, the second frame each row attends to."""
    if num_frames < 1:
        raise ValueError("a clip needs at least one frame")
    ref = reference_index(num_frames, reference)
    windows = []
    for index, start in enumerate(range(0, num_frames, window)):
        own = list(range(start, min(num_frames, start + window)))
        if ref is not None:
            rows = own + ([ref] if ref not in own else [])
            refs = [rows.index(ref)] * len(rows)
            out = list(range(len(own)))
        else:  # previous frame; a window after the first starts with one context frame
            rows = ([start - 1] if start > 0 else []) + own
            if first and start > 0:
                rows = [0] + [r for r in rows if r != 0]
            # the previous frame's row; frame 0 and the context frame attend to themselves
            refs = [rows.index(f - 1) if i > 0 and f - 1 in rows else i for i, f in enumerate(rows)]
            out = list(range(len(rows) - len(own), len(rows)))
        windows.append(Window(index, tuple(rows), tuple(refs), tuple(out)))
    return windows


# --- the editor --------------------------------------------------------------------------
class FateZeroEditor:
    """Inversion and editing of one batch of frames (a window) on loaded components.

    Args:
        components: `diffstream.models.components.Components`.
        config: the edit.
        latent_hw: (h, w) of the latents (frame size / 8).
    """

    def __init__(self, components, config: FateZeroEditConfig, latent_hw: tuple[int, int]):
        if getattr(components, "is_sdxl", False):
            raise ModelLoadError(f"--method fatezero runs SD 1.x/2.x checkpoints; {components.name!r} is SDXL: pass "
                                 f"an SD 1.x/2.x model, or stream it with diffstream run")
        self.components = components
        self.config = config
        self.latent_hw = tuple(latent_hw)
        self.video = components.is_video_unet  # a Tune-A-Video-style video UNet: clips per call
        fz = config.fatezero
        self.schedule: DDIMSchedule = ddim_schedule_from_config(
            components.scheduler.config, components.alphas_cumprod, fz.steps
        )
        tokenizer = components.tokenizer
        self.layers = probe_layers(components.unet, self.latent_hw, text_tokens=tokenizer.model_max_length)
        texts = components.encode_prompt([config.source_prompt, config.prompt, config.negative_prompt])
        self.source_text, self.target_text, self.uncond_text = texts[0:1], texts[1:2], texts[2:3]
        self.fusion = build_token_fusion(tokenizer, config)
        self.mechanism = FateZero(fz, self.layers, self.fusion, self.source_text)
        self.plan: FusionPlan = self.mechanism.plan
        self.store_dtype = resolve_store_dtype(config.store_dtype, components.dtype)
        self._layouts: dict = {}  # (phase, step, branches, ref_rows) -> BatchLayout

    def _layout(self, phase: str, step: int, ref_rows, branches: tuple[str, ...] = ("source",)) -> BatchLayout:
        """The layout of one UNet call: `branches` groups of the window's rows (branch-major),
        built once per phase, step and window shape. One group of rows is the inversion
        (or its recomputation, or the reconstruction) under the source prompt; editing with
        guidance is ("uncond", "cond"), whose last group is the fused one."""
        key = (phase, step, branches, tuple(ref_rows))
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = BatchLayout.branch_major(
                phase, step, branches, len(key[3]), self.num_steps, refs=key[3],
                fused_group=len(branches) - 1 if phase == "fuse" else None,
            )
        return layout

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    def check_rows(self, rows: int) -> None:
        """Refuse windows a video UNet cannot take in one call (its motion modules hold at
        most `motion_max_seq_length` frames). ConfigError, one line."""
        if self.video and rows > int(self.components.unet.config.motion_max_seq_length):
            raise ConfigError(f"--fz-window: a window of {rows} rows is longer than the video model takes in one "
                              f"call ({self.components.unet.config.motion_max_seq_length} frames): use a shorter "
                              f"--fz-window")

    def new_store(self) -> AttentionStore:
        """An empty store with this edit's budget, dtype and spill folder."""
        return AttentionStore(self.config.store_budget, self.store_dtype, self.config.spill_dir)

    def store_bytes(self, rows: int) -> int:
        """Planned attention-store bytes of a window of `rows` frames."""
        if self.config.fusion_source == "recompute":
            return 0
        return self.plan.store_bytes(rows, torch.tensor([], dtype=self.store_dtype).element_size())

    def latent_keys(self) -> list[int]:
        """Inversion latents the editing pass reads: z_T, plus (recompute) the input of
        every fused step. Index i is the latent after i inversion steps."""
        n = self.num_steps
        keys = {n}
        if self.config.fusion_source == "recompute":
            keys |= {n - 1 - k for k in self.plan.fused_steps}
        return sorted(keys)

    def required_keys(self) -> set:
        """Every store key the editing pass will read."""
        keys = {("latent", "z", i) for i in self.latent_keys()}
        if self.config.fusion_source == "store":
            for step in range(self.num_steps):
                keys |= {(kind, name, step) for kind, name in self.plan.keys_at(step)}
        return keys

    def _unet(self, x: torch.Tensor, t: int, text: torch.Tensor) -> torch.Tensor:
        """One UNet call on the rows of the current layout. x (B, C, h, w), text (B, T, D).

        A video UNet (a Tune-A-Video-style UNetMotionModel, `--video-model`) gets each
        branch group of R rows as one clip of R frames, in row order: (G, C, R, h, w), the
        text once per frame (rows are branch-major, so (g, r) is row g*R + r, the order
        UNetMotionModel folds frames into). Its temporal layers see those R frames and no
        others (see the module docstring on windows).
        """
        unet = self.components.unet
        if not self.video:
            return unet(x, t, encoder_hidden_states=text).sample
        call = self.mechanism.state.call
        groups, rows = call.groups, call.rows
        b, c, h, w = x.shape
        assert b == groups * rows, f"{x.shape=} {groups=} {rows=}"
        clips = x.view(groups, rows, c, h, w).transpose(1, 2)  # (G, C, R, h, w)
        out = unet(clips, t, encoder_hidden_states=text).sample  # (G, C, R, h, w)
        return out.transpose(1, 2).reshape(b, c, h, w)  # (G*R, C, h, w), rows in order

    def _eps(self, x: torch.Tensor, k: int, text: torch.Tensor, abar_in) -> torch.Tensor:
        """Noise prediction at step k for latents `x` at level `abar_in`. x (B, C, h, w), text (B, T, D)."""
        t = int(self.schedule.timesteps[k])
        out = self._unet(x, t, text)
        a = torch.as_tensor(abar_in, dtype=torch.float32)
        return model_output_to_eps(out, x, a.sqrt().to(x.dtype), (1 - a).sqrt().to(x.dtype),
                                   self.components.prediction_type)

    @torch.no_grad()
    def invert(self, z0: torch.Tensor, ref_rows, store: AttentionStore, progress: Callable | None = None):
        """DDIM inversion under the source prompt at guidance 1 (Eqs. 3-4).

        Args:
            z0: (R, C, h, w) clean latents of the window's rows.
            ref_rows: Eq. 8 reference row of each row.
            store: receives the attention entries of the plan (fusion source "store")
                and the latents the editing pass reads.
            progress: called once per step.
        Returns:
            (R, C, h, w) z_T.
        """
        n, sched = self.num_steps, self.schedule
        text = self.source_text.expand(z0.shape[0], -1, -1)
        keep = set(self.latent_keys())
        store_attention = self.config.fusion_source == "store"
        x = z0
        if 0 in keep:
            store.put(("latent", "z", 0), x, dtype=torch.float32)
        self.mechanism.reset()
        self.mechanism.use_stores(sink=store)
        ProcessorLease.release(self.components.unet)  # an open stream's processors, if any
        with self.mechanism.attach(self.components.unet):
            for i, k in enumerate(reversed(range(n))):
                phase = "store" if store_attention and self.plan.keys_at(k) else "plain"
                self.mechanism.before_unet(self._layout(phase, k, ref_rows))
                eps = self._eps(x, k, text, sched.abar_prev[k])
                x = ddim_inversion_step(x, eps, sched, k)
                if i + 1 in keep:
                    store.put(("latent", "z", i + 1), x, dtype=torch.float32)
                if progress is not None:
                    progress()
        self.mechanism.reset()
        return x

    @torch.no_grad()
    def edit(self, store: AttentionStore, ref_rows, progress: Callable | None = None) -> torch.Tensor:
        """DDIM denoising from z_T under the target prompt with attention fusion (Eq. 5).

        Args:
            store: an inversion of the same rows (from `invert` or `AttentionStore.load`).
            ref_rows: Eq. 8 reference row of each row.
        Returns:
            (R, C, h, w) edited clean latents.
        """
        c, n, sched = self.components, self.num_steps, self.schedule
        x = store.get(("latent", "z", n), device=c.device, dtype=c.dtype)
        rows = x.shape[0]
        guided = float(self.config.guidance) > 1.0
        branches = ("uncond", "cond") if guided else ("cond",)
        groups = len(branches)
        text = self.target_text.expand(rows, -1, -1)
        if guided:
            text = torch.cat([self.uncond_text.expand(rows, -1, -1), text])  # (2R, T, D): uncond, cond
        source_text = self.source_text.expand(rows, -1, -1)
        recompute = self.config.fusion_source == "recompute"
        self.mechanism.reset()
        self.mechanism.use_stores(source=store)
        ProcessorLease.release(c.unet)  # an open stream's processors, if any
        with self.mechanism.attach(c.unet):
            for k in range(n):
                fused = bool(self.plan.keys_at(k))
                source = store
                if fused and recompute:
                    # The inversion's UNet call of this step, re-run: same latent, text,
                    # timestep and rows, hence the same attention inputs.
                    source = AttentionStore(None, self.store_dtype)
                    self.mechanism.use_stores(sink=source, source=source)
                    x_src = store.get(("latent", "z", n - 1 - k), device=c.device, dtype=c.dtype)
                    self.mechanism.before_unet(self._layout("store", k, ref_rows))
                    self._eps(x_src, k, source_text, sched.abar_prev[k])
                self.mechanism.before_unet(self._layout("fuse" if fused else "plain", k, ref_rows, branches))
                x_in = torch.cat([x] * groups)  # (groups*R, C, h, w)
                eps = self._eps(x_in, k, text, sched.abar[k])
                if guided:
                    eps_u, eps_c = eps.chunk(2)
                    eps = cfg(eps_c, eps_u, float(self.config.guidance))
                x = ddim_step(x, eps, sched, k)
                if source is not store:
                    source.close()
                    self.mechanism.use_stores(source=store)  # back to the window's store
                if progress is not None:
                    progress()
        self.mechanism.reset()
        return x

    @torch.no_grad()
    def reconstruct(self, z_T: torch.Tensor, ref_rows) -> torch.Tensor:
        """Plain DDIM from z_T under the source prompt at guidance 1, no fusion (Sec. 3.1:
        z_0(p_src) = DDIM(z_T, p_src)). (R, C, h, w) -> (R, C, h, w)."""
        text = self.source_text.expand(z_T.shape[0], -1, -1)
        x = z_T
        self.mechanism.reset()
        ProcessorLease.release(self.components.unet)  # an open stream's processors, if any
        with self.mechanism.attach(self.components.unet):
            for k in range(self.num_steps):
                self.mechanism.before_unet(self._layout("plain", k, ref_rows))
                x = ddim_step(x, self._eps(x, k, text, self.schedule.abar[k]), self.schedule, k)
        self.mechanism.reset()
        return x

    # --- pixels <-> latents, a few frames at a time -------------------------------------
    @torch.no_grad()
    def encode(self, frames, chunk: int = 4) -> torch.Tensor:
        """Frames (list of (H, W, 3) uint8) to clean latents (R, C, H/8, W/8)."""
        from diffstream.frames import frames_to_tensor

        c = self.components
        parts = [c.encode_image(frames_to_tensor(list(frames[i : i + chunk]), c.device, c.dtype))
                 for i in range(0, len(frames), chunk)]
        return torch.cat(parts)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk: int = 4) -> list:
        """Latents (R, C, h, w) to R frames (H, W, 3) uint8."""
        from diffstream.frames import tensor_to_frames

        out = []
        for i in range(0, latents.shape[0], chunk):
            out += tensor_to_frames(self.components.decode_latents(latents[i : i + chunk]))
        return out


# --- saved inversions --------------------------------------------------------------------
def _frames_digest(frames) -> str:
    h = hashlib.blake2b(digest_size=16)
    for f in frames:
        h.update(np.ascontiguousarray(f).tobytes())
    return h.hexdigest()


def model_fingerprint(model_config=None, dtype: torch.dtype | None = None, unet=None) -> dict:
    """What of the loaded model changes the attention maps recomputed from a saved
    inversion's layer inputs: the checkpoint, its LoRAs with their scales, the LCM-LoRA,
    the dtype and, for a video UNet (`--video-model`), the id of the video model.
    `model_config`: the `config.ModelConfig` the model was loaded from (None: unknown,
    only the dtype is recorded); `unet`: the UNet that runs (None: not recorded)."""
    fingerprint = dict(dtype=str(dtype).replace("torch.", "") if dtype is not None else None)
    if unet is not None and type(unet).__name__ == "UNetMotionModel":
        fingerprint["video_model"] = video_model_id(unet) or "unsaved"
    if model_config is not None:
        resolved = model_config.resolved()
        lcm = resolved.lcm_lora if resolved.lcm_lora and str(resolved.lcm_lora).lower() != "none" else None
        fingerprint.update(checkpoint=resolved.model, lcm_lora=lcm,
                           loras=[[str(path), float(scale)] for path, scale in resolved.loras])
    return fingerprint


# key of the fingerprint -> the option that sets it (for the one-line refusal)
_FINGERPRINT_OPTIONS = {"checkpoint": "--model", "lcm_lora": "--lcm-lora", "loras": "--lora", "dtype": "--dtype",
                        "video_model": "--video-model"}


def inversion_meta(model: str, config: FateZeroEditConfig, size: tuple[int, int], num_frames: int,
                   fingerprint: dict | None = None, store_dtype: torch.dtype | None = None) -> dict:
    """What a saved inversion must agree on with the edit that loads it. `fingerprint`:
    `model_fingerprint` of the loaded model; `store_dtype`: the resolved store dtype."""
    fz = config.fatezero
    stored_as = str(store_dtype).replace("torch.", "") if store_dtype is not None else config.store_dtype
    return dict(
        format=INVERSION_FORMAT, version=INVERSION_VERSION, model=model, source_prompt=config.source_prompt,
        fingerprint=fingerprint or {},
        steps=fz.steps, size=list(size), num_frames=num_frames, window=config.window,
        reference_frame=fz.reference_frame, frame_attention=fz.frame_attention,
        cross_frame_min_downsample=fz.cross_frame_min_downsample, fusion_source=config.fusion_source, store_dtype=stored_as,
        cross_replace=fz.cross_replace, self_replace=fz.self_replace, fuse_min_downsample=fz.fuse_min_downsample,
        blend=config.blend_words[0] if config.blend_words else None, windows_done=0,
    )


def read_inversion_meta(directory) -> dict:
    """The metadata of a saved inversion folder.

    Raises:
        InputError: not a saved FateZero inversion.
    """
    path = Path(directory) / "meta.json"
    if not path.is_file():
        raise InputError(f"--load-inversion {directory}: not a saved FateZero inversion (no meta.json)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"--load-inversion {directory}: cannot read meta.json ({err})") from None
    if meta.get("format") != INVERSION_FORMAT or meta.get("version") != INVERSION_VERSION:
        raise InputError(f"--load-inversion {directory}: not a FateZero inversion of this diffstream version")
    return meta


def check_inversion_meta(meta: dict, expected: dict, directory) -> None:
    """Refuse a saved inversion that the requested edit cannot use (one-line ConfigError)."""
    saved_print, wanted_print = meta.get("fingerprint", {}), expected.get("fingerprint", {})
    for key in sorted(set(saved_print) | set(wanted_print)):
        if saved_print.get(key) != wanted_print.get(key):
            option = _FINGERPRINT_OPTIONS.get(key, key)
            raise ConfigError(f"--load-inversion {directory} was made with {key}={saved_print.get(key)!r}, this "
                              f"model has {wanted_print.get(key)!r} ({option}): the maps would change; use the "
                              f"same model or re-invert")
    for key, option in (("model", "--model"), ("source_prompt", "--source-prompt"), ("steps", "--steps"),
                        ("size", "--size"), ("num_frames", "--max-frames / input length"),
                        ("window", "--fz-window"), ("reference_frame", "--reference-frame"),
                        ("frame_attention", "--frame-attention"),
                        ("cross_frame_min_downsample", "--cross-frame-min-downsample"),
                        ("fusion_source", "--fusion-source"), ("store_dtype", "store dtype")):
        if meta.get(key) != expected[key]:
            raise ConfigError(f"--load-inversion {directory} was made with {key}={meta.get(key)!r}, "
                              f"this edit has {expected[key]!r} ({option}): use the same setting or re-invert")
    for key, option in (("cross_replace", "--cross-replace"), ("self_replace", "--self-replace")):
        if expected[key] > meta[key] + 1e-9 and expected["fusion_source"] == "store":
            raise ConfigError(f"--load-inversion {directory} stored {option} {meta[key]}, this edit asks for "
                              f"{expected[key]}: use at most {meta[key]} or re-invert")
    if expected["fusion_source"] == "store":
        if expected["fuse_min_downsample"] < meta["fuse_min_downsample"]:
            raise ConfigError(f"--load-inversion {directory} stored layers downsampled >= {meta['fuse_min_downsample']}"
                              f", this edit fuses >= {expected['fuse_min_downsample']}: re-invert")
        if expected["blend"] is not None and meta["blend"] != expected["blend"]:
            made = f"source blend words {meta['blend']!r}" if meta["blend"] else "no --blend-words"
            raise ConfigError(f"--load-inversion {directory} was made with {made}, so it holds no blend map of "
                              f"{expected['blend']!r}: re-invert with these --blend-words")


def edit_frames(
    components,
    frames,
    config: FateZeroEditConfig,
    save_inversion=None,
    load_inversion=None,
    progress: Callable | None = None,
    log: Callable[[str], None] | None = None,
    model_config=None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Edit a clip window by window; the returned iterator yields (frame index, edited
    frame) in clip order.

    Everything that can be checked is checked before this returns (a saved inversion's
    settings, frames and entries), so a caller can open its output afterwards and
    lose nothing on a bad `load_inversion`.

    Args:
        components: loaded model.
        frames: sequence of N frames (H, W, 3) uint8, all at the processing size (sides
            multiples of `components.size_multiple`); a numpy memmap works.
        config: the edit.
        save_inversion: folder to save each window's inversion into (must not exist or be empty).
        load_inversion: folder of a saved inversion of the same frames to edit from.
        progress: called once per UNet step (inversion and editing).
        log: receives one-line notes (the memory plan).
        model_config: the `config.ModelConfig` the components were loaded from (its
            checkpoint, LoRAs and LCM-LoRA go into a saved inversion's fingerprint).
    Raises:
        ConfigError / InputError: a saved inversion this edit cannot use.
    """
    n = len(frames)
    height, width = frames[0].shape[:2]
    vf = components.vae_scale_factor
    editor = FateZeroEditor(components, config, (height // vf, width // vf))
    windows = plan_windows(n, config.window, config.fatezero.reference_frame,
                           first=config.fatezero.frame_attention == "previous+first")
    editor.check_rows(max(len(w.rows) for w in windows))
    expected = inversion_meta(components.name, config, (width, height), n,
                              fingerprint=model_fingerprint(model_config, components.dtype, components.unet),
                              store_dtype=editor.store_dtype)
    if load_inversion:
        _check_saved_windows(load_inversion, editor, windows, frames, expected)
    save_dir = Path(save_inversion) if save_inversion else None
    if save_dir is not None:
        _write_meta(save_dir, expected)
    if log is not None:
        rows = max(len(w.rows) for w in windows)
        ref = reference_index(n, config.fatezero.reference_frame)
        budget = "no limit" if config.store_budget is None else format_bytes(config.store_budget)
        log(f"{n} frames in {len(windows)} window(s) of up to {config.window}"
            + (f" sharing reference frame {ref}" if ref is not None else " chained by the previous frame")
            + f"; attention store {format_bytes(editor.store_bytes(rows))} per window"
            + f" (RAM budget {budget}, the rest spills to disk)")
    return _edit_windows(editor, windows, frames, expected, save_dir, load_inversion, progress)


def _check_saved_windows(directory, editor: FateZeroEditor, windows, frames, expected: dict) -> None:
    """Settings, completeness, frames and entries of a saved inversion (reads only indexes)."""
    saved = read_inversion_meta(directory)
    check_inversion_meta(saved, expected, directory)
    if saved.get("windows_done", 0) < len(windows):
        raise InputError(f"--load-inversion {directory} holds {saved.get('windows_done', 0)} of "
                         f"{len(windows)} windows (the saving run was interrupted): re-invert")
    required = editor.required_keys()
    for window in windows:
        store = AttentionStore.load(Path(directory) / f"window_{window.index:04d}")
        try:
            digest = _frames_digest([frames[i] for i in window.rows])
            if store.meta.get("digest") != digest or list(store.meta.get("rows", [])) != list(window.rows):
                raise InputError(f"--load-inversion {directory} was made from other frames "
                                 f"(window {window.index} differs): pass the same input or re-invert")
            missing = required - set(store.keys())
            if missing:
                kind, name, step = sorted(missing, key=str)[0]
                raise ConfigError(f"--load-inversion {directory} lacks {kind} entry {name} at step {step}: "
                                  f"it was made with another fusion schedule; re-invert")
        finally:
            store.close()


def _edit_windows(editor: FateZeroEditor, windows, frames, meta: dict, save_dir, load_inversion, progress):
    """The window loop of `edit_frames` (a generator: the work happens as frames are taken)."""
    for window in windows:
        rows = [frames[i] for i in window.rows]
        if load_inversion:
            store = AttentionStore.load(Path(load_inversion) / f"window_{window.index:04d}")
        else:
            store = editor.new_store()
            editor.invert(editor.encode(rows), window.ref_rows, store, progress)
            if save_dir is not None:
                store.meta = dict(rows=list(window.rows), digest=_frames_digest(rows))
                store.save(save_dir / f"window_{window.index:04d}")
                meta["windows_done"] = window.index + 1
                _write_meta(save_dir, meta)
        try:
            latents = editor.edit(store, window.ref_rows, progress)
        finally:
            store.close()
        out = editor.decode(latents[list(window.out_rows)])
        for index, frame in zip(window.frames, out):
            yield index, frame


def _write_meta(directory: Path, meta: dict) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / "meta.json.part"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, directory / "meta.json")
    except OSError as err:
        raise OutputError(f"cannot write the inversion to {directory}: {err.strerror or err}") from None
