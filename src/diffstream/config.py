"""Typed configuration, built once at the edge (CLI, server, Python caller) and passed down.

Every check that can be made without a model happens in `__post_init__`, so a bad
option fails with one line before anything heavy is imported or loaded.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from diffstream.attention.block_causal import BlockCausalConfig
from diffstream.attention.causal_temporal import CausalTemporalConfig
from diffstream.attention.feature_bank import FeatureBankConfig
from diffstream.errors import ConfigError
from diffstream.schedule import timesteps
from diffstream.schedule.blend import BLEND_MODES
from diffstream.schedule.motion_noise import MotionNoiseConfig
from diffstream.schedule.timesteps import TIMESTEP_TABLE_SIZE

# Presets: short names for the checkpoints users start from.
MODEL_PRESETS: dict[str, dict] = {
    # SD 1.5 with LCM-LoRA fused: the StreamV2V / Live2Diff setting (4 LCM steps).
    "sd15-lcm": dict(
        model="stable-diffusion-v1-5/stable-diffusion-v1-5",
        lcm_lora="latent-consistency/lcm-lora-sdv1-5",
    ),
    # SD-turbo (SD 2.1 distilled with adversarial diffusion distillation): 1 step, no CFG.
    "sd-turbo": dict(model="stabilityai/sd-turbo", turbo=True),
    # SDXL with LCM-LoRA fused (4 LCM steps), and SDXL-Turbo (1 step, no CFG, 512 px).
    "sdxl-lcm": dict(model="stabilityai/stable-diffusion-xl-base-1.0", lcm_lora="latent-consistency/lcm-lora-sdxl"),
    "sdxl-turbo": dict(model="stabilityai/sdxl-turbo", turbo=True),
}
DEFAULT_MODEL = "sd15-lcm"
# AnimateDiff v1.5-2 motion modules in diffusers format (live2diff's default for real models).
DEFAULT_MOTION_ADAPTER = "guoyww/animatediff-motion-adapter-v1-5-2"
TINY_VAE_PRESETS = {"taesd": "madebyollin/taesd", "taesdxl": "madebyollin/taesdxl"}

# causal-video runs on a Wan video model (`--model tiny-wan` or a Wan folder), the others on SD models.
METHODS = ("streamdiffusion", "streamv2v", "live2diff", "causal-video")
# Models that are Wan video models by name (a folder is known only once it is read).
WAN_MODELS = ("tiny-wan",)
# Models that are Stable Diffusion models by name.
SD_MODELS = ("tiny", "tiny-sdxl", "toy")
CFG_TYPES = ("none", "self", "initialize", "full")
NOISE_MODES = ("fixed", "per-frame")
VAE_ENCODINGS = ("mean", "sample")

# Each method's own paper/reference setting for what the user leaves unset (issue #20):
# - StreamDiffusion's examples run RCFG self at guidance 1.2 with one fixed noise tensor
#   per step slot (Sec. 3.2: the fixed noise keeps the stream stable);
# - StreamV2V runs "without classifier-free guidance" (Sec. 5.1; its vid2vid/main.py has
#   guidance_scale 1.0) and keeps StreamDiffusion's fixed slot noise;
# - Live2Diff's reference asserts cfg none and draws fresh noise for every frame and
#   every re-noise, which is what its motion modules saw in training.
METHOD_DEFAULTS: dict[str, dict] = {
    "streamdiffusion": dict(guidance=1.2, noise="fixed"),
    "streamv2v": dict(guidance=1.0, noise="fixed"),
    "live2diff": dict(guidance=1.0, noise="per-frame"),
    # StreamDiffusionV2 (and the Self-Forcing family): distilled few-step models, no
    # guidance, fresh noise at every step of every chunk; SDEdit at noise scale 0.7 (its
    # single-GPU script's --noise_scale default; the CLI takes the strength from here).
    "causal-video": dict(guidance=1.0, noise="per-frame", strength=0.7),
}
DTYPES = ("auto", "fp32", "fp16", "bf16")
# Execution backends (`models.backends`): eager PyTorch, inductor, OpenVINO, or the best
# that works on the device.
BACKENDS = ("eager", "compile", "openvino", "auto")
# The largest ControlNet conditioning scale accepted: UIs offer 0..2; beyond a few the
# residuals swamp the UNet's own features.
MAX_CONTROL_SCALE = 5.0


MAX_BLEND_ITEMS = 8


def _check_blend(items, what: str, kind) -> tuple | None:
    """A prompt or seed blend as a tuple of (value, weight) pairs, or ConfigError."""
    if items is None:
        return None
    try:
        pairs = tuple((value, weight) for value, weight in items)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a list of (value, weight) pairs, got {items!r}") from None
    if not 1 <= len(pairs) <= MAX_BLEND_ITEMS:
        raise ConfigError(f"{what} takes 1 to {MAX_BLEND_ITEMS} entries, got {len(pairs)}")
    for value, weight in pairs:
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            raise ConfigError(f"{what} entries are ({'seed >= 0' if kind is int else 'prompt'}, weight), "
                              f"got {value!r}")
        ok = not isinstance(weight, bool) and isinstance(weight, (int, float)) and math.isfinite(weight)
        if not ok or weight < 0:
            raise ConfigError(f"{what} weights must be numbers >= 0, got {weight!r}")
    if not sum(w for _, w in pairs) > 0:
        raise ConfigError(f"{what} needs a weight above 0")
    return tuple((value, float(weight)) for value, weight in pairs)


def check_control_scale(scale, what: str = "a ControlNet scale") -> float:
    """A ControlNet / IP-Adapter scale as a float, or ConfigError: a finite number in
    [0, MAX_CONTROL_SCALE]."""
    ok = not isinstance(scale, bool) and isinstance(scale, (int, float)) and math.isfinite(scale)
    if not ok or not 0.0 <= scale <= MAX_CONTROL_SCALE:
        raise ConfigError(f"{what} must be a number in [0, {MAX_CONTROL_SCALE:g}], got {scale!r}")
    return float(scale)


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint to run and how.

    Attributes:
        model: a preset name (`sd15-lcm`, `sd-turbo`), `tiny` (random test model), a hub id,
            a local diffusers folder, or a single `.safetensors`/`.ckpt` file.
        lcm_lora: LCM-LoRA to load and fuse (hub id, folder or file); None keeps the preset's
            choice; "none" disables it.
        loras: extra LoRA files as (path_or_id, scale) pairs, fused in order.
        tiny_vae: AutoencoderTiny to use instead of the full VAE (hub id, folder, `taesd`,
            or `tiny` for a random one in tests); for a Wan model, TAEHV's weights
            (`taew2_1.pth` / `.safetensors`, or `tiny`), which decode (`models.taehv`).
        device: "auto" (cuda, then mps, then cpu) or a torch device string.
        dtype: "auto" (fp16 on cuda/mps, fp32 on cpu), "fp32", "fp16" or "bf16".
        turbo: force (True) or forbid (False) turbo handling (1 step, x0 sampler, no CFG);
            None detects it from "turbo" in the model name.
        instruct: for `tiny` only: build the 8-channel instruction-edit variant.
        motion_adapter: AnimateDiff-style motion modules to insert (live2diff): a hub id or
            folder (diffusers MotionAdapter), an original AnimateDiff or Live2Diff
            checkpoint file, or "tiny"; None for an image model.
        backend: how the UNet and VAE run (`models.backends`): "eager", "compile"
            (inductor; CPU with weight freezing, CUDA with max-autotune), "openvino"
            (CPU, the per-frame baseline only) or "auto" (compile on CPU/CUDA, eager on MPS).
        controlnets: (kind, checkpoint or None) per ControlNet, in order (`models.controlnet`):
            kind names the preprocessor ("canny", "depth"); None takes the kind's default
            for the base model; "tiny" is a random test ControlNet. Their scales are
            stream settings (`StreamConfig.control_scales`), changeable while streaming.
        control_depth_model: the depth estimator of "depth" ControlNets (None: DPT-Hybrid,
            or the tiny one for tiny ControlNets).
        ip_adapter: an IP-Adapter to load into the UNet (`models.ip_adapter`): "sd15",
            "plus-sd15", "tiny", a local weight file or a hub path; None: none. The image and
            its scale are stream settings (`StreamConfig.ip_adapter_image` / `_scale`).
        video_model: a video UNet folder written by `diffstream tune video`
            (`models.video_unet`), run in place of the checkpoint's UNet (FateZero's shape
            edits); None: the checkpoint's own UNet.
        transformer: a Wan 2.1 transformer checkpoint that replaces the Wan model's own
            (`--transformer`, `models.wan_checkpoints.load_wan_transformer`): a causal one
            (StreamDiffusionV2's / Self-Forcing's / CausVid's `.pt`), an original Wan
            `.safetensors`, a ComfyUI re-save or a diffusers folder. The causal checkpoints
            hold the transformer only, so `model` stays the base Wan2.1-T2V diffusers folder
            (VAE, UMT5, tokenizer). None: the model's own transformer.
        text_encoder_offload: a Wan model's text encoder (UMT5-XXL, 11.4 GB bf16) stays on
            the CPU: prompts are encoded there and only their embeddings go to `device`,
            cached per prompt (`models.wan.WanComponents.encode_text`).
        quantize: a Wan model's transformer and text encoder with "int8" or "fp8"
            weight-only Linear weights (torchao, `models.quantize`; `--int8` / `--fp8`);
            None: as loaded.
    """

    model: str = DEFAULT_MODEL
    lcm_lora: str | None = None
    loras: tuple[tuple[str, float], ...] = ()
    tiny_vae: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    turbo: bool | None = None
    instruct: bool = False
    motion_adapter: str | None = None
    backend: str = "eager"
    controlnets: tuple[tuple[str, str | None], ...] = ()
    control_depth_model: str | None = None
    ip_adapter: str | None = None
    video_model: str | None = None
    transformer: str | None = None
    text_encoder_offload: bool = False
    quantize: str | None = None

    def __post_init__(self):
        if not self.model:
            raise ConfigError("--model must not be empty (pass a hub id, a local path, or 'tiny')")
        if self.transformer == "":
            raise ConfigError("--transformer must not be empty: pass a Wan transformer checkpoint (.pt, "
                              ".safetensors) or leave it out")
        if self.quantize not in (None, "int8", "fp8"):
            raise ConfigError(f"quantize is int8 or fp8 (--int8 / --fp8), got {self.quantize!r}")
        wan_only = [flag for flag, given in (("--transformer", self.transformer),
                                             ("--text-encoder-offload", self.text_encoder_offload),
                                             (f"--{self.quantize}", self.quantize)) if given]
        if wan_only and (self.model in SD_MODELS or self.model in MODEL_PRESETS):
            are, them = ("are", "them") if len(wan_only) > 1 else ("is", "it")
            raise ConfigError(f"{' and '.join(wan_only)} {are} for Wan video models, not --model {self.model}: pass "
                              f"--model Wan-AI/Wan2.1-T2V-1.3B-Diffusers (or a local copy of it) with --method "
                              f"causal-video, or leave {them} out")
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for _, scale in self.loras:
            if not isinstance(scale, (int, float)):
                raise ConfigError(f"LoRA scale must be a number, got {scale!r}")
        for spec in self.controlnets:
            if len(spec) != 2 or not spec[0] or spec[1] == "":
                raise ConfigError(f"a ControlNet is (kind, checkpoint or None), got {spec!r}")

    def resolved(self) -> "ModelConfig":
        """This config with a preset name expanded to its checkpoint and LoRA."""
        preset = MODEL_PRESETS.get(self.model)
        if preset is None:
            return self
        values = dict(preset)
        if self.lcm_lora is not None:
            values["lcm_lora"] = self.lcm_lora
        if self.turbo is not None:
            values["turbo"] = self.turbo
        return dataclasses.replace(self, **values)


def uses_lcm(model: ModelConfig) -> bool:
    """Whether a ModelConfig fuses an LCM-LoRA (so SDEdit should use the LCM sampler)."""
    lora = model.resolved().lcm_lora
    return bool(lora) and lora.lower() != "none"


def uses_turbo(model: ModelConfig) -> bool:
    """Whether a ModelConfig is a turbo model: --turbo if given, else "turbo" in the
    checkpoint's name (the one rule model loading uses too)."""
    resolved = model.resolved()
    return resolved.turbo if resolved.turbo is not None else "turbo" in resolved.model.lower()


@dataclass(frozen=True)
class CausalVideoConfig:
    """Chunking, cache and schedule of `--method causal-video` (`pipelines.causal_video`).

    Attributes:
        block_causal: chunk size in latent frames and the KV cache policy (sink chunks,
            rolling window). Default: StreamDiffusionV2's 1 latent frame per chunk (4
            video frames; the stream's first chunk is its first frame alone), 3 sink
            chunks and a window of 2 (its `num_kv_cache 6` slots with `num_sink_tokens 3`).
        timesteps: the model timesteps of the denoising steps, in (0, 1000], decreasing
            (StreamDiffusionV2's `denoising_step_list` without its final 0, e.g. (700, 500));
            None: from `StreamConfig.strength` and `steps` (see `sigmas`).
        warp: shift every sigma by the scheduler's timestep shift s, s u / (1 + (s - 1) u)
            (Self-Forcing's `warp_denoising_step`); False: sigma = t / 1000, as
            StreamDiffusionV2 runs (`warp_denoising_step: false`).
        kv_record: what the KV cache holds. "clean" (Self-Forcing / CausVid's inference
            loop): each chunk's denoising calls only read the cache, then one extra call
            on its denoised latents at timestep 0 writes it: one cache of clean chunks.
            "steps" (StreamDiffusionV2): every denoising step's call writes the chunk's
            keys/values to a cache of its own, one per step (step k attends to the
            earlier chunks as they were at step k); no extra call. None: "steps" with
            `stream_batch`, else "clean".
        stream_batch: StreamDiffusionV2's stream batch over denoising steps: the K steps
            of K consecutive chunks in one transformer call (row k = chunk n - k at step
            k), which needs `kv_record` "steps"; the same frames as running them one by
            one, K - 1 chunks later.
        recache: LongLive's KV recache on a prompt switch (`pipelines.causal_video`);
            None: on where the cache policy has it (fixed sinks, clean records), else off.
        motion_noise: StreamDiffusionV2's motion-aware noise (`schedule.motion_noise`): the
            first step's sigma of each chunk lowered by its motion; None: off.
    """

    block_causal: BlockCausalConfig = field(default_factory=lambda: BlockCausalConfig(chunk_frames=1, sink_chunks=3,
                                                                                      window_chunks=2))
    timesteps: tuple[int, ...] | None = None
    warp: bool = False
    kv_record: str | None = None
    stream_batch: bool = False
    recache: bool | None = None
    motion_noise: MotionNoiseConfig | None = None

    def __post_init__(self):
        if self.timesteps is not None:
            ts = tuple(self.timesteps)
            if not ts or any(not 0 < t <= 1000 for t in ts) or any(b >= a for a, b in zip(ts, ts[1:])):
                raise ConfigError(f"--video-timesteps must be decreasing timesteps in (0, 1000], got {list(ts)}")
            object.__setattr__(self, "timesteps", tuple(int(t) for t in ts))
        if self.kv_record not in (None, "clean", "steps"):
            raise ConfigError(f"--kv-record must be clean or steps, got {self.kv_record!r}")
        if self.stream_batch and self.kv_record == "clean":
            raise ConfigError("--video-stream-batch keeps one KV cache per denoising step (--kv-record steps): "
                              "it has no clean record call; leave --kv-record out")
        if self.kv_record is None:
            object.__setattr__(self, "kv_record", "steps" if self.stream_batch else "clean")
        if self.kv_record == "steps" and self.block_causal.sink_policy != "fixed":
            raise ConfigError("--kv-record steps (and --video-stream-batch) need --sink-policy fixed")
        if self.recache and not self.recache_available:
            raise ConfigError("the recache on a prompt switch needs --sink-policy fixed and clean records "
                              "(--kv-record clean, no --video-stream-batch): pass --no-recache")

    @property
    def recache_available(self) -> bool:
        """The recache re-records the cached chunks from their clean latents: only with fixed
        sinks (the adaptive policy picks its sinks on the device) and clean records."""
        return self.block_causal.sink_policy == "fixed" and self.kv_record == "clean"

    def sigmas(self, strength: float, steps: int | None, shift: float = 1.0) -> tuple[float, ...]:
        """The noise level of each denoising step (flow matching: x_t = (1 - sigma) x0 + sigma noise).

        From `timesteps` when given (sigma = t / 1000); else `steps` (None: 2, StreamDiffusionV2's
        1.3B default) levels evenly spaced from `strength` down: strength (n - k) / n, k = 0..n-1
        (0.7 and 2 steps: 0.7, 0.35). With `warp`, each is then shifted by `shift`.
        """
        if self.timesteps is not None:
            sigmas = [t / 1000.0 for t in self.timesteps]
        else:
            n = 2 if steps is None else int(steps)
            sigmas = [float(strength) * (n - k) / n for k in range(n)]
        if self.warp:  # diffusers FlowMatchEulerDiscreteScheduler's static shift
            sigmas = [shift * u / (1 + (shift - 1) * u) for u in sigmas]
        return tuple(sigmas)


@dataclass(frozen=True)
class StreamConfig:
    """How frames are denoised (StreamDiffusion: SDEdit on a few-step schedule).

    Attributes:
        prompt: the text the frames are restyled towards.
        negative_prompt: the unconditional text for `cfg_type` "initialize"/"full".
        strength: SDEdit noise strength in (0, 1]: the first step starts at timestep
            ~ strength x 1000. StreamV2V's default 0.4 keeps the input's structure.
        steps: denoising steps; None means 4 (LCM) or 1 (turbo).
        t_index_list: explicit indices into the 50-entry LCM timestep table
            (StreamDiffusion's convention, e.g. (32, 45)); overrides strength/steps.
        guidance: classifier-free guidance scale gamma; <= 1 disables guidance; None: the
            method's paper setting (`METHOD_DEFAULTS`: 1.2 for streamdiffusion, 1.0, i.e.
            no guidance, for streamv2v and live2diff).
        delta: RCFG magnitude moderation of the virtual residual noise (StreamDiffusion).
        cfg_type: "none", "self" (self-negative RCFG: no extra UNet call),
            "initialize" (onetime-negative RCFG: one unconditional call per frame, at the
            first step), "full" (ordinary CFG: an unconditional call at every step);
            None means "self" for LCM models and "none" for turbo.
        seed: seeds the fixed per-slot noise and every random draw of the stream.
        noise: "fixed" (StreamDiffusion: one noise tensor per step slot, the same for
            every frame) or "per-frame" (Live2Diff's reference: fresh noise for every frame
            and re-noise, drawn from (seed, frame, step) so runs are reproducible); None:
            the method's setting (per-frame for live2diff, fixed otherwise).
        vae_encode: "mean" (the posterior mean: deterministic, our default) or "sample"
            (a posterior sample per frame, drawn from (seed, frame), as the references do).
        similarity_threshold: stochastic similarity filter threshold on the cosine
            similarity of consecutive inputs; None disables the filter.
        max_skip: at most this many consecutive frames are skipped by the filter.
        stream_batch: run the denoising steps of consecutive frames as one UNet batch;
            False denoises each frame to completion before the next (same frames, slower).
        size: longer side of the processing size in pixels (rounded to the model's multiple).
        method: the temporal-consistency method: "streamdiffusion" (per-frame baseline)
            or "streamv2v" (feature bank).
        feature_bank: settings of the streamv2v feature bank.
        causal: settings of live2diff's causal temporal attention.
        video: settings of causal-video (chunks, KV cache, denoising steps).
        control_scales: one conditioning scale per loaded ControlNet (`ModelConfig.controlnets`),
            0 switches one off; None: 1.0 each.
        ip_adapter_image: the image prompt of the loaded IP-Adapter (`ModelConfig.ip_adapter`):
            a file, an http(s) URL or a base64 data: URI; None: no image (the adapter is off).
        ip_adapter_scale: the IP-Adapter's weight (its paper's lambda); 0 is off.
        prompt_blend: ((prompt, weight), ...) mixed instead of `prompt` (`schedule.blend`);
            None: `prompt` alone.
        blend: how prompts mix: "linear" (weighted mean of the embeddings) or "slerp".
        seed_blend: ((seed, weight), ...) whose noises are mixed, keeping unit variance,
            instead of `seed`'s noise alone; None: `seed`'s.
    """

    prompt: str = ""
    negative_prompt: str = ""
    strength: float = 0.4
    steps: int | None = None
    t_index_list: tuple[int, ...] | None = None
    guidance: float | None = None
    delta: float = 1.0
    cfg_type: str | None = None
    seed: int = 2
    noise: str | None = None
    vae_encode: str = "mean"
    similarity_threshold: float | None = None
    max_skip: int = 10
    stream_batch: bool = True
    size: int = 512
    method: str = "streamdiffusion"
    feature_bank: FeatureBankConfig = field(default_factory=FeatureBankConfig)
    causal: CausalTemporalConfig = field(default_factory=CausalTemporalConfig)
    video: CausalVideoConfig = field(default_factory=CausalVideoConfig)
    control_scales: tuple[float, ...] | None = None
    ip_adapter_image: str | None = None
    ip_adapter_scale: float = 1.0
    prompt_blend: tuple[tuple[str, float], ...] | None = None
    blend: str = "linear"
    seed_blend: tuple[tuple[int, float], ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "prompt_blend", _check_blend(self.prompt_blend, "--prompt-blend", str))
        object.__setattr__(self, "seed_blend", _check_blend(self.seed_blend, "--seed-blend", int))
        if self.blend not in BLEND_MODES:
            raise ConfigError(f"--blend must be one of {', '.join(BLEND_MODES)}, got {self.blend!r}")
        check_control_scale(self.ip_adapter_scale, "--ip-adapter-scale")
        if self.ip_adapter_image is not None and (not isinstance(self.ip_adapter_image, str)
                                                  or not self.ip_adapter_image):
            raise ConfigError(f"--ip-adapter-image must be a file, URL or data: URI, got {self.ip_adapter_image!r}")
        if self.control_scales is not None:
            if not isinstance(self.control_scales, (tuple, list)):
                raise ConfigError(f"control_scales must be a list of numbers, got {self.control_scales!r}")
            object.__setattr__(self, "control_scales", tuple(check_control_scale(s) for s in self.control_scales))
        if not (0.0 < float(self.strength) <= 1.0):
            raise ConfigError(f"--strength must be in (0, 1], got {self.strength}")
        if self.steps is not None and not (1 <= int(self.steps) <= TIMESTEP_TABLE_SIZE):
            raise ConfigError(f"--steps must be between 1 and {TIMESTEP_TABLE_SIZE}, got {self.steps}")
        if self.t_index_list is not None:
            idx = list(self.t_index_list)
            if not idx:
                raise ConfigError("--t-index-list must hold at least one index")
            if any(i < 0 or i >= TIMESTEP_TABLE_SIZE for i in idx):
                raise ConfigError(
                    f"--t-index-list entries must be in [0, {TIMESTEP_TABLE_SIZE - 1}], got {idx}"
                )
            if any(b <= a for a, b in zip(idx, idx[1:])):
                raise ConfigError(f"--t-index-list must be strictly increasing, got {idx}")
        elif self.steps is not None:
            most = timesteps.max_steps(self.strength)
            if int(self.steps) > most:
                raise ConfigError(f"--steps {self.steps} is too many for --strength {self.strength}: at most {most}")
        if self.cfg_type is not None and self.cfg_type not in CFG_TYPES:
            raise ConfigError(f"--cfg-type must be one of {', '.join(CFG_TYPES)}, got {self.cfg_type!r}")
        if self.guidance is not None and self.guidance < 0:
            raise ConfigError(f"--guidance must be >= 0, got {self.guidance}")
        if self.noise is not None and self.noise not in NOISE_MODES:
            raise ConfigError(f"--noise must be one of {', '.join(NOISE_MODES)}, got {self.noise!r}")
        if self.vae_encode not in VAE_ENCODINGS:
            raise ConfigError(f"--vae-encode must be one of {', '.join(VAE_ENCODINGS)}, got {self.vae_encode!r}")
        if self.similarity_threshold is not None and not (0.0 <= self.similarity_threshold < 1.0):
            raise ConfigError(
                f"--similarity-filter must be in [0, 1), got {self.similarity_threshold}"
            )
        if self.max_skip < 0:
            raise ConfigError(f"--max-skip must be >= 0, got {self.max_skip}")
        if self.size < 64:
            raise ConfigError(f"--size must be at least 64, got {self.size}")
        if self.method not in METHODS:
            raise ConfigError(f"unknown --method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.method == "causal-video":
            self._check_causal_video()

    @property
    def video_cache_rows(self) -> int:
        """KV cache rows of one causal-video stream: one per denoising step with
        `kv_record` "steps" (StreamDiffusionV2's cache per step), else 1."""
        if self.video.kv_record != "steps":
            return 1
        return len(self.video.sigmas(self.strength, self.steps))

    def _check_causal_video(self) -> None:
        """Refuse, in one line, the image engine's options that causal-video does not have."""
        refused = [flag for flag, given in (
            ("--guidance above 1", self.resolved_guidance > 1.0), ("--cfg-type", self.cfg_type not in (None, "none")),
            ("--t-index-list", self.t_index_list is not None), ("--noise fixed", self.resolved_noise == "fixed"),
            ("--vae-encode sample", self.vae_encode == "sample"),
            ("--similarity-filter", self.similarity_threshold is not None), ("--seed-blend", self.seed_blend),
            ("--controlnet scales", self.control_scales), ("--ip-adapter-image", self.ip_adapter_image))
            if given]
        if refused:
            raise ConfigError(f"--method causal-video does not take {', '.join(refused)} (a distilled few-step "
                              f"video model: no guidance, fresh noise per step; steps via --strength/--steps or "
                              f"--video-timesteps): leave {'them' if len(refused) > 1 else 'it'} out")

    def t_indices(self, turbo: bool = False) -> tuple[int, ...]:
        """Indices into the 50-entry timestep table, one per denoising step
        (`schedule.timesteps.t_indices` of this config's strength, steps and t_index_list)."""
        return timesteps.t_indices(self.strength, self.steps, self.t_index_list, turbo=turbo)

    @property
    def resolved_guidance(self) -> float:
        """The guidance scale: `guidance`, or the method's paper setting when unset."""
        return float(self.guidance if self.guidance is not None else METHOD_DEFAULTS[self.method]["guidance"])

    @property
    def resolved_noise(self) -> str:
        """The noise mode: `noise`, or the method's reference setting when unset."""
        return self.noise or METHOD_DEFAULTS[self.method]["noise"]

    def resolved_cfg_type(self, turbo: bool = False) -> str:
        """The effective guidance type: turbo models and guidance <= 1 need none."""
        # With gamma <= 1 every guidance formula reduces to the conditional prediction
        # (eps_u + 1 * (eps_c - eps_u) = eps_c), so no unconditional work is needed.
        if turbo or self.resolved_guidance <= 1.0:
            return "none"
        return self.cfg_type or "self"

    def replace(self, **changes) -> "StreamConfig":
        """A validated copy with `changes` applied."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class IOConfig:
    """Where frames come from and go.

    Attributes:
        input: a video file, an image folder, `webcam:N`, or an rtsp/rtmp/http(s) URL.
        output: an .mp4 (or .mkv/.mov) file, a folder for PNGs, or `window`.
        max_frames: process only the first N frames.
        keep_size: scale outputs back to the input size instead of the processing size.
        queue_size: capacity of the threaded input/output queues.
        progress: show a progress bar.
        fps: frame rate of an image-folder input (None: 30); videos keep their own.
    """

    input: str
    output: str
    max_frames: int | None = None
    keep_size: bool = False
    queue_size: int = 8
    progress: bool = True
    fps: float | None = None

    def __post_init__(self):
        if self.max_frames is not None and self.max_frames < 1:
            raise ConfigError(f"--max-frames must be >= 1, got {self.max_frames}")
        if self.queue_size < 1:
            raise ConfigError(f"--queue-size must be >= 1, got {self.queue_size}")
        if self.fps is not None and not self.fps > 0:
            raise ConfigError(f"--fps must be > 0, got {self.fps}")


@dataclass(frozen=True)
class RunConfig:
    """Everything `diffstream run` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    io: IOConfig | None = None

    def __post_init__(self):
        # Caught here, before anything loads: the image methods cannot run on the video
        # UNet that motion modules make (factory.make_mechanism says the same at run time).
        if self.model.ip_adapter and self.model.motion_adapter:
            raise ConfigError("--ip-adapter does not run with --motion-adapter (live2diff) yet: leave one out")
        if self.stream.ip_adapter_image is not None and not self.model.ip_adapter:
            raise ConfigError("--ip-adapter-image needs an IP-Adapter: pass --ip-adapter sd15 (or plus-sd15, a file)")
        wan = self.model.model in WAN_MODELS
        sd = self.model.model in SD_MODELS or self.model.model in MODEL_PRESETS
        if self.stream.method == "causal-video" and sd:
            raise ConfigError(f"--method causal-video runs on a Wan video model, not --model {self.model.model}: "
                              f"pass --model tiny-wan or a Wan diffusers folder")
        if (self.model.transformer or self.model.text_encoder_offload) and self.stream.method != "causal-video":
            raise ConfigError("--transformer and --text-encoder-offload are for --method causal-video on a Wan video "
                              "model: add --method causal-video")
        if wan and self.stream.method != "causal-video":
            raise ConfigError(f"--model {self.model.model} is a Wan video model: it runs --method causal-video only")
        if self.model.motion_adapter and self.stream.method != "live2diff":
            raise ConfigError(f"--motion-adapter is for --method live2diff (motion modules turn the UNet into a "
                              f"video UNet); --method {self.stream.method} runs without it: leave it out")
