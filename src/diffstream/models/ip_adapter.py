"""IP-Adapter: an image as a prompt (Ye et al. 2023, "IP-Adapter: Text Compatible Image
Prompt Adapter for Text-to-Image Diffusion Models"), loaded into the UNet with diffusers.

An IP-Adapter adds decoupled cross-attention: every cross-attention layer gets its own
key/value projections of image tokens (Sec. 3.2, Eq. 5), their output scaled by a weight
and added to the text attention's. The image tokens come from a CLIP image encoder through
a small projection: the pooled embedding to 4 tokens (IP-Adapter), or the penultimate
hidden states through a resampler (IP-Adapter Plus). diffusers implements both
(`UNet2DConditionLoadersMixin._load_ip_adapter_weights`, `IPAdapterAttnProcessor2_0`); this
module loads them the way users name them and turns an image into the UNet's
`added_cond_kwargs["image_embeds"]` for positive and negative rows, as diffusers'
pipelines do (`encode_image`, `prepare_ip_adapter_image_embeds`).

The IP-Adapter's processors become the UNet's own: mechanisms that install processors
(the feature bank on self-attention, Live2Diff on the motion modules) keep them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffstream.errors import ConfigError, ModelLoadError, one_line

# h94/IP-Adapter's SD 1.5 adapters: (repo, subfolder, weight file); their CLIP ViT-H image
# encoder sits in models/image_encoder, where diffusers' loader looks by default.
IP_ADAPTER_PRESETS = {
    "sd15": ("h94/IP-Adapter", "models", "ip-adapter_sd15.safetensors"),
    "plus-sd15": ("h94/IP-Adapter", "models", "ip-adapter-plus_sd15.safetensors"),
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass
class IPAdapter:
    """A loaded IP-Adapter: its image encoder and image processor (the projection and the
    attention weights live in the UNet).

    Attributes:
        image_encoder: transformers `CLIPVisionModelWithProjection`, on the model's device/dtype.
        feature_extractor: `CLIPImageProcessor` (resize, crop, normalise).
        plus: True for IP-Adapter Plus (penultimate hidden states, negative from a black image).
    """

    image_encoder: torch.nn.Module
    feature_extractor: object
    plus: bool

    @torch.no_grad()
    def embeds(self, image: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive, negative) image embeddings of one image prompt, each (1, 1, ...).

        Follows diffusers' `encode_image`: the pooled projection with zeros as the negative
        (IP-Adapter), or the penultimate hidden states with those of a black image as the
        negative (Plus). `image=None` gives zeros for both (used at scale 0).

        Args:
            image: (H, W, 3) uint8 RGB, or None.
        Returns:
            ((1, 1, D) or (1, 1, T, D), same), on the encoder's device and dtype.
        """
        p = next(self.image_encoder.parameters())
        if image is None:
            cfg = self.image_encoder.config
            tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1  # patches + class token: 257 for ViT-H/14
            shape = (1, 1, tokens, cfg.hidden_size) if self.plus else (1, 1, cfg.projection_dim)
            zeros = torch.zeros(shape, device=p.device, dtype=p.dtype)
            return zeros, zeros
        pixels = self.feature_extractor(image, return_tensors="pt").pixel_values.to(device=p.device, dtype=p.dtype)
        if self.plus:
            pos = self.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]  # (1, T, D)
            neg = self.image_encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
        else:
            pos = self.image_encoder(pixels).image_embeds  # (1, D)
            neg = torch.zeros_like(pos)
        return pos[None], neg[None]  # one image per adapter: (1, 1, ...)


def set_scale(unet, scale: float) -> None:
    """Set the IP-Adapter weight (Eq. 5's lambda) on every decoupled cross-attention layer.

    A plain attribute: diffusers' processors read it at each call, and skip the image
    attention entirely at 0 (then a UNet call equals one without the adapter).
    """
    for proc in unet.attn_processors.values():
        if hasattr(proc, "to_k_ip"):
            proc.scale = [float(scale)] * len(proc.scale)


def tiny_ip_adapter_state(unet, image_embed_dim: int, seed: int = 0, plus: bool = False) -> dict:
    """A random IP-Adapter state dict in the original file layout, for `unet`.

    Keys as in h94's files: "image_proj" (IP-Adapter: `proj` to 4 tokens of the text width
    and `norm`; Plus: the resampler, `_plus_projection_state`) and "ip_adapter"
    ("{k}.to_k_ip.weight" / "{k}.to_v_ip.weight" for the k-th attention processor, odd k:
    the cross-attention layers, in `unet.attn_processors` order).

    Args:
        image_embed_dim: the image encoder's projection width (IP-Adapter) or hidden width (Plus).
    """
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.2):
        return torch.randn(shape, generator=generator) * std

    cross = int(unet.config.cross_attention_dim)
    widths = list(unet.config.block_out_channels)
    ip = {}
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        block = name.split(".")[0]
        if block == "mid_block":
            hidden = widths[-1]
        elif block == "up_blocks":
            hidden = widths[::-1][int(name.split(".")[1])]
        else:
            hidden = widths[int(name.split(".")[1])]
        ip[f"{key}.to_k_ip.weight"] = rand(hidden, cross)
        ip[f"{key}.to_v_ip.weight"] = rand(hidden, cross)
        key += 2
    if plus:
        proj = _plus_projection_state(image_embed_dim, cross, seed)
    else:
        proj = {"proj.weight": rand(4 * cross, image_embed_dim), "proj.bias": rand(4 * cross),
                "norm.weight": 1 + rand(cross, std=0.05), "norm.bias": rand(cross, std=0.05)}
    return {"image_proj": proj, "ip_adapter": ip}


def _plus_projection_state(embed_dim: int, cross: int, seed: int) -> dict:
    """IP-Adapter Plus's resampler (4 query tokens, 4 layers, one 64-wide head) with random
    weights, under the original file's key names: diffusers' module built at that size, its
    names mapped back the way `_convert_ip_adapter_image_proj_to_diffusers` maps them forward."""
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    from diffstream.models.tiny import randomize

    module = randomize(IPAdapterPlusImageProjection(embed_dims=embed_dim, output_dims=cross, hidden_dims=64,
                                                    heads=1, num_queries=4), seed=seed, std=0.1)
    state = module.state_dict()
    out = {}
    for name, value in state.items():
        parts = name.split(".")
        if parts[0] != "layers":
            out[name] = value
            continue
        i, rest = parts[1], ".".join(parts[2:])
        if rest.startswith("attn.to_k"):
            out[f"layers.{i}.0.to_kv.{parts[-1]}"] = torch.cat([value, state[name.replace("to_k", "to_v")]])
        elif rest.startswith("attn.to_v"):
            continue
        else:
            rest = {"ln0": "0.norm1", "ln1": "0.norm2", "attn.to_q": "0.to_q", "attn.to_out.0": "0.to_out",
                    "ff.0": "1.0", "ff.1.net.0.proj": "1.1", "ff.1.net.2": "1.3"}[rest.rsplit(".", 1)[0]]
            out[f"layers.{i}.{rest}.{parts[-1]}"] = value
    return out


def tiny_image_encoder(seed: int = 0):
    """A random CLIP image encoder at toy size and its image processor (32 px)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPVisionModelWithProjection(config).eval(), processor


def _hub_parts(spec: str) -> tuple[str, str, str] | None:
    """(repo or folder, subfolder, weight file) of a preset, a local weight file or
    "owner/repo/sub/dir/file.safetensors"; None if `spec` is none of these."""
    if spec in IP_ADAPTER_PRESETS:
        return IP_ADAPTER_PRESETS[spec]
    if not spec.lower().endswith(_WEIGHT_SUFFIXES):
        return None
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")):
        return str(path.parent), "", path.name
    parts = spec.split("/")
    if len(parts) >= 3:
        return "/".join(parts[:2]), "/".join(parts[2:-1]), parts[-1]
    return None


def precheck(spec: str) -> None:
    """One line before any model loads: an unknown form, or a local file that is missing.

    Raises:
        ConfigError / ModelLoadError.
    """
    if spec in ("tiny", "tiny-plus"):
        return
    parts = _hub_parts(spec)
    if parts is None:
        raise ConfigError(f"--ip-adapter takes {', '.join(IP_ADAPTER_PRESETS)}, tiny, a local .safetensors/.bin "
                          f"file (its image encoder in image_encoder/ beside it) or OWNER/REPO/PATH/FILE.safetensors, "
                          f"got {spec!r}")
    if Path(parts[0]).is_absolute() and not (Path(parts[0]) / parts[2]).exists():
        raise ModelLoadError(f"IP-Adapter file {spec!r} does not exist: pass --ip-adapter with a local "
                             f".safetensors file, a hub path, or {', '.join(IP_ADAPTER_PRESETS)}")


def load_ip_adapter(spec: str, modules: dict, device, dtype) -> IPAdapter:
    """Load an IP-Adapter into `modules["unet"]` (in place) and return its image encoder.

    Args:
        spec: "tiny" / "tiny-plus" (random IP-Adapter / Plus, for tests), a preset (`IP_ADAPTER_PRESETS`), a local weight
            file with its image encoder in `image_encoder/` beside it, or
            "owner/repo/subfolder/file.safetensors" on the hub.
        modules: the base model's modules (unet, vae, text_encoder, tokenizer, scheduler).
    Raises:
        ConfigError / ModelLoadError: one line.
    """
    precheck(spec)
    unet = modules["unet"]
    if spec in ("tiny", "tiny-plus"):
        encoder, processor = tiny_image_encoder()
        plus = spec == "tiny-plus"
        width = encoder.config.hidden_size if plus else encoder.config.projection_dim
        unet._load_ip_adapter_weights([tiny_ip_adapter_state(unet, width, plus=plus)])
    else:
        from diffusers import StableDiffusionPipeline

        from diffstream.models.hub import hub_kwargs

        repo, subfolder, weight = _hub_parts(spec)
        pipe = StableDiffusionPipeline(**modules, safety_checker=None, feature_extractor=None, image_encoder=None,
                                       requires_safety_checker=False)
        try:
            pipe.load_ip_adapter(repo, subfolder=subfolder, weight_name=weight, **hub_kwargs(repo))
        except Exception as exc:
            raise ModelLoadError(f"cannot load IP-Adapter {spec!r} ({type(exc).__name__}: {one_line(exc, 160)}): "
                                 f"pass --ip-adapter with a local file whose folder has image_encoder/") from None
        encoder, processor = pipe.image_encoder, pipe.feature_extractor
        if encoder is None:
            raise ModelLoadError(f"IP-Adapter {spec!r} came without its CLIP image encoder: put it in image_encoder/ "
                                 f"beside the weight file")
    projection = unet.encoder_hid_proj.image_projection_layers[0]
    plus = type(projection).__name__ != "ImageProjection"
    encoder = encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)
    unet.to(device=device, dtype=dtype)
    return IPAdapter(image_encoder=encoder, feature_extractor=processor, plus=plus)
