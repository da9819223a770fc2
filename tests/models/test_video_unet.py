"""The Tune-A-Video-style video UNet: exact inflation, the tuned set, position-free temporal
layers, and its folder (save, load, resume, one-line errors)."""

import json

import pytest
import torch

from diffstream.errors import ModelLoadError
from diffstream.models.tiny import tiny_unet
from diffstream.models.video_unet import (
    inflate,
    is_motion_module,
    load_tuned_weights,
    load_video_model,
    mark_trainable,
    save_video_model,
    video_model_id,
)

FRAMES = 4
LATENT = (4, 6)


@pytest.fixture(scope="module")
def image_unet():
    return tiny_unet().requires_grad_(False)


def clip(seed=0):
    """Latent frames that differ visibly, and a different text per frame (the video UNet
    takes the text once per frame: a frame paired with another's text would show)."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(FRAMES, 4, *LATENT, generator=g)  # (F, C, h, w)
    text = torch.randn(FRAMES, 77, 32, generator=g)
    return frames, text


def run_video(unet, frames, text, t=500):
    """(F, C, h, w) frames as one clip (1, C, F, h, w) through a video UNet, back to rows."""
    f, c, h, w = frames.shape
    with torch.no_grad():
        out = unet(frames.view(1, f, c, h, w).transpose(1, 2), t, encoder_hidden_states=text).sample
    return out.transpose(1, 2).reshape(f, c, h, w)


def randomize_motion(video, seed=1, std=0.2):
    """Non-zero output projections: motion modules that mix frames (a trained model's)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in video.named_modules():
            if is_motion_module(name + ".") and name.endswith("proj_out"):
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * std)
                module.bias.copy_(torch.randn(module.bias.shape, generator=g) * std)
    return video


def test_inflated_unet_equals_the_image_unet_on_every_frame(image_unet):
    frames, text = clip()
    with torch.no_grad():
        expected = image_unet(frames, 500, encoder_hidden_states=text).sample  # (F, C, h, w), frame by frame
    got = run_video(inflate(image_unet), frames, text)
    # the frames' outputs differ from one another, so a swapped frame would show
    assert min((expected[i] - expected[j]).abs().max() for i in range(FRAMES) for j in range(i)) > 0.1
    # not bit-exact: the video UNet embeds the timestep once per clip, a batch of another
    # size through the same Linear (measured 1e-6); the motion modules add exact zeros
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_motion_modules_that_are_not_zero_mix_the_frames(image_unet):
    """The variant that gives the previous test its teeth: with non-zero output
    projections the video UNet is no longer the image UNet, and a frame's output depends
    on the other frames of its clip."""
    frames, text = clip()
    video = randomize_motion(inflate(image_unet))
    with torch.no_grad():
        image = image_unet(frames, 500, encoder_hidden_states=text).sample
    out = run_video(video, frames, text)
    assert (out - image).abs().max() > 0.05
    changed = frames.clone()
    changed[3] += 1.0
    assert (run_video(video, changed, text)[0] - out[0]).abs().max() > 1e-3  # frame 0 sees frame 3


@pytest.mark.parametrize("positions", [False, True])
def test_temporal_layers_see_the_clip_as_a_set(image_unet, positions):
    """Tune-A-Video's temporal attention has no positional encoding: permuting the frames
    of a clip permutes the outputs (default processors: spatial layers per frame). With
    diffusers' sinusoidal positions kept, it does not."""
    frames, text = clip(seed=2)
    video = randomize_motion(inflate(image_unet, positions=positions))
    order = torch.tensor([2, 0, 3, 1])
    out = run_video(video, frames, text)
    permuted = run_video(video, frames[order], text[order])
    error = (permuted - out[order]).abs().max()
    if positions:
        assert error > 1e-3
    else:
        assert error < 1e-5


def test_the_trainable_set_is_tune_a_videos(image_unet):
    """train_tune_a_video.py trains the modules named *attn_temporal and *.to_q: here the
    motion modules (all of them) and the query projections of the spatial self- and
    cross-attention, nothing else."""
    video = inflate(image_unet)
    names = set(mark_trainable(video))
    params = dict(video.named_parameters())
    motion = {n for n in params if ".motion_modules." in n}
    queries = {n for n in params if ".motion_modules." not in n
               and (n.endswith(".attn1.to_q.weight") or n.endswith(".attn2.to_q.weight"))}
    # the tiny UNet: 4 spatial transformer blocks (down 1, mid, up 2), SD's to_q has no bias
    assert len(queries) == 8 and len(motion) > 100
    assert names == motion | queries
    assert {n for n, p in params.items() if p.requires_grad} == names
    for n in names - motion:
        assert "to_k" not in n and "to_v" not in n and "to_out" not in n


def test_save_load_round_trip_and_resume(image_unet, tmp_path):
    video = randomize_motion(inflate(image_unet), seed=5)
    mark_trainable(video)
    with torch.no_grad():  # a "tuned" query projection
        q = video.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
        q.weight.add_(0.1)
    info = save_video_model(video, tmp_path / "vm", dict(base_model="tiny", source_prompt="a swan"))
    saved = json.loads((tmp_path / "vm" / "video_model.json").read_text())
    assert saved["id"] == info["id"] and saved["base_model"] == "tiny"

    loaded = load_video_model(tmp_path / "vm")
    assert video_model_id(loaded) == info["id"]
    assert type(loaded.down_blocks[0].motion_modules[0].norm).__name__ == "FrameGroupNorm"
    state, again = video.state_dict(), loaded.state_dict()
    assert set(state) == set(again)
    assert all(torch.equal(state[k], again[k]) for k in state)
    assert all(not p.requires_grad for p in loaded.parameters())
    frames, text = clip(seed=3)
    assert torch.equal(run_video(loaded, frames, text), run_video(video, frames, text))

    fresh = inflate(image_unet)  # resume: the tuned tensors come back, the rest is the base's
    assert load_tuned_weights(fresh, tmp_path / "vm") == len(mark_trainable(fresh))
    assert torch.equal(fresh.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight, q.weight)


def test_a_folder_that_is_not_a_video_model_is_one_line(image_unet, tmp_path):
    cases = {"missing": tmp_path / "nope", "empty": tmp_path / "empty"}
    cases["empty"].mkdir()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "video_model.json").write_text("{not json")
    other = tmp_path / "other"
    other.mkdir()
    (other / "video_model.json").write_text(json.dumps({"format": "something-else"}))
    no_unet = tmp_path / "no_unet"
    no_unet.mkdir()
    (no_unet / "video_model.json").write_text(json.dumps({"format": "diffstream-video-unet", "version": 1}))
    for folder in (*cases.values(), bad, other, no_unet):
        with pytest.raises(ModelLoadError, match="--video-model .*pass the final/ folder") as err:
            load_video_model(folder)
        assert "\n" not in str(err.value)


def test_only_an_sd_image_unet_inflates(image_unet):
    with pytest.raises(ModelLoadError, match="image UNet"):
        inflate(inflate(image_unet))
