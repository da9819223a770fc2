"""A tiny, randomly initialised Stable Diffusion: the machinery's test bench.

It has the SD 1.x architecture at toy width: a UNet2DConditionModel with attention in
the down, mid and up blocks below full latent resolution, an AutoencoderKL with the real
8x down-sampling, and a CLIP text encoder driven by the real CLIP BPE tokenizer. Built from config with a fixed
seed, so it is identical on every machine and needs no download. Its images are noise:
it exists for smoke tests, CI and benchmarks of the machinery, never for results.
"""

from __future__ import annotations

import torch

TINY_TEXT_DIM = 32


def tiny_unet(in_channels: int = 4, seed: int = 0):
    """A small UNet2DConditionModel: 2 resolutions, attention only at the lower one.

    As in SD 1.5, whose 64x64-latent blocks are the costly ones, the full-resolution
    blocks have no attention (`DownBlock2D` / `UpBlock2D`): self-attention over every
    latent cell (4,096 tokens at 512 px) made the model take seconds per frame on a CPU.
    Self- and cross-attention sit in `down_blocks.1`, `mid_block` and `up_blocks.0` (two
    layers), all at half resolution, so StreamV2V's default fusion blocks (mid_block,
    up_blocks.0, up_blocks.1) fuse in mid_block and up_blocks.0. Widths (32, 64) are what
    `tiny_motion_adapter` and the depth prior match.

    Args:
        in_channels: 4 for text-to-image / SDEdit, 8 for an InstructPix2Pix-style model
            (noisy latent concatenated with the source image latent).
    """
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=TINY_TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def tiny_vae(seed: int = 0):
    """A small AutoencoderKL with SD's 8x spatial down-sampling and 4 latent channels.

    Unlike SD's VAE its mid blocks have no self-attention: at the latent resolution
    (4,096 tokens at 512 px) it would cost more than the rest of the tiny VAE, and no
    machinery of diffstream touches the VAE's attention.
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        mid_block_add_attention=False,
    ).eval()


def tiny_text_encoder(seed: int = 0):
    """A 2-layer CLIP text encoder over the full 49,408-token CLIP vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffstream.models.tokenizer import VOCAB_SIZE

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=TINY_TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config).eval()


def sd_scheduler():
    """An LCMScheduler with Stable Diffusion 1.x's noise schedule (scaled linear betas)."""
    from diffusers import LCMScheduler

    return LCMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
    )


def tiny_components(in_channels: int = 4, seed: int = 0):
    """All modules of the tiny model, as a dict ready for `Components`."""
    from diffstream.models.tokenizer import clip_tokenizer

    return dict(
        unet=tiny_unet(in_channels=in_channels, seed=seed),
        vae=tiny_vae(seed=seed + 1),
        text_encoder=tiny_text_encoder(seed=seed + 2),
        tokenizer=clip_tokenizer(),
        scheduler=sd_scheduler(),
    )


def tiny_sdxl_components(seed: int = 0):
    """A tiny random SDXL-architecture model, as a dict ready for `Components` (tests).

    SDXL's layout at toy width: a UNet with `text_time` added conditioning (pooled text
    embedding + 6 size ids), linear attention projections and two transformer layers in
    its lower block; two CLIP text encoders (the second with a text projection, whose
    penultimate hidden states are concatenated with the first's: 32 + 32 wide); a KL VAE
    with SDXL's latent scaling factor.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from diffstream.models.tokenizer import VOCAB_SIZE, clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=2 * TINY_TEXT_DIM,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + TINY_TEXT_DIM, norm_num_groups=8,
    ).eval()
    vae = tiny_vae(seed=seed + 1)
    vae.register_to_config(scaling_factor=0.13025)  # SDXL's VAE latent scale
    torch.manual_seed(seed + 3)
    config = CLIPTextConfig(vocab_size=VOCAB_SIZE, hidden_size=TINY_TEXT_DIM, intermediate_size=64,
                            num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=77,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                            projection_dim=TINY_TEXT_DIM)
    return dict(unet=unet, vae=vae, text_encoder=tiny_text_encoder(seed=seed + 2), tokenizer=clip_tokenizer(),
                text_encoder_2=CLIPTextModelWithProjection(config).eval(), tokenizer_2=clip_tokenizer(),
                scheduler=sd_scheduler())


def tiny_taesd(seed: int = 0, full_size: bool = False):
    """A random AutoencoderTiny: TAESD's real architecture (`full_size=True`) or a toy width."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    if full_size:
        return AutoencoderTiny().eval()
    return AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    ).eval()


# --- Full-size Stable Diffusion 1.5 architecture with random weights -----------------
# Random weights time exactly like trained ones, so benchmarks of the machinery can run
# at real size with no download.


def sd15_unet():
    """(Benchmarks) UNet2DConditionModel with Stable Diffusion 1.5's configuration, random weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8,
    ).eval().requires_grad_(False)


def sd15_text_encoder():
    """(Benchmarks) SD 1.x's CLIP ViT-L/14 text encoder configuration, random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return CLIPTextModel(cfg).eval().requires_grad_(False)


def sd15_vae():
    """(Benchmarks) SD's AutoencoderKL configuration, random weights."""
    from diffusers import AutoencoderKL

    torch.manual_seed(2)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    ).eval().requires_grad_(False)


def sd15_random_components(dtype=torch.float32):
    """(Benchmarks) Components of a random SD 1.5-size model with a TAESD-size tiny VAE."""
    from diffstream.models.components import Components
    from diffstream.models.tokenizer import clip_tokenizer

    return Components(
        unet=sd15_unet().to(dtype), vae=tiny_taesd(full_size=True).to(dtype),
        text_encoder=sd15_text_encoder().to(dtype), tokenizer=clip_tokenizer(), scheduler=sd_scheduler(),
        name="sd15-random", dtype=dtype,
    )


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give every parameter seeded random values (zero-initialised layers included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    return module


def tiny_dpt(seed: int = 0):
    """A random DPT depth model at toy size and its image processor (tests)."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37, image_size=32,
        patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 8, 16, 16],
        fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5],
    )
    torch.manual_seed(seed)
    model = DPTForDepthEstimation(config).eval()
    processor = DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False)
    return model, processor


def tiny_depth_estimator(seed: int = 0):
    """The tiny DPT wrapped as a DepthEstimator (tests, --depth-model tiny)."""
    from diffstream.models.depth import DepthEstimator

    return DepthEstimator.from_components(*tiny_dpt(seed), device="cpu")


def tiny_clip(seed: int = 0):
    """A random CLIP model at toy size with the real CLIP BPE tokenizer (metrics tests).

    Returns:
        (CLIPModel, CLIPImageProcessor, CLIPTokenizer)
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from diffstream.models.tokenizer import VOCAB_SIZE, clip_tokenizer

    config = CLIPConfig(
        text_config=dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPModel(config).eval(), processor, clip_tokenizer()
