"""IP-Adapter in the stream (issue #17): off == stock, one frame == diffusers' img2img with
an image prompt, live image and scale changes, per-stream scales on a shared model."""

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
def images(tmp_path_factory):
    """Two different image prompts as PNG files (lossless: the pipeline reads the same pixels)."""
    import cv2

    folder = tmp_path_factory.mktemp("ip")
    paths = []
    for seed in (0, 1):
        image = np.random.RandomState(seed).randint(0, 256, (40, 60, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / f"{seed}.png"), image[..., ::-1])
        paths.append((str(folder / f"{seed}.png"), image))
    return paths


@pytest.fixture(autouse=True)
def _stock_scale(adapted):
    """Every test starts from the UNet's processors at scale 1 (a shared model)."""
    from diffstream.models.ip_adapter import set_scale

    set_scale(adapted.unet, 1.0)
    vars(adapted.unet).pop("_diffstream_ip_scale", None)


CFG = StreamConfig(prompt="a red fox", negative_prompt="blurry", size=64, steps=2, strength=0.6, guidance=1.8,
                   cfg_type="full")


@pytest.mark.parametrize("method", ["streamdiffusion", "streamv2v"])
def test_off_is_exactly_the_stream_without_the_adapter(adapted, tiny, images, method):
    """No image, or an image at scale 0, against the same model loaded without an IP-Adapter
    (the feature bank's self-attention processors and the adapter's cross-attention ones coexist)."""
    from diffstream.pipelines.factory import make_pipeline

    frames = make_frames(5)
    cfg = CFG.replace(method=method)
    stock, _ = run(make_pipeline(tiny, cfg), frames)
    no_image, _ = run(make_pipeline(adapted, cfg), frames)
    zero, _ = run(make_pipeline(adapted, cfg.replace(ip_adapter_image=images[0][0], ip_adapter_scale=0.0)), frames)
    on, _ = run(make_pipeline(adapted, cfg.replace(ip_adapter_image=images[0][0])), frames)
    for a, b, c in zip(stock, no_image, zero):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    assert max(np.abs(a.astype(int) - b.astype(int)).max() for a, b in zip(on, stock)) > 10


@pytest.mark.parametrize("kind", ["ip-adapter", "plus"])
def test_one_frame_equals_diffusers_img2img_with_an_image_prompt(request, images, kind):
    """Our stream on one frame == diffusers' StableDiffusionImg2ImgPipeline with
    `ip_adapter_image`, the same noise, guidance 1.8 (negative rows: zero embeddings for
    IP-Adapter, a black image's hidden states for Plus)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    adapted = request.getfixturevalue("adapted" if kind == "ip-adapter" else "adapted_plus")
    assert adapted.ip_adapter.plus == (kind == "plus")
    if kind == "plus":
        from diffstream.models.ip_adapter import set_scale

        set_scale(adapted.unet, 1.0)
        vars(adapted.unet).pop("_diffstream_ip_scale", None)

    from diffstream.models.tiny import sd_scheduler
    from diffstream.schedule.timesteps import lcm_timestep_table

    frame = make_frames(3)[2]
    pipe = StableDiffusionImg2ImgPipeline(
        vae=adapted.vae, text_encoder=adapted.text_encoder, tokenizer=adapted.tokenizer, unet=adapted.unet,
        scheduler=sd_scheduler(), safety_checker=None, feature_extractor=adapted.ip_adapter.feature_extractor,
        image_encoder=adapted.ip_adapter.image_encoder, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.set_ip_adapter_scale(0.6)
    with torch.no_grad():
        z0 = adapted.vae.encode(F.frames_to_tensor(frame)).latent_dist.mean * adapted.vae.config.scaling_factor
    out = pipe(prompt="a red fox", negative_prompt="blurry", image=z0, ip_adapter_image=images[0][1], strength=0.25,
               num_inference_steps=4, guidance_scale=1.8, generator=torch.Generator().manual_seed(5),
               output_type="pt").images
    reference = F.tensor_to_frames(out * 2 - 1)

    # At strength 0.25 of 4 LCM steps diffusers runs the last one: we run the same timestep.
    pipe.scheduler.set_timesteps(4)
    index = lcm_timestep_table().index(int(pipe.scheduler.timesteps[-1]))
    cfg = CFG.replace(steps=None, t_index_list=(index,), seed=5, ip_adapter_image=images[0][0], ip_adapter_scale=0.6)
    ours, _ = run(StreamPipeline(adapted, cfg), [frame])
    assert_frames_close(ours, reference)
    plain, _ = run(StreamPipeline(adapted, cfg.replace(ip_adapter_scale=0.0)), [frame])
    assert np.abs(plain[0].astype(int) - ours[0].astype(int)).max() > 4  # the image prompt is visible


def test_stream_batch_equals_sequential_with_an_image_prompt(adapted, images):
    cfg = CFG.replace(steps=3, cfg_type="initialize", ip_adapter_image=images[0][0])
    frames = make_frames(6)
    streamed, _ = run(StreamPipeline(adapted, cfg), frames)
    sequential, _ = run(StreamPipeline(adapted, cfg.replace(stream_batch=False)), frames)
    assert_frames_close(streamed, sequential)


@pytest.mark.parametrize("change", ["scale", "image"])
def test_changes_apply_from_the_next_frame(adapted, images, change):
    """One step (nothing in flight across the change): frames 0-2 are the first setting's
    stream, frames 3- the second's."""
    first = CFG.replace(steps=1, ip_adapter_image=images[0][0], ip_adapter_scale=0.8)
    changes = {"ip_adapter_scale": 0.3} if change == "scale" else {"ip_adapter_image": images[1][0]}
    frames = make_frames(6)
    before, _ = run(StreamPipeline(adapted, first), frames)
    after, _ = run(StreamPipeline(adapted, first.replace(**changes)), frames)
    outs = stream_with_update(StreamPipeline(adapted, first), frames, 3, **changes)
    for i in range(6):
        assert np.array_equal(outs[i], (before if i < 3 else after)[i]), i
    assert not np.array_equal(before[3], after[3])


def test_streams_sharing_a_model_keep_their_own_scales(adapted, images):
    """Two streams on one loaded model (as the server's sessions), pushed in turn with
    different scales: each gives exactly what it gives alone."""
    frames = make_frames(5)
    cfg_a = CFG.replace(ip_adapter_image=images[0][0], ip_adapter_scale=1.0)
    cfg_b = CFG.replace(ip_adapter_image=images[0][0], ip_adapter_scale=0.2)
    alone_a, _ = run(StreamPipeline(adapted, cfg_a), frames)
    alone_b, _ = run(StreamPipeline(adapted, cfg_b), frames)
    a, b = StreamPipeline(adapted, cfg_a), StreamPipeline(adapted, cfg_b)
    outs_a, outs_b = [], []
    for frame in frames:
        outs_a.append(a.push(frame))
        outs_b.append(b.push(frame))
    outs_a = [o for o in outs_a if o is not None] + a.flush()
    outs_b = [o for o in outs_b if o is not None] + b.flush()
    for x, y in zip(outs_a, alone_a):
        assert np.array_equal(x, y)
    for x, y in zip(outs_b, alone_b):
        assert np.array_equal(x, y)


def test_bad_image_prompts_fail_now_in_one_line(adapted, tiny, tmp_path):
    (tmp_path / "not.png").write_bytes(b"hello")
    pipe = StreamPipeline(adapted, CFG)
    for bad in (str(tmp_path / "missing.png"), str(tmp_path / "not.png"), "data:image/png;base64,@@@"):
        with pytest.raises(ConfigError, match="cannot read the IP-Adapter image"):
            pipe.update(ip_adapter_image=bad)
    with pytest.raises(ConfigError, match="needs a model loaded with an IP-Adapter"):
        StreamPipeline(tiny, CFG.replace(ip_adapter_image=str(tmp_path / "not.png")))
    with pytest.raises(ConfigError, match=r"--ip-adapter-scale must be a number in \[0, 5\]"):
        CFG.replace(ip_adapter_scale=-1)


@pytest.mark.parametrize("kind", ["ip-adapter", "plus"])
def test_image_embeddings_equal_diffusers(request, images, kind):
    """The (negative, positive) embeddings of an image prompt are exactly those diffusers'
    pipelines prepare for guidance (`prepare_ip_adapter_image_embeds`)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    adapted = request.getfixturevalue("adapted" if kind == "ip-adapter" else "adapted_plus")
    pipe = StableDiffusionImg2ImgPipeline(
        vae=adapted.vae, text_encoder=adapted.text_encoder, tokenizer=adapted.tokenizer, unet=adapted.unet,
        scheduler=adapted.scheduler, safety_checker=None, feature_extractor=adapted.ip_adapter.feature_extractor,
        image_encoder=adapted.ip_adapter.image_encoder, requires_safety_checker=False)
    with torch.no_grad():
        (reference,) = pipe.prepare_ip_adapter_image_embeds(images[0][1], None, "cpu", 1, True)  # (2, 1, ...)
    pos, neg = adapted.ip_adapter.embeds(images[0][1])
    assert torch.equal(torch.cat([neg, pos]), reference)
