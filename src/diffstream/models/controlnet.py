"""ControlNets for the stream: loading, the tiny test ControlNet and the per-frame preprocessors.

A ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models") is a trainable copy of the UNet's encoder fed with a condition image (edges,
depth...); its zero-initialised 1x1 convolutions give residuals that are added to the
UNet's skip connections and middle block. diffusers' `ControlNetModel` computes them;
this module loads it the way the base model is loaded (hub id, folder, single file), checks
that it was trained for the loaded base model, and pairs it with the preprocessor that turns
a frame into its condition image, so the engine (`pipelines.control`) only calls them.

Preprocessors are pluggable (`register_preprocessor`): a function
`(frame (H, W, 3) uint8, pixels (1, 3, H, W) in [-1, 1]) -> (1, 3, H, W) in [0, 1]` on the
pixels' device and dtype, the layout diffusers' ControlNet pipelines feed `controlnet_cond`
(their control image processor leaves images in [0, 1]).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from diffstream.errors import ConfigError, ModelLoadError, one_line

# The ControlNet v1.1 checkpoints for SD 1.5 (lllyasviel), used when --controlnet names
# only a kind and the base model is SD 1.x (cross-attention width 768).
SD15_CONTROLNETS = {
    "canny": "lllyasviel/control_v11p_sd15_canny",
    "depth": "lllyasviel/control_v11f1p_sd15_depth",
}
# cv2.Canny thresholds of diffusers' and ControlNet's own canny examples.
CANNY_LOW, CANNY_HIGH = 100, 200

Preprocessor = Callable[[np.ndarray, torch.Tensor], torch.Tensor]


@dataclass
class ControlUnit:
    """One loaded ControlNet and the preprocessor that makes its condition images.

    Attributes:
        kind: the preprocessor's name ("canny", "depth", or a registered one).
        model: a diffusers `ControlNetModel` on the base model's device and dtype.
        preprocess: frame -> condition image (see the module docstring).
    """

    kind: str
    model: torch.nn.Module
    preprocess: Preprocessor


# --- preprocessors --------------------------------------------------------------------
def canny_map(frame: np.ndarray, pixels: torch.Tensor) -> torch.Tensor:
    """Canny edges of the frame's grey image as a white-on-black RGB image in {0, 1}.

    Args:
        frame: (H, W, 3) uint8 RGB, the frame at processing size.
        pixels: (1, 3, H, W) the same frame on the model's device (gives device/dtype).
    Returns:
        (1, 3, H, W) in [0, 1].
    """
    import cv2

    grey = cv2.cvtColor(np.ascontiguousarray(frame[..., :3]), cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(grey, CANNY_LOW, CANNY_HIGH)  # (H, W) uint8, 0 or 255
    edges = torch.from_numpy(edges).to(device=pixels.device, dtype=pixels.dtype)
    return (edges / 255.0)[None, None].expand(1, 3, -1, -1)  # (1, 3, H, W)


class DepthMap:
    """A depth estimator as a preprocessor: the min-max normalised map, quantised to 8-bit
    grey levels as a depth image file would be, as an RGB image in [0, 1] (the depth
    ControlNets were trained on MiDaS/DPT maps saved as images)."""

    def __init__(self, estimator):
        self.estimator = estimator

    def __call__(self, frame: np.ndarray, pixels: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) in [-1, 1] pixels -> (1, 3, H, W) grey depth image in [0, 1]."""
        from diffstream.models.depth import normalise_depth

        depth = normalise_depth(self.estimator.predict_pixels(pixels))  # (1, H, W) in [0, 1]
        levels = torch.floor(depth * 255.0 + 0.5) / 255.0
        return levels.to(device=pixels.device, dtype=pixels.dtype)[:, None].expand(-1, 3, -1, -1)


_PREPROCESSORS: dict[str, Callable[..., Preprocessor]] = {}


def register_preprocessor(kind: str, make: Callable[..., Preprocessor]) -> None:
    """Make `--controlnet KIND:MODEL` available: `make(depth_model=..., device=...)` builds
    the preprocessor once at load time (a model it needs is loaded there, not per frame)."""
    _PREPROCESSORS[kind] = make


def _make_canny(**_) -> Preprocessor:
    return canny_map


def _make_depth(depth_model: str | None = None, device=None, tiny: bool = False, **_) -> Preprocessor:
    if tiny or depth_model == "tiny":
        from diffstream.models.tiny import tiny_depth_estimator

        return DepthMap(tiny_depth_estimator().to(device))
    from diffstream.models.depth import DEFAULT_DEPTH_MODEL, DepthEstimator

    return DepthMap(DepthEstimator(depth_model or DEFAULT_DEPTH_MODEL, device=device))


register_preprocessor("canny", _make_canny)
register_preprocessor("depth", _make_depth)


def control_kinds() -> tuple[str, ...]:
    """The preprocessors `--controlnet` accepts."""
    return tuple(_PREPROCESSORS)


def check_kind(kind: str) -> None:
    """ConfigError in one line for an unknown preprocessor name."""
    if kind not in _PREPROCESSORS:
        raise ConfigError(f"--controlnet kind must be one of {', '.join(control_kinds())}, got {kind!r} "
                          f"(form: KIND[:MODEL][:SCALE], e.g. canny:lllyasviel/control_v11p_sd15_canny:0.8)")


# --- models ---------------------------------------------------------------------------
def tiny_controlnet(unet, seed: int = 0):
    """A random ControlNet for `unet` (tests, `--controlnet KIND:tiny`).

    Built from the UNet's config with diffusers' `ControlNetModel.from_unet`, then every
    parameter gets seeded random values: a real ControlNet starts with zero convolutions
    (residuals exactly 0), which would make every test of the control path pass vacuously.
    """
    from diffusers import ControlNetModel

    from diffstream.models.tiny import randomize

    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16),
                                    load_weights_from_unet=False)
    randomize(net, seed=seed, std=0.1)
    # A wider condition embedding makes the residuals depend on the map (measured: about
    # 45% of their size between two maps shifted by 4 pixels, vs 0.2% at std 0.1), so a
    # row given another frame's map shows; the residuals stay about 0.3-0.5 in size.
    randomize(net.controlnet_cond_embedding, seed=seed + 1, std=0.2)
    return net.eval()


def default_controlnet(kind: str, unet, base_name: str) -> str:
    """The checkpoint for `--controlnet KIND` without a model: SD 1.5's v1.1 ControlNets for
    an SD 1.x base, the random tiny one for the tiny/toy models; else ConfigError."""
    if base_name in ("tiny", "tiny-sdxl", "toy"):
        return "tiny"
    if int(unet.config.cross_attention_dim) == 768 and kind in SD15_CONTROLNETS:
        return SD15_CONTROLNETS[kind]
    raise ConfigError(f"no default {kind} ControlNet for this base model (cross-attention width "
                      f"{unet.config.cross_attention_dim}): pass --controlnet {kind}:MODEL with a ControlNet "
                      f"trained for it")


def check_compatible(config, unet, name: str) -> None:
    """ConfigError in one line when a ControlNet's config does not fit the base UNet.

    A ControlNet adds residuals to the UNet's skip connections, so it must have been
    trained for a base model of the same layout: the same block widths (the residuals'
    channels) and cross-attention width (its own text conditioning). An SD 1.5 ControlNet
    on SD 2.1 or SDXL fails both.
    """
    ours = (tuple(unet.config.block_out_channels), int(unet.config.cross_attention_dim))
    theirs = (tuple(config["block_out_channels"]), int(config["cross_attention_dim"]))
    if ours != theirs:
        raise ConfigError(f"ControlNet {name!r} is for another base model (blocks {list(theirs[0])}, text width "
                          f"{theirs[1]}; this model has {list(ours[0])}, {ours[1]}): pass a ControlNet trained for "
                          f"this model")


def _is_single_file(spec: str) -> bool:
    return spec.lower().endswith((".safetensors", ".ckpt", ".pth", ".bin"))


def precheck(specs) -> None:
    """What can be checked before any model loads: known kinds, and that local paths exist.

    Raises:
        ConfigError / ModelLoadError: one line.
    """
    for kind, spec in specs:
        check_kind(kind)
        if not spec or spec == "tiny":
            continue
        looks_local = _is_single_file(spec) or spec.startswith((".", "/", "~")) or spec.count("/") != 1
        if looks_local and not Path(spec).expanduser().exists():
            raise ModelLoadError(f"ControlNet {spec!r} does not exist: pass --controlnet KIND:MODEL with a hub id, a "
                                 f"diffusers folder or a .safetensors file (KIND:tiny for a random test ControlNet)")


def _load_controlnet_model(spec: str, dtype: torch.dtype, unet):
    """A `ControlNetModel` from a hub id, diffusers folder or single file, checked against `unet`."""
    from diffusers import ControlNetModel

    from diffstream.models.hub import hub_kwargs

    path = Path(spec).expanduser()
    single = _is_single_file(spec)
    try:
        if single:
            net = ControlNetModel.from_single_file(str(path), torch_dtype=dtype)
        else:
            source = str(path) if path.exists() else spec
            kwargs = hub_kwargs(source)
            check_compatible(ControlNetModel.load_config(source, **kwargs), unet, spec)
            net = ControlNetModel.from_pretrained(source, torch_dtype=dtype, **kwargs)
    except (ConfigError, ImportError):
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load ControlNet {spec!r} ({type(exc).__name__}: {one_line(exc, 160)}): "
                             f"pass --controlnet KIND:MODEL with a local diffusers folder or .safetensors file") from None
    check_compatible(net.config, unet, spec)
    return net


def load_controlnets(specs, unet, base_name: str, device, dtype, depth_model: str | None = None
                     ) -> tuple[ControlUnit, ...]:
    """Load the ControlNets of `--controlnet` options, in order.

    Args:
        specs: (kind, model or None) pairs; None takes `default_controlnet`.
        unet: the base model's UNet (the ControlNets must fit it).
        base_name: the base model as the user named it ("tiny"/"toy" get tiny ControlNets).
        depth_model: the estimator of the "depth" preprocessor (None: DPT-Hybrid, or the
            tiny one for tiny ControlNets).
    Raises:
        ConfigError / ModelLoadError: one line.
    """
    precheck(specs)
    units = []
    for i, (kind, spec) in enumerate(specs):
        spec = spec or default_controlnet(kind, unet, base_name)
        if spec == "tiny":
            net = tiny_controlnet(unet, seed=100 + i)
        else:
            net = _load_controlnet_model(spec, dtype, unet)
        net = net.to(device=device, dtype=dtype).eval().requires_grad_(False)
        preprocess = _PREPROCESSORS[kind](depth_model=depth_model, device=device, tiny=spec == "tiny")
        units.append(ControlUnit(kind=kind, model=net, preprocess=preprocess))
    return tuple(units)
