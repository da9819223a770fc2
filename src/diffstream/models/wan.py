"""A tiny, randomly initialised Wan 2.1 video model: the causal-video machinery's test bench.

Issue #18 (a causal video-model backend, Wan family: StreamDiffusionV2, Self-Forcing,
LongLive; shared/notes/field-2026-12.md Sec. 1, 2, 5). Their checkpoints are Wan 2.1's
DiT (1.3B: 30 blocks, 12 heads x 128) made block-causal, with Wan's causal 3-D VAE.
Here both are diffusers' own classes (`WanTransformer3DModel`, `AutoencoderKLWan`) at
toy width, built from config with a fixed seed: identical on every machine, no download,
fast on a CPU at 32x32 px. Their outputs are noise: they exist to prove the machinery.

- `tiny_wan_transformer`: the DiT. Latents (B, 16, F, h, w) like Wan's; patch (1, 2, 2),
  so one latent frame of h x w is h*w/4 tokens and a patch never spans two frames.
- `tiny_wan_vae`: the VAE, with Wan's 8x spatial and 4x temporal compression (1 + 4k
  frames -> 1 + k latent frames) and 16 latent channels.
- `WanVAEStream`: that VAE's encoder and decoder driven chunk by chunk through their own
  causal feature caches, as StreamDiffusionV2's streaming VAE does (notes Sec. 5: "a thin
  wrapper over diffusers' own feature cache"); equal to one-shot encode/decode.
"""

from __future__ import annotations

import torch

# The DiT's text width (the tiny text embeddings are (B, L, TINY_WAN_TEXT_DIM)); Wan's is 4096 (UMT5-XXL).
TINY_WAN_TEXT_DIM = 32
# Latent channels of Wan 2.1's VAE, and what the DiT takes and returns.
WAN_LATENT_CHANNELS = 16
# Wan's VAE: 4x temporal compression after the first frame, 8x spatial.
WAN_TEMPORAL_FACTOR = 4
WAN_SPATIAL_FACTOR = 8


def tiny_wan_transformer(seed: int = 0, num_layers: int = 2):
    """A small `WanTransformer3DModel` (Wan 2.1 text-to-video layout), random weights.

    2 heads x 24 channels (inner width 48), so Wan's 3-axis rotary embedding splits each
    head into 8 time + 8 height + 8 width channels (diffusers' `WanRotaryPosEmbed`:
    h = w = 2 * (head_dim // 6), t = head_dim - h - w; each must be even). Patch (1, 2, 2)
    as in Wan; 16 latent channels in and out; text width `TINY_WAN_TEXT_DIM`; rotary
    table of Wan's 1024 positions per axis.

    Forward: `model(latents, timestep, encoder_hidden_states, return_dict=False)[0]` with
    latents (B, 16, F, h, w) (h, w even), timestep (B,) in [0, 1000), text (B, L, 32)
    -> (B, 16, F, h, w). Tokens are in (frame, row, column) order: F * (h/2) * (w/2).

    Args:
        seed: torch seed for the weights.
        num_layers: transformer blocks (each: self-attention `attn1`, cross-attention
            `attn2`, feed-forward).
    """
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=24,
        in_channels=WAN_LATENT_CHANNELS,
        out_channels=WAN_LATENT_CHANNELS,
        text_dim=TINY_WAN_TEXT_DIM,
        freq_dim=32,
        ffn_dim=64,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    ).eval().requires_grad_(False)


def tiny_wan_vae(seed: int = 0):
    """A small `AutoencoderKLWan` (Wan 2.1's causal 3-D VAE), random weights.

    Wan's compression at toy width: 3 spatial down-samplings (8x), the last two also
    temporal (4x, causal: frame 0 alone, then 4 frames per latent frame), 16 latent
    channels, one residual block per level, no attention outside the mid block.

    encode: (B, 3, 1 + 4k, H, W) in [-1, 1] (H, W multiples of 8) -> posterior over
    (B, 16, 1 + k, H/8, W/8); decode: (B, 16, 1 + k, h, w) -> (B, 3, 1 + 4k, 8h, 8w),
    clamped to [-1, 1].
    """
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=WAN_LATENT_CHANNELS,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
    ).eval().requires_grad_(False)


class WanVAEStream:
    """One stream through a Wan VAE: frames in as they come, latents out; latents in, frames out.

    `AutoencoderKLWan._encode` runs its causal encoder over frame 0, then frames 1-4,
    5-8, ..., carrying each causal convolution's last input frames in a feature cache
    (`feat_cache`, one entry per `WanCausalConv3d`), and `_decode` runs the decoder one
    latent frame at a time the same way. Here those loops are split across calls, with
    this stream's own caches (never the model's `_feat_map` / `_enc_feat_map`, so
    several streams and one-shot calls can share one VAE). Equal to one-shot
    `vae.encode(video).latent_dist.mode()` / `vae.decode(latents)` on the whole video
    (tests/models/test_wan_vae_stream.py).

    Wan's VAE has no patchify (`patch_size` None, Wan 2.1) and no tiling here; a VAE with
    either is refused.

    Args:
        vae: an `AutoencoderKLWan`.
    """

    def __init__(self, vae):
        if vae.config.patch_size is not None:
            raise ValueError("WanVAEStream supports Wan 2.1's VAE (no patch_size)")
        self.vae = vae
        self._encoder_convs = vae._cached_conv_counts["encoder"]
        self._decoder_convs = vae._cached_conv_counts["decoder"]
        self.reset()

    def reset(self) -> None:
        """A new stream: the next pushed frame is frame 0, the next latent latent frame 0."""
        self._enc_cache = [None] * self._encoder_convs
        self._dec_cache = [None] * self._decoder_convs
        self._pending: list[torch.Tensor] = []  # frames waiting for a full group of 4, each (B, 3, 1, H, W)
        self.frames_in = 0  # frames pushed so far
        self.latents_decoded = 0  # latent frames decoded so far

    @property
    def frames_needed(self) -> int:
        """Frames the next `encode` call needs: 1 for the stream's first frame, then 4."""
        return 1 if self.frames_in == 0 else WAN_TEMPORAL_FACTOR

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Encode the next group of frames into one latent frame (the posterior mean).

        Args:
            frames: (B, 3, n, H, W) in [-1, 1], n = `frames_needed` (1 first, then 4).
        Returns:
            (B, 16, 1, H/8, W/8) the latent frame (unscaled, as `vae.encode` gives it).
        """
        n = frames.shape[2]
        if n != self.frames_needed:
            raise ValueError(f"the Wan VAE encodes 1 frame first, then 4 at a time: got {n}, "
                             f"need {self.frames_needed}")
        vae = self.vae
        # Adapted from diffusers AutoencoderKLWan._encode (0.42.1): one iteration of its loop.
        out = vae.encoder(frames, feat_cache=self._enc_cache, feat_idx=[0])  # (B, 2 z, 1, h, w)
        self.frames_in += n
        moments = vae.quant_conv(out)  # 1x1x1 causal conv: no cache needed
        mean, _ = moments.chunk(2, dim=1)  # DiagonalGaussianDistribution's mode: the mean
        return mean

    @torch.no_grad()
    def push(self, frame: torch.Tensor) -> torch.Tensor | None:
        """Push one frame; return a latent frame when one is complete (frame 0, then every 4th).

        Args:
            frame: (B, 3, H, W) in [-1, 1].
        Returns:
            (B, 16, 1, H/8, W/8) or None.
        """
        self._pending.append(frame.unsqueeze(2))  # (B, 3, 1, H, W)
        if len(self._pending) < self.frames_needed:
            return None
        frames = torch.cat(self._pending, dim=2)  # (B, 3, n, H, W)
        self._pending.clear()
        return self.encode(frames)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Decode the next latent frame.

        Args:
            latent: (B, 16, 1, h, w), unscaled.
        Returns:
            (B, 3, n, 8h, 8w) in [-1, 1]: n = 1 for the stream's first latent frame, else 4.
        """
        if latent.shape[2] != 1:
            raise ValueError(f"decode one latent frame at a time, got {latent.shape[2]}")
        vae = self.vae
        # Adapted from diffusers AutoencoderKLWan._decode (0.42.1): one iteration of its loop.
        x = vae.post_quant_conv(latent)  # 1x1x1 causal conv: no cache needed
        out = vae.decoder(x, feat_cache=self._dec_cache, feat_idx=[0], first_chunk=self.latents_decoded == 0)
        self.latents_decoded += 1
        return torch.clamp(out, min=-1.0, max=1.0)
