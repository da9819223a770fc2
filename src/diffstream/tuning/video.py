"""One-shot tuning of a Tune-A-Video-style video UNet on one clip, for FateZero's shape edits.

Wu et al., "Tune-A-Video" (ICCV 2023), Sec. 4.2, as FateZero tunes its shape-edit models
(Qi et al., Sec. 4; reference `train_tune_a_video.py`, `video_diffusion/trainer/
ddpm_trainer.py`, `config/tune/swan.yaml`):

- the image UNet is inflated (`models.video_unet.inflate`: temporal layers at an exact
  identity) and only Tune-A-Video's modules are trained (`mark_trainable`: the temporal
  layers and the spatial attn1/attn2 query projections);
- the data is one clip (the first `max_frames` frames, 8 in the reference) under its
  source prompt; the frames are encoded once by the frozen VAE (mean and std of the
  posterior) and the prompt once by the frozen text encoder; each step draws a posterior
  sample (the reference calls `latent_dist.sample()` every step), one timestep per clip
  uniformly from the training schedule and Gaussian noise, and the loss is the DDPM
  MSE between the UNet's output and the target of the scheduler's prediction type
  (epsilon: the noise; v_prediction: the velocity; sample: the clean latents);
- every forward pass runs the spatial self-attention sparse-causally (each frame attends
  to the previous and the first frame, FateZero's "previous+first" layout in every
  layer, `pipelines.fatezero.SPARSE_CAUSAL`), the attention the model is edited with;
- validation inverts the clip with DDIM under the source prompt and reconstructs it
  (FateZero's own editor with target = source, no fusion, guidance 1: exactly what the
  shape edit starts from) and reports the reconstruction's PSNR, so "the tuned model
  reconstructs its clip better" is measured during training.

The shared loop (`tuning.loop.tune`) owns the optimizer (AdamW, lr 1e-5 in the
reference), accelerate, checkpoints, resume and Ctrl-C.

What validation showed here (no SD 1.5 weights on the CI machine). On the tiny random
model, whose UNet is no denoiser, tuning makes DDIM inversion + reconstruction of the
clip far better (relative latent error 7.9 -> 2.3 in 60 steps, tests/tuning). On the
shipped toy model (`--model toy`, a trained denoiser) the tuning fits the clip (the
validation `loss` falls, 0.48 -> 0.38 in 100 steps at lr 1e-4) but the reconstruction
gets slightly worse at lr 1e-5 and much worse at 1e-4, almost all of it from the motion
modules (tuning only the queries leaves it as it was). A likely reason: they learn to
denoise a frame from its neighbours under independent per-frame noise (the training
noise, as the reference's), while DDIM inversion's "noise" is nearly the same in similar
frames. Validate before editing with a checkpoint, as the
reference does (its shape edits use the checkpoints of steps 150-250).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffstream.attention.base import BatchLayout
from diffstream.attention.fatezero import FateZero, FateZeroConfig, probe_layers
from diffstream.errors import ConfigError, InputError, ModelLoadError
from diffstream.models.video_unet import (
    DEFAULT_MAX_FRAMES,
    inflate,
    load_tuned_weights,
    mark_trainable,
    read_video_model_info,
    save_video_model,
)
from diffstream.pipelines.fatezero import SPARSE_CAUSAL, FateZeroEditConfig, FateZeroEditor, plan_windows

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# Timesteps at which validation measures the training objective on fixed noise.
VALIDATION_TIMESTEPS = (100, 300, 500, 700, 900)


@dataclass(frozen=True)
class VideoTuneConfig:
    """What `diffstream tune video` tunes on.

    Attributes:
        source_prompt: the text describing the clip (the reference's dataset prompt).
        input: the clip (video file or image folder); None when the frames are given to
            `VideoTuneTask` directly.
        max_frames: frames of the clip tuned on, from its start (the reference's
            n_sample_frame: 8).
        size: longer side of the processing size (rounded to what the model needs).
        validation_steps: DDIM steps of the validation inversion and reconstruction
            (the reference's tune configs: 50).
        positions: keep diffusers' frame positions in the temporal layers (False:
            Tune-A-Video's position-free temporal attention, `inflate`).
    """

    source_prompt: str
    input: str | None = None
    max_frames: int = 8
    size: int = 512
    validation_steps: int = 50
    positions: bool = False

    def __post_init__(self):
        if not str(self.source_prompt).strip():
            raise ConfigError("--source-prompt is required: describe the clip, e.g. \"a black swan swimming in a "
                              "river\" (the model is tuned on the clip under this text)")
        if not 1 <= int(self.max_frames) <= DEFAULT_MAX_FRAMES:
            raise ConfigError(f"--max-frames must be between 1 and {DEFAULT_MAX_FRAMES}, got {self.max_frames}")
        if int(self.size) < 8:
            raise ConfigError(f"--size must be at least 8 pixels, got {self.size}")
        if not 1 <= int(self.validation_steps) <= 1000:
            raise ConfigError(f"--validation-steps must be between 1 and 1000, got {self.validation_steps}")


def check_clip(path: str) -> None:
    """Open the clip and decode its first frame, before any model loads.

    Raises:
        InputError: an input that cannot be read, holds no frames or is a live stream.
    """
    from diffstream.io.sources import open_source

    source = open_source(path, max_frames=1)
    live = source.is_live
    source.close()
    if live:
        raise InputError(f"tune video needs a recorded clip (a video file or image folder), not the live stream {path}")


def read_clip(path: str, max_frames: int, size: int, multiple: int) -> list[np.ndarray]:
    """The first `max_frames` frames of a video file or image folder, resized as
    `diffstream edit` resizes them (longer side `size`, sides multiples of `multiple`).

    Returns:
        list of F frames (H, W, 3) uint8.
    Raises:
        InputError: an input that cannot be read or holds no frames.
    """
    from diffstream.frames import fit_size, resize
    from diffstream.io.sources import open_source

    source = open_source(path, max_frames=max_frames)
    try:
        if source.is_live:
            raise InputError(f"tune video needs a recorded clip (a video file or image folder), not the live "
                             f"stream {path}")
        target = fit_size(source.width, source.height, size, multiple)
        frames = [resize(frame, target) for frame in source]
    finally:
        source.close()
    if not frames:
        raise InputError(f"{path}: no frames could be read")
    return frames


def previous_refs(frames: int) -> tuple[int, ...]:
    """Sparse-causal reference rows of a clip: frame i attends to frame i - 1 (frame 0 to
    itself) and, through "previous+first", to frame 0."""
    return tuple(max(0, i - 1) for i in range(frames))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two pixel tensors in [-1, 1] (peak-to-peak 2)."""
    mse = float((a.float() - b.float()).square().mean())
    return math.inf if mse == 0 else 10.0 * math.log10(4.0 / mse)


class VideoTuneTask:
    """`TuneTask` of `diffstream tune video` (see the module docstring).

    Args:
        components: the loaded base model (`models.components.Components`), fp32: the
            tuned weights stay fp32 (accelerate's mixed precision casts the compute).
        config: the clip and prompt.
        frames: the clip's frames (F x (H, W, 3) uint8, sides multiples of the model's
            `size_multiple`) instead of reading `config.input`.
        model_config: the `config.ModelConfig` the components were loaded from (recorded
            in the saved model, so `edit --video-model` loads the same base).
    """

    name = "video"

    def __init__(self, components, config: VideoTuneConfig, frames=None, model_config=None):
        if getattr(components, "is_sdxl", False):
            raise ModelLoadError(f"tune video runs SD 1.x/2.x checkpoints (FateZero's); {components.name!r} is SDXL")
        if components.dtype != torch.float32:
            raise ConfigError("tune video keeps the tuned weights in fp32: load the model with --dtype fp32 (and "
                              "use --mixed-precision fp16/bf16 for half-precision compute)")
        self.config = config
        self.model_config = model_config
        if frames is None:
            if config.input is None:
                raise ConfigError("tune video needs a clip: pass INPUT (a video file or image folder)")
            frames = read_clip(config.input, config.max_frames, config.size, components.size_multiple)
        self.frames = [np.ascontiguousarray(f) for f in list(frames)[: config.max_frames]]
        if not self.frames:
            raise InputError("tune video needs at least one frame")
        shape = self.frames[0].shape
        multiple = components.size_multiple
        if any(f.shape != shape for f in self.frames) or len(shape) != 3 or shape[2] != 3 \
                or shape[0] % multiple or shape[1] % multiple:
            raise InputError(f"the clip's frames must all be (H, W, 3) with sides multiples of {multiple}, "
                             f"got {[f.shape for f in self.frames][:3]}")
        vf = components.vae_scale_factor
        self.latent_hw = (shape[0] // vf, shape[1] // vf)
        self.pixels, self.mean, self.std = self._encode(components)  # (F, 3, H, W), (F, C, h, w) x2, CPU
        self.text = components.encode_prompt([config.source_prompt]).float().cpu()  # (1, T, D)
        self.unet = inflate(components.unet, positions=config.positions).float()
        self.trainable = mark_trainable(self.unet)
        self.components = dataclasses.replace(components, unet=self.unet)
        self.refs = previous_refs(len(self.frames))
        # Sparse-causal spatial self-attention in every forward pass (FateZero's processors,
        # "plain" phase: attention layout only, nothing stored or fused). Installed for the
        # task's life, not per step: gradient checkpointing re-runs blocks in the backward
        # pass, which must see the same processors and layout as the forward pass.
        sc = FateZeroConfig(steps=1, cross_replace=0.0, self_replace=0.0, **SPARSE_CAUSAL)
        self.mechanism = FateZero(sc, probe_layers(self.unet, self.latent_hw,
                                                   text_tokens=components.tokenizer.model_max_length))
        self._attached = contextlib.ExitStack()
        self._attached.enter_context(self.mechanism.attach(self.unet))
        self.alphas_cumprod = components.alphas_cumprod.detach().float().cpu()  # (T_train,)
        self.prediction_type = components.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise ModelLoadError(f"tune video: unknown prediction type {self.prediction_type!r} of the scheduler")

    @torch.no_grad()
    def _encode(self, components):
        """Pixels, posterior mean and std of the clip, encoded once (the VAE is frozen)."""
        from diffstream.frames import frames_to_tensor

        pixels, means, stds = [], [], []
        scale = components.vae.config.scaling_factor
        for i in range(0, len(self.frames), 4):
            batch = frames_to_tensor(self.frames[i : i + 4], components.device, components.dtype)  # (b, 3, H, W)
            if components.is_tiny_vae:  # TAESD has no posterior: a point
                mean = components.encode_image(batch)
                std = torch.zeros_like(mean)
            else:
                posterior = components.vae.encode(batch).latent_dist
                mean, std = posterior.mean * scale, posterior.std * scale
            pixels.append(batch.float().cpu())
            means.append(mean.float().cpu())
            stds.append(std.float().cpu())
        # contiguous: the VAE may hand back channels-last tensors, and the CPU backward of
        # a convolution over channels-last input crashed (torch 2.13, oneDNN) in tests
        return tuple(torch.cat(parts).contiguous() for parts in (pixels, means, stds))

    # --- the TuneTask protocol --------------------------------------------------------
    def module(self) -> torch.nn.Module:
        """The video UNet; requires_grad exactly on Tune-A-Video's tuned parameters, with
        the sparse-causal processors installed (`close` restores the stock ones)."""
        return self.unet

    def close(self) -> None:
        """Put the video UNet's own attention processors back (after the run)."""
        self._attached.close()

    def sample_batch(self, step: int, generator: torch.Generator, batch_size: int) -> torch.Tensor:
        """`batch_size` posterior samples of the clip's latents, (B, F, C, h, w)."""
        noise = torch.randn((int(batch_size), *self.mean.shape), generator=generator)
        return self.mean + self.std * noise

    def loss(self, module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """DDPM loss of a batch of clips (Ho et al. 2020, Eq. 14; ddpm_trainer.py's step).

        Args:
            module: the video UNet, possibly wrapped by accelerate.
            batch: (B, F, C, h, w) clean latents from `sample_batch`.
        Returns:
            scalar MSE between the UNet output and the prediction type's target.
        """
        b = batch.shape[0]
        noise = torch.randn(batch.shape, generator=generator)  # (B, F, C, h, w)
        t = torch.randint(0, len(self.alphas_cumprod), (b,), generator=generator)  # one timestep per clip
        return self._ddpm_loss(module, batch, noise, t)

    def _ddpm_loss(self, module, batch: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The loss of clean latents `batch` (B, F, C, h, w) noised with `noise` (same
        shape) to timesteps `t` (B,)."""
        device = next(self.unet.parameters()).device
        b, frames = batch.shape[:2]
        abar = self.alphas_cumprod[t].view(b, 1, 1, 1, 1)
        x0 = batch
        noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * noise  # q(x_t | x_0)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":  # Salimans & Ho 2022: v = sqrt(abar) eps - sqrt(1-abar) x0
            target = abar.sqrt() * noise - (1 - abar).sqrt() * x0
        else:
            target = x0
        clips = noisy.transpose(1, 2).contiguous().to(device)  # (B, C, F, h, w); see _encode on the layout
        text = self.text.to(device).expand(b * frames, -1, -1)  # (B*F, T, D): once per frame
        # B clips of F frames, branch-major: what FateZero's processors read as groups
        layout = BatchLayout.branch_major("plain", 0, tuple(f"clip{i}" for i in range(b)), frames, 1,
                                          refs=self.refs)
        self.mechanism.before_unet(layout)  # stays set for the backward pass (checkpointing)
        out = module(clips, t.to(device), encoder_hidden_states=text, return_dict=False)[0]  # (B, C, F, h, w)
        return F.mse_loss(out.float().transpose(1, 2), target.to(device).float())

    @torch.no_grad()
    def validate(self, module, step: int, folder: Path) -> dict[str, float]:
        """Invert the clip with DDIM under the source prompt and reconstruct it with the
        current weights (FateZero's editor, target = source, no fusion, guidance 1).

        Writes the reconstructed frames (`frame_NNNN.png`) into `folder`. Returns
        psnr (dB, decoded frames against the input frames), psnr_vae (against the VAE's
        own reconstruction of the clip, the best an inversion can reach), psnr_latent
        (reconstructed latents against the encoded clip, peak = the clip latents' range:
        the inversion alone, without the VAE), latent_error (their relative L2 distance)
        and loss (the training loss of the clip's posterior mean on fixed noise at
        `VALIDATION_TIMESTEPS`: how well the model fits the clip).
        """
        from diffstream.frames import save_image, tensor_to_frames

        device = next(module.parameters()).device
        components = self.components
        if components.device != device:  # the loop put the UNet elsewhere: follow it
            components.vae.to(device)
            components.text_encoder.to(device)
            components = self.components = dataclasses.replace(components, device=device)
        components = dataclasses.replace(components, unet=module)
        prompt = self.config.source_prompt
        fz = FateZeroConfig(steps=self.config.validation_steps, cross_replace=0.0, self_replace=0.0, **SPARSE_CAUSAL)
        edit = FateZeroEditConfig(source_prompt=prompt, prompt=prompt, guidance=1.0, window=len(self.frames),
                                  store_budget=None, fatezero=fz)
        editor = FateZeroEditor(components, edit, self.latent_hw)
        window = plan_windows(len(self.frames), len(self.frames), fz.reference_frame, first=True)[0]
        z0 = self.mean.to(device)  # (F, C, h, w): the posterior mean
        store = editor.new_store()
        try:
            z_T = editor.invert(z0, window.ref_rows, store)
        finally:
            store.close()
        recon = editor.reconstruct(z_T, window.ref_rows)  # (F, C, h, w)
        pixels = torch.cat([components.decode_latents(recon[i : i + 4]).float().cpu() for i in range(0, len(recon), 4)])
        vae = torch.cat([components.decode_latents(z0[i : i + 4]).float().cpu() for i in range(0, len(z0), 4)])
        for i, frame in enumerate(tensor_to_frames(pixels)):
            save_image(Path(folder) / f"frame_{i:04d}.png", frame)
        # the training objective on fixed noise at fixed timesteps: how well the clip is fitted
        g = torch.Generator().manual_seed(0)
        fitted = [float(self._ddpm_loss(module, self.mean[None], torch.randn((1, *self.mean.shape), generator=g),
                                        torch.tensor([t]))) for t in VALIDATION_TIMESTEPS]
        error = float((recon.float() - z0.float()).norm() / z0.float().norm().clamp_min(1e-12))
        peak = float(z0.max() - z0.min())
        mse = float((recon.float() - z0.float()).square().mean())
        latent = math.inf if mse == 0 else 10.0 * math.log10(peak**2 / mse)
        return dict(psnr=psnr(pixels, self.pixels), psnr_vae=psnr(pixels, vae), psnr_latent=latent,
                    latent_error=error, loss=sum(fitted) / len(fitted))

    def save(self, module, folder: Path) -> None:
        """The video model (`models.video_unet.save_video_model`) with what edit needs."""
        save_video_model(module, folder, self.base_info())

    def load_trainable(self, module, folder: Path) -> None:
        """Restore the tuned parameters from a saved video model (resume); a checkpoint
        of another clip, prompt or size is refused (ConfigError)."""
        saved = read_video_model_info(folder)
        mine = self.base_info()
        for key in ("source_prompt", "frames", "size", "base_model"):
            if saved.get(key) != mine[key]:
                raise ConfigError(f"--resume {Path(folder).parent}: that run tuned {key}={saved.get(key)!r}, this one "
                                  f"has {mine[key]!r}; resume with the same clip, prompt and model, or start a new run")
        load_tuned_weights(module, folder)

    def usage(self, folder: Path) -> str:
        clip = self.config.input or "CLIP"
        return (f"diffstream edit {clip} -o edited.mp4 --method fatezero --video-model {folder} "
                f"--max-frames {len(self.frames)} --size {self.config.size} "
                f"--source-prompt \"{self.config.source_prompt}\" "
                f"--prompt \"...\" --blend-words SOURCE_WORD TARGET_WORD")

    def base_info(self) -> dict:
        """What `edit --video-model` checks and shows: the base model, the clip, the prompt."""
        model = self.model_config.resolved() if self.model_config is not None else None
        lcm = model.lcm_lora if model is not None and model.lcm_lora and str(model.lcm_lora).lower() != "none" else None
        height, width = self.frames[0].shape[:2]
        return dict(
            base_model=model.model if model is not None else self.components.name,
            lcm_lora=lcm,
            loras=[[str(p), float(s)] for p, s in model.loras] if model is not None else [],
            source_prompt=self.config.source_prompt,
            input=self.config.input,
            frames=len(self.frames),
            size=[width, height],
            positions=bool(self.config.positions),
            frame_attention=SPARSE_CAUSAL["frame_attention"],
        )
