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
- `WanComponents`: the loaded bundle (transformer, VAE, UMT5 text encoder and tokenizer,
  flow-matching scheduler) of `--model tiny-wan` (`tiny_wan_modules`) or of a Wan
  diffusers folder (`load_wan_modules`), with the text encoding and latent normalisation
  of diffusers' Wan pipelines.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

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


# --- the model bundle (`--model tiny-wan`, a Wan diffusers folder) ------------------

# Text tokens the DiT sees: Wan's pipelines pad (with zeros) or cut UMT5's output to 512.
WAN_MAX_TEXT_TOKENS = 512
# Prompts whose embeddings `WanComponents.encode_text` keeps with the text encoder
# offloaded (each (L, D) on the device: 512 x 4096 x 2 B = 4 MiB for Wan 2.1 in bf16).
TEXT_CACHE_PROMPTS = 32
# StreamDiffusionV2's `timestep_shift` (its configs/wan_causal_dmd_v2v.yaml): the tiny
# scheduler's shift, used only when a schedule asks for warped timesteps.
SDV2_TIMESTEP_SHIFT = 8.0


@dataclass
class WanComponents:
    """The modules of a Wan 2.1 text-to-video model and what the causal-video pipeline needs of them.

    Loaded by `models.loading.load_components` (`--model tiny-wan`, or a Wan diffusers
    folder: `transformer/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`).

    Attributes:
        transformer: `WanTransformer3DModel` (also `unet`: the name the mechanism protocol,
            `ProcessorLease` and the server's method probe use for the denoiser).
        vae: `AutoencoderKLWan`.
        text_encoder, tokenizer: UMT5 and its tokenizer (the tiny model: a tiny UMT5 over
            the CLIP BPE vocabulary the package ships, with the CLIP tokenizer).
        scheduler: `FlowMatchEulerDiscreteScheduler` (its `shift` is the timestep shift).
        name: what the user asked for.
        device, dtype: where the modules live (the transformer, the VAE; the text encoder
            too unless offloaded).
        tiny_vae: a TAEHV (`--tiny-vae`) that decodes the stream's latents instead of the
            Wan VAE (StreamDiffusionV2's `--use_taehv`); the Wan VAE still encodes.
        text_encoder_offload: the text encoder lives on the CPU (`--text-encoder-offload`):
            prompts are encoded there, only their embeddings move to `device`, and those
            are cached per prompt (the last `TEXT_CACHE_PROMPTS` prompts), so a prompt is
            encoded once however often a stream returns to it.
    """

    transformer: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    name: str
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    backend: str = "eager"
    # What the image-model code paths ask of any components (none of it exists here).
    turbo: bool = False
    controlnets: tuple = ()
    ip_adapter: object | None = None
    is_video_unet: bool = False
    is_wan: bool = True
    text_encoder_offload: bool = False
    tiny_vae: torch.nn.Module | None = None  # TAEHV (`models.taehv`, `--tiny-vae`): decodes in the VAE's place
    _text_cache: OrderedDict = field(default_factory=OrderedDict, repr=False, compare=False)
    _text_lock: object = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser (the transformer), under the name every mechanism attaches to."""
        return self.transformer

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8, Wan's VAE)."""
        return WAN_SPATIAL_FACTOR

    @property
    def size_multiple(self) -> int:
        """Frame sides must be multiples of this: the VAE's 8 x the DiT's spatial patch."""
        return WAN_SPATIAL_FACTOR * int(self.transformer.config.patch_size[1])

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.out_channels)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def shift(self) -> float:
        """The scheduler's timestep shift."""
        return float(self.scheduler.config.shift)

    @property
    def max_text_tokens(self) -> int:
        """Text tokens per prompt: Wan's 512, or fewer if the tokenizer has fewer positions (CLIP: 77)."""
        return int(min(WAN_MAX_TEXT_TOKENS, self.tokenizer.model_max_length))

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Text to the DiT's text conditioning, as diffusers' Wan pipelines compute it.

        Adapted from diffusers WanVideoToVideoPipeline._get_t5_prompt_embeds (0.42.1):
        UMT5's last hidden states with the padding positions zeroed. With
        `text_encoder_offload` the encoder runs where it lives (the CPU), on the prompts
        not cached yet (one batch), and the embeddings are cached on `device`: equal to
        the encoding without offload (each row depends on its own prompt only).

        Args:
            prompts: N texts.
        Returns:
            (N, L, D) on device/dtype, L = `max_text_tokens`, D the encoder's width.
        """
        if not self.text_encoder_offload:
            return self._encode(prompts)
        with self._text_lock:
            cache = self._text_cache
            missing = list(dict.fromkeys(p for p in prompts if p not in cache))
            if missing:
                for prompt, emb in zip(missing, self._encode(missing)):  # emb (L, D) on device
                    cache[prompt] = emb
            for prompt in prompts:
                cache.move_to_end(prompt)
            out = torch.stack([cache[p] for p in prompts])  # (N, L, D)
            while len(cache) > TEXT_CACHE_PROMPTS:
                cache.popitem(last=False)
        return out

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        """Run the tokenizer and the text encoder where the encoder lives: (N, L, D) on device/dtype."""
        length = self.max_text_tokens
        where = next(self.text_encoder.parameters()).device
        tokens = self.tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                                add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = tokens.input_ids.to(where), tokens.attention_mask.to(where)  # (N, L) each
        hidden = self.text_encoder(ids, mask).last_hidden_state  # (N, L, D)
        return (hidden * mask[..., None].to(hidden.dtype)).to(device=self.device, dtype=self.dtype)

    def _latent_stats(self, like: torch.Tensor):
        config = self.vae.config
        shape = (1, int(config.z_dim), 1, 1, 1)
        mean = torch.tensor(config.latents_mean, device=like.device, dtype=like.dtype).view(shape)
        std = torch.tensor(config.latents_std, device=like.device, dtype=like.dtype).view(shape)
        return mean, std

    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's latents (B, 16, F, h, w) to the DiT's: (z - mean) / std per channel (Wan's pipelines)."""
        mean, std = self._latent_stats(latents)
        return (latents - mean) / std

    def denormalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The DiT's latents (B, 16, F, h, w) back to the VAE's: z * std + mean."""
        mean, std = self._latent_stats(latents)
        return latents * std + mean


def tiny_wan_text_encoder(seed: int = 0):
    """A 2-layer `UMT5EncoderModel` of width `TINY_WAN_TEXT_DIM` over the CLIP BPE
    vocabulary (the tiny model tokenises with the CLIP tokenizer the package ships; real
    Wan uses UMT5's own sentencepiece tokenizer)."""
    from transformers import UMT5Config, UMT5EncoderModel

    from diffstream.models.tokenizer import VOCAB_SIZE

    torch.manual_seed(seed)
    config = UMT5Config(vocab_size=VOCAB_SIZE, d_model=TINY_WAN_TEXT_DIM, d_kv=8, d_ff=64, num_layers=2,
                        num_heads=4, dropout_rate=0.0, is_encoder_decoder=False, use_cache=False,
                        pad_token_id=49407, eos_token_id=49407)
    return UMT5EncoderModel(config).eval().requires_grad_(False)


def flow_scheduler(shift: float = SDV2_TIMESTEP_SHIFT, num_train_timesteps: int = 1000):
    """diffusers' `FlowMatchEulerDiscreteScheduler` with a static timestep shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)


def tiny_wan_modules(seed: int = 0) -> dict:
    """Every module of `--model tiny-wan`, as a dict ready for `WanComponents`."""
    from diffstream.models.tokenizer import clip_tokenizer

    return dict(transformer=tiny_wan_transformer(seed=seed), vae=tiny_wan_vae(seed=seed + 1),
                text_encoder=tiny_wan_text_encoder(seed=seed + 2), tokenizer=clip_tokenizer(),
                scheduler=flow_scheduler())


def is_wan_checkpoint(spec: str) -> bool:
    """Whether `spec` names a Wan diffusers model: a folder whose `transformer/config.json`
    is a `WanTransformer3DModel` (or whose `model_index.json` is a Wan pipeline), or a hub
    id with a word starting "wan" in it, e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers (the hub is
    not asked: its loader says what is wrong)."""
    import json
    from pathlib import Path

    path = Path(spec).expanduser()
    if path.is_dir():
        for config, wanted in (("transformer/config.json", "WanTransformer3DModel"), ("model_index.json", "Wan")):
            try:
                name = json.loads((path / config).read_text()).get("_class_name", "")
            except (OSError, ValueError):
                continue
            if name.startswith(wanted):
                return True
        return False
    import re

    return (spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
            and re.search(r"(^|[/_.-])wan", spec.lower()) is not None)


def load_wan_modules(spec: str, dtype: torch.dtype, local_files_only: bool, transformer: bool = True) -> dict:
    """The modules of a Wan diffusers folder or hub id, each through its `from_pretrained`.

    The scheduler is a `FlowMatchEulerDiscreteScheduler` with the folder's shift (Wan's
    folders ship a UniPC config whose `flow_shift` is that shift).

    Args:
        transformer: load the folder's transformer; False leaves it out (None in the
            result: `--transformer` replaces it, and 2.6 GB need not be read for nothing).
    """
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    kwargs = dict(local_files_only=local_files_only)
    scheduler_config = {}
    try:
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(spec, subfolder="scheduler", **kwargs)
    except Exception:  # no scheduler/ folder: Wan's default shift
        pass
    shift = scheduler_config.get("shift", scheduler_config.get("flow_shift", 3.0))
    return dict(
        transformer=(WanTransformer3DModel.from_pretrained(spec, subfolder="transformer", torch_dtype=dtype, **kwargs)
                     if transformer else None),
        # Wan's pipelines keep the VAE in fp32 (its decoder is fragile in half precision); so do we.
        vae=AutoencoderKLWan.from_pretrained(spec, subfolder="vae", torch_dtype=torch.float32, **kwargs),
        text_encoder=UMT5EncoderModel.from_pretrained(spec, subfolder="text_encoder", torch_dtype=dtype, **kwargs),
        tokenizer=AutoTokenizer.from_pretrained(spec, subfolder="tokenizer", **kwargs),
        scheduler=flow_scheduler(shift=float(shift),
                                 num_train_timesteps=int(scheduler_config.get("num_train_timesteps", 1000))),
    )
