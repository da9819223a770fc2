"""The trained toy model: a small Stable Diffusion 1.x-family model that ships with the package.

`--model toy` is a real diffusers pipeline folder (`assets/toy/`: unet, vae, text_encoder,
tokenizer, scheduler, model_index.json) loaded by the same code as any local checkpoint.
It was trained by `scripts/train_toy.py` (issue #14) to restyle frames into five
*checkable* styles: each style's target is a classical filter of the input frame
(`TOY_STYLES`), so anyone can measure how well an output shows its prompt
(`diffstream.metrics.style`).

This module holds what the training script, the metric, the benchmark and the tests share:
the style filters, the architecture (built from config, random until trained), and a
procedural scene / clip generator used both as training data and as held-out test video.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TOY_DIR = Path(__file__).parent / "assets" / "toy"
TOY_TEXT_DIM = 24
# Longer side the toy model was trained at (its styles' spatial scales are tuned to it).
TOY_SIZE = 256

_SEPIA = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], dtype=np.float32)


def pencil_sketch(frame: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> OpenCV's pencil sketch, gray, as (H, W, 3) uint8."""
    import cv2

    gray = cv2.pencilSketch(np.ascontiguousarray(frame), sigma_s=60, sigma_r=0.07, shade_factor=0.05)[0]
    return np.repeat(gray[..., None], 3, axis=2)


def watercolor(frame: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> OpenCV's edge-preserving stylization (a watercolour look)."""
    import cv2

    return cv2.stylization(np.ascontiguousarray(frame), sigma_s=60, sigma_r=0.45)


def negative(frame: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> 255 - frame."""
    return 255 - frame


def sepia(frame: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> the standard sepia matrix applied per pixel, clipped to [0, 255]."""
    out = frame.astype(np.float32) @ _SEPIA.T  # (H, W, 3): out_c = sum_k M[c, k] in_k
    return np.clip(out, 0, 255).astype(np.uint8)


def identity(frame: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> a copy."""
    return frame.copy()


# The prompts are the exact wording; the order is the metric's class order.
TOY_STYLES: dict[str, callable] = {
    "a pencil sketch": pencil_sketch,
    "a watercolor painting": watercolor,
    "a negative photo": negative,
    "a sepia photo": sepia,
    "a photo": identity,
}
# Prompts the model was taught to leave the frame as it is: the empty prompt (the
# unconditional text of classifier-free guidance) and a few others, so guidance pushes
# away from the photo and an unknown prompt does not produce an arbitrary style.
IDENTITY_PROMPTS = ("", "a photo", "a picture", "an image", "a frame of a video")


def style_targets(frame: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (S, H, W, 3) uint8: every toy style's target, in TOY_STYLES order."""
    return np.stack([fn(frame) for fn in TOY_STYLES.values()])


def toy_available() -> bool:
    """Whether the trained weights are present (a source checkout always has them)."""
    return (TOY_DIR / "unet" / "diffusion_pytorch_model.safetensors").is_file()


# --- Architecture (random until trained) --------------------------------------------


def toy_unet(seed: int = 0):
    """The toy UNet2DConditionModel: three resolutions, cross-attention at the lower two.

    SD 1.x's block structure at toy width (32, 64, 64): the full-latent-resolution blocks
    have no attention, as in SD, where they are the costly ones; the third level gives a
    receptive field that the styles' 60-pixel filters need at 256 px.
    """
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=TOY_TEXT_DIM,
        attention_head_dim=8, norm_num_groups=8,
    )


def toy_vae(seed: int = 0):
    """The toy AutoencoderKL: SD's 8x down-sampling and 4 latent channels, no mid attention."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 64), sample_size=256, mid_block_add_attention=False,
    )


def toy_text_encoder(seed: int = 0):
    """A 2-layer CLIP text encoder of width 24 over the full 49,408-token CLIP vocabulary."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffstream.models.tokenizer import VOCAB_SIZE

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=TOY_TEXT_DIM, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407,
    ))


# The toy's scaled-linear (beta_start, beta_end), gentler than SD 1.x's (0.00085, 0.012): at
# SDEdit strength 0.4 a frame keeps sqrt(abar) = 0.94 of its signal (SD's: 0.63), which the
# small UNet turns into sharper outputs (measured on bunny 40-49 at the engine's defaults:
# "a photo" 19.0 dB vs 15.1, the sepia target 16.8 dB vs 13.8).
TOY_BETAS = (0.0001, 0.002)


def toy_scheduler(beta_start: float = TOY_BETAS[0], beta_end: float = TOY_BETAS[1]):
    """LCMScheduler with a scaled-linear noise schedule and v-prediction (as SD 2.x): the
    UNet's x0 error is its v error times sqrt(1 - abar), so no step amplifies it.

    Args:
        beta_start, beta_end: the scaled-linear betas (default: the toy's, `TOY_BETAS`).
    """
    from diffusers import LCMScheduler

    return LCMScheduler(num_train_timesteps=1000, beta_start=beta_start, beta_end=beta_end,
                        beta_schedule="scaled_linear", prediction_type="v_prediction")


# --- Procedural scenes: training data and held-out video -----------------------------


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """(h, w) float32 in [0, 1]: bicubically up-sampled random cells (soft texture)."""
    import cv2

    small = rng.random((cells, cells), dtype=np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 1)


class SceneGenerator:
    """Random outdoor-like scenes (sky, ground, shaded shapes, texture), optionally moving.

    Natural photos are bright above and have shaded objects, so a scene's negative is
    recognisably a negative (the toy model must tell a frame from its own styled output).

    Args:
        seed: every scene and clip is a function of it.
        size: (width, height) of the frames.
    """

    def __init__(self, seed: int, size: tuple[int, int] = (256, 144)):
        self.rng = np.random.default_rng(seed)
        self.size = size

    def _layout(self) -> dict:
        rng = self.rng
        w, h = self.size
        sky_top, sky_bottom = rng.uniform(0.55, 1.0, 3), rng.uniform(0.6, 1.0, 3)
        ground = rng.uniform(0.1, 0.6, 3)
        shapes = []
        for _ in range(int(rng.integers(3, 9))):
            shapes.append(dict(
                kind=str(rng.choice(["circle", "rect", "triangle"])),
                centre=np.array([rng.uniform(0, w), rng.uniform(0.2 * h, h)]),
                radius=float(rng.uniform(0.05, 0.25) * min(w, h) * 1.5),
                colour=rng.uniform(0.0, 1.0, 3),
                velocity=rng.normal(0, 1.5, 2),
                angle=float(rng.uniform(0, np.pi)),
            ))
        return dict(horizon=float(rng.uniform(0.35, 0.75)), sky=(sky_top, sky_bottom), ground=ground,
                    shapes=shapes, texture=_smooth_noise(rng, 2 * h, 2 * w, int(rng.integers(6, 24))),
                    grain=_smooth_noise(rng, 2 * h, 2 * w, 64), pan=rng.normal(0, 1.0, 2))

    def _render(self, layout: dict, t: float) -> np.ndarray:
        import cv2

        w, h = self.size
        ys = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
        sky_top, sky_bottom = layout["sky"]
        img = np.broadcast_to(sky_top * (1 - ys) + sky_bottom * ys, (h, w, 3)).copy()  # (H, W, 3)
        dx, dy = (layout["pan"] * t).astype(int) % np.array([w, h])
        tex = layout["texture"][dy:dy + h, dx:dx + w, None]
        grain = layout["grain"][dy:dy + h, dx:dx + w, None]
        horizon = int(layout["horizon"] * h)
        img[horizon:] = layout["ground"] * (0.6 + 0.8 * tex[horizon:])
        img[:horizon] *= 0.9 + 0.1 * tex[:horizon]
        for s in layout["shapes"]:
            cx, cy = s["centre"] + s["velocity"] * t + layout["pan"] * t * 0.5
            r = s["radius"]
            mask = np.zeros((h, w), np.uint8)
            if s["kind"] == "circle":
                cv2.circle(mask, (int(cx), int(cy)), int(r), 255, -1, cv2.LINE_AA)
            elif s["kind"] == "rect":
                box = cv2.boxPoints(((float(cx), float(cy)), (2 * r, 1.2 * r), np.degrees(s["angle"])))
                cv2.fillPoly(mask, [box.astype(np.int32)], 255, cv2.LINE_AA)
            else:
                a = s["angle"] + np.arange(3) * 2 * np.pi / 3
                pts = np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], 1).astype(np.int32)
                cv2.fillPoly(mask, [pts], 255, cv2.LINE_AA)
            alpha = mask.astype(np.float32)[..., None] / 255
            shade = 0.65 + 0.35 * (1 - np.linspace(0, 1, h, dtype=np.float32)[:, None, None])  # lit from above
            img = img * (1 - alpha) + alpha * s["colour"] * shade * (0.85 + 0.3 * grain)
        return (np.clip(img, 0, 1) * 255).astype(np.uint8)

    def scene(self) -> np.ndarray:
        """One random still scene, (H, W, 3) uint8 RGB."""
        return self._render(self._layout(), 0.0)

    def clip(self, num_frames: int) -> list[np.ndarray]:
        """One random scene in motion (objects move, the camera pans): num_frames x (H, W, 3) uint8."""
        layout = self._layout()
        return [self._render(layout, float(i)) for i in range(num_frames)]


# Seeds of the procedural data: training scenes draw from TRAIN_SCENE_SEED, the held-out
# clip (benchmarks, tests) from HELD_OUT_CLIP_SEED, which training never uses.
TRAIN_SCENE_SEED = 1000
HELD_OUT_CLIP_SEED = 7


def held_out_clip(num_frames: int = 24, size: tuple[int, int] = (256, 144)) -> list[np.ndarray]:
    """A procedural clip the toy model was not trained on: num_frames x (H, W, 3) uint8."""
    return SceneGenerator(HELD_OUT_CLIP_SEED, size).clip(num_frames)
