"""`Components`: the loaded modules of a Stable Diffusion model and the facts derived from them.

A plain dataclass with no loading code, so every room that only *uses* a model
(pipelines, the tiny test model, benchmarks) can name it without importing the loaders
(`models.loading` builds it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Components:
    """The modules of a Stable Diffusion model plus what the engine needs to know about them.

    Attributes:
        unet, vae, text_encoder, tokenizer, scheduler: diffusers/transformers objects.
        text_encoder_2, tokenizer_2: SDXL's second (OpenCLIP ViT-bigG) text encoder with its
            projection, and its tokenizer; None for SD 1.x/2.x.
        force_zeros_for_empty_prompt: SDXL: an empty negative prompt is zeros, not the
            encoding of "" (the SDXL pipelines' own setting).
        name: what the user asked for (for messages and reports).
        turbo: 1-step x0 sampler, no CFG.
        device, dtype: where the modules live.
        backend: "eager", "compile" or "openvino" (`models.backends`).
    """

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    name: str
    turbo: bool = False
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    depth_prior_state: dict | None = None  # Live2Diff's depth module weights, if the checkpoint had them
    backend: str = "eager"  # how unet/vae run (`models.backends.apply_backend` sets it)
    controlnets: tuple = ()  # `models.controlnet.ControlUnit`s, in --controlnet order
    ip_adapter: object | None = None  # `models.ip_adapter.IPAdapter` (its weights are in the UNet)
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object | None = None
    force_zeros_for_empty_prompt: bool = True

    # --- facts derived from the modules ---------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for SD)."""
        if self.is_tiny_vae:
            return 8  # TAESD always down-samples 8x, like SD's VAE
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def is_tiny_vae(self) -> bool:
        return type(self.vae).__name__ == "AutoencoderTiny"

    @property
    def size_multiple(self) -> int:
        """Frame sides must be multiples of this: VAE factor x the UNet's down-sampling."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def is_sdxl(self) -> bool:
        """SDXL-family: two text encoders, pooled text embeddings and size conditioning."""
        return self.text_encoder_2 is not None

    @property
    def is_video_unet(self) -> bool:
        """True for a UNet with motion modules (UNetMotionModel)."""
        return type(self.unet).__name__ == "UNetMotionModel"

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.out_channels)

    @property
    def unet_in_channels(self) -> int:
        """4 for text-to-image checkpoints, 8 for InstructPix2Pix-style ones."""
        return int(self.unet.config.in_channels)

    @property
    def prediction_type(self) -> str:
        return getattr(self.scheduler.config, "prediction_type", "epsilon")

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    # --- the three model calls the engine makes besides the UNet ----------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Text to CLIP hidden states. Returns (len(prompts), 77, D) on device/dtype."""
        return self.encode_text(prompts)[0]

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text to the UNet's text conditioning.

        SD 1.x/2.x: the text encoder's last hidden states, no pooled embedding. SDXL (as
        diffusers' SDXL pipelines): both encoders' penultimate hidden states side by side
        (768 + 1280 = 2048 wide) and the second encoder's pooled, projected embedding.

        Returns:
            ((N, 77, D), (N, P) or None) on device/dtype.
        """
        pairs = [(self.tokenizer, self.text_encoder)]
        if self.is_sdxl:
            pairs.append((self.tokenizer_2, self.text_encoder_2))
        hidden, pooled = [], None
        for tokenizer, encoder in pairs:
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(self.device)
            if not self.is_sdxl:
                return encoder(ids)[0].to(self.dtype), None  # (N, 77, D)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # (N, 77, D_i): SDXL conditions on the penultimate layer
            if out[0].ndim == 2:  # the projection model's text_embeds (N, P)
                pooled = out[0]
        return torch.cat(hidden, dim=-1).to(self.dtype), pooled.to(self.dtype)

    def time_ids(self, height: int, width: int) -> torch.Tensor:
        """SDXL's size conditioning (original size, crop top-left, target size), as diffusers'
        img2img pipeline builds it for an uncropped (height, width) image. Returns (1, 6)."""
        return torch.tensor([[height, width, 0, 0, height, width]], device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] to scaled latents (B, C, H/8, W/8).

        Without `generator` the posterior mean is used, so encoding is deterministic; with
        a (CPU) generator, a posterior sample mean + std * noise is drawn from it (what the
        streaming references do every frame). A tiny VAE has no posterior: always its output.
        """
        assert pixels.ndim == 4 and pixels.shape[1] == 3, f"{pixels.shape=}"
        if self.is_tiny_vae:
            latents = self.vae.encode(pixels).latents
        elif generator is None:
            latents = self.vae.encode(pixels).latent_dist.mean
        else:
            posterior = self.vae.encode(pixels).latent_dist
            noise = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean)
            latents = posterior.mean + posterior.std * noise
        return latents * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) to pixels (B, 3, 8h, 8w) in [-1, 1]."""
        assert latents.ndim == 4, f"{latents.shape=}"
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample
