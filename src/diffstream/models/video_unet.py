"""A Tune-A-Video-style video UNet: an SD 1.x/2.x UNet inflated with temporal layers.

Wu et al., "Tune-A-Video: One-Shot Tuning of Image Diffusion Models for Text-to-Video
Generation" (ICCV 2023), Sec. 4.1, as FateZero uses it for shape edits (Qi et al., Sec. 4;
reference code `video_diffusion/models/attention.py`, `train_tune_a_video.py`):

- inflation: every spatial layer keeps its pretrained weights and runs frame by frame;
  temporal attention layers are added, initialised so that they change nothing, so the
  inflated model equals the image model on every frame (`inflate`);
- spatial self-attention becomes sparse-causal (each frame attends to the first and the
  previous frame). That is an attention *processor*, not a weight: FateZero's
  "previous+first" frame attention (`attention.fatezero`) installs it at run time, in
  tuning and in editing alike, so the model itself is stored with stock processors and
  the equality above holds for the model as stored;
- one-shot tuning trains the temporal layers and the query projections of the spatial
  self- and cross-attention (`TUNED_MODULES`, `mark_trainable`), everything else frozen.

Deviations on purpose (the temporal layers are diffusers' AnimateDiff motion modules,
`UNetMotionModel.from_unet2d` + a `MotionAdapter`, so no model block is copied or patched):

- Tune-A-Video puts one `attn_temporal` (LayerNorm + attention) inside each spatial
  transformer block and zero-initialises only its `to_out[0].weight` (its bias stays at
  PyTorch's random init, so the reference's inflated model is only approximately the
  image model). Here each motion module sits after a resnet/attention pair of every
  block, mid block included (AnimateDiff's places), and is GroupNorm -> proj_in -> two
  temporal self-attentions + feed-forward -> proj_out, plus the residual; `proj_out`'s
  weight AND bias are zero, which makes the module an exact identity (its output is
  proj_out(...) + residual), so inflation is exact. The modules are larger than
  Tune-A-Video's single attention (about 22 C^2 parameters per module against 4 C^2).
- The motion modules' GroupNorm normalises each frame on its own (`FrameGroupNorm`, as
  AnimateDiff's original and Tune-A-Video's per-token LayerNorm: no statistics shared
  across frames).
- Tune-A-Video's temporal attention has no positional encoding; diffusers' motion
  modules add sinusoidal positions, whose tables are zeroed here (`positions=False`, the
  default), so the temporal layers see the frames of a call as a set, like the reference.
- FateZero's `train_temporal_conv` (a temporal convolution in the resnets of its own
  pseudo-3D UNet) has no counterpart: the motion modules are the only temporal layers.

A video model is a folder (`save_video_model`): `unet/` (diffusers' `save_pretrained` of
the UNetMotionModel) and `video_model.json` (the base model it was inflated from, the
source prompt and clip it was tuned on, an id for saved inversions' fingerprints).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import torch

from diffstream.errors import ModelLoadError, one_line

VIDEO_MODEL_FORMAT = "diffstream-video-unet"
VIDEO_MODEL_VERSION = 1
INFO_FILE = "video_model.json"
UNET_FOLDER = "unet"
# Set on a loaded video UNet: the id of its folder (saved inversions' fingerprints).
VIDEO_MODEL_ATTRIBUTE = "_diffstream_video_model"
# Tune-A-Video's tuned modules (train_tune_a_video.py: names ending in "attn_temporal" or
# ".to_q"): the temporal layers (here: every motion module) and the query projections of
# the spatial self-attention (attn1) and cross-attention (attn2).
TUNED_MODULES = (".motion_modules.", ".attn1.to_q", ".attn2.to_q")
# Longest sequence of frames one UNet call can hold (the motion modules' position tables).
DEFAULT_MAX_FRAMES = 64


def is_motion_module(name: str) -> bool:
    """Whether a module, parameter or processor name lies inside a motion module."""
    return ".motion_modules." in name


def is_tuned(parameter_name: str) -> bool:
    """Whether `mark_trainable` trains this parameter (`TUNED_MODULES`)."""
    module = parameter_name.rsplit(".", 1)[0]
    return is_motion_module(module + ".") or module.endswith(TUNED_MODULES[1:])


def _heads(unet) -> tuple[int, ...]:
    """Attention heads per block of the temporal layers: the spatial blocks' own (as
    Tune-A-Video's attn_temporal), reduced to a divisor of the block's width if needed."""
    config = unet.config
    heads = config.num_attention_heads or config.attention_head_dim  # diffusers' SD 1.x naming
    widths = tuple(config.block_out_channels)
    heads = (heads,) * len(widths) if isinstance(heads, int) else tuple(heads)
    return tuple(h if c % h == 0 else next(d for d in range(min(h, c), 0, -1) if c % d == 0)
                 for h, c in zip(heads, widths))


def inflate(unet, positions: bool = False, max_frames: int = DEFAULT_MAX_FRAMES):
    """The video UNet of an image UNet: temporal layers added at an exact identity.

    Args:
        unet: an SD 1.x/2.x `UNet2DConditionModel` (not modified).
        positions: keep diffusers' sinusoidal frame positions in the motion modules
            (False: zeroed, Tune-A-Video's position-free temporal attention).
        max_frames: most frames one UNet call may hold.
    Returns:
        A diffusers `UNetMotionModel` on `unet`'s device and dtype, in eval mode, no
        parameter requiring grad (`mark_trainable` chooses them). Called with a clip
        (B, C, F, h, w) and text (B*F, T, D) it returns, frame by frame, exactly what
        `unet` returns for (B*F, C, h, w).
    Raises:
        ModelLoadError: a UNet that cannot be inflated (already a video UNet, SDXL).
    """
    from diffusers import MotionAdapter

    from diffstream.models.motion import motion_unet

    kind = type(unet).__name__
    if kind != "UNet2DConditionModel":
        raise ModelLoadError(f"tune video inflates an SD 1.x/2.x image UNet, not a {kind}: pass the base "
                             f"checkpoint with --model (no --motion-adapter)")
    if unet.config.addition_embed_type is not None:
        raise ModelLoadError("tune video and FateZero run SD 1.x/2.x checkpoints; this UNet is SDXL-like: pass "
                             "an SD 1.x/2.x model with --model")
    if int(max_frames) < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    widths = tuple(unet.config.block_out_channels)
    layers = unet.config.layers_per_block
    groups = int(unet.config.norm_num_groups)
    adapter = MotionAdapter(
        block_out_channels=widths,
        motion_layers_per_block=layers if isinstance(layers, int) else tuple(layers),
        motion_num_attention_heads=_heads(unet),
        motion_norm_num_groups=groups,
        motion_max_seq_length=int(max_frames),
        use_motion_mid_block=True,  # Tune-A-Video's mid block has temporal attention too
    )
    with torch.no_grad():
        for name, module in adapter.named_modules():
            if name.endswith("proj_out"):  # motion module output = proj_out(...) + residual
                module.weight.zero_()
                module.bias.zero_()
            if not positions and name.endswith("pos_embed"):
                module.pe.zero_()
    return motion_unet(unet, adapter)


def mark_trainable(video_unet) -> list[str]:
    """Make exactly Tune-A-Video's tuned parameters trainable (`TUNED_MODULES`), freeze
    the rest. Returns the trainable parameter names."""
    names = []
    for name, param in video_unet.named_parameters():
        param.requires_grad_(is_tuned(name))
        if param.requires_grad:
            names.append(name)
    if not any(is_motion_module(n) for n in names):
        raise ModelLoadError("this UNet has no motion modules: inflate it first (models.video_unet.inflate)")
    return names


def video_model_id(unet) -> str | None:
    """The id of the video model folder `unet` was loaded from (None: not loaded from one)."""
    return vars(unet).get(VIDEO_MODEL_ATTRIBUTE)


def save_video_model(video_unet, folder, base_info: dict) -> dict:
    """Write a video model into the (new or empty) `folder`.

    Args:
        video_unet: the UNetMotionModel (unwrapped; processors are not saved).
        base_info: what `edit` must know about how it was made, JSON-serialisable: e.g.
            base_model, loras, lcm_lora, source_prompt, frames, size.
    Returns:
        the info written to `video_model.json` (with a new id).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    video_unet.save_pretrained(str(folder / UNET_FOLDER), safe_serialization=True)
    info = dict(format=VIDEO_MODEL_FORMAT, version=VIDEO_MODEL_VERSION, id=uuid.uuid4().hex,
                tuned=list(TUNED_MODULES), max_frames=int(video_unet.config.motion_max_seq_length), **base_info)
    tmp = folder / f".{INFO_FILE}.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    tmp.replace(folder / INFO_FILE)
    return info


def _not_a_model(folder, why: str) -> ModelLoadError:
    return ModelLoadError(f"--video-model {folder}: {why}; pass the final/ folder of `diffstream tune video` "
                          f"(or a checkpoint's model/ folder)")


def read_video_model_info(folder) -> dict:
    """The `video_model.json` of a video model folder, checked (no weights are read).

    Raises:
        ModelLoadError: one line, when the folder is missing or not a video model.
    """
    path = Path(folder)
    if not path.is_dir():
        raise _not_a_model(folder, "no such folder")
    try:
        info = json.loads((path / INFO_FILE).read_text())
    except FileNotFoundError:
        raise _not_a_model(folder, f"not a video model (no {INFO_FILE})") from None
    except (OSError, ValueError) as exc:
        raise _not_a_model(folder, f"cannot read {INFO_FILE} ({one_line(exc, 100)})") from None
    if not isinstance(info, dict) or info.get("format") != VIDEO_MODEL_FORMAT:
        raise _not_a_model(folder, f"{INFO_FILE} is not a diffstream video model")
    if info.get("version") != VIDEO_MODEL_VERSION:
        raise _not_a_model(folder, f"a video model of format version {info.get('version')}, this diffstream reads "
                                   f"{VIDEO_MODEL_VERSION}")
    if not (path / UNET_FOLDER / "config.json").is_file():
        raise _not_a_model(folder, f"its {UNET_FOLDER}/ folder is missing")
    return info


def load_video_model(folder, dtype: torch.dtype = torch.float32, device="cpu"):
    """A video UNet saved by `save_video_model`, ready to run (eval, no grad).

    Returns:
        the UNetMotionModel, per-frame motion-module norms restored, tagged with the
        folder's id (`video_model_id`).
    Raises:
        ModelLoadError: a missing or malformed folder (one line saying what to pass).
    """
    from diffusers import UNetMotionModel

    from diffstream.models.motion import use_frame_norms

    info = read_video_model_info(folder)
    try:
        unet = UNetMotionModel.from_pretrained(str(Path(folder) / UNET_FOLDER), torch_dtype=torch.float32,
                                               local_files_only=True)
    except Exception as exc:
        raise _not_a_model(folder, f"cannot load {UNET_FOLDER}/ ({type(exc).__name__}: {one_line(exc, 120)})") \
            from None
    use_frame_norms(unet)
    unet = unet.to(device=device, dtype=dtype).eval().requires_grad_(False)
    setattr(unet, VIDEO_MODEL_ATTRIBUTE, info["id"])
    return unet


def load_tuned_weights(video_unet, folder) -> int:
    """Copy the tuned parameters (`is_tuned`) of a saved video model into `video_unet`
    (resuming a tuning run). Returns how many tensors were copied.

    Raises:
        ModelLoadError: the folder lacks a tuned tensor or holds one of another shape.
    """
    from safetensors.torch import load_file

    read_video_model_info(folder)
    files = sorted((Path(folder) / UNET_FOLDER).glob("*.safetensors"))
    if not files:
        raise _not_a_model(folder, f"no weights in {UNET_FOLDER}/")
    state = {}
    for file in files:
        state.update(load_file(str(file)))
    copied = 0
    with torch.no_grad():
        for name, param in video_unet.named_parameters():
            if not is_tuned(name):
                continue
            saved = state.get(name)
            if saved is None or saved.shape != param.shape:
                raise _not_a_model(folder, f"its weights do not match this model ({name})")
            param.copy_(saved)
            copied += 1
    return copied
