"""The trained toy model (issue #14): its format, and that its styles show.

The style tests run the stream engine on the held-out procedural clip (seed 7, never
used in training) and judge outputs with the style metric, whose own oracle tests are in
tests/metrics/test_style.py.
"""

import json

import numpy as np
import pytest

from diffstream.models.toy import TOY_DIR, TOY_STYLES, held_out_clip, toy_available

pytestmark = pytest.mark.skipif(not toy_available(), reason="the toy weights are not in this checkout")

STYLED = [p for p in TOY_STYLES if p != "a photo"]


@pytest.fixture(scope="module")
def toy():
    from diffstream import ModelConfig, load_components

    return load_components(ModelConfig(model="toy", device="cpu"))


@pytest.fixture(scope="module")
def clip():
    return held_out_clip(6, (256, 128))


def run(components, frames, prompt, **stream):
    from diffstream.config import StreamConfig
    from diffstream.pipelines.factory import make_pipeline

    pipe = make_pipeline(components, StreamConfig(prompt=prompt, size=256, **stream))
    outs = []
    for f in frames:
        outs += pipe.process(f)
    return outs + pipe.flush()


def test_the_toy_folder_is_a_diffusers_pipeline_of_the_sd_family_within_8_mb():
    from diffusers import StableDiffusionPipeline

    from diffstream.models.tokenizer import clip_tokenizer

    weights = sum(p.stat().st_size for p in TOY_DIR.rglob("*.safetensors"))
    assert weights <= 8_000_000, weights
    # diffusers' own loader, given the package's CLIP tokenizer (the folder does not store it twice)
    pipe = StableDiffusionPipeline.from_pretrained(str(TOY_DIR), tokenizer=clip_tokenizer(), safety_checker=None)
    assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 8 and pipe.vae.config.latent_channels == 4
    assert any("CrossAttn" in b for b in pipe.unet.config.down_block_types)
    prompt = "a watercolor painting of a rabbit"
    assert pipe.tokenizer(prompt).input_ids == clip_tokenizer()(prompt).input_ids  # the real CLIP BPE
    assert pipe.tokenizer("a photo").input_ids == [49406, 320, 1125, 49407]  # CLIP's ids: <start> a photo <end>
    assert not (TOY_DIR / "tokenizer").exists()
    assert json.loads((TOY_DIR / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"


def test_load_components_reads_the_toy_folder_like_a_checkpoint(toy):
    assert toy.name == "toy" and toy.prediction_type == "v_prediction"
    assert tuple(toy.unet.config.block_out_channels) == (32, 64, 64)


@pytest.mark.parametrize("prompt", STYLED)
def test_each_style_shows_on_a_held_out_clip_at_the_engine_defaults(toy, clip, prompt):
    from diffstream.frames import resize
    from diffstream.metrics.style import style_accuracy

    outs = run(toy, clip, prompt)
    inputs = [resize(f, outs[0].shape[1::-1]) for f in clip]
    assert style_accuracy(inputs, outs, prompt) >= 0.8


def test_a_photo_at_strength_04_stays_closer_to_the_input_than_a_style(toy, clip):
    # The toy VAE is blurry (photo PSNR ~12-15 dB, README), so the bar is relative.
    from diffstream.metrics.style import psnr

    photo = np.mean([psnr(a, b) for a, b in zip(clip, run(toy, clip, "a photo"))])
    negative = np.mean([psnr(a, b) for a, b in zip(clip, run(toy, clip, "a negative photo"))])
    assert photo > negative + 3


def test_a_prompt_change_mid_stream_changes_the_style_of_the_next_frames(toy, clip):
    from diffstream.config import StreamConfig
    from diffstream.metrics.style import nearest_style
    from diffstream.pipelines.factory import make_pipeline

    pipe = make_pipeline(toy, StreamConfig(prompt="a negative photo", size=256))
    frames = clip + clip  # 12 frames: the prompt changes after the 6th push
    outs = []
    for i, f in enumerate(frames):
        if i == 6:
            pipe.update(prompt="a sepia photo")
        outs += pipe.process(f)
    outs += pipe.flush()
    before = [nearest_style(a, b) for a, b in zip(frames[:3], outs[:3])]
    after = [nearest_style(a, b) for a, b in zip(frames[-3:], outs[-3:])]
    assert before == ["a negative photo"] * 3 and after == ["a sepia photo"] * 3


def test_one_step_turbo_mode_shows_the_style(toy, clip):
    import dataclasses

    from diffstream.metrics.style import style_accuracy

    turbo = dataclasses.replace(toy, turbo=True)
    outs = run(turbo, clip, "a negative photo", strength=0.5)
    assert style_accuracy(clip, outs, "a negative photo") >= 0.8


def test_the_feature_bank_on_a_static_clip_does_not_hurt_style_accuracy(toy, clip):
    from diffstream.metrics.style import style_accuracy

    static = [clip[0]] * 6
    base = style_accuracy(static, run(toy, static, "a pencil sketch"), "a pencil sketch")
    bank = style_accuracy(static, run(toy, static, "a pencil sketch", method="streamv2v"), "a pencil sketch")
    assert bank >= base and bank >= 0.8


def test_toy_refuses_what_it_cannot_do_in_one_line():
    from diffstream import ModelConfig, load_components
    from diffstream.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="text-to-image model"):
        load_components(ModelConfig(model="toy", device="cpu", instruct=True))
