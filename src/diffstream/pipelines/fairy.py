"""Fairy: offline video editing with anchor-based cross-frame attention (Wu et al., CVPR 2024).

    pipe = FairyPipeline(components, FairyConfig(instruction="Turn into a marble Roman sculpture"))
    for frame in pipe.edit(clip):        # a list of frames or a Clip (file / image folder)
        sink.write(frame)

Every input frame gets exactly one output frame, in order (Fairy processes all frames:
no temporal down-sampling, no interpolation). The work is:

1. K anchor frames, evenly spread over the clip, are generated together; each attends
   to all anchors' tokens and their self-attention keys/values are cached for every
   layer, step and guidance branch (`diffstream.attention.anchor`, Fig. 4a).
2. The other frames are generated in chunks of `chunk_size`; their self-attention runs
   over their own tokens plus the cached anchor tokens (Fig. 4b). Chunks are independent,
   so peak memory depends on the chunk size and K, never on the clip length, and chunks
   can run on other processes or machines (`diffstream.pipelines.distributed`).

Two editing modes:
- instruction (InstructPix2Pix-style checkpoints, 8-channel UNet; the default checkpoint
  for real use is `timbrooks/instruct-pix2pix`, the model Fairy starts from): each frame
  is generated from noise, conditioned on the source frame's latent. Three guidance
  branches run in one UNet batch: (instruction, image), (empty text, image), (empty text,
  no image), combined as in InstructPix2Pix (Brooks et al. 2023, eq. 3) with a text scale
  `guidance` and an image scale `image_guidance`. Sampler: Euler ancestral, 10 steps, as
  Fairy samples (field notes, /work/shared/notes/field-offline-editing.md; the
  InstructPix2Pix model card samples with it too), written as pure functions
  in `diffstream.schedule.euler_ancestral`. `--sampler ddim` (eta 0) is the alternative:
  an ancestral step injects fresh noise into every frame at every step (each frame its
  own), while with DDIM a frame's only randomness is its initial noise.
- SDEdit (plain text-to-image checkpoints, 4-channel UNet): each frame's latent is noised
  to `strength` and denoised towards `prompt` with classifier-free guidance. DDIM with 10
  steps for ordinary checkpoints (diffusers' img2img convention: steps x strength of them
  run); for LCM-LoRA / turbo checkpoints (the library default `sd15-lcm`) the
  consistency sampler of `diffstream.schedule.timesteps` with 4 steps (1 for turbo).

Noise: by default every frame starts from the same noise (`noise="fixed"`, the generator
of (seed, 0)), as StreamDiffusion's fixed noise keeps a stream stable (its Sec. 3.2): on
the trained toy model, per-frame noise raises the warp error of its held-out SDEdit
clips from 28.7 to 501 (0-255 scale, `benchmarks/quality_toy.py`), and anchor attention
does not win it back (28.9 without anchors). `noise="per-frame"` draws frame i's noise from (seed, i) (a one-frame run then
equals diffusers' with `frame_generator(seed, i)` for every i).

Determinism: every random number of frame i comes from a generator seeded with
(seed, i) or (seed, 0), so chunk size, worker count and processing order do not change
what a frame is computed from. On CPU fp32 the result is bit-identical for the same chunk layout;
different chunk sizes change the UNet batch shape, and oneDNN/MKL pick kernels by shape,
so frames can then differ in the last float bits (documented and tested tolerance).
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator, Literal, Sequence, get_args

import numpy as np

from diffstream import frames as F
from diffstream.config import NOISE_MODES
from diffstream.errors import ConfigError, InputError, ModelLoadError
from diffstream.io.clip import as_clip

if TYPE_CHECKING:
    import torch

# torch, diffusers and the attention/schedule modules are imported where they are used, so
# that building the command-line parser (add_edit_arguments) and validating FairyConfig
# stay as cheap as the rest of the CLI's option handling.

# The checkpoint `--instruction` uses when --model is left at its default.
INSTRUCT_DEFAULT_MODEL = "timbrooks/instruct-pix2pix"
Sampler = Literal["auto", "euler-a", "ddim", "lcm"]
SAMPLERS: tuple[str, ...] = get_args(Sampler)
DEFAULT_ANCHORS = 3
# 4 frames x 3 guidance branches = 12 UNet rows per call, each attending to (1 + K) frames
# of tokens: a batch that keeps a GPU busy at 512 px without needing a large one.
DEFAULT_CHUNK_SIZE = 4
DEFAULT_DDIM_STEPS = 10  # Fairy's 10 steps (field notes), kept for --sampler ddim
DEFAULT_EULER_STEPS = 10  # Fairy: Euler ancestral, 10 steps (field notes)
DEFAULT_LCM_STEPS = 4
DEFAULT_TURBO_STEPS = 1
DEFAULT_GUIDANCE = 7.5  # InstructPix2Pix / Stable Diffusion default text scale
DEFAULT_LCM_GUIDANCE = 1.0  # LCM-LoRA is distilled for little or no CFG
DEFAULT_IMAGE_GUIDANCE = 1.5  # InstructPix2Pix default image scale
DEFAULT_STRENGTH = 0.5
MIN_SIZE = 16


@dataclass(frozen=True)
class FairyConfig:
    """How a clip is edited.

    Attributes:
        instruction: the edit instruction ("Turn into a marble Roman sculpture"); selects
            instruction mode (needs an InstructPix2Pix-style checkpoint).
        prompt: the target description; selects SDEdit mode (plain text-to-image model).
            Exactly one of `instruction` and `prompt` must be given.
        negative_prompt: text of the unconditional branches.
        anchors: K anchor frames (Fairy's default range: 3 works, 1 is too few, > 7 loses
            detail); 0 edits every frame independently (no cross-frame attention).
        chunk_size: ordinary frames per UNet batch; memory grows with it.
        steps: denoising steps; None: 10 (Euler ancestral, DDIM), 4 (LCM), 1 (turbo). In
            SDEdit mode with Euler ancestral or DDIM, int(steps x strength) of them run
            (diffusers' img2img convention).
        guidance: text guidance scale; None: 7.5, or 1.0 with the LCM sampler. <= 1 runs
            a single branch.
        image_guidance: InstructPix2Pix image guidance scale (instruction mode only).
        strength: SDEdit noise strength in (0, 1]; None: 0.5 (SDEdit mode only).
        sampler: "euler-a" (Euler ancestral, Fairy's sampler), "ddim" (eta 0), "lcm"
            (consistency sampler, for LCM-LoRA/turbo checkpoints in SDEdit mode) or "auto":
            Euler ancestral for instruction edits (Fairy's setting), LCM for LCM/turbo
            checkpoints in SDEdit mode, else DDIM.
        noise: "fixed" (default): every frame's noise comes from (seed, 0), the same
            tensor for all frames (StreamDiffusion's fixed noise, temporally stable);
            "per-frame": frame i's noise comes from (seed, i).
        seed: seeds the noise generators.
        size: longer side of the processing size in pixels (rounded to the model's multiple).
    """

    instruction: str = ""
    prompt: str = ""
    negative_prompt: str = ""
    anchors: int = DEFAULT_ANCHORS
    chunk_size: int = DEFAULT_CHUNK_SIZE
    steps: int | None = None
    guidance: float | None = None
    image_guidance: float = DEFAULT_IMAGE_GUIDANCE
    strength: float | None = None
    sampler: Sampler = "auto"
    noise: str = "fixed"
    seed: int = 0
    size: int = 512

    def __post_init__(self):
        if bool(self.instruction.strip()) == bool(self.prompt.strip()):
            raise ConfigError(
                "pass either --instruction (InstructPix2Pix-style edit) or --prompt (SDEdit with a "
                "text-to-image model), not both" if self.instruction.strip() else
                "nothing to edit towards: pass --instruction \"...\" or --prompt \"...\""
            )
        if self.anchors < 0:
            raise ConfigError(f"--anchors must be >= 0 (0 disables anchor attention), got {self.anchors}")
        if self.chunk_size < 1:
            raise ConfigError(f"--chunk-size must be >= 1, got {self.chunk_size}")
        if self.steps is not None and not (1 <= self.steps <= 1000):
            raise ConfigError(f"--steps must be between 1 and 1000, got {self.steps}")
        if self.guidance is not None and self.guidance < 0:
            raise ConfigError(f"--guidance must be >= 0, got {self.guidance}")
        if self.image_guidance < 0:
            raise ConfigError(f"--image-guidance must be >= 0, got {self.image_guidance}")
        if self.strength is not None:
            if self.instructing:
                raise ConfigError("--strength is for SDEdit (--prompt); instruction edits start from noise")
            if not (0.0 < float(self.strength) <= 1.0):
                raise ConfigError(f"--strength must be in (0, 1], got {self.strength}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.noise not in NOISE_MODES:
            raise ConfigError(f"--noise must be one of {', '.join(NOISE_MODES)}, got {self.noise!r}")
        if self.sampler == "lcm" and self.instructing:
            raise ConfigError("--sampler lcm is for SDEdit with LCM/turbo checkpoints; instruction edits use euler-a or ddim")
        if self.size < MIN_SIZE:
            raise ConfigError(f"--size must be at least {MIN_SIZE}, got {self.size}")
        if self.sampler in ("ddim", "euler-a") and not self.instructing and self.steps is not None:
            if int(self.steps * self.resolved_strength) < 1:
                raise ConfigError(
                    f"--steps {self.steps} with --strength {self.resolved_strength} runs no denoising step: "
                    f"raise --steps or --strength"
                )
        if self.sampler == "lcm" and self.steps is not None:
            from diffstream.schedule.timesteps import TIMESTEP_TABLE_SIZE, max_steps

            if self.steps > TIMESTEP_TABLE_SIZE:
                raise ConfigError(f"--steps must be at most {TIMESTEP_TABLE_SIZE} with the LCM sampler")
            most = max_steps(self.resolved_strength)  # the LCM table's room below the SDEdit start
            if self.steps > most:
                raise ConfigError(f"--steps {self.steps} is too many for --strength {self.resolved_strength}: "
                                  f"at most {most}")

    @property
    def instructing(self) -> bool:
        """Instruction mode (InstructPix2Pix) rather than SDEdit."""
        return bool(self.instruction.strip())

    @property
    def resolved_strength(self) -> float:
        return DEFAULT_STRENGTH if self.strength is None else float(self.strength)

    def resolve(self, lcm: bool = False, turbo: bool = False) -> "FairyConfig":
        """This config with the sampler and every None default made concrete.

        Args:
            lcm: the checkpoint has an LCM-LoRA fused in.
            turbo: the checkpoint is a 1-step turbo (ADD) model.
        Raises:
            ConfigError: the combination cannot run (e.g. too many LCM steps for the strength).
        """
        sampler = self.sampler
        if sampler == "auto":
            if self.instructing:
                sampler = "euler-a"  # Fairy's sampler
            else:
                sampler = "lcm" if (lcm or turbo) else "ddim"
        if sampler == "lcm":
            steps = self.steps or (DEFAULT_TURBO_STEPS if turbo else DEFAULT_LCM_STEPS)
            guidance = DEFAULT_LCM_GUIDANCE if self.guidance is None else self.guidance
        else:
            steps = self.steps or (DEFAULT_EULER_STEPS if sampler == "euler-a" else DEFAULT_DDIM_STEPS)
            guidance = DEFAULT_GUIDANCE if self.guidance is None else self.guidance
        strength = None if self.instructing else self.resolved_strength
        return dataclasses.replace(self, sampler=sampler, steps=steps, guidance=guidance, strength=strength)

    @property
    def num_branches(self) -> int:
        """Guidance branches per frame in a UNet call (rows are branch-major)."""
        guidance = self.guidance
        if guidance is None:
            guidance = DEFAULT_LCM_GUIDANCE if self.sampler == "lcm" else DEFAULT_GUIDANCE
        if self.instructing:
            # InstructPix2Pix runs its three branches only when both scales do something.
            return 3 if guidance > 1.0 and self.image_guidance >= 1.0 else 1
        return 2 if guidance > 1.0 else 1


def frame_generator(seed: int, index: int) -> "torch.Generator":
    """The CPU generator of frame `index`: seeded from (seed, index) only, never from
    the position of the frame in a chunk, segment or worker."""
    import torch

    state = np.random.SeedSequence([int(seed) % 2**64, int(index)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def frame_noise(seed: int, index: int, count: int, shape: tuple[int, ...]) -> "torch.Tensor":
    """`count` standard-normal tensors of `shape` (C, h, w) for frame `index`: (count, C, h, w) fp32.

    Drawn one (1, C, h, w) tensor after another from the frame's generator, the order in
    which diffusers' pipelines consume a generator (initial latent, then one draw per
    ancestral step), so a one-frame run equals diffusers' with `frame_generator(seed, i)`.
    One draw of (count, C, h, w) would not give the same numbers for every shape.
    """
    import torch

    gen = frame_generator(seed, index)
    return torch.cat([torch.randn((1, *shape), generator=gen) for _ in range(count)])


@dataclass(frozen=True)
class EditPlan:
    """Which frames are anchors and how the others are chunked and segmented.

    Ordinary (non-anchor) frames are numbered by rank (their position among ordinary
    frames); chunk c holds ranks [c * chunk_size, (c + 1) * chunk_size). Chunks, and so
    every UNet batch, are the same however the clip is split across workers, because
    segments always start at a chunk boundary. Nothing here grows with the clip length.
    """

    num_frames: int
    anchors: tuple[int, ...]
    chunk_size: int

    @classmethod
    def build(cls, num_frames: int, num_anchors: int, chunk_size: int) -> "EditPlan":
        """The plan of a clip: `num_anchors` anchors spread evenly (`anchor_indices`)."""
        from diffstream.attention.anchor import anchor_indices

        return cls(num_frames, anchor_indices(num_frames, num_anchors), chunk_size)

    @property
    def num_ordinary(self) -> int:
        return self.num_frames - len(self.anchors)

    @property
    def num_chunks(self) -> int:
        return -(-self.num_ordinary // self.chunk_size)

    def is_anchor(self, index: int) -> bool:
        pos = bisect.bisect_left(self.anchors, index)
        return pos < len(self.anchors) and self.anchors[pos] == index

    def rank(self, index: int) -> int:
        """Position of ordinary frame `index` among the ordinary frames."""
        return index - bisect.bisect_left(self.anchors, index)

    def closes_chunk(self, index: int) -> bool:
        """Ordinary frame `index` is the last of its chunk."""
        r = self.rank(index)
        return (r + 1) % self.chunk_size == 0 or r == self.num_ordinary - 1

    def index_of_rank(self, rank: int) -> int:
        """The frame index of the ordinary frame with this rank."""
        index = rank
        for anchor in self.anchors:  # sorted: each anchor at or before the candidate shifts it
            if anchor <= index:
                index += 1
        return index

    def segments(self, chunks_per_segment: int) -> Iterator[tuple[int, int]]:
        """Contiguous frame ranges [start, stop) covering the clip, each starting at a
        chunk boundary and holding `chunks_per_segment` chunks (anchors ride along)."""
        step = max(1, int(chunks_per_segment))
        count = max(1, -(-self.num_chunks // step))
        start = 0
        for s in range(1, count + 1):
            stop = self.num_frames if s == count else self.index_of_rank(s * step * self.chunk_size)
            yield start, stop
            start = stop


class FairyPipeline:
    """Edits a clip with anchor-based cross-frame attention; one instance per model.

    Args:
        components: the loaded model; 8-channel UNet for instruction mode, 4 for SDEdit.
        config: the edit settings (resolved here if the caller did not).
        lcm: the checkpoint has an LCM-LoRA fused in (for sampler "auto").
    Raises:
        ModelLoadError: the model's UNet does not fit the mode.
    """

    def __init__(self, components, config: FairyConfig, lcm: bool = False):
        from diffstream.attention.anchor import AnchorAttention, AnchorConfig

        self.components = components
        if getattr(components, "is_sdxl", False):
            raise ModelLoadError(f"--method fairy runs SD 1.x/2.x checkpoints; {components.name!r} is SDXL: pass an "
                                 f"SD 1.x/2.x model, or stream it with diffstream run")
        self.config = config = config.resolve(lcm=lcm, turbo=components.turbo)
        channels, latent = components.unet_in_channels, components.latent_channels
        if config.instructing and channels != 2 * latent:
            raise ModelLoadError(
                f"model {components.name!r} has a {channels}-channel UNet (text-to-image): --instruction needs an "
                f"InstructPix2Pix-style checkpoint ({2 * latent} channels, e.g. {INSTRUCT_DEFAULT_MODEL}); "
                f"use --prompt for SDEdit with this model"
            )
        if not config.instructing and channels != latent:
            raise ModelLoadError(
                f"model {components.name!r} has a {channels}-channel image-conditioned UNet: use --instruction "
                f"with it, or a text-to-image model for --prompt"
            )
        self.mechanism = AnchorAttention(AnchorConfig(num_anchors=config.anchors))
        self.state = self.mechanism.state  # the clip's anchor cache (export / load / nbytes)
        self.num_branches = config.num_branches
        if config.instructing:  # InstructPix2Pix's order: (text, image), (-, image), (-, -)
            self._branches = ("cond", "image", "uncond")[: self.num_branches]
        else:  # diffusers' text-to-image order: (uncond, cond)
            self._branches = ("uncond",) * (self.num_branches - 1) + ("cond",)
        self._layouts: dict = {}  # (mode, step, frames) -> BatchLayout
        self._own_unet()  # installs nothing with 0 anchors, but removes another owner's processors
        text = config.instruction if config.instructing else config.prompt
        emb = components.encode_prompt([text, config.negative_prompt])  # (2, 77, D)
        self._text, self._negative = emb[0:1], emb[1:2]
        self._emb_cache: dict = {}  # frames per batch -> (branches * n, 77, D) text rows
        self._setup_sampler()
        self.plan: EditPlan | None = None
        self.size: tuple[int, int] | None = None
        self._anchor_outputs: dict[int, np.ndarray] = {}
        self.unet_calls = 0

    # --- lifecycle ------------------------------------------------------------------
    def close(self) -> None:
        """Restore the UNet's original attention processors (if this edit's are on it)."""
        from diffstream.attention.base import ProcessorLease

        ProcessorLease.release(self.components.unet, self)

    def _own_unet(self) -> None:
        """Make this edit's processors the ones on the (possibly shared) UNet: a stream that
        ran on the same loaded model before has its processors restored first, so an edit
        never runs another owner's attention (e.g. a feature bank left by an open stream)."""
        from diffstream.attention.base import ProcessorLease

        ProcessorLease.acquire(self.components.unet, self, self.mechanism.attach)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- the sampler ------------------------------------------------------------------
    def _setup_sampler(self) -> None:
        from diffstream.schedule.timesteps import make_step_table, t_indices

        comp, c = self.components, self.config
        if c.sampler == "ddim":
            from diffusers import DDIMScheduler

            # The checkpoint's own noise schedule (betas, prediction type) with DDIM steps,
            # normalised as diffusers' Stable Diffusion pipelines normalise legacy configs:
            # no clipping of x0 to [-1, 1] (latents are not pixels), steps offset 1.
            self.scheduler = DDIMScheduler.from_config(comp.scheduler.config, clip_sample=False, steps_offset=1)
            self.scheduler.set_timesteps(c.steps, device=comp.device)
            timesteps = self.scheduler.timesteps
            if not c.instructing:  # SDEdit: start part-way down the schedule (diffusers img2img)
                run = min(int(c.steps * c.strength), c.steps)
                if run < 1:
                    raise ConfigError(f"--steps {c.steps} with --strength {c.strength} runs no denoising step")
                timesteps = timesteps[c.steps - run :]
            self.timesteps = list(timesteps)
            self.noise_count = 1  # DDIM with eta 0: the initial noise is all
        elif c.sampler == "euler-a":
            from diffstream.schedule.euler_ancestral import euler_ancestral_schedule

            # The checkpoint's noise schedule and timestep spacing, read as diffusers'
            # EulerAncestralDiscreteScheduler.from_config reads it: a config that does not
            # set a spacing itself (diffusers lists the defaults it filled in under
            # "_use_default_values") gets Euler-a's default "linspace"
            # (999 .. 0); steps offset 1 as for DDIM above (used by "leading" only).
            config = comp.scheduler.config
            spacing = config.get("timestep_spacing")
            if spacing is None or "timestep_spacing" in config.get("_use_default_values", ()):
                spacing = "linspace"
            schedule = euler_ancestral_schedule(comp.alphas_cumprod, c.steps, spacing=spacing, steps_offset=1)
            if not c.instructing:  # SDEdit: start part-way down the schedule (diffusers img2img)
                run = min(int(c.steps * c.strength), c.steps)
                if run < 1:
                    raise ConfigError(f"--steps {c.steps} with --strength {c.strength} runs no denoising step")
                schedule = schedule.tail(c.steps - run)
            self.euler = schedule
            self.timesteps = list(schedule.timesteps.to(comp.device))
            self.noise_count = 1 + len(self.timesteps)  # the initial (or SDEdit) noise, then one per step
        else:
            table = make_step_table(
                comp.alphas_cumprod,
                t_indices(c.strength, c.steps, turbo=comp.turbo),
                sampler="x0" if comp.turbo else "lcm",
                prediction_type=comp.prediction_type,
                num_train_timesteps=comp.num_train_timesteps,
            )
            self.table = table.to(device=comp.device, dtype=comp.dtype)
            self.timesteps = list(self.table.timesteps)
            self.noise_count = len(self.timesteps)  # the SDEdit noise, then one per re-noising

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    # --- planning ---------------------------------------------------------------------
    def processing_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) at which a clip of that size is edited."""
        return F.fit_size(width, height, self.config.size, self.components.size_multiple)

    def begin(self, num_frames: int, width: int, height: int, size: tuple[int, int] | None = None) -> EditPlan:
        """Start a clip: forget the previous anchors and plan this one.

        Args:
            num_frames: frames in the clip.
            width, height: input frame size (sets the processing size).
            size: force this processing size (workers get it from the driver).
        """
        if num_frames < 1:
            raise InputError("no frames to edit")
        self.mechanism.reset()
        self._anchor_outputs = {}
        self.size = tuple(size) if size is not None else self.processing_size(width, height)
        self.plan = EditPlan.build(num_frames, self.config.anchors, self.config.chunk_size)
        return self.plan

    def prepare(self, frame: np.ndarray) -> np.ndarray:
        """A frame at the processing size, RGB uint8 (H, W, 3)."""
        return F.resize(F.to_rgb(frame), self.size)

    # --- editing ----------------------------------------------------------------------
    def edit(self, frames) -> Iterator[np.ndarray]:
        """Edit a whole clip in this process.

        Args:
            frames: a `Clip`, a list of (H, W, 3) uint8 frames, or a video/folder path.
        Yields:
            one (h, w, 3) uint8 frame per input frame, in order, at the processing size.
        """
        clip = as_clip(frames)
        plan = self.begin(len(clip), clip.width, clip.height)
        self.make_anchors(clip.read(plan.anchors))
        yield from self.edit_range(iter(clip), 0, plan.num_frames)

    def make_anchors(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Generate the anchors together and cache their keys/values (Fig. 4a).

        Args:
            frames: the input frames at `self.plan.anchors`, in that order.
        Returns:
            the anchors' output frames (also emitted at their positions by `edit_range`).
        """
        anchors = self.plan.anchors
        if len(frames) != len(anchors):
            raise ValueError(f"expected {len(anchors)} anchor frames, got {len(frames)}")
        if not anchors:
            return []
        outputs = self._edit_batch([self.prepare(f) for f in frames], anchors, "record")
        self._anchor_outputs = dict(zip(anchors, outputs))
        return outputs

    def load_anchors(self, cache: dict, outputs: dict[int, np.ndarray]) -> None:
        """Install anchors made elsewhere (`export_anchors` of another process)."""
        self.state.load(cache, device=self.components.device)
        self._anchor_outputs = dict(outputs)

    def export_anchors(self) -> tuple[dict, dict[int, np.ndarray]]:
        """(key/value cache on CPU, anchor output frames) to ship to another process."""
        return self.state.export(), dict(self._anchor_outputs)

    def edit_range(self, frames: Iterable[np.ndarray], start: int, stop: int) -> Iterator[np.ndarray]:
        """Edit frames start..stop-1 of the planned clip (anchors made already).

        `start` must be a segment boundary of the plan (0 or a chunk start) so that the
        chunks, and thus every UNet batch, are the same as in a single-process run.

        Args:
            frames: the input frames start..stop-1, any size.
        Yields:
            the output frames start..stop-1 in order; anchors come from `make_anchors`.
        """
        plan = self.plan
        done: dict[int, np.ndarray] = {}
        pending: list[np.ndarray] = []
        pending_index: list[int] = []
        next_out = start
        for index, frame in zip(range(start, stop), frames):
            if plan.is_anchor(index):
                done[index] = self._anchor_outputs[index]
            else:
                pending.append(self.prepare(frame))
                pending_index.append(index)
                if plan.closes_chunk(index):
                    done.update(zip(pending_index, self._edit_batch(pending, pending_index, "attend")))
                    pending, pending_index = [], []
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1
        if pending:  # the input ended early: finish what it gave
            done.update(zip(pending_index, self._edit_batch(pending, pending_index, "attend")))
        while next_out in done:
            yield done.pop(next_out)
            next_out += 1

    def _edit_batch(self, frames: list[np.ndarray], indices: Sequence[int], mode: str) -> list[np.ndarray]:
        comp = self.components
        pixels = F.frames_to_tensor(frames, device=comp.device, dtype=comp.dtype)  # (n, 3, H, W)
        latents = self.denoise(pixels, indices, mode if self.config.anchors > 0 else "off")
        return F.tensor_to_frames(comp.decode_latents(latents))

    # --- the denoising loop -------------------------------------------------------------
    def _embeddings(self, n: int) -> "torch.Tensor":
        """Text rows for n frames, branch-major: (branches * n, 77, D)."""
        import torch

        emb = self._emb_cache.get(n)
        if emb is None:
            if self.config.instructing:  # (text, image), (-, image), (-, -): InstructPix2Pix's order
                rows = [self._text] + [self._negative] * (self.num_branches - 1)
            else:  # (uncond, cond): diffusers' text-to-image order
                rows = [self._negative] * (self.num_branches - 1) + [self._text]
            emb = self._emb_cache[n] = torch.cat([r.expand(n, -1, -1) for r in rows]).contiguous()
        return emb

    def _layout(self, mode: str, step: int, n: int):
        """The layout of one UNet call (built once per mode, step and batch size): n
        frames per guidance branch, branch-major, every row at `step`."""
        key = (mode, step, n)
        layout = self._layouts.get(key)
        if layout is None:
            from diffstream.attention.base import BatchLayout

            layout = self._layouts[key] = BatchLayout.branch_major(mode, step, self._branches, n, self.num_steps)
        return layout

    def denoise(self, pixels: "torch.Tensor", indices: Sequence[int], mode: str = "off") -> "torch.Tensor":
        """Edit a batch of frames in latent space.

        Args:
            pixels: (n, 3, H, W) source frames in [-1, 1].
            indices: the n frames' indices in the clip (they seed the noise).
            mode: "record" (the batch is the anchors), "attend" (ordinary frames against
                the anchor cache) or "off" (plain per-frame self-attention).
        Returns:
            (n, C, H/8, W/8) edited latents (scaled, ready for `decode_latents`).
        """
        import torch

        with torch.no_grad():
            return self._denoise(pixels, indices, mode)

    def _denoise(self, pixels, indices, mode):
        import torch

        from diffstream.schedule import euler_ancestral as EA
        from diffstream.schedule.timesteps import add_noise, denoise, model_output_to_eps

        comp, c = self.components, self.config
        n, branches = len(indices), self.num_branches
        # (n, C, h, w): InstructPix2Pix conditions on the *unscaled* posterior mode of the
        # source frame (its training recipe); SDEdit starts from the scaled latent.
        z0 = _unscaled_latents(comp, pixels) if c.instructing else comp.encode_image(pixels)
        shape = tuple(z0.shape[1:])
        per_frame = c.noise == "per-frame"
        noise = torch.stack([frame_noise(c.seed, i if per_frame else 0, self.noise_count, shape) for i in indices],
                            dim=1)
        noise = noise.to(device=comp.device, dtype=comp.dtype)  # (count, n, C, h, w)
        emb = self._embeddings(n)
        image_rows = None
        if c.instructing:
            # The unconditional branch sees a zero image (InstructPix2Pix's dropped image).
            image_rows = torch.cat([z0, z0, torch.zeros_like(z0)][:branches])  # (branches*n, C, h, w)
            sigma0 = self.euler.init_noise_sigma if c.sampler == "euler-a" else self.scheduler.init_noise_sigma
            x = noise[0] * sigma0
        elif c.sampler == "ddim":
            x = self.scheduler.add_noise(z0, noise[0], self.timesteps[0].repeat(n))
        elif c.sampler == "euler-a":
            x = EA.add_noise(z0, noise[0], self.euler.sigmas[0])
        else:
            first = self.table.rows(0, 1)
            x = add_noise(z0, noise[0], first.alpha_sqrt, first.beta_sqrt)

        for step, t in enumerate(self.timesteps):
            # (branches*n, C, h, w), branch-major. torch.cat (not repeat) keeps x's memory
            # layout, as diffusers does, and the UNet's convolutions pick kernels by layout.
            x_in = torch.cat([x] * branches)
            if c.sampler == "ddim":
                x_in = self.scheduler.scale_model_input(x_in, t)
            elif c.sampler == "euler-a":
                x_in = EA.scale_model_input(x_in, self.euler.sigmas[step])
            if image_rows is not None:
                x_in = torch.cat([x_in, image_rows], dim=1)  # (branches*n, 2C, h, w)
            layout = self._layout(mode, step, n)
            self._own_unet()  # an attribute lookup unless another owner took the UNet
            self.mechanism.before_unet(layout)
            try:
                out = comp.unet(x_in, t, encoder_hidden_states=emb, return_dict=False)[0]
            finally:
                self.mechanism.after_unet(layout)  # back to plain attention between calls
            self.unet_calls += 1
            out = self._guide(out)  # (n, C, h, w)
            if c.sampler == "ddim":
                x = self.scheduler.step(out, t, x, return_dict=False)[0]
            elif c.sampler == "euler-a":  # fresh noise: this frame's own draw for this step
                sig = self.euler.sigmas
                x = EA.euler_ancestral_step(out, x, sig[step], sig[step + 1], noise[step + 1], comp.prediction_type)
            else:
                rows = self.table.rows(step, step + 1)
                eps = model_output_to_eps(out, x, rows.alpha_sqrt, rows.beta_sqrt, rows.prediction_type)
                x = denoise(eps, x, rows)
                if step + 1 < self.num_steps:  # re-noise to the next step with this frame's noise
                    nxt = self.table.rows(step + 1, step + 2)
                    x = add_noise(x, noise[step + 1], nxt.alpha_sqrt, nxt.beta_sqrt)
        return x

    def _guide(self, out: "torch.Tensor") -> "torch.Tensor":
        """Combine the branch outputs (branch-major rows) into one prediction per frame."""
        c = self.config
        if self.num_branches == 1:
            return out
        if c.instructing:
            # InstructPix2Pix eq. 3: e(z, 0, 0) + s_I (e(z, I, 0) - e(z, 0, 0)) + s_T (e(z, I, T) - e(z, I, 0)),
            # written in diffusers' order so results match its pipeline.
            text, image, uncond = out.chunk(3)
            return uncond + c.guidance * (text - image) + c.image_guidance * (image - uncond)
        uncond, cond = out.chunk(2)
        return uncond + c.guidance * (cond - uncond)


def _unscaled_latents(comp, pixels: "torch.Tensor") -> "torch.Tensor":
    """Pixels (n, 3, H, W) in [-1, 1] to the VAE's unscaled posterior mode (n, C, H/8, W/8).

    `Components.encode_image` returns scaled latents; dividing by the scaling factor
    again would not give back the same float bits, and InstructPix2Pix checkpoints were
    trained on the unscaled mode.
    """
    import torch

    with torch.no_grad():
        if comp.is_tiny_vae:
            return comp.vae.encode(pixels).latents
        return comp.vae.encode(pixels).latent_dist.mode()
