"""ControlNet in the stream (issue #17): off == stock, one frame == diffusers' ControlNet
img2img pipeline, every stream-batch row with its own frame's maps, live scale changes.

The tiny ControlNets are random in every parameter (a real one starts with zero
convolutions, which would make all of this pass vacuously); the inputs are frames shifted
between each other, so a row given another frame's edges differs.
"""

import numpy as np
import pytest
import torch

from diffstream import frames as F
from diffstream.config import ModelConfig, StreamConfig
from diffstream.errors import ConfigError
from diffstream.pipelines.stream import StreamPipeline
from diffstream.testing import assert_frames_close, make_frames, stream_with_update
from diffstream.testing import stream_all as run


@pytest.fixture(scope="module")
def moving():
    """Frames with edges that move: each is the previous one shifted by 4 pixels."""
    base = make_frames(1, width=64, height=48)[0]
    yy, xx = np.mgrid[:48, :64]
    base = base.copy()
    base[(yy // 8 + xx // 8) % 2 == 0] //= 3  # a checkerboard: strong canny edges
    return [np.roll(base, 4 * i, axis=1) for i in range(6)]


def test_tiny_controlnets_are_not_vacuous(controlled, moving):
    """Each ControlNet's residuals are non-zero and depend on its map (else every proof below is empty)."""
    from diffstream.pipelines.control import ControlStack

    stack = ControlStack(controlled.controlnets)
    pixels = F.frames_to_tensor(moving[0])
    maps = stack.maps(moving[0], pixels)  # (1, 2, 3, H, W)
    assert maps.shape == (1, 2, 3, 48, 64) and 0 <= maps.min() and maps.max() <= 1
    assert maps[0, 0].std() > 0.1 and maps[0, 1].std() > 0.05  # edges and depth, not blank
    x = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    t, emb = torch.tensor([500]), controlled.encode_prompt(["a"])
    with torch.no_grad():
        for k in range(2):
            scales = tuple(float(i == k) for i in range(2))
            mid = stack.residuals(x, t, emb, maps, scales)["mid_block_additional_residual"]
            other = stack.residuals(x, t, emb, maps.roll(1, dims=-1), scales)["mid_block_additional_residual"]
            assert mid.abs().mean() > 0.1 and (mid - other).abs().mean() > 0.05 * mid.abs().mean()


@pytest.mark.parametrize("method", ["streamdiffusion", "streamv2v"])
def test_scale_zero_is_exactly_the_stream_without_controlnets(controlled, tiny, moving, method):
    """Off == stock: both ControlNets at scale 0 against the same model loaded without them."""
    cfg = StreamConfig(prompt="a red fox", size=64, steps=2, strength=0.6, method=method, guidance=1.8,
                       cfg_type="full")
    off, _ = run(StreamPipeline(controlled, cfg.replace(control_scales=(0.0, 0.0))), moving)
    stock, _ = run(StreamPipeline(tiny, cfg), moving)
    on, _ = run(StreamPipeline(controlled, cfg.replace(control_scales=(1.0, 1.0))), moving)
    for a, b in zip(off, stock):
        assert np.array_equal(a, b)
    assert max(np.abs(a.astype(int) - b.astype(int)).max() for a, b in zip(on, stock)) > 10


def _reference_maps(frame, estimator):
    """The condition images written out independently of `models.controlnet`: cv2's Canny
    on the RGB frame's grey image, and the estimator's depth min-max normalised to 8 bits."""
    import cv2

    edges = cv2.Canny(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), 100, 200)
    canny = torch.from_numpy(edges).float()[None, None].expand(1, 3, -1, -1) / 255.0
    depth = estimator.predict_pixels(F.frames_to_tensor(frame))  # (1, H, W)
    lo, hi = depth.amin(), depth.amax()
    depth = torch.floor((depth - lo) / (hi - lo) * 255.0 + 0.5) / 255.0
    return canny, depth[:, None].expand(-1, 3, -1, -1)


@pytest.mark.parametrize("scales", [(0.7, 0.0), (0.7, 0.4)], ids=["canny", "canny+depth"])
def test_one_frame_equals_diffusers_controlnet_img2img(controlled, moving, scales):
    """Our stream on one frame == diffusers' StableDiffusionControlNetImg2ImgPipeline with
    the same noise, guidance 1.8 (both branches get the residuals) and MultiControlNet sums."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    from diffstream.models.tiny import sd_scheduler
    from diffstream.schedule.timesteps import lcm_timestep_table

    frame = moving[2]
    units = [u for u, s in zip(controlled.controlnets, scales) if s]
    pipe = StableDiffusionControlNetImg2ImgPipeline(
        vae=controlled.vae, text_encoder=controlled.text_encoder, tokenizer=controlled.tokenizer,
        unet=controlled.unet, controlnet=[u.model for u in units] if len(units) > 1 else units[0].model,
        scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    # At strength 0.25 of 4 LCM steps diffusers runs the last one: we run the same timestep.
    pipe.scheduler.set_timesteps(4)
    index = lcm_timestep_table().index(int(pipe.scheduler.timesteps[-1]))
    cfg = StreamConfig(prompt="a red fox", negative_prompt="blurry", size=64, t_index_list=(index,),
                       guidance=1.8, cfg_type="full", seed=5, control_scales=scales)
    ours, _ = run(StreamPipeline(controlled, cfg), [frame])
    with torch.no_grad():  # the posterior mean, as our default vae_encode="mean"
        z0 = controlled.vae.encode(F.frames_to_tensor(frame)).latent_dist.mean * controlled.vae.config.scaling_factor
    canny, depth = _reference_maps(frame, controlled.controlnets[1].preprocess.estimator)
    control = [canny, depth][: len(units)]
    out = pipe(prompt="a red fox", negative_prompt="blurry", image=z0, control_image=control if len(units) > 1
               else control[0], strength=0.25, num_inference_steps=4, guidance_scale=1.8,
               controlnet_conditioning_scale=[s for s in scales if s] if len(units) > 1 else scales[0],
               generator=torch.Generator().manual_seed(5), output_type="pt", height=48, width=64).images
    reference = F.tensor_to_frames(out * 2 - 1)
    assert_frames_close(ours, reference)
    plain, _ = run(StreamPipeline(controlled, cfg.replace(control_scales=(0.0, 0.0))), [frame])
    assert np.abs(plain[0].astype(int) - ours[0].astype(int)).max() > 10  # the control is visible


@pytest.mark.parametrize("cfg_type", ["none", "initialize", "full"])
def test_stream_batch_rows_get_their_own_frames_maps(controlled, moving, cfg_type):
    """Stream batch == sequential with both ControlNets on, frames whose edges move: in a
    stream-batched call each row is another frame, so a row given the newest (or oldest)
    frame's maps would differ; the sequential run has one frame per call."""
    cfg = StreamConfig(prompt="a red fox", size=64, steps=3, strength=0.6, guidance=1.8, delta=0.7,
                       cfg_type=cfg_type, control_scales=(1.0, 0.8))
    streamed, returned = run(StreamPipeline(controlled, cfg), moving)
    sequential, _ = run(StreamPipeline(controlled, cfg.replace(stream_batch=False)), moving)
    assert returned == [False, False] + [True] * (len(moving) - 2)
    assert_frames_close(streamed, sequential)


def test_scale_change_applies_from_the_next_frame(controlled, moving):
    """A scale raised before frame 3: frames 0-2 are the off stream's, frames 3- the on stream's
    (one step, so no frame is in flight across the change)."""
    cfg = StreamConfig(prompt="a red fox", size=64, steps=1, strength=0.5, control_scales=(0.0, 0.0))
    off, _ = run(StreamPipeline(controlled, cfg), moving)
    on, _ = run(StreamPipeline(controlled, cfg.replace(control_scales=(0.9, 0.0))), moving)
    changed = stream_with_update(StreamPipeline(controlled, cfg), moving, 3, control_scales=(0.9, 0.0))
    for i in range(6):
        assert np.array_equal(changed[i], (off if i < 3 else on)[i]), i
    assert not np.array_equal(off[3], on[3])


def test_scale_change_keeps_the_feature_bank(controlled, moving):
    """StreamV2V with a ControlNet switched on mid-stream: the bank is not reset, and the run
    matches one where the bank saw the same frames."""
    cfg = StreamConfig(prompt="a red fox", size=64, steps=2, strength=0.5, method="streamv2v",
                       control_scales=(0.0, 0.0))
    from diffstream.pipelines.factory import make_pipeline

    pipe = make_pipeline(controlled, cfg)
    resets = []
    pipe.mechanism.reset = lambda *a, _r=pipe.mechanism.reset: (resets.append(1), _r(*a))[1]
    outs = stream_with_update(pipe, moving, 3, control_scales=(0.0, 1.0))
    assert resets == [] and len(outs) == len(moving)


def test_scales_are_validated_now(controlled, tiny):
    pipe = StreamPipeline(controlled, StreamConfig(prompt="x", size=64))
    with pytest.raises(ConfigError, match="one scale per loaded ControlNet"):
        pipe.update(control_scales=(1.0,))
    with pytest.raises(ConfigError, match=r"in \[0, 5\]"):
        pipe.update(control_scales=(1.0, -0.5))
    with pytest.raises(ConfigError, match="one scale per loaded ControlNet"):
        StreamPipeline(tiny, StreamConfig(prompt="x", size=64, control_scales=(1.0,)))


def test_controlnet_for_another_base_model_is_refused(tmp_path):
    """An SD 1.5-shaped ControlNet folder (config only) on the tiny model: one line, before
    any ControlNet weight loads; a missing path: one line before the base model loads."""
    import json

    from diffstream.errors import ModelLoadError
    from diffstream.models.loading import load_components

    folder = tmp_path / "cn15"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "ControlNetModel", "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768}))
    with pytest.raises(ConfigError, match="another base model"):
        load_components(ModelConfig(model="tiny", device="cpu", controlnets=(("canny", str(folder)),)))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_components(ModelConfig(model="/no/such/model", device="cpu",
                                    controlnets=(("canny", "/no/such/cn.safetensors"),)))


def test_live2diff_with_a_controlnet_keeps_its_caches_across_a_scale_change(moving):
    """Live2Diff (a video UNet: rows folded (video, frame)) takes ControlNet residuals in row
    order; a scale change later does not warm up again (the KV caches stay)."""
    from diffstream.models.loading import load_components
    from diffstream.pipelines.factory import make_pipeline

    video = load_components(ModelConfig(model="tiny", device="cpu", motion_adapter="tiny",
                                        controlnets=(("canny", "tiny"),)))
    cfg = StreamConfig(prompt="a red fox", size=64, steps=2, strength=0.6, method="live2diff",
                       causal=StreamConfig().causal.__class__(warmup_frames=2, window=4), control_scales=(0.0,))
    plain, _ = run(make_pipeline(video, cfg), moving)
    pipe = make_pipeline(video, cfg)
    resets = []
    pipe.mechanism.reset = lambda *a, _r=pipe.mechanism.reset: (resets.append(1), _r(*a))[1]
    outs = stream_with_update(pipe, moving, 4, control_scales=(1.0,))
    assert resets == [] and len(outs) == len(moving)
    for i in range(3):  # frames finished before the change are the plain stream's
        assert np.array_equal(outs[i], plain[i]), i
    assert not np.array_equal(outs[-1], plain[-1])
