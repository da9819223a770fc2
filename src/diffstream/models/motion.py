"""Motion modules (AnimateDiff / Live2Diff) on top of an SD 1.5 UNet, through diffusers.

Three checkpoint layouts load here:
- a diffusers MotionAdapter (hub id or folder), loaded with `from_pretrained`;
- an original AnimateDiff motion-module file (`mm_sd_v15_v2.ckpt` and friends);
- Live2Diff's released checkpoint: the same original layout for its fine-tuned
  uni-directional motion modules, plus its depth-prior module (`flow_conv_in.*`,
  Live2Diff Sec. 3.2), possibly wrapped in {"state_dict": ...} with "module." prefixes.

The original layout names things differently from diffusers; `convert_original_motion`
renames every tensor and reports anything it could not place, so a partial load never
passes silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffstream.errors import ModelLoadError, one_line

# Original AnimateDiff/Live2Diff name fragment -> diffusers MotionAdapter name fragment.
# Adapted from diffusers/scripts/convert_animatediff_motion_module_to_diffusers.py
# (convert_motion_module): the same renames. Deviations on purpose in
# `convert_original_motion`: the positional tables are kept (the script drops them), one
# per block, after checking the two attentions' copies are equal; Live2Diff's depth prior
# is split off; and every key is placed or reported, so a partial load fails loudly.
_RENAMES = (
    (".temporal_transformer.", "."),
    (".attention_blocks.0.", ".attn1."),
    (".attention_blocks.1.", ".attn2."),
    (".norms.0.", ".norm1."),
    (".norms.1.", ".norm2."),
    (".ff_norm.", ".norm3."),
)
DEPTH_PREFIX = "flow_conv_in."


@dataclass
class ConvertedMotion:
    """A converted original checkpoint.

    Attributes:
        motion: diffusers-named motion-module tensors (`down_blocks.0.motion_modules.0...`).
        depth: depth-prior tensors without their prefix (empty if the file has none).
        duplicates: original keys that carried a copy of a tensor already placed (the
            per-attention positional tables, identical by construction; checked equal).
        dropped: keys deliberately ignored (Live2Diff's `grid` buffers).
    """

    motion: dict = field(default_factory=dict)
    depth: dict = field(default_factory=dict)
    duplicates: list = field(default_factory=list)
    dropped: list = field(default_factory=list)


def read_checkpoint(path: str) -> dict:
    """Tensors of a .safetensors / .ckpt / .pt / .pth / .bin file, unwrapped and unprefixed."""
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"motion module file not found: {path} (pass --motion-adapter PATH or a hub id)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read motion module {path}: {type(exc).__name__}: {one_line(exc, 160)}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return {re.sub(r"^module\.", "", k): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def convert_original_motion(state: dict) -> ConvertedMotion:
    """Rename an original AnimateDiff / Live2Diff state dict to diffusers' MotionAdapter names.

    Positional tables: the original keeps one `pos_encoder.pe` per attention block; the
    diffusers block has one `pos_embed.pe` shared by both attentions.
    """
    out = ConvertedMotion()
    for key, tensor in state.items():
        if "grid" in key:
            out.dropped.append(key)
            continue
        if key.startswith(DEPTH_PREFIX):
            out.depth[key[len(DEPTH_PREFIX):]] = tensor
            continue
        new = key
        for old, rep in _RENAMES:
            new = new.replace(old, rep)
        pe = re.match(r"(.*\.transformer_blocks\.\d+)\.attn(\d)\.pos_encoder\.pe$", new)
        if pe:
            target = pe.group(1) + ".pos_embed.pe"
            if target in out.motion:
                if not torch.equal(out.motion[target], tensor):
                    raise ModelLoadError(f"positional tables of {pe.group(1)} differ between its attention blocks")
                out.duplicates.append(key)
                continue
            new = target
        if new in out.motion:
            raise ModelLoadError(f"two checkpoint tensors map to {new}")
        out.motion[new] = tensor
    return out


def adapter_config_from(motion: dict, block_out_channels) -> dict:
    """MotionAdapter settings that reproduce the tensor shapes of a converted checkpoint."""
    pe_keys = [k for k in motion if k.endswith("pos_embed.pe")]
    if not pe_keys:
        raise ModelLoadError("the checkpoint has no motion modules (no positional tables found)")
    max_len = motion[pe_keys[0]].shape[1]
    per_block = 1 + max(int(m.group(1)) for k in motion if (m := re.match(r"down_blocks\.\d+\.motion_modules\.(\d+)\.", k)))
    channels = motion["down_blocks.0.motion_modules.0.proj_in.weight"].shape[0]
    groups = 32 if channels % 32 == 0 else 8
    return dict(
        block_out_channels=tuple(block_out_channels),
        motion_layers_per_block=per_block,
        motion_num_attention_heads=8,
        motion_norm_num_groups=groups,
        motion_max_seq_length=max_len,
        use_motion_mid_block=any(k.startswith("mid_block.") for k in motion),
    )


# Adapted from diffusers/src/diffusers/models/controlnets/controlnet.py
# (ControlNetConditioningEmbedding): the same layers, names and widths, so the checkpoint's
# `flow_conv_in.*` tensors load as they are. Deviation on purpose: stride 1 throughout, as
# the input is a VAE latent, already at the UNet's resolution.
class DepthPrior(nn.Module):
    """Live2Diff's depth-prior module (Sec. 3.2): VAE-encoded depth -> a residual on conv_in.

    Convolutions at latent resolution (SiLU between them) ending in a zero-initialised
    projection to the UNet's first channel width, so an untrained module changes nothing.

    Args:
        out_channels: the UNet's block_out_channels[0].
        in_channels: latent channels of the encoded depth map.
        widths: hidden widths.
    """

    def __init__(self, out_channels: int, in_channels: int = 4, widths=(16, 32, 96, 256)):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in zip(widths[:-1], widths[1:]):
            self.blocks.append(nn.Conv2d(a, a, 3, padding=1))
            self.blocks.append(nn.Conv2d(a, b, 3, padding=1))
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, depth_latent: torch.Tensor) -> torch.Tensor:
        """(B, C_in, h, w) -> (B, out_channels, h, w)."""
        x = F.silu(self.conv_in(depth_latent))
        for conv in self.blocks:
            x = F.silu(conv(x))
        return self.conv_out(x)


def tiny_motion_adapter(block_out_channels=(32, 64), seed: int = 0):
    """A random MotionAdapter for the tiny UNet, with *non-zero* output projections.

    AnimateDiff zero-initialises `proj_out` so an untrained module is an identity; a test
    model needs motion modules that actually mix frames, or every equivalence would be
    trivially true.
    """
    from diffusers import MotionAdapter

    torch.manual_seed(seed)
    adapter = MotionAdapter(
        block_out_channels=tuple(block_out_channels), motion_layers_per_block=1, motion_num_attention_heads=2,
        motion_norm_num_groups=8, motion_max_seq_length=32, use_motion_mid_block=True,
    )
    for name, module in adapter.named_modules():
        if name.endswith("proj_out"):
            nn.init.normal_(module.weight, std=0.2)
            nn.init.normal_(module.bias, std=0.02)
    return adapter.eval()


def load_motion_adapter(spec: str, block_out_channels, dtype=torch.float32):
    """A MotionAdapter (and Live2Diff depth-prior weights, if present) from `spec`.

    Args:
        spec: a hub id or folder (diffusers format), a single original-layout file, or
            "tiny" (random, for tests).
        block_out_channels: the SD UNet's widths (original files do not record them).
    Returns:
        (adapter, depth_state_dict or None, ConvertedMotion or None)
    """
    from diffusers import MotionAdapter

    if spec == "tiny":
        return tiny_motion_adapter(block_out_channels).to(dtype), None, None
    path = Path(spec)
    if path.is_file():
        converted = convert_original_motion(read_checkpoint(spec))
        adapter = MotionAdapter(**adapter_config_from(converted.motion, block_out_channels))
        missing, unexpected = adapter.load_state_dict(converted.motion, strict=False)
        missing = [k for k in missing if not k.endswith("pos_embed.pe")]  # sinusoids: recomputed, identical
        if missing or unexpected:
            raise ModelLoadError(
                f"motion module {spec} does not match the AnimateDiff layout "
                f"({len(missing)} missing, {len(unexpected)} unexpected tensors, e.g. {(missing + unexpected)[:2]})"
            )
        return adapter.to(dtype).eval(), (converted.depth or None), converted
    from diffstream.models.hub import hub_kwargs

    try:
        adapter = MotionAdapter.from_pretrained(spec, torch_dtype=dtype, **hub_kwargs(spec))
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load motion adapter {spec!r} ({type(exc).__name__}): pass a local MotionAdapter folder or an "
            f"AnimateDiff/Live2Diff checkpoint file with --motion-adapter PATH"
        ) from None
    return adapter.eval(), None, None


# Deviates on purpose from diffusers' motion modules (AnimateDiffTransformer3D.norm), see below.
class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics per frame, as AnimateDiff and Live2Diff normalise.

    The original motion modules fold frames into the batch before their GroupNorm; the
    diffusers port normalises a (B, C, F, H, W) tensor, pooling statistics over all F
    frames. That pooling lets every frame influence every other one, which a causal
    stream cannot have (and the released weights were not trained with).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            return super().forward(x)
        b, c, f, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * f, c, h, w)  # (B*F, C, H, W)
        return super().forward(frames).reshape(b, f, c, h, w).transpose(1, 2)


def use_frame_norms(model) -> None:
    """Give every motion module of a UNetMotionModel per-frame normalisation
    (FrameGroupNorm, same parameters), in place; already-converted ones are left alone.
    The new norms are fp32 on the CPU: move the model to its device and dtype afterwards."""
    for name, module in list(model.named_modules()):
        if ".motion_modules." in name + "." and isinstance(getattr(module, "norm", None), nn.GroupNorm) \
                and not isinstance(module.norm, FrameGroupNorm) and hasattr(module, "proj_in"):
            old = module.norm
            new = FrameGroupNorm(old.num_groups, old.num_channels, eps=old.eps, affine=old.affine)
            new.load_state_dict(old.state_dict())
            module.norm = new


def motion_unet(unet, adapter):
    """Insert the adapter's motion modules into an SD UNet (diffusers' UNetMotionModel),
    with per-frame normalisation in the motion modules (see FrameGroupNorm)."""
    from diffusers import UNetMotionModel

    model = UNetMotionModel.from_unet2d(unet, adapter)
    use_frame_norms(model)
    return model.to(device=unet.device, dtype=unet.dtype).eval().requires_grad_(False)
