"""SDXL in the stream engine (issue #17): one frame == diffusers' SDXL img2img pipeline
(two text encoders, pooled embeddings, size ids, zeros for an empty negative prompt),
stream batch == sequential, the feature bank on SDXL's layout, prompt blends."""

import numpy as np
import pytest
import torch

from diffstream import frames as F
from diffstream.config import StreamConfig
from diffstream.pipelines.factory import make_pipeline
from diffstream.pipelines.stream import StreamPipeline
from diffstream.testing import assert_frames_close, make_frames
from diffstream.testing import stream_all as run


@pytest.mark.parametrize("negative", ["blurry", ""], ids=["negative", "empty-negative-is-zeros"])
def test_one_frame_equals_diffusers_sdxl_img2img(tiny_sdxl, negative):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from diffstream.models.tiny import sd_scheduler
    from diffstream.schedule.timesteps import lcm_timestep_table

    c = tiny_sdxl
    frame = make_frames(3)[2]  # 64 x 48: the size ids (48, 64, 0, 0, 48, 64) are not symmetric
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2, tokenizer=c.tokenizer,
        tokenizer_2=c.tokenizer_2, unet=c.unet, scheduler=sd_scheduler(), requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        z0 = c.vae.encode(F.frames_to_tensor(frame)).latent_dist.mean * c.vae.config.scaling_factor
    out = pipe(prompt="a red fox", negative_prompt=negative or None, image=z0, strength=0.25, num_inference_steps=4,
               guidance_scale=1.8, generator=torch.Generator().manual_seed(5), output_type="pt").images
    reference = F.tensor_to_frames(out * 2 - 1)

    pipe.scheduler.set_timesteps(4)  # diffusers runs the last of 4 LCM steps at strength 0.25: so do we
    index = lcm_timestep_table().index(int(pipe.scheduler.timesteps[-1]))
    cfg = StreamConfig(prompt="a red fox", negative_prompt=negative, size=64, t_index_list=(index,), guidance=1.8,
                       cfg_type="full", seed=5)
    ours, _ = run(StreamPipeline(c, cfg), [frame])
    assert_frames_close(ours, reference)


@pytest.mark.parametrize("method", ["streamdiffusion", "streamv2v"])
def test_stream_batch_equals_sequential(tiny_sdxl, method):
    cfg = StreamConfig(prompt="a red fox", size=64, steps=3, strength=0.6, guidance=1.8, cfg_type="initialize",
                       method=method)
    frames = make_frames(6)
    streamed, _ = run(make_pipeline(tiny_sdxl, cfg), frames)
    sequential, _ = run(make_pipeline(tiny_sdxl, cfg.replace(stream_batch=False)), frames)
    assert_frames_close(streamed, sequential)


def test_feature_bank_fuses_in_sdxl_blocks(tiny_sdxl):
    """StreamV2V's default fusion blocks exist in SDXL's layout (its processors sit there
    while the stream is open) and the bank changes frames after the first."""
    import dataclasses

    cfg = StreamConfig(prompt="a red fox", size=64, steps=2, strength=0.6, method="streamv2v", guidance=1.0)
    # Fuse every token (a random model's features are far apart, so the 0.98 cosine gate never opens).
    cfg = cfg.replace(feature_bank=dataclasses.replace(cfg.feature_bank, fusion_threshold=0.0, interval=1))
    pipe = make_pipeline(tiny_sdxl, cfg)
    frames = make_frames(6)
    banked, _ = run(pipe, frames)
    fusing = [name for name, proc in tiny_sdxl.unet.attn_processors.items()
              if ".attn1." in name and name.startswith(cfg.feature_bank.fusion_blocks)
              and type(proc).__module__.endswith("feature_bank")]
    assert len(fusing) >= 3, fusing  # mid_block (2 layers in SDXL's lower block) and up_blocks.0
    pipe.close()
    plain, _ = run(make_pipeline(tiny_sdxl, cfg.replace(method="streamdiffusion")), frames)
    assert_frames_close(banked[:1], plain[:1])  # an empty bank changes (almost) nothing
    diffs = [int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(banked[1:], plain[1:])]
    assert max(diffs) > 2, diffs


def test_pooled_embeddings_follow_the_prompt_blend(tiny_sdxl):
    """A blend with weights (1, 0) is the first prompt exactly, also through SDXL's pooled path."""
    frames = make_frames(3)
    base = StreamConfig(prompt="a red fox", size=64, steps=2, strength=0.6)
    plain, _ = run(StreamPipeline(tiny_sdxl, base), frames)
    mixed, _ = run(StreamPipeline(tiny_sdxl, base.replace(prompt_blend=(("a red fox", 1.0), ("a cat", 0.0)))), frames)
    assert_frames_close(plain, mixed, tol=0)


def test_an_sdxl_diffusers_folder_loads_as_sdxl(tiny_sdxl, tmp_path):
    """A diffusers SDXL folder (model_index.json names text_encoder_2) loads with both text
    encoders and its force_zeros setting, and streams exactly like the model it was saved from."""
    from diffusers import StableDiffusionXLPipeline

    from diffstream.config import ModelConfig
    from diffstream.models.loading import load_components

    c = tiny_sdxl
    StableDiffusionXLPipeline(vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2,
                              tokenizer=c.tokenizer, tokenizer_2=c.tokenizer_2, unet=c.unet, scheduler=c.scheduler,
                              force_zeros_for_empty_prompt=False).save_pretrained(tmp_path / "xl")
    loaded = load_components(ModelConfig(model=str(tmp_path / "xl"), device="cpu", lcm_lora="none"))
    assert loaded.is_sdxl and loaded.force_zeros_for_empty_prompt is False
    cfg = StreamConfig(prompt="a red fox", negative_prompt="blurry", size=64, steps=2, strength=0.6)
    frames = make_frames(3)
    assert_frames_close(run(StreamPipeline(loaded, cfg), frames)[0], run(StreamPipeline(c, cfg), frames)[0], tol=0)


def test_sdxl_single_files_are_told_from_their_keys(tmp_path):
    """Original (SGM) SDXL checkpoints keep the second text encoder under conditioner.embedders.1."""
    from safetensors.torch import save_file

    from diffstream.models.loading import _is_sdxl_file

    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)}, tmp_path / "xl.safetensors")
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(2)},
              tmp_path / "sd15.safetensors")
    assert _is_sdxl_file(str(tmp_path / "xl.safetensors"))
    assert not _is_sdxl_file(str(tmp_path / "sd15.safetensors"))
