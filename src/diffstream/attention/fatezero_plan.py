"""FateZero's planning, apart from its hot path: which attention layers exist at which
token grid (`probe_layers`), and which of them are stored and fused at which editing
step (`FusionPlan`). Runs once per clip; `attention/fatezero.py` uses it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffstream.attention.base import SDPAAttnProcessor, block_of, compiler_opaque, install_processors, is_self_attention
from diffstream.errors import ConfigError


# Store key of the blend mask's source maps (Eqs. 6-7).
BLEND_KEY = ("blend", "mask")


@dataclass(frozen=True)
class AttnLayer:
    """One attention layer of a UNet at a given latent size.

    Attributes:
        name: processor name (`...attn1.processor` self, `...attn2.processor` cross).
        kind: "self" or "cross".
        tokens: query tokens per frame (L = grid height x width).
        channels: channels of the processor's input tokens (what the store keeps).
        heads: attention heads.
        kv_tokens: keys per query: 2 L for spatial-temporal self-attention (Eq. 8),
            the text length for cross-attention.
        grid: (height, width) of the layer's token grid.
        downsample: latent side / grid side.
    """

    name: str
    kind: str
    tokens: int
    channels: int
    heads: int
    kv_tokens: int
    grid: tuple[int, int]
    downsample: int

    @property
    def block(self) -> str:
        return block_of(self.name)


class _ProbeProcessor(SDPAAttnProcessor):
    """Plain attention that records each layer's shapes."""

    def __init__(self, name: str, found: dict):
        self.name = name
        self.found = found

    @compiler_opaque  # stateful: the compiled graphs stop here (attention.base)
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        tokens = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]
        channels = hidden_states.shape[-1] if hidden_states.ndim == 3 else hidden_states.shape[1]
        kv = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else None
        self.found[self.name] = (tokens, channels, attn.heads, kv)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


def is_temporal_layer(name: str) -> bool:
    """Processor names inside the motion modules of a video UNet (diffusers'
    UNetMotionModel): temporal attention, which FateZero never replaces."""
    return ".motion_modules." in name


@torch.no_grad()
def probe_layers(unet, latent_hw: tuple[int, int], text_tokens: int = 77) -> list[AttnLayer]:
    """Run one UNet call on zeros and describe every attention layer at this latent size.

    Works on the meta device too (a UNet built from config without weights), which is
    how the memory benchmark reads SD 1.5's real layer shapes. On a video UNet
    (UNetMotionModel) it describes the spatial layers only, not the motion modules.

    Args:
        latent_hw: (h, w) of the latents (frame size / 8).
        text_tokens: text sequence length (77 for CLIP).
    Returns:
        AttnLayer per attention processor, in the UNet's call order.
    """
    found: dict = {}
    param = next(unet.parameters())
    h, w = latent_hw
    video = any(is_temporal_layer(name) for name in unet.attn_processors)
    # a video UNet (UNetMotionModel) takes clips: one clip of one frame, (1, C, 1, h, w)
    shape = (1, unet.config.in_channels, 1, h, w) if video else (1, unet.config.in_channels, h, w)
    sample = torch.zeros(shape, device=param.device, dtype=param.dtype)
    text = torch.zeros(1, text_tokens, unet.config.cross_attention_dim, device=param.device, dtype=param.dtype)
    # only the spatial layers: a video UNet's motion modules keep their own processors
    with install_processors(unet, lambda name, _: None if is_temporal_layer(name) else _ProbeProcessor(name, found)):
        unet(sample, 10, encoder_hidden_states=text)
    layers = []
    for name, (tokens, channels, heads, kv) in found.items():
        down = max(1, round(math.sqrt(h * w / tokens)))
        grid = (-(-h // down), -(-w // down))
        if grid[0] * grid[1] != tokens:
            raise ValueError(f"cannot place {tokens} tokens of {name} on a grid of latent {h}x{w}")
        kind = "self" if is_self_attention(name) else "cross"
        kv_tokens = 2 * tokens if kind == "self" else kv
        layers.append(AttnLayer(name, kind, tokens, channels, heads, kv_tokens, grid, down))
    return layers


@dataclass(frozen=True)
class FusionPlan:
    """Which layers are fused and stored at which editing steps.

    Attributes:
        self_layers, cross_layers: names of the fused self-/cross-attention layers.
        mask_layers: cross-attention layers whose source maps make the blend mask: the
            down/up-block layers at the coarsest resolution (16x16 at 512 px, the
            reference's choice).
        self_steps, cross_steps: editing steps with self-/cross-attention fusion.
        blend: whether a blend mask is used; its source map (`BLEND_KEY`) is then
            stored at every self-attention step.
    """

    layers: tuple[AttnLayer, ...]
    self_layers: tuple[str, ...]
    cross_layers: tuple[str, ...]
    mask_layers: tuple[str, ...]
    self_steps: tuple[int, ...]
    cross_steps: tuple[int, ...]
    blend: bool
    num_steps: int

    @staticmethod
    def build(layers, config, blend: bool, cross_steps=None) -> "FusionPlan":
        """The plan of `config` (an `attention.fatezero.FateZeroConfig`, not imported here
        because that module imports this one) on `layers` (from `probe_layers`).
        `cross_steps`: steps with any cross-attention fusion when per-word schedules
        differ from the config's (None: `config.cross_steps`)."""
        layers = tuple(layers)
        fused = [l for l in layers if l.downsample >= config.fuse_min_downsample]
        outer = [l for l in layers if l.kind == "cross" and l.block != "mid_block"]
        coarsest = max((l.downsample for l in outer), default=None)
        if blend and not outer:
            raise ConfigError("--blend-words needs cross-attention in the UNet's down/up blocks; this UNet has none")
        return FusionPlan(
            layers=layers,
            self_layers=tuple(l.name for l in fused if l.kind == "self"),
            cross_layers=tuple(l.name for l in fused if l.kind == "cross"),
            mask_layers=tuple(l.name for l in outer if l.downsample == coarsest),
            self_steps=tuple(config.self_steps),
            cross_steps=tuple(config.cross_steps if cross_steps is None else cross_steps),
            blend=bool(blend),
            num_steps=int(config.steps),
        )

    @property
    def fused_steps(self) -> tuple[int, ...]:
        """Steps with any fusion."""
        return tuple(sorted(set(self.self_steps) | set(self.cross_steps)))

    def keys_at(self, step: int) -> list[tuple[str, str]]:
        """(kind, name) entries the editing step reads from the inversion: ("self", layer),
        ("cross", layer) and, when blending, `BLEND_KEY`."""
        keys = []
        if step in self.self_steps:
            keys += [("self", name) for name in self.self_layers]
        if step in self.cross_steps:
            keys += [("cross", name) for name in self.cross_layers]
        if self.blend and step in self.self_steps:
            keys.append(BLEND_KEY)
        return keys

    def entry_bytes(self, key: tuple[str, str], rows: int, itemsize: int = 2) -> int:
        """Bytes of one stored entry: a layer's input tokens (rows x L x C, store dtype),
        or the blend map (rows x h x w at the mask layers' grid, fp32)."""
        if key == BLEND_KEY:
            mask = next(l for l in self.layers if l.name == self.mask_layers[0])
            return rows * mask.tokens * 4
        layer = next(l for l in self.layers if l.name == key[1])
        return rows * layer.tokens * layer.channels * itemsize

    def store_bytes(self, rows: int, itemsize: int = 2) -> int:
        """Bytes of attention entries stored for `rows` frames over the whole schedule."""
        per_step = {}
        total = 0
        for step in range(self.num_steps):
            keys = tuple(self.keys_at(step))
            if keys not in per_step:
                per_step[keys] = sum(self.entry_bytes(k, rows, itemsize) for k in keys)
            total += per_step[keys]
        return total
