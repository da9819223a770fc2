"""Fairy's equivariant fine-tuning of an InstructPix2Pix model (Wu et al., CVPR 2024, Sec. 5.2).

Fairy's observation: an image editor f is sensitive to small changes of its input, so
frames that differ only by a camera motion get edits that differ by more. Its remedy is a
data augmentation applied to any editing dataset: for a pair (I, I') of an image and its
edit, sample one random affine transform g and train on (g(I), g(I')), "the assumption
is that the affine transformations applied to input images should correspondingly affect
the edited images". Its settings (Sec. 5.2), the defaults here:

- torchvision's RandomAffine: rotation < 5 degrees, translation in [-0.05, 0.05] of the
  size, scale in [0.95, 1.05], shear in [-5, 5] degrees on both axes;
- a random resized crop: the image scaled to 288 px and a random 256 px square cropped
  (the same crop for both images).

Fairy resumes training of the editing model on its own data with this augmentation
(50,000 steps at batch 128, Sec. 6); it does not train with its anchor attention (the
anchors are an inference-time change of self-attention), so neither does this task.

The training objective is InstructPix2Pix's (Brooks et al. 2023, Sec. 3.2, and diffusers'
`train_instruct_pix2pix.py`): the UNet sees the noisy latent of the edited image
concatenated with the *unscaled* VAE mode of the input image (8 channels), the text
embedding of the instruction, and is trained to predict the noise (or v, as the model's
scheduler says). Conditioning is dropped as Brooks et al. do for their two-way classifier-
free guidance: 5% of samples lose the text, 5% the image, 5% both. The VAE and the text
encoder stay frozen; the UNet is tuned whole or through a LoRA (peft).

Data: a folder or a manifest of (input image, instruction, edited image) triplets, all
checked before anything trains (`load_triplets`):

    DATA/input/NAME.png            the image to edit (any format PIL reads)
    DATA/edited/NAME.png           its edit (same size; any extension)
    DATA/instructions/NAME.txt     its instruction, or DATA/instruction.txt for all
or a manifest (DATA/manifest.json / .jsonl / .csv, or the file itself):
    [{"input": "a.png", "instruction": "make it blue", "edited": "a_blue.png"}, ...]
    (CSV: a header row input,instruction,edited; diffusers' column names input_image,
    edit_prompt, edited_image work too; paths relative to the manifest's folder).

    components, widened = load_base("timbrooks/instruct-pix2pix")
    task = EquivariantTask(components, load_triplets("DATA"), EquivariantConfig(), base="timbrooks/instruct-pix2pix")
    tune(task, TuneConfig(output_dir="out"))   # out/final: a diffusers folder for `edit --method fairy`
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from diffstream import frames as F
from diffstream.errors import ConfigError, InputError, ModelLoadError, one_line
from diffstream.metrics.equivariance import equivariance_errors, fairy_edit_fn, warp_affine

# Fairy Sec. 5.2 (torchvision RandomAffine settings and the 288 -> 256 random resized crop).
FAIRY_DEGREES = 5.0
FAIRY_TRANSLATE = 0.05
FAIRY_SCALE = (0.95, 1.05)
FAIRY_SHEAR = 5.0
FAIRY_SIZE = 256
FAIRY_CROP_RATIO = 288 / 256
# Brooks et al. Sec. 3.2: 5% text only, 5% image only, 5% both dropped.
IP2P_CONDITIONING_DROPOUT = 0.05
# The UNet's attention projections (diffusers' LoRA training scripts) plus conv_in, where
# the source image enters: a model widened from text-to-image has zero weights on the
# image channels, which attention-only LoRA could never change.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv_in")
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' `save_lora_weights` name
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MANIFEST_NAMES = ("manifest.json", "manifest.jsonl", "manifest.csv")
# Columns of a manifest: ours first, then diffusers' InstructPix2Pix dataset names.
_COLUMNS = {"input": ("input", "input_image"), "instruction": ("instruction", "edit_prompt"),
            "edited": ("edited", "edited_image")}
# Validation draws its held-out transforms from this seed; training draws from the loop's
# per-step generators, which never start from it.
VALIDATION_SEED = 20231221
VALIDATION_TRANSFORMS = 2
VALIDATION_IMAGES = 2


# --- affine transforms ------------------------------------------------------------------

@dataclass(frozen=True)
class AffineRanges:
    """The ranges random affine transforms are drawn from (torchvision RandomAffine's).

    Attributes:
        degrees: rotation uniform in [-degrees, degrees].
        translate: shift uniform in [-translate, translate] times the width / height.
        scale: zoom factor uniform in [scale[0], scale[1]].
        shear: shear angles (x and y, each) uniform in [-shear, shear] degrees.
    """

    degrees: float = FAIRY_DEGREES
    translate: float = FAIRY_TRANSLATE
    scale: tuple[float, float] = FAIRY_SCALE
    shear: float = FAIRY_SHEAR

    def __post_init__(self):
        if not (0 <= self.degrees <= 180):
            raise ConfigError(f"--rotation must be in [0, 180] degrees, got {self.degrees}")
        if not (0 <= self.translate < 1):
            raise ConfigError(f"--translate must be in [0, 1) (a fraction of the size), got {self.translate}")
        lo, hi = self.scale
        if not (0 < lo <= hi):
            raise ConfigError(f"--scale must be LO,HI with 0 < LO <= HI, got {lo},{hi}")
        if not (0 <= self.shear < 90):
            raise ConfigError(f"--shear must be in [0, 90) degrees, got {self.shear}")


@dataclass(frozen=True)
class Affine:
    """One affine transform of the image plane, in size-independent terms.

    The map is g(p) = c + t + s R(angle) Sh_x Sh_y (p - c): about the image centre c, a
    shear along x by `shear_x` degrees, along y by `shear_y`, a rotation by `angle`
    degrees (clockwise on screen, where y points down; the ranges are symmetric), a zoom
    `scale`, then a shift t = (tx W, ty H).
    """

    angle: float = 0.0
    tx: float = 0.0
    ty: float = 0.0
    scale: float = 1.0
    shear_x: float = 0.0
    shear_y: float = 0.0

    def matrix(self, width: int, height: int) -> np.ndarray:
        """The (2, 3) forward map in pixel coordinates for a width x height image
        (`diffstream.metrics.equivariance.warp_affine`'s convention)."""
        a, sx, sy = (math.radians(v) for v in (self.angle, self.shear_x, self.shear_y))
        rotation = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        shear = np.array([[1.0, math.tan(sx)], [0.0, 1.0]]) @ np.array([[1.0, 0.0], [math.tan(sy), 1.0]])
        linear = self.scale * rotation @ shear  # (2, 2)
        centre = np.array([(width - 1) / 2.0, (height - 1) / 2.0])  # pixel centres are integers
        shift = np.array([self.tx * width, self.ty * height])
        return np.hstack([linear, (centre + shift - linear @ centre)[:, None]])  # (2, 3)


def random_affine(generator: torch.Generator, ranges: AffineRanges) -> Affine:
    """A transform drawn uniformly from `ranges` (six draws from `generator`, in a fixed order).

    Args:
        generator: a CPU torch.Generator (the loop's per-step generator in training).
        ranges: the ranges (Fairy's by default).
    """
    u = (2 * torch.rand(6, generator=generator, dtype=torch.float64) - 1).tolist()  # six in [-1, 1)
    lo, hi = ranges.scale
    return Affine(angle=u[0] * ranges.degrees, tx=u[1] * ranges.translate, ty=u[2] * ranges.translate,
                  scale=lo + (u[3] + 1) / 2 * (hi - lo), shear_x=u[4] * ranges.shear, shear_y=u[5] * ranges.shear)


def apply_affine(source: np.ndarray, target: np.ndarray, affine: Affine) -> tuple[np.ndarray, np.ndarray]:
    """The SAME transform applied to an input image and its edit (Fairy's augmentation).

    Args:
        source, target: (H, W, 3) uint8 of the same size.
    Returns:
        (g(source), g(target)), each (H, W, 3) uint8: bilinear, black where g brings in
        pixels from outside the image (torchvision RandomAffine's default fill of 0).
    """
    if source.shape != target.shape:
        raise ValueError(f"input {source.shape} and edited {target.shape} images differ in size")
    h, w = source.shape[:2]
    matrix = affine.matrix(w, h)
    return warp_affine(source, matrix), warp_affine(target, matrix)


def crop_pair(source: np.ndarray, target: np.ndarray, size: int, crop_ratio: float,
              generator: torch.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """Fairy's random resized crop of both images: the shorter side scaled to
    size x crop_ratio (288 for 256), then one size x size square at the same place.

    Args:
        source, target: (H, W, 3) uint8 of the same size.
        generator: draws the crop offset (x first, then y); None crops the centre (validation).
    Returns:
        two (size, size, 3) uint8 images.
    """
    h, w = source.shape[:2]
    shorter = max(size, int(round(size * crop_ratio)))
    scale = shorter / min(h, w)
    new_w, new_h = max(size, int(round(w * scale))), max(size, int(round(h * scale)))
    source, target = F.resize(source, (new_w, new_h)), F.resize(target, (new_w, new_h))
    if generator is None:
        x, y = (new_w - size) // 2, (new_h - size) // 2
    else:
        x = int(torch.randint(0, new_w - size + 1, (1,), generator=generator))
        y = int(torch.randint(0, new_h - size + 1, (1,), generator=generator))
    return source[y:y + size, x:x + size].copy(), target[y:y + size, x:x + size].copy()


# --- configuration ----------------------------------------------------------------------

@dataclass(frozen=True)
class EquivariantConfig:
    """What an equivariant fine-tuning run does besides the loop's settings.

    Attributes:
        affine: the random affine ranges (Fairy Sec. 5.2's by default).
        size: side of the square training crops in pixels (Fairy: 256); a multiple of the
            model's `size_multiple`.
        crop_ratio: the shorter side is scaled to size x crop_ratio before the random
            crop (Fairy: 288 / 256); 1 takes the centre square's full extent.
        instruction: None: each triplet's own instruction; a text: this instruction for
            every triplet (a dataset of one edit, e.g. a folder without instruction files).
        lora_rank: None tunes every UNet weight; r >= 1 trains a rank-r LoRA on the
            attention projections and conv_in (`LORA_TARGETS`), saved in diffusers' format.
        conditioning_dropout: the fraction of samples that lose the text, the image, and
            both, each (InstructPix2Pix: 0.05, so 15% lose something).
        guidance, image_guidance, validation_steps: how validation edits run (FairyPipeline,
            Euler ancestral, fixed noise): the `edit` command's scales by default.
    """

    affine: AffineRanges = field(default_factory=AffineRanges)
    size: int = FAIRY_SIZE
    crop_ratio: float = FAIRY_CROP_RATIO
    instruction: str | None = None
    lora_rank: int | None = None
    conditioning_dropout: float = IP2P_CONDITIONING_DROPOUT
    guidance: float = 7.5
    image_guidance: float = 1.5
    validation_steps: int = 10

    def __post_init__(self):
        if int(self.size) < 16:
            raise ConfigError(f"--size must be at least 16, got {self.size}")
        if not (1.0 <= float(self.crop_ratio) <= 4.0):
            raise ConfigError(f"--crop-ratio must be in [1, 4], got {self.crop_ratio}")
        if self.instruction is not None and not self.instruction.strip():
            raise ConfigError("--instruction must not be empty (leave it out to use each triplet's own)")
        if self.lora_rank is not None and int(self.lora_rank) < 1:
            raise ConfigError(f"--lora-rank must be at least 1 (leave it out for full fine-tuning), "
                              f"got {self.lora_rank}")
        if not (0.0 <= float(self.conditioning_dropout) <= 1 / 3):
            raise ConfigError(f"--conditioning-dropout must be in [0, 1/3] (three cases of it), "
                              f"got {self.conditioning_dropout}")
        if self.guidance < 0 or self.image_guidance < 0:
            raise ConfigError("--guidance and --image-guidance must be >= 0")
        if int(self.validation_steps) < 1:
            raise ConfigError(f"--validation-steps must be at least 1, got {self.validation_steps}")


# --- the triplets -----------------------------------------------------------------------

@dataclass(frozen=True)
class Triplet:
    """One training example: paths of the input and edited images, and the instruction."""

    input: Path
    instruction: str
    edited: Path
    origin: str = field(default="", compare=False)  # "manifest.csv, row 3" for messages

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """(input, edited) as (H, W, 3) uint8 RGB frames."""
        return F.load_image(self.input), F.load_image(self.edited)


def load_triplets(path, instruction: str | None = None) -> list[Triplet]:
    """Find and check every triplet of a data folder or manifest (see the module docstring).

    Every image is decoded once here, so a broken dataset fails before the model loads.

    Args:
        path: a triplet folder, a folder holding a manifest, or a manifest file.
        instruction: one instruction for every triplet (then no instruction files are needed).
    Returns:
        the triplets, sorted by name (folder) or in manifest order.
    Raises:
        InputError: one line naming the file and what is wrong with it (missing, not an
            image, empty instruction, input and edit of different sizes, bad manifest).
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise InputError(f"{root}: no such folder or manifest file")
    if root.is_file():
        triplets = _read_manifest(root, instruction)
    elif manifest := next((root / n for n in MANIFEST_NAMES if (root / n).is_file()), None):
        triplets = _read_manifest(manifest, instruction)
    else:
        triplets = _read_folder(root, instruction)
    for triplet in triplets:
        _check_triplet(triplet)
    return triplets


def _read_folder(root: Path, instruction: str | None) -> list[Triplet]:
    inputs, edited = root / "input", root / "edited"
    if not inputs.is_dir() or not edited.is_dir():
        raise InputError(f"{root}: not a triplet folder (needs input/ and edited/ folders, or a "
                         f"{'/'.join(MANIFEST_NAMES)})")
    sources = _images_by_stem(inputs)
    targets = _images_by_stem(edited)
    if not sources:
        raise InputError(f"{inputs}: no images (.png, .jpg, .webp, ...)")
    for stem, file in targets.items():
        if stem not in sources:
            raise InputError(f"{file}: an edited image with no input/{stem}.* beside it")
    shared = root / "instruction.txt"
    triplets = []
    for stem, source in sorted(sources.items()):
        if stem not in targets:
            raise InputError(f"{edited / (stem + source.suffix)}: missing (the edited image of {source})")
        text = instruction
        if text is None:
            own = root / "instructions" / f"{stem}.txt"
            file = own if own.is_file() else shared if shared.is_file() else None
            if file is None:
                raise InputError(f"{own}: missing (each triplet needs an instruction: this file, {shared} for all, "
                                 f"or --instruction)")
            text = _read_text(file)
            if not text.strip():
                raise InputError(f"{file}: empty instruction")
        triplets.append(Triplet(source, text.strip(), targets[stem]))
    return triplets


def _images_by_stem(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for file in sorted(folder.iterdir()):
        if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
            if file.stem in found:
                raise InputError(f"{file}: two images named {file.stem!r} in {folder} ({found[file.stem].name})")
            found[file.stem] = file
    return found


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{file}: cannot read it ({one_line(exc, 120)})") from None


def _read_manifest(file: Path, instruction: str | None) -> list[Triplet]:
    text = _read_text(file)
    suffix = file.suffix.lower()
    rows: list[tuple[str, dict]] = []  # (where, row)
    try:
        if suffix == ".json":
            data = json.loads(text)
            if isinstance(data, dict) and isinstance(data.get("triplets"), list):
                data = data["triplets"]
            if not isinstance(data, list):
                raise InputError(f"{file}: expected a JSON list of triplets "
                                 f"[{{\"input\": ..., \"instruction\": ..., \"edited\": ...}}, ...]")
            rows = [(f"entry {i + 1}", row) for i, row in enumerate(data)]
        elif suffix == ".jsonl":
            rows = [(f"line {i + 1}", json.loads(line)) for i, line in enumerate(text.splitlines()) if line.strip()]
        elif suffix == ".csv":
            reader = csv.DictReader(text.splitlines())
            rows = [(f"row {i + 2}", row) for i, row in enumerate(reader)]  # row 1 is the header
        else:
            raise InputError(f"{file}: a manifest must be .json, .jsonl or .csv")
    except json.JSONDecodeError as exc:
        raise InputError(f"{file}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except csv.Error as exc:
        raise InputError(f"{file}: not a valid CSV file ({one_line(exc, 120)})") from None
    if not rows:
        raise InputError(f"{file}: no triplets")
    base = file.parent
    triplets = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise InputError(f"{file}, {where}: expected an object with input, instruction and edited")
        values = {}
        for key, names in _COLUMNS.items():
            value = next((row[n] for n in names if row.get(n) not in (None, "")), None)
            if value is None and not (key == "instruction" and instruction is not None):
                what = "an empty instruction" if key == "instruction" and any(n in row for n in names) else \
                    f"no {key!r} field ({' or '.join(names)})"
                raise InputError(f"{file}, {where}: {what}")
            values[key] = value
        text_value = instruction if instruction is not None else str(values["instruction"])
        if not text_value.strip():
            raise InputError(f"{file}, {where}: an empty instruction")
        triplets.append(Triplet(base / str(values["input"]), text_value.strip(), base / str(values["edited"]),
                                origin=f"{file}, {where}"))
    return triplets


def _check_triplet(triplet: Triplet) -> None:
    sizes = []
    for role, file in (("input", triplet.input), ("edited", triplet.edited)):
        if not file.is_file():
            other = f"the edited image of {triplet.input}" if role == "edited" else ""
            context = "; ".join(part for part in (other, triplet.origin) if part)
            raise InputError(f"{file}: no such file" + (f" ({context})" if context else ""))
        try:
            image = F.load_image(file)
        except Exception as exc:  # PIL raises many kinds for a broken file
            raise InputError(f"{file}: not a readable image ({type(exc).__name__}: {one_line(exc, 120)})") from None
        sizes.append(image.shape[:2])
    if sizes[0] != sizes[1]:
        (h0, w0), (h1, w1) = sizes
        raise InputError(f"{triplet.edited}: {w1}x{h1}, but its input {triplet.input} is {w0}x{h0} "
                         f"(an edit must have its input's size)")


# --- the model --------------------------------------------------------------------------

def instruct_from_text_model(components):
    """Turn a text-to-image model into an InstructPix2Pix-style one, in place.

    The UNet's first convolution gets as many extra input channels as the latent has
    (4 -> 8), their weights zero, the rest kept: Brooks et al. (Sec. 3.2) initialise
    InstructPix2Pix from Stable Diffusion this way, so the widened model starts as exactly
    the text-to-image model and learns to use the input image during tuning.

    Args:
        components: a loaded `Components` with a latent-channel (4) UNet.
    Returns:
        the same components, its UNet now taking (B, 8, h, w).
    """
    unet = components.unet
    old = unet.conv_in
    latent = components.latent_channels
    if old.in_channels != latent:
        raise ModelLoadError(f"model {components.name!r} already has a {old.in_channels}-channel UNet")
    new = torch.nn.Conv2d(2 * latent, old.out_channels, old.kernel_size, old.stride, old.padding,
                          device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :latent].copy_(old.weight)  # (out, 8, k, k): the image channels stay zero
        new.bias.copy_(old.bias)
    new.requires_grad_(old.weight.requires_grad)
    unet.conv_in = new
    unet.register_to_config(in_channels=2 * latent)
    return components


def load_base(model: str, device: str = "auto"):
    """The model to tune: `tiny` (random 8-channel), `toy` (the trained toy model widened
    by `instruct_from_text_model`), a hub id, a diffusers folder or a single file.

    A 4-channel (text-to-image) checkpoint is widened like `toy`; an 8-channel one is
    used as it is. Weights load in fp32 (the trained copy; mixed precision is the loop's).

    Returns:
        (components, widened): widened is True when the UNet was widened here, so the
        base cannot be named by its --model spec for `edit --lora`.
    Raises:
        ModelLoadError / ConfigError: one line, as `load_components` does.
    """
    from diffstream.config import MODEL_PRESETS, ModelConfig
    from diffstream.models.loading import load_components

    if model in MODEL_PRESETS or model == "tiny-sdxl":
        raise ConfigError(f"--model {model}: tuning takes an InstructPix2Pix checkpoint (default "
                          f"timbrooks/instruct-pix2pix), an SD 1.x/2.x model, toy or tiny; not a streaming preset "
                          f"or SDXL")
    components = load_components(ModelConfig(model=model, device=device, dtype="fp32", instruct=model == "tiny"))
    if components.is_sdxl:
        raise ModelLoadError(f"--model {model} is SDXL; Fairy's editor (and so this tuning) is SD 1.x/2.x")
    widened = components.unet_in_channels == components.latent_channels
    if widened:
        instruct_from_text_model(components)
    elif components.unet_in_channels != 2 * components.latent_channels:
        raise ModelLoadError(f"--model {model} has a {components.unet_in_channels}-channel UNet; tuning needs a "
                             f"text-to-image ({components.latent_channels}) or InstructPix2Pix "
                             f"({2 * components.latent_channels}) one")
    return components, widened


def add_lora(unet, rank: int) -> None:
    """A rank-`rank` LoRA (peft, via diffusers' `add_adapter`) on `LORA_TARGETS`; only its
    weights require grad. alpha = rank (scale 1), the value diffusers assumes when it
    loads a LoRA file without alphas, so the file means what was trained."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=int(rank), lora_alpha=int(rank), init_lora_weights="gaussian",
                                target_modules=list(LORA_TARGETS)))


def save_lora(unet, folder: Path) -> Path:
    """The UNet's LoRA as diffusers writes it (`StableDiffusionPipeline.save_lora_weights`:
    `unet.`-prefixed keys, safetensors, the peft config as metadata), so `load_lora_weights`
    and `diffstream edit --lora` read it. Returns the file."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    # peft's key names (lora_A / lora_B), which diffusers reads as they are; its older
    # lora.down / lora.up names are not written for conv layers, so a converted file
    # would mix both and diffusers would drop the attention half of it.
    layers = get_peft_model_state_dict(unet)
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=layers, weight_name=LORA_FILE,
                                              safe_serialization=True,
                                              unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    return Path(folder) / LORA_FILE


def load_lora(unet, file: Path) -> None:
    """Put the weights of a `save_lora` file into the UNet's (already added) LoRA."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = {k.removeprefix("unet."): v for k, v in load_file(str(file)).items()}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state), adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ModelLoadError(f"{file}: LoRA keys that this model does not have ({unexpected[0]}, ...)")


def save_pipeline(components, unet, folder: Path) -> None:
    """A diffusers StableDiffusionInstructPix2PixPipeline folder of the components with
    `unet` (what `--model FOLDER` and diffusers' `from_pretrained` load)."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    scheduler = components.scheduler
    # The pipeline's constructor "fixes" legacy scheduler configs in place (steps_offset,
    # clip_sample): give it a copy, then register the model's own scheduler to be saved,
    # so the checkpoint samples exactly as the tuned model did.
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer, unet=unet,
        scheduler=type(scheduler).from_config(scheduler.config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.register_modules(scheduler=scheduler)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    # Settings the scheduler took as defaults are left out of the file, so they load as
    # defaults again: FairyPipeline reads a defaulted timestep_spacing as Euler's
    # "linspace" and a written one as written.
    defaults = scheduler.config.get("_use_default_values") or ()
    if defaults:
        file = Path(folder) / "scheduler" / "scheduler_config.json"
        config = json.loads(file.read_text())
        file.write_text(json.dumps({k: v for k, v in config.items() if k not in defaults}, indent=2))


# --- the task ---------------------------------------------------------------------------

class EquivariantTask:
    """Fairy's equivariant fine-tuning as a `diffstream.tuning.loop.TuneTask`.

    Args:
        components: an 8-channel (InstructPix2Pix-style) model, e.g. from `load_base`;
            its UNet is tuned in place (whole, or through an added LoRA).
        triplets: the training data (`load_triplets`).
        config: the augmentation, LoRA rank, dropout and validation settings.
        base: the --model spec the result needs beside a LoRA file (None: the base is
            written next to the LoRA, as after `instruct_from_text_model`).
        validation: triplets edited at every validation (default: the first two of
            `triplets`); their held-out transforms come from `VALIDATION_SEED`.
    """

    name = "equivariant"

    def __init__(self, components, triplets: Sequence[Triplet], config: EquivariantConfig, base: str | None = None,
                 validation: Sequence[Triplet] | None = None):
        if not triplets:
            raise InputError("no training triplets")
        latent = components.latent_channels
        if components.unet_in_channels != 2 * latent:
            raise ModelLoadError(f"model {components.name!r} has a {components.unet_in_channels}-channel UNet; "
                                 f"equivariant tuning needs an InstructPix2Pix-style ({2 * latent}) one "
                                 f"(`instruct_from_text_model` widens a text-to-image model)")
        if config.size % components.size_multiple:
            raise ConfigError(f"--size {config.size} must be a multiple of {components.size_multiple} for this model")
        self.components, self.config, self.base = components, config, base
        self.triplets = [dataclasses.replace(t, instruction=config.instruction) if config.instruction else t
                         for t in triplets]
        chosen = validation if validation else self.triplets[:VALIDATION_IMAGES]
        self.validation = [dataclasses.replace(t, instruction=config.instruction) if config.instruction else t
                           for t in chosen]
        from diffusers import DDPMScheduler

        # The model's own noise schedule and prediction type, for add_noise / get_velocity.
        self.noise_scheduler = DDPMScheduler.from_config(components.scheduler.config)
        self._text: dict[str, torch.Tensor] = {}  # instruction -> (1, 77, D), frozen encoder
        unet = components.unet
        if config.lora_rank is None:
            unet.requires_grad_(True)
        else:
            add_lora(unet, config.lora_rank)

    # --- what the loop trains -----------------------------------------------------------
    def module(self) -> torch.nn.Module:
        """The UNet (trainable: all of it, or its LoRA layers only)."""
        return self.components.unet

    def sample_batch(self, step: int, generator: torch.Generator, batch_size: int) -> dict:
        """`batch_size` triplets drawn from `generator`, each cropped and transformed by
        Fairy's augmentation, the same crop and affine for input and edit.

        Returns:
            dict(source=(B, 3, S, S), target=(B, 3, S, S) float in [-1, 1] on the CPU,
            instructions=[B str]).
        """
        c = self.config
        sources, targets, texts = [], [], []
        for _ in range(batch_size):
            triplet = self.triplets[int(torch.randint(0, len(self.triplets), (1,), generator=generator))]
            source, target = crop_pair(*triplet.read(), c.size, c.crop_ratio, generator)
            source, target = apply_affine(source, target, random_affine(generator, c.affine))
            sources.append(source)
            targets.append(target)
            texts.append(triplet.instruction)
        return dict(source=F.frames_to_tensor(sources), target=F.frames_to_tensor(targets), instructions=texts)

    def loss(self, module: torch.nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """InstructPix2Pix's denoising loss of a batch (Brooks et al. Sec. 3.2).

        Draws (from `generator`, in this order): the VAE posterior sample of the edits,
        the noise, the timesteps, and one uniform per sample for conditioning dropout.
        """
        from diffusers.utils.torch_utils import randn_tensor

        comp = self.components
        device = next(module.parameters()).device
        self._place(device)
        source = batch["source"].to(device)  # (B, 3, S, S)
        target = batch["target"].to(device)
        b = source.shape[0]
        with torch.no_grad():
            # The edit's latent as the model generates it (scaled posterior sample); the
            # input's as the model is conditioned on it (unscaled posterior mode, as
            # FairyPipeline and diffusers' InstructPix2Pix pipeline condition).
            latents = comp.vae.encode(target).latent_dist.sample(generator) * comp.vae.config.scaling_factor
            source_latents = comp.vae.encode(source).latent_dist.mode()  # (B, 4, h, w)
            text = torch.cat([self._embed(t) for t in batch["instructions"]])  # (B, 77, D)
            null_text = self._embed("")
        noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=latents.dtype)
        steps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=generator)
        steps = steps.to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, steps)
        # Conditioning dropout as diffusers' train_instruct_pix2pix.py draws it: with
        # p ~ U[0, 1) and q the dropout, text goes when p < 2q, the image when q <= p < 3q:
        # q text only, q both, q image only.
        q = float(self.config.conditioning_dropout)
        p = torch.rand(b, generator=generator).to(device)
        drop_text = (p < 2 * q).view(b, 1, 1)
        keep_image = 1.0 - ((p >= q) & (p < 3 * q)).to(source_latents.dtype).view(b, 1, 1, 1)
        text = torch.where(drop_text, null_text.expand_as(text), text)
        model_input = torch.cat([noisy, keep_image * source_latents], dim=1)  # (B, 8, h, w)
        if comp.prediction_type == "v_prediction":
            wanted = self.noise_scheduler.get_velocity(latents, noise, steps)
        elif comp.prediction_type == "epsilon":
            wanted = noise
        else:
            raise ModelLoadError(f"model {comp.name!r}: prediction type {comp.prediction_type!r} is not supported "
                                 f"for tuning (epsilon or v_prediction)")
        predicted = module(model_input, steps, encoder_hidden_states=text, return_dict=False)[0]
        return torch.nn.functional.mse_loss(predicted.float(), wanted.float())

    def _place(self, device: torch.device) -> None:
        """The frozen VAE and text encoder on the device accelerate put the UNet on."""
        comp = self.components
        if comp.device != device:
            comp.vae.to(device)
            comp.text_encoder.to(device)
            comp.device = device
            self._text.clear()

    def _embed(self, text: str) -> torch.Tensor:
        emb = self._text.get(text)
        if emb is None:
            emb = self._text[text] = self.components.encode_prompt([text]).float()  # (1, 77, D)
        return emb

    # --- validation -------------------------------------------------------------------
    def validate(self, module: torch.nn.Module, step: int, folder: Path) -> dict[str, float]:
        """Edit the validation triplets (centre crops) with Fairy's pipeline and measure.

        Writes `folder/equivariance.png`: one row per triplet: input, target, edit(x),
        T(x), edit(T(x)), T(edit(x)) for the first held-out transform T.

        Returns:
            equivariance_error: mean |edit(T(x)) - T(edit(x))| over the triplets and
                `VALIDATION_TRANSFORMS` held-out transforms (grey levels);
            edit_error: mean |edit(x) - target| (grey levels).
        """
        c = self.config
        self._place(next(module.parameters()).device)
        generator = torch.Generator().manual_seed(VALIDATION_SEED)
        affines = [random_affine(generator, c.affine) for _ in range(VALIDATION_TRANSFORMS)]
        matrices = [a.matrix(c.size, c.size) for a in affines]
        equivariance, edit_errors, rows = [], [], []
        for triplet in self.validation:
            source, target = crop_pair(*triplet.read(), c.size, c.crop_ratio, None)
            memo: dict[bytes, np.ndarray] = {}
            editor = fairy_edit_fn(self.components, triplet.instruction, steps=c.validation_steps,
                                   guidance=c.guidance, image_guidance=c.image_guidance)

            def edit(image, editor=editor, memo=memo):
                key = image.tobytes()
                if key not in memo:
                    memo[key] = editor(image)
                return memo[key]

            equivariance.append(equivariance_errors(edit, [source], matrices).mean())
            edited = edit(source)
            edit_errors.append(np.abs(edited.astype(np.float64) - target).mean())
            moved = warp_affine(source, matrices[0])
            rows.append(np.hstack([source, target, edited, moved, edit(moved), warp_affine(edited, matrices[0])]))
        F.save_image(Path(folder) / "equivariance.png", np.vstack(rows))
        return dict(equivariance_error=float(np.mean(equivariance)), edit_error=float(np.mean(edit_errors)))

    # --- the result -------------------------------------------------------------------
    def save(self, module: torch.nn.Module, folder: Path) -> None:
        """Full tuning: a diffusers InstructPix2Pix folder. LoRA: `LORA_FILE` (diffusers'
        format), plus the base in `base/` when it cannot be named by a --model spec."""
        folder = Path(folder)
        if self.config.lora_rank is None:
            save_pipeline(self.components, module, folder)
            return
        save_lora(module, folder)
        if self.base is None:
            self._save_base(module, folder / "base")

    def _save_base(self, module, folder: Path) -> None:
        """The base model without the LoRA (its frozen weights, which peft keeps under
        `base_layer.`), as a diffusers folder."""
        state = {k.replace(".base_layer.", "."): v for k, v in module.state_dict().items() if "lora_" not in k}
        base = type(module).from_config(module.config)  # the same architecture, no adapter
        base.load_state_dict(state)
        save_pipeline(self.components, base, folder)

    def load_trainable(self, module: torch.nn.Module, folder: Path) -> None:
        """Restore the trained weights from a folder `save` wrote (resume)."""
        folder = Path(folder)
        if self.config.lora_rank is not None:
            load_lora(module, folder / LORA_FILE)
            return
        from safetensors.torch import load_file

        weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
        module.load_state_dict(load_file(str(weights)))

    def usage(self, folder: Path) -> str:
        """The `diffstream edit` line that uses the result in `folder`."""
        instruction = json.dumps(self.triplets[0].instruction)
        head = f"diffstream edit CLIP -o OUT --method fairy --instruction {instruction}"
        if self.config.lora_rank is None:
            return f"{head} --model {folder}"
        base = self.base if self.base is not None else Path(folder) / "base"
        return f"{head} --model {base} --lora {Path(folder) / LORA_FILE}"
