"""Wan 2.1 transformer checkpoints in their original formats, and what a causal stream costs in VRAM.

Issue #18 (loading and memory); shared/notes/field-2026-12.md Sec. 1 (StreamDiffusionV2:
Wan2.1-T2V-1.3B, "where the 24 GB goes") and Sec. 5 (diffusers' single-file converter).

Loading. The causal Wan checkpoints are Wan 2.1's own module tree (`WanModel` /
`CausalWanModel`: `blocks.N.self_attn.q`, `patch_embedding`, `text_embedding.0`,
`time_projection.1`, `head.head`, ...), the names diffusers' single-file loader maps to
`WanTransformer3DModel` with `convert_wan_transformer_to_diffusers`. The formats differ
only in where those keys sit (read from each project's loading code):

- "wan": the keys at the top level (Wan-AI's original files; Wan 2.1's `WanModel`).
- "self-forcing": the keys under `model.`. The trainers' `generator` is CausVid's
  `WanDiffusionWrapper`, whose `self.model` is the (Causal)WanModel; files are
  `{"generator": ..., "generator_ema": ...}` dicts or the flat prefixed dict. Read from
  Self-Forcing's `inference.py` (`pipeline.generator.load_state_dict(state_dict['generator'
  or 'generator_ema'])`) and StreamDiffusionV2's `streamv2v/inference.py` (`model.pt` in
  the checkpoint folder: "generator", else "generator_ema", else "state_dict", else the
  dict itself, into the same wrapper).
- "comfyui": the keys under `model.diffusion_model.` (ComfyUI's re-saves; diffusers'
  converter strips that prefix itself).
- "diffusers": `WanTransformer3DModel`'s own names (a diffusers folder, or one file).

One format name covers CausVid, Self-Forcing and StreamDiffusionV2: their keys cannot be
told apart, and none needs to be (LongLive builds on Self-Forcing's code; its own
checkpoints were not checked). Wrapper
segments left by training (FSDP's `_fsdp_wrapped_module.`, activation checkpointing's
`_checkpoint_wrapped_module.`, `torch.compile`'s `_orig_mod.`) are removed first.

Memory. `estimate_vram` adds up what a block-causal stream holds on the GPU (weights,
text encoder, VAE, the KV cache of `attention.block_causal`, activations), each item a
formula of the model config and the stream settings, documented where it is computed;
`check_fits` turns an estimate over the available memory into one line saying what to
lower. The weight and KV-cache items are exact for the model diffstream builds (tested
against the parameters and `BlockCausalState.nbytes()`); activations are rough.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path

import torch

from diffstream.errors import ConfigError, ModelLoadError, one_line

FORMATS = ("diffusers", "wan", "self-forcing", "comfyui")
# Where each original-key format keeps Wan's keys (longest first: "model.diffusion_model."
# also starts with "model.").
ORIGINAL_PREFIXES = {"comfyui": "model.diffusion_model.", "self-forcing": "model.", "wan": ""}
# Segments that training wrappers insert into parameter names (FSDP, activation
# checkpointing, torch.compile); the modules they wrap are Wan's own.
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
# Sub-dicts of a training checkpoint that hold the generator, in the order they are taken:
# EMA first (the Self-Forcing README runs inference with --use_ema; StreamDiffusionV2's
# loader takes "generator" first: pass ema=False for that order).
NESTED_KEYS = ("generator_ema", "generator", "state_dict", "model")

# Keys that identify each naming (a Wan 2.1 text-to-video transformer has all of them).
_ORIGINAL_MARKERS = ("patch_embedding.weight", "blocks.0.self_attn.q.weight", "head.head.weight")
_DIFFUSERS_MARKERS = ("patch_embedding.weight", "blocks.0.attn1.to_q.weight", "condition_embedder.time_proj.weight")
# Wan variants with more than the text-to-video tree: refused by name (the causal-video
# backend restyles video from text; these need inputs it does not have).
_VARIANTS = {"vace_blocks.": "VACE (control video)", "motion_encoder.": "Wan-Animate", "face_adapter.": "Wan-Animate",
             "img_emb.": "image-to-video (CLIP image embedding)",
             "condition_embedder.image_embedder.": "image-to-video (CLIP image embedding)",
             "attn2.add_k_proj.": "image-to-video (image cross-attention)",
             "cross_attn.k_img.": "image-to-video (image cross-attention)"}

# WanTransformer3DModel configs of the released Wan 2.1 text-to-video models (Wan-AI's
# *-Diffusers repos, transformer/config.json; notes Sec. 1: 1.3B = 30 blocks, 12 heads x
# 128 (dim 1536), ffn 8960, text_dim 4096, 16 channels in/out, patch (1, 2, 2)).
_WAN21_COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                     freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                     image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024, pos_embed_seq_len=None)
WAN21_T2V_1_3B = dict(_WAN21_COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30)
WAN21_T2V_14B = dict(_WAN21_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40)
# Attention heads x head width by model width: the one thing the tensors do not tell (the
# q/k norms are across heads). 48: `models.wan.tiny_wan_transformer` (2 x 24).
HEADS_BY_WIDTH = {1536: (12, 128), 5120: (40, 128), 48: (2, 24)}

# The text encoder: Wan 2.1's UMT5-XXL encoder (models_t5_umt5-xxl-enc-bf16.pth; transformers'
# UMT5EncoderModel with google/umt5-xxl's config): 24 layers, d_model 4096, 64 heads x 64,
# gated-GELU FFN 10240, a 256,384-token embedding, relative position buckets (32) in every
# layer (UMT5 does not share them), no biases. Parameters = embedding + 24 x (q, k, v, o +
# wi_0, wi_1, wo + 2 layer norms + position bias) + final norm = 5,680,910,336 (tested against
# the meta-device model), 11.4 GB in bf16: the notes' "~10-11 GB bf16" (Sec. 1).
UMT5_XXL = dict(vocab=256384, d_model=4096, d_ff=10240, layers=24, heads=64, d_kv=64, buckets=32)
# Wan 2.1's VAE (diffusers `AutoencoderKLWan()` defaults: base 96, dim_mult [1, 2, 4, 4], 2 res
# blocks): parameters counted on the meta device (tested).
WAN21_VAE_PARAMS = 126_892_531
# Tokens of the text encoder's output (Wan pads every prompt to 512).
WAN_TEXT_LEN = 512
# diffusers keeps these modules of WanTransformer3DModel in fp32 whatever the load dtype
# (`_keep_in_fp32_modules`, matched against the dot-separated parts of a parameter name by
# `load_model_dict_into_meta`, diffusers 0.42.1); the loader and the estimate do the same.
KEEP_FP32 = ("rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")
# The VAE's widest full-resolution feature map has 96 channels (Wan 2.1 VAE base_dim) and
# one latent frame decodes to 4 frames (notes Sec. 1: chunks of 4 frames per latent frame).
_VAE_BASE_DIM = 96
_VAE_FRAMES_PER_LATENT = 4
# Rough: live full-resolution feature maps while the VAE decodes a chunk (a residual
# block's input, norm, two conv outputs, the skip, and the causal convs' 2-frame caches).
# An assumption, not a measurement.
_VAE_LIVE_MAPS = 8
# Rough: (B, L, dim) tensors live in a block at once (hidden state, residual, modulated
# norm, q, k, v, attention output, the block's output).
_BLOCK_LIVE_HIDDEN = 8
# CUDA context and allocator slack (an assumption: ~0.5 GiB is what a CUDA context takes
# on current drivers before any tensor).
RUNTIME_OVERHEAD_BYTES = 512 * 2**20
GiB = 2**30


# ---------------------------------------------------------------------------------------
# Formats


def _strip_wrappers(key: str) -> str:
    for segment in WRAPPER_SEGMENTS:
        key = key.replace(segment, "")
    return key


def _first(keys: Iterable[str], n: int = 3) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def detect_format(state_dict_keys: Iterable[str]) -> str:
    """Which naming a Wan 2.1 transformer state dict uses.

    Args:
        state_dict_keys: the parameter names of a flat state dict (a nested training
            checkpoint is unwrapped first, `unwrap_checkpoint`).
    Returns:
        one of `FORMATS`: "diffusers" (`WanTransformer3DModel`'s names), "wan" (original
        Wan 2.1 names at the top level), "self-forcing" (the original names under
        `model.`: CausVid, Self-Forcing, StreamDiffusionV2, LongLive) or "comfyui" (under
        `model.diffusion_model.`). Training-wrapper segments (FSDP, torch.compile) are
        ignored.
    Raises:
        ModelLoadError: one line naming what was found, for anything else (another model,
            or a Wan variant beyond text-to-video: VACE, I2V, Animate).
    """
    raw = list(state_dict_keys)
    keys = {_strip_wrappers(k) for k in raw}
    for marker, variant in _VARIANTS.items():
        if any(marker in k for k in keys):
            raise ModelLoadError(f"this is a Wan {variant} checkpoint (keys like "
                                 f"{_first(sorted(k for k in keys if marker in k), 1)}): the causal-video backend "
                                 "loads Wan 2.1 text-to-video transformers")
    if all(m in keys for m in _DIFFUSERS_MARKERS):
        return "diffusers"
    for fmt, prefix in ORIGINAL_PREFIXES.items():
        if all(prefix + m in keys for m in _ORIGINAL_MARKERS):
            return fmt
    raise ModelLoadError(f"not a Wan 2.1 transformer checkpoint: {len(raw)} tensors, e.g. {_first(sorted(raw))}; "
                         "expected Wan's keys (blocks.0.self_attn.q.weight, head.head.weight), at the top level, "
                         "under model. (Self-Forcing, CausVid, StreamDiffusionV2) or model.diffusion_model. "
                         "(ComfyUI), or diffusers' (blocks.0.attn1.to_q.weight)")


def unwrap_checkpoint(checkpoint: Mapping, ema: bool | None = None) -> tuple[dict, str]:
    """The generator's flat state dict out of a training checkpoint.

    Self-Forcing / CausVid / StreamDiffusionV2 save `{"generator": sd, "generator_ema":
    sd, ...}` (other entries: critic, optimizer states); a flat dict of tensors is
    returned as is.

    Args:
        checkpoint: what `torch.load` / `safetensors` gave.
        ema: True: "generator_ema" only; False: "generator" first (StreamDiffusionV2's
            order); None: `NESTED_KEYS` in order (EMA first, as Self-Forcing's README runs).
    Returns:
        (state dict, where: "" for a flat dict, else the entry taken).
    Raises:
        ModelLoadError: a nested checkpoint without a generator entry, or no EMA when asked.
    """
    if not isinstance(checkpoint, Mapping):
        raise ModelLoadError(f"the checkpoint holds a {type(checkpoint).__name__}, not a state dict")
    if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return dict(checkpoint), ""
    if ema is True:
        order = ("generator_ema",)
    elif ema is False:
        order = ("generator", "generator_ema", "state_dict", "model")
    else:
        order = NESTED_KEYS
    for key in order:
        value = checkpoint.get(key)
        if isinstance(value, Mapping) and value:
            return unwrap_checkpoint(value, ema)[0], key
    entries = ", ".join(f"{k} ({type(v).__name__})" for k, v in list(checkpoint.items())[:6])
    raise ModelLoadError(f"a nested checkpoint without {' / '.join(order)}: its entries are {entries}")


def convert_to_diffusers(state_dict: Mapping[str, torch.Tensor], fmt: str | None = None) -> dict:
    """A Wan 2.1 transformer state dict in `WanTransformer3DModel`'s names.

    Strips the format's prefix (and training-wrapper segments), then maps original Wan
    names with diffusers' own single-file converter,
    `diffusers.loaders.single_file_utils.convert_wan_transformer_to_diffusers` (notes
    Sec. 5). Tensors are not copied (the result shares them).

    Args:
        state_dict: a flat state dict (`unwrap_checkpoint` first for a training checkpoint).
        fmt: its format, `detect_format`'s if None.
    Returns:
        {diffusers name: tensor}. Keys outside the format's prefix are passed through under
        their own names (the loader reports them as unexpected).
    """
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    fmt = fmt or detect_format(state_dict.keys())
    if fmt not in FORMATS:
        raise ValueError(f"unknown Wan checkpoint format {fmt!r}; one of {', '.join(FORMATS)}")
    flat = {_strip_wrappers(k): v for k, v in state_dict.items()}
    if fmt == "diffusers":
        return flat
    prefix = ORIGINAL_PREFIXES[fmt]
    stripped = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in flat.items()}
    # The converter pops from the dict it is given: it gets its own.
    return convert_wan_transformer_to_diffusers(dict(stripped))


def infer_config(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """`WanTransformer3DModel` keyword arguments read off a diffusers-named state dict.

    Widths and depth come from tensor shapes: `patch_embedding.weight` (dim, in, *patch),
    the text and time embedders' first layers (text_dim, freq_dim), `ffn.net.0.proj`
    (ffn_dim), `proj_out` (out channels x patch volume), the highest block index. The head
    count is not in any shape (Wan's q/k norms span all heads): it comes from
    `HEADS_BY_WIDTH` (1.3B 12 x 128, 14B 40 x 128, the tiny model 2 x 24), else
    dim / 128 (every released Wan 2.1 has 128-wide heads).

    Raises:
        ModelLoadError: a tensor the inference needs is missing, or the width is unknown.
    """
    try:
        patch = state_dict["patch_embedding.weight"]  # (dim, in_channels, pt, ph, pw)
        dim, in_channels, patch_size = patch.shape[0], patch.shape[1], tuple(patch.shape[2:])
        text_dim = state_dict["condition_embedder.text_embedder.linear_1.weight"].shape[1]  # (dim, text_dim)
        freq_dim = state_dict["condition_embedder.time_embedder.linear_1.weight"].shape[1]  # (dim, freq_dim)
        ffn_dim = state_dict["blocks.0.ffn.net.0.proj.weight"].shape[0]  # (ffn_dim, dim)
        out_channels = state_dict["proj_out.weight"].shape[0] // math.prod(patch_size)  # (out * pt*ph*pw, dim)
    except KeyError as exc:
        raise ModelLoadError(f"cannot infer the Wan transformer's config: tensor {exc.args[0]} is missing") from None
    if dim in HEADS_BY_WIDTH:
        heads, head_dim = HEADS_BY_WIDTH[dim]
    elif dim % 128 == 0:
        heads, head_dim = dim // 128, 128
    else:
        raise ModelLoadError(f"cannot infer the attention heads of a Wan transformer {dim} wide: pass its config")
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    return dict(
        patch_size=patch_size, num_attention_heads=heads, attention_head_dim=head_dim, in_channels=in_channels,
        out_channels=out_channels, text_dim=text_dim, freq_dim=freq_dim, ffn_dim=ffn_dim,
        num_layers=max(blocks) + 1 if blocks else 0,
        cross_attn_norm="blocks.0.norm2.weight" in state_dict,
        qk_norm="rms_norm_across_heads",  # diffusers builds the q/k norms whatever this says
        eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024, pos_embed_seq_len=None)


# ---------------------------------------------------------------------------------------
# Loading


def keeps_fp32(name: str) -> bool:
    """Whether diffusers keeps parameter `name` in fp32 whatever the load dtype (`KEEP_FP32`)."""
    parts = name.split(".")
    return any(module in parts for module in KEEP_FP32)


def _empty_model(config: Mapping):
    """The transformer with its parameters on the meta device (no memory, no init) and its
    rotary tables (non-persistent buffers, in no checkpoint) built for real on the CPU."""
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    accepted = inspect.signature(WanTransformer3DModel.__init__).parameters
    with torch.device("meta"):  # `model.config` also holds "_class_name", "_diffusers_version", ...
        model = WanTransformer3DModel(**{k: v for k, v in config.items() if k in accepted})
    cfg = model.config
    with torch.device("cpu"):
        model.rope = WanRotaryPosEmbed(cfg.attention_head_dim, cfg.patch_size, cfg.rope_max_seq_len)
    stray = [n for n, b in model.named_buffers() if b.is_meta]
    if stray:  # a diffusers version with other buffers: they would stay empty
        raise RuntimeError(f"buffers left on the meta device: {_first(stray)}")
    return model


def wan_transformer_from_state_dict(state_dict: Mapping[str, torch.Tensor], config: Mapping | None = None,
                                    dtype: torch.dtype = torch.float32, fmt: str | None = None):
    """A `WanTransformer3DModel` holding exactly the given tensors (any supported format).

    Built on the meta device and filled by assignment (no random init, no second copy
    of the weights). Floating tensors are cast to `dtype`, except diffusers' fp32 modules
    (`keeps_fp32`), as `from_pretrained(torch_dtype=dtype)` does. Meta tensors in give a
    meta model (shape checks without memory).

    Args:
        state_dict: flat, in any of `FORMATS`.
        config: `WanTransformer3DModel` kwargs; inferred from shapes if None (`infer_config`).
        dtype: the weights' dtype.
        fmt: the format, detected if None.
    Returns:
        the model, eval mode, no gradients.
    Raises:
        ModelLoadError: one line: tensors missing, unexpected, or of the wrong shape.
    """
    converted = convert_to_diffusers(state_dict, fmt)
    config = dict(config) if config is not None else infer_config(converted)
    model = _empty_model(config)
    expected = model.state_dict()
    # diffusers ignores these on load (WanTransformer3DModel._keys_to_ignore_on_load_unexpected).
    ignored = tuple(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    missing = [k for k in expected if k not in converted]
    unexpected = [k for k in converted if k not in expected and not any(p in k for p in ignored)]
    if missing or unexpected:
        parts = ([f"{len(missing)} missing: {_first(missing)}"] if missing else []) + (
            [f"{len(unexpected)} unexpected: {_first(unexpected)}"] if unexpected else [])
        raise ModelLoadError(f"the checkpoint does not fit a Wan transformer of {config['num_layers']} blocks x "
                             f"{config['num_attention_heads'] * config['attention_head_dim']} wide: "
                             + "; ".join(parts))
    wrong = [f"{k} {tuple(converted[k].shape)} vs {tuple(t.shape)}" for k, t in expected.items()
             if converted[k].shape != t.shape]
    if wrong:
        raise ModelLoadError(f"{len(wrong)} tensors of the wrong shape (checkpoint vs model): {_first(wrong, 2)}")
    weights = {}
    for k in expected:
        t = converted[k]
        if t.is_floating_point():
            t = t.to(torch.float32 if keeps_fp32(k) else dtype)
        weights[k] = t
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def read_checkpoint(path: str | Path) -> Mapping:
    """The tensors of one checkpoint file: `.safetensors`, or a torch pickle (`.pt`, `.pth`,
    `.ckpt`, `.bin`) read with `weights_only=True` (tensors and plain containers only: no
    code runs) and memory-mapped when its format allows.

    Raises:
        ModelLoadError: unreadable, or a pickle holding more than tensors.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        tensors = {}
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    # safetensors' tensors may sit 8 bytes off a 64-byte boundary: vectorised CPU
                    # kernels then round differently (4e-7 on the tiny model, measured) and run
                    # slower. A copy from torch's allocator is aligned; one tensor at a time.
                    tensors[key] = t.clone() if t.data_ptr() % 64 else t
        except Exception as exc:  # noqa: BLE001  (safetensors raises its own error types)
            raise ModelLoadError(f"{path}: not a readable safetensors file ({one_line(exc, 120)})") from None
        return tensors
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as exc:  # noqa: BLE001  (pickle errors come in many types)
        raise ModelLoadError(f"{path}: torch.load(weights_only=True) refused it ({one_line(exc, 120)}); re-save "
                             "the generator's state dict alone (torch.save(ckpt['generator'], ...))") from None


def load_wan_transformer(path: str | Path, config: Mapping | None = None, dtype: torch.dtype = torch.float32,
                         ema: bool | None = None):
    """Load a Wan 2.1 text-to-video transformer from any supported format.

    Args:
        path: a checkpoint file (`.safetensors`, `.pt`, `.pth`, `.ckpt`, `.bin`) in any of
            `FORMATS`, nested (`{"generator": ..., "generator_ema": ...}`) or flat; a
            StreamDiffusionV2 checkpoint folder (its `model.pt`); or a diffusers folder
            (`config.json` + weights, or a pipeline folder with `transformer/`).
        config: `WanTransformer3DModel` kwargs; None: from the folder's config.json, or
            inferred from the tensors' shapes (1.3B, 14B, the tiny model; `infer_config`).
        dtype: the weights' dtype (diffusers' fp32 modules stay fp32).
        ema: which generator of a training checkpoint (`unwrap_checkpoint`).
    Returns:
        `WanTransformer3DModel` on the CPU, eval mode, no gradients.
    Raises:
        ModelLoadError: one line (no such path, unknown format, missing/unexpected tensors).
    """
    path = Path(path)
    if path.is_dir():
        if (path / "model.pt").is_file() and not (path / "config.json").is_file():
            path = path / "model.pt"  # StreamDiffusionV2's --checkpoint_folder
        else:
            return _load_diffusers_folder(path, dtype)
    if not path.is_file():
        raise ModelLoadError(f"no such Wan checkpoint: {path}")
    state_dict, _ = unwrap_checkpoint(read_checkpoint(path), ema)
    return wan_transformer_from_state_dict(state_dict, config, dtype)


def checkpoint_config(path: str | Path, ema: bool | None = None) -> dict:
    """The `WanTransformer3DModel` config of a checkpoint, without loading its weights.

    A diffusers folder gives its config.json (or transformer/config.json); a file (or a
    StreamDiffusionV2 folder's model.pt) gives its tensor shapes to `infer_config`: a
    `.safetensors` file's header is read alone; a torch pickle is memory-mapped
    (`weights_only=True`), so no tensor data is read either.

    Args:
        path: what `load_wan_transformer` takes.
        ema: which generator of a training checkpoint (`unwrap_checkpoint`).
    Returns:
        the config as a dict (`estimate_vram`'s `config`).
    Raises:
        ModelLoadError: one line (no such path, unknown format, shapes that do not tell).
    """
    import json

    path = Path(path)
    if path.is_dir():
        if (path / "model.pt").is_file() and not (path / "config.json").is_file():
            path = path / "model.pt"
        else:
            for config in (path / "config.json", path / "transformer" / "config.json"):
                if config.is_file():
                    try:
                        return json.loads(config.read_text())
                    except (OSError, ValueError) as exc:
                        raise ModelLoadError(f"{config}: unreadable ({one_line(exc, 120)})") from None
            raise ModelLoadError(f"{path}: neither a diffusers model folder (config.json) nor a pipeline folder "
                                 "(transformer/config.json) nor a StreamDiffusionV2 folder (model.pt)")
    if not path.is_file():
        raise ModelLoadError(f"no such Wan checkpoint: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:  # the header only: shapes, no data
                shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
        except Exception as exc:  # noqa: BLE001  (safetensors raises its own error types)
            raise ModelLoadError(f"{path}: not a readable safetensors file ({one_line(exc, 120)})") from None
        state_dict = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    else:
        state_dict, _ = unwrap_checkpoint(read_checkpoint(path), ema)  # memory-mapped: no data read
        state_dict = {key: torch.empty(t.shape, device="meta") for key, t in state_dict.items()}
    return infer_config(convert_to_diffusers(state_dict))


def _load_diffusers_folder(path: Path, dtype: torch.dtype):
    from diffusers import WanTransformer3DModel

    subfolder = None
    if not (path / "config.json").is_file():
        if not (path / "transformer" / "config.json").is_file():
            raise ModelLoadError(f"{path}: neither a diffusers model folder (config.json) nor a pipeline folder "
                                 "(transformer/config.json) nor a StreamDiffusionV2 folder (model.pt)")
        subfolder = "transformer"
    try:
        model = WanTransformer3DModel.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"{path}: not a loadable WanTransformer3DModel folder ({one_line(exc, 140)})") from None
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------
# Memory


def _cfg(config: Mapping, key: str):
    return config[key] if isinstance(config, Mapping) else getattr(config, key)


def transformer_parameters(config: Mapping) -> dict:
    """Parameter counts of a `WanTransformer3DModel` (text-to-video) from its config.

    Module by module, as diffusers 0.42.1 builds it (dim D = heads x head width, FFN
    width F, text width T, time-frequency width f, patch volume p):

    - patch_embedding: Conv3d(C_in -> D, kernel = patch): D*C_in*p + D
    - condition_embedder: time_embedder (f -> D -> D), time_proj (D -> 6D), text_embedder
      (T -> D -> D), all Linear with bias
    - per block: attn1 and attn2, each q, k, v, out (D -> D, bias) + RMS norms of q and k
      (D each; built whatever `qk_norm` says); the cross-attention norm `norm2` (2D, with
      `cross_attn_norm`); FFN (D -> F -> D, bias); `scale_shift_table` (6D)
    - proj_out (D -> C_out*p, bias), `scale_shift_table` (2D)

    Returns:
        {"total", "fp32" (in `KEEP_FP32` modules: loaded in fp32 whatever the dtype),
         "linear_weights" (nn.Linear weights outside the fp32 modules: what int8 quantizes),
         "linear_rows" (their output rows: one int8 scale each)}.
    """
    if _cfg(config, "image_dim") is not None or _cfg(config, "added_kv_proj_dim") is not None:
        raise ConfigError("the memory estimate covers Wan text-to-video transformers (no image embedding)")
    d = _cfg(config, "num_attention_heads") * _cfg(config, "attention_head_dim")
    ffn, text, freq, layers = (_cfg(config, k) for k in ("ffn_dim", "text_dim", "freq_dim", "num_layers"))
    p = math.prod(_cfg(config, "patch_size"))
    c_in = _cfg(config, "in_channels")
    c_out = _cfg(config, "out_channels") or c_in
    norms = 2 * d  # q and k RMS norms: diffusers 0.42.1's WanAttention builds them whatever `qk_norm` says

    def linear(i, o):  # (weight, bias) parameters of Linear(i -> o)
        return i * o, o

    lin = [linear(d, 6 * d), linear(text, d), linear(d, d)]  # time_proj, text_embedder 1, 2
    lin += [linear(d, d)] * (8 * layers)  # q, k, v, out of attn1 and attn2
    lin += [linear(d, ffn), linear(ffn, d)] * layers  # FFN
    lin += [linear(d, c_out * p)]  # proj_out
    fp32_lin = [linear(freq, d), linear(d, d)]  # time_embedder (kept in fp32)
    fp32 = sum(w + b for w, b in fp32_lin) + 6 * d * layers + 2 * d  # + scale_shift_tables
    fp32 += 2 * d * layers if _cfg(config, "cross_attn_norm") else 0  # norm2 weight + bias
    other = d * c_in * p + d + norms * 2 * layers  # patch_embedding, q/k norms of both attentions
    linear_weights = sum(w for w, _ in lin)
    linear_biases = sum(b for _, b in lin)
    return {"total": linear_weights + linear_biases + fp32 + other, "fp32": fp32,
            "linear_weights": linear_weights, "linear_rows": linear_biases}


def umt5_encoder_parameters(vocab: int, d_model: int, d_ff: int, layers: int, heads: int, d_kv: int,
                            buckets: int) -> dict:
    """Parameter counts of a UMT5 encoder (transformers' `UMT5EncoderModel`, gated-GELU).

    Embedding vocab x d_model; per layer q, k, v (d_model -> heads*d_kv), o (back), wi_0,
    wi_1 (d_model -> d_ff), wo (back), no biases, two RMS norms (d_model each), a relative
    position bias (buckets x heads, in every layer: UMT5); a final norm.

    Returns:
        {"total", "linear_weights", "linear_rows"} as `transformer_parameters`; the Linear
        weights are those int8 quantizes: not `wo`, which transformers keeps in fp32
        (`_keep_in_fp32_modules`) and `models.quantize` leaves alone (counted in the total,
        at the load dtype, which diffstream's loader casts it to).
    """
    inner = heads * d_kv
    linear_weights = layers * (4 * d_model * inner + 2 * d_model * d_ff)
    linear_rows = layers * (3 * inner + d_model + 2 * d_ff)
    wo = layers * d_ff * d_model
    total = vocab * d_model + linear_weights + wo + layers * (2 * d_model + buckets * heads) + d_model
    return {"total": total, "linear_weights": linear_weights, "linear_rows": linear_rows}


def _weights_bytes(params: dict, dtype_bytes: int, int8: bool) -> int:
    """Bytes of a model's weights: fp32 modules at 4 B, the rest at `dtype_bytes`; with
    int8 (torchao's int8 weight-only, `models.quantize`: int8 weights, one scale per output
    row in the compute dtype and one int8 zero point per row) the Linear weights at 1 B +
    a scale and a zero point per row; fp8 counted the same (it has no zero point: 1 B per
    row less). Measured equal on the tiny transformer (tests/models/test_wan_quantize.py)."""
    fp32 = params.get("fp32", 0)
    rest = params["total"] - fp32
    b = 4 * fp32 + dtype_bytes * rest
    if int8:
        b -= (dtype_bytes - 1) * params["linear_weights"]
        b += (dtype_bytes + 1) * params["linear_rows"]
    return b


def estimate_vram(config: Mapping, height: int, width: int, *, steps: int = 2, chunk_frames: int = 1,
                  sink_chunks: int = 1, window_chunks: int = 5, dtype_bytes: int = 2,
                  text_encoder_offload: bool = False, weights_int8: bool = False, rows: int | None = None,
                  text_encoder_params: dict | None = None, vae_params: int | None = WAN21_VAE_PARAMS,
                  vae_dtype_bytes: int | None = None, text_len: int = WAN_TEXT_LEN, fused_attention: bool = True,
                  text_kv_cache: bool = True, overhead_bytes: int = RUNTIME_OVERHEAD_BYTES) -> dict:
    """What a block-causal Wan stream holds on the GPU, item by item, in bytes.

    Items (D = model width, layers = blocks, F = FFN width; n = tokens per latent frame
    = (height/8 / patch_h) x (width/8 / patch_w): Wan's VAE is 8x, the patch 2x2, so
    1,560 at 480x832; N = chunk_frames x n tokens per chunk; R = `rows`):

    - transformer: its parameters (`transformer_parameters`), diffusers' fp32 modules at
      4 B, the rest at `dtype_bytes`; with `weights_int8` the Linear weights at 1 B plus
      one scale per output row (torchao int8 weight-only). Exact for diffstream's loader.
    - text_encoder: UMT5-XXL's encoder (`UMT5_XXL`, 5.68 B parameters: 11.4 GB bf16, the
      largest single item, notes Sec. 1), int8 like the transformer; 0 with
      `text_encoder_offload` (it runs once per prompt off the GPU, or on it before the
      transformer and the cache are allocated, then leaves).
    - prompt_embeds: the cached embeddings, R x text_len x text_dim at `dtype_bytes`.
    - vae: Wan 2.1's VAE weights at `vae_dtype_bytes`.
    - kv_cache: `attention.block_causal`'s buffers: per layer K and V of (S + W + 1)
      chunks (sinks, window, the current chunk's slot), each N x D:
      layers x 2 x R x (S + W + 1) x N x D x dtype_bytes. Exact: equals
      `BlockCausalState.nbytes()`. At 480x832, 1.3B, S + W + 1 = 7: 2.01 GB per row
      (the notes' 1.7 GB per stream-batch slot is SDV2's 6 frames: 30 x 2 x 9,360 x 1,536
      x 2 B).
    - text_kv_cache: the cross-attention keys/values kept per prompt
      (`attention.cross_kv_cache`), layers x 2 x R x text_len x D, and the memoised text
      projection R x text_len x D, at `dtype_bytes` (1.3B, 512 tokens: 96 MB per row).
    - activations (rough): one chunk call's live tensors: `_BLOCK_LIVE_HIDDEN` (B, N, D)
      tensors + the FFN's two (B, N, F) + the text projection (R x text_len x (T + 2D);
      T alone with the cross-attention cache, whose K/V are resident: `text_kv_cache`);
      with `fused_attention=False` also the attention scores R x heads x N x (S+W+1)N in
      fp32 (a math SDPA path; flash / memory-efficient attention has none). Measured on
      the tiny model (CPU, 256x256, 2 rows, 512 text tokens, torch's profiler): 1,581,952
      B transient in one chunk call, 1,572,864 B estimated (benchmarks/causal_video_memory.py).
      Not counted: the rotary tables (1 MB for the 1.3B) and the call's inputs.
    - vae_activations (rough): decoding one latent frame: `_VAE_LIVE_MAPS` full-resolution
      96-channel maps of its 4 frames.
    - overhead: CUDA context and allocator slack (`RUNTIME_OVERHEAD_BYTES`, assumed).

    Args:
        config: `WanTransformer3DModel` config (a dict like `WAN21_T2V_1_3B`, or `model.config`).
        height, width: frame size in pixels (multiples of 16).
        steps: denoising steps per chunk.
        chunk_frames, sink_chunks, window_chunks: `BlockCausalConfig`'s.
        dtype_bytes: bytes per element of weights, cache and activations (bf16/fp16 2, fp32 4).
        text_encoder_offload: the text encoder stays off the GPU (its embeddings cached).
        weights_int8: transformer and text-encoder Linear weights in int8.
        rows: rows of a chunk call, each with its own cache; None: `steps`, StreamDiffusionV2's
            stream batch over denoising steps (one slot per step, notes Sec. 1). A pipeline
            that runs the steps one after another passes 1.
        text_encoder_params: `umt5_encoder_parameters(...)` of another encoder ({} or 0: none);
            None: UMT5-XXL's.
        vae_params: the VAE's parameter count (None: no VAE on the GPU).
        vae_dtype_bytes: bytes per element of the VAE's weights and maps (None: `dtype_bytes`,
            as StreamDiffusionV2 runs it in bf16; diffusers' Wan pipelines keep it in fp32: 4).
        text_len: tokens per prompt embedding.
        fused_attention: attention without a materialised score matrix.
        text_kv_cache: the cross-attention cache is on (`BlockCausalConfig.cross_kv_cache`).
        overhead_bytes: fixed runtime overhead.
    Returns:
        {item: bytes} for the items above, "total", and "settings" (the arguments, so
        `check_fits` can say what lowering each would save).
    """
    if height % 16 or width % 16:
        raise ConfigError(f"the frame size must be a multiple of 16 for Wan (8x VAE, 2x2 patch), got "
                          f"{width}x{height}")
    settings = dict(height=height, width=width, steps=steps, chunk_frames=chunk_frames, sink_chunks=sink_chunks,
                    window_chunks=window_chunks, dtype_bytes=dtype_bytes, text_encoder_offload=text_encoder_offload,
                    weights_int8=weights_int8, rows=rows, text_encoder_params=text_encoder_params,
                    vae_params=vae_params, vae_dtype_bytes=vae_dtype_bytes, text_len=text_len, fused_attention=fused_attention,
                    text_kv_cache=text_kv_cache, overhead_bytes=overhead_bytes)
    r = steps if rows is None else rows
    vae_bytes = dtype_bytes if vae_dtype_bytes is None else vae_dtype_bytes
    heads = _cfg(config, "num_attention_heads")
    d = heads * _cfg(config, "attention_head_dim")
    ffn, text_dim, layers = _cfg(config, "ffn_dim"), _cfg(config, "text_dim"), _cfg(config, "num_layers")
    _, ph, pw = _cfg(config, "patch_size")
    n = (height // 8 // ph) * (width // 8 // pw)  # tokens per latent frame
    tokens = chunk_frames * n  # per chunk
    slots = sink_chunks + window_chunks + 1  # BlockCausalConfig.slots
    te = text_encoder_params if text_encoder_params is not None else umt5_encoder_parameters(**UMT5_XXL)
    items = {
        "transformer": _weights_bytes(transformer_parameters(config), dtype_bytes, weights_int8),
        "text_encoder": 0 if text_encoder_offload or not te else _weights_bytes(te, dtype_bytes, weights_int8),
        "prompt_embeds": r * text_len * text_dim * dtype_bytes,
        "vae": (vae_params or 0) * vae_bytes,
        "kv_cache": layers * 2 * r * slots * tokens * d * dtype_bytes,
        "text_kv_cache": (2 * layers + 1) * r * text_len * d * dtype_bytes if text_kv_cache else 0,
        # the text projection's K/V are transient only without the cross-attention cache
        "activations": (r * tokens * (_BLOCK_LIVE_HIDDEN * d + 2 * ffn)
                        + r * text_len * (text_dim + (0 if text_kv_cache else 2 * d)))
        * dtype_bytes + (0 if fused_attention else r * heads * tokens * slots * tokens * 4),
        "vae_activations": (_VAE_LIVE_MAPS * _VAE_BASE_DIM * _VAE_FRAMES_PER_LATENT * height * width * vae_bytes
                            if vae_params else 0),
        "overhead": overhead_bytes,
    }
    return {**items, "total": sum(items.values()), "settings": settings}


def format_estimate(estimate: dict, title: str = "VRAM estimate") -> str:
    """The estimate as a small table (GiB), one item a line, the total last."""
    lines = [f"{title}:"]
    for item, b in estimate.items():
        if item not in ("total", "settings"):
            lines.append(f"  {item:<16} {b / GiB:7.2f} GiB")
    lines.append(f"  {'total':<16} {estimate['total'] / GiB:7.2f} GiB")
    return "\n".join(lines)


def check_fits(estimate: dict, available_bytes: int, config: Mapping | None = None, *,
               flags: Collection[str] | None = None, more: Mapping[str, dict] | None = None) -> None:
    """Refuse, in one line, a stream whose estimate exceeds the memory available.

    The line names what would bring it under, each with what it saves (re-estimated):
    --text-encoder-offload and --int8 when not on, a smaller --window-chunks, fewer
    --steps (fewer stream-batch rows), a smaller --size; the biggest saving first.

    Args:
        estimate: `estimate_vram`'s result.
        available_bytes: free device memory (`torch.cuda.mem_get_info()[0]`).
        config: the transformer config the estimate was made for (needed for the
            suggestions; without it the line names the items only).
        flags: which of the options above the caller has ("--text-encoder-offload",
            "--int8", "--window-chunks", "--steps", "--size"); None: all of them.
        more: further options the caller has, {label: the `estimate_vram` settings it
            changes}, e.g. {"--max-clients 1": {"rows": 1}}; offered like the others.
    Raises:
        ConfigError: when estimate["total"] > available_bytes.
    """
    total = estimate["total"]
    if total <= available_bytes:
        return
    need = f"needs about {total / GiB:.1f} GiB of GPU memory, {available_bytes / GiB:.1f} GiB is free"
    s = dict(estimate["settings"])
    if config is None:
        top = sorted(((b, k) for k, b in estimate.items() if k not in ("total", "settings")), reverse=True)[:2]
        raise ConfigError(f"{need} (largest: " + ", ".join(f"{k} {b / GiB:.1f} GiB" for b, k in top) + ")")
    options = []

    def offer(label: str, **change):
        if flags is not None and label.split()[0] not in flags:
            return
        saved = total - estimate_vram(config, **{**s, **change})["total"]
        if saved > 0:
            options.append((saved, f"{label} (-{saved / GiB:.1f} GiB)"))

    if not s["text_encoder_offload"]:
        offer("--text-encoder-offload", text_encoder_offload=True)
    if not s["weights_int8"]:
        offer("--int8", weights_int8=True)
    if s["window_chunks"] > 1:
        offer(f"--window-chunks {s['window_chunks'] // 2}", window_chunks=s["window_chunks"] // 2)
    if s["steps"] > 1 and s["rows"] is None:
        offer(f"--steps {s['steps'] - 1}", steps=s["steps"] - 1)
    h, w = s["height"], s["width"]
    h2, w2 = max(16, (h * 3 // 4) // 16 * 16), max(16, (w * 3 // 4) // 16 * 16)
    if (h2, w2) != (h, w):
        offer(f"--size {max(h2, w2)}", height=h2, width=w2)
    for label, change in (more or {}).items():
        saved = total - estimate_vram(config, **{**s, **change})["total"]
        if saved > 0:
            options.append((saved, f"{label} (-{saved / GiB:.1f} GiB)"))
    options.sort(key=lambda o: -o[0])
    hint = "; lower: " + ", ".join(label for _, label in options) if options else ""
    raise ConfigError(f"{need}{hint}")
