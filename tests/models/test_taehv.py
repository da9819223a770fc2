"""TAEHV for Wan 2.1 (`models.taehv`, issue #18): the reference's weights layout, strict
loading, and the streamed encoder / decoder equal to the whole-clip ones.

No real `taew2_1.pth` here: the checkpoints are `random_taehv` saved to disk, whose
layout is checked against the one written out below from the reference's construction
(madebyollin/taehv `taehv.py`, `TAEHV.__init__` with Wan 2.1's options), and whose
arithmetic is checked against `oracle_run`, a frame-by-frame reading of the reference's
blocks on the bare state dict (`F.conv2d`), independent of the module's code.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffstream.errors import ModelLoadError
from diffstream.models.taehv import TAEHV, TAEHVStream, load_taehv, random_taehv

ATOL = 1e-5
SIZE = 32  # frames of 32 x 32: latents of 4 x 4
FRAMES = 9  # 1 + 4 * 2, Wan's clip length for 3 latent frames


@pytest.fixture(scope="module")
def taehv():
    return random_taehv(seed=0)


def clip(frames: int = FRAMES, seed: int = 0, batch: int = 1, height: int = SIZE, width: int = SIZE) -> torch.Tensor:
    """(B, T, 3, H, W) in [0, 1] (TAEHV's NTCHW), every frame different."""
    return torch.rand(batch, frames, 3, height, width, generator=torch.Generator().manual_seed(seed))


def latents(frames: int = 3, seed: int = 1, scale: float = 2.0, batch: int = 1) -> torch.Tensor:
    """(B, T, 16, 4, 4) latents (TAEHV's NTCHW)."""
    return torch.randn(batch, frames, 16, 4, 4, generator=torch.Generator().manual_seed(seed)) * scale


def pad_to_groups(video: torch.Tensor) -> torch.Tensor:
    """(B, T, 3, H, W) padded at its end with its last frame to a multiple of 4 frames (the reference's padding)."""
    short = -video.shape[1] % 4
    return torch.cat([video, video[:, -1:].repeat(1, short, 1, 1, 1)], dim=1)


def to_wan(x: torch.Tensor) -> torch.Tensor:
    """NTCHW -> NCTHW (Wan's layout)."""
    return x.transpose(1, 2)


# --- the reference's layout, written out from its construction ----------------------

# Block kinds at each Sequential index (taehv.py: encoder = conv, ReLU, then per stage TPool,
# stride-2 conv, 3 MemBlocks, then conv; decoder = Clamp, conv, ReLU, then per stage 3
# MemBlocks, Upsample, TGrow, conv, then ReLU, conv). Strides: encoder_time_downscale
# (True, True, False), decoder_time_upscale (False, True, True).
ENCODER_LAYOUT = (["conv", "relu"]
                  + [("pool", 2), "conv_s2", "mem", "mem", "mem"] + [("pool", 2), "conv_s2", "mem", "mem", "mem"]
                  + [("pool", 1), "conv_s2", "mem", "mem", "mem"] + ["conv"])
DECODER_LAYOUT = (["clamp", "conv", "relu"]
                  + ["mem", "mem", "mem", "up", ("grow", 1), "conv"] + ["mem", "mem", "mem", "up", ("grow", 2), "conv"]
                  + ["mem", "mem", "mem", "up", ("grow", 2), "conv"] + ["relu", "conv"])
KIND_OF_CLASS = {"Conv2d": "conv", "ReLU": "relu", "TPool": "pool", "MemBlock": "mem", "Clamp": "clamp",
                 "Upsample": "up", "TGrow": "grow"}


def reference_shapes() -> dict:
    """Every key of the reference TAEHV's state dict for taew2_1, with its shape."""
    shapes = {}

    def conv(key, n_in, n_out, k=3, bias=True):
        shapes[f"{key}.weight"] = (n_out, n_in, k, k)
        if bias:
            shapes[f"{key}.bias"] = (n_out,)

    def memblock(key, c):  # conv = Sequential(conv(2c, c), ReLU, conv(c, c), ReLU, conv(c, c)); skip Identity
        conv(f"{key}.conv.0", 2 * c, c)
        conv(f"{key}.conv.2", c, c)
        conv(f"{key}.conv.4", c, c)

    conv("encoder.0", 3, 64)
    i = 2
    for stride in (2, 2, 1):
        conv(f"encoder.{i}.conv", 64 * stride, 64, k=1, bias=False)  # TPool(64, stride)
        conv(f"encoder.{i + 1}", 64, 64, bias=False)  # stride-2 conv
        for j in range(3):
            memblock(f"encoder.{i + 2 + j}", 64)
        i += 5
    conv(f"encoder.{i}", 64, 16)  # i == 17
    conv("decoder.1", 16, 256)
    i = 3
    for c_in, c_out, stride in ((256, 128, 1), (128, 64, 2), (64, 64, 2)):
        for j in range(3):
            memblock(f"decoder.{i + j}", c_in)
        conv(f"decoder.{i + 4}.conv", c_in, c_in * stride, k=1, bias=False)  # TGrow(c_in, stride)
        conv(f"decoder.{i + 5}", c_in, c_out, bias=False)
        i += 6
    conv(f"decoder.{i + 1}", 64, 3)  # i == 21: ReLU, then the output conv at 22
    return shapes


def test_state_dict_is_the_references_key_for_key():
    """Keys, shapes and block kinds per Sequential index are the reference's (so taew2_1.pth loads strictly)."""
    model = TAEHV()
    expected = reference_shapes()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(ours) == sorted(expected)
    assert ours == expected
    assert len(expected) == 128  # 64 tensors in each half
    per_index = {}
    for key in expected:
        half, index = key.split(".")[:2]
        per_index[(half, int(index))] = per_index.get((half, int(index)), 0) + 1
    assert per_index[("encoder", 4)] == 6 and per_index[("encoder", 2)] == 1 and per_index[("decoder", 7)] == 1
    for blocks, layout in ((model.encoder, ENCODER_LAYOUT), (model.decoder, DECODER_LAYOUT)):
        assert len(blocks) == len(layout)
        for block, kind in zip(blocks, layout):
            name, stride = (kind, None) if isinstance(kind, str) else kind
            assert KIND_OF_CLASS[type(block).__name__] == name.split("_")[0]
            if stride is not None:
                assert block.stride == stride
    assert (model.t_downscale, model.t_upscale, model.frames_to_trim) == (4, 4, 3)


# --- an independent reading of the reference's arithmetic ----------------------------

def oracle_run(state: dict, half: str, layout: list, frames: list) -> list:
    """Run the reference's blocks frame by frame on a bare state dict.

    Args:
        frames: T tensors (N, C, H, W), in time order.
    Returns:
        the output frames, in time order.
    """
    def conv(key, x, stride=1):
        w = state[f"{key}.weight"]
        return F.conv2d(x, w, state.get(f"{key}.bias"), stride=stride, padding=w.shape[-1] // 2)

    for i, kind in enumerate(layout):
        key = f"{half}.{i}"
        name, stride = (kind, None) if isinstance(kind, str) else kind
        if name == "conv":
            frames = [conv(key, x) for x in frames]
        elif name == "conv_s2":
            frames = [conv(key, x, stride=2) for x in frames]
        elif name == "relu":
            frames = [x.clamp(min=0) for x in frames]
        elif name == "clamp":
            frames = [3 * torch.tanh(x / 3) for x in frames]
        elif name == "up":
            frames = [x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3) for x in frames]
        elif name == "mem":
            out, past = [], torch.zeros_like(frames[0])
            for x in frames:  # relu(conv4(relu(conv2(relu(conv0([x, past]))))) + x)
                y = conv(f"{key}.conv.0", torch.cat([x, past], dim=1)).clamp(min=0)
                y = conv(f"{key}.conv.2", y).clamp(min=0)
                out.append((conv(f"{key}.conv.4", y) + x).clamp(min=0))
                past = x
            frames = out
        elif name == "pool":  # consecutive groups of `stride` frames, stacked on channels, oldest first
            frames = [conv(f"{key}.conv", torch.cat(frames[t:t + stride], dim=1))
                      for t in range(0, len(frames), stride)]
        elif name == "grow":  # each frame's conv output split on channels into `stride` frames, in order
            frames = [y for x in frames for y in conv(f"{key}.conv", x).chunk(stride, dim=1)]
    return frames


def oracle_encode(state: dict, video: torch.Tensor) -> torch.Tensor:
    """(N, T, 3, H, W) in [0, 1] -> (N, ceil(T/4), 16, h, w), the end padded with the last frame."""
    frames = list(pad_to_groups(video).unbind(1))
    return torch.stack(oracle_run(state, "encoder", ENCODER_LAYOUT, frames), dim=1)


def oracle_decode(state: dict, z: torch.Tensor) -> torch.Tensor:
    """(N, T, 16, h, w) -> (N, 4T - 3, 3, 8h, 8w) in [0, 1]: clamped, the first 3 frames dropped."""
    frames = oracle_run(state, "decoder", DECODER_LAYOUT, list(z.unbind(1)))
    return torch.stack(frames, dim=1).clamp(0, 1)[:, 3:]


def test_one_shot_is_the_references_arithmetic(taehv):
    """`encode_video` / `decode_video` (parallel over time) == the frame-by-frame oracle, latents
    large enough that the decoder's soft clamp and the output clamp both act."""
    state = taehv.state_dict()
    video = clip()
    z = taehv.encode_video(video)
    assert z.shape == (1, 3, 16, 4, 4)
    assert (z - oracle_encode(state, video)).abs().max() < ATOL
    big = latents(scale=6.0)
    frames = taehv.decode_video(big)
    assert frames.shape == (1, FRAMES, 3, SIZE, SIZE)
    assert (frames - oracle_decode(state, big)).abs().max() < ATOL
    assert (frames == 0).any() or (frames == 1).any()  # the output clamp acted


# --- loading ---------------------------------------------------------------------------

def save(state: dict, path) -> None:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_strict_load_round_trip(taehv, tmp_path, suffix):
    """Saved and loaded back, every tensor is the same and so is the model's output; a
    half-precision file loads into the requested dtype."""
    path = tmp_path / f"taew2_1{suffix}"
    save(taehv.state_dict(), path)
    loaded = load_taehv(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    ours, theirs = taehv.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    video = clip(frames=4)
    assert torch.equal(loaded.encode_video(video), taehv.encode_video(video))
    half = tmp_path / f"half{suffix}"
    save({k: v.half() for k, v in ours.items()}, half)
    loaded = load_taehv(half, dtype=torch.float32)
    assert all(v.dtype == torch.float32 and torch.equal(v, ours[k].half().float())
               for k, v in loaded.state_dict().items())


def _error(path) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_taehv(path)
    message = str(info.value)
    assert "\n" not in message and "--tiny-vae" in message and "taew2_1" in message, message
    return message


def test_bad_files_give_one_line_errors(taehv, tmp_path):
    """Missing, unreadable, not tensors, missing / extra keys, another TAEHV's shapes: one line
    each, naming what to pass (the keys first: a non-strict load accepts them silently)."""
    assert "do not exist" in _error(tmp_path / "nowhere.pth")
    (tmp_path / "notes.txt").write_text("hello")
    assert ".pth or .safetensors" in _error(tmp_path / "notes.txt")
    (tmp_path / "garbage.pth").write_bytes(np.random.default_rng(0).bytes(256))
    assert "unreadable" in _error(tmp_path / "garbage.pth")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    assert "unreadable" in _error(tmp_path / "garbage.safetensors")
    torch.save({"step": 3}, tmp_path / "counter.pth")
    assert "not a state dict of tensors" in _error(tmp_path / "counter.pth")
    state = dict(taehv.state_dict())
    keys = {k: v for k, v in state.items() if k != "decoder.22.bias"}
    keys["decoder.23.weight"] = torch.zeros(3)
    save(keys, tmp_path / "keys.safetensors")
    message = _error(tmp_path / "keys.safetensors")
    assert "1 missing keys (e.g. decoder.22.bias)" in message
    assert "1 unexpected keys (e.g. decoder.23.weight)" in message
    # taehv1_5 / taew2_2 style: 32 or 48 latent channels, pixel-shuffled frames
    other = dict(state)
    other["decoder.1.weight"], other["encoder.0.weight"] = torch.zeros(256, 32, 3, 3), torch.zeros(64, 12, 3, 3)
    save(other, tmp_path / "taehv1_5.pth")
    message = _error(tmp_path / "taehv1_5.pth")
    assert "2 of another shape" in message and "expected (" in message


# --- streaming -------------------------------------------------------------------------

def test_streamed_encode_equals_one_shot(taehv):
    """Groups of 4 frames (in [-1, 1], Wan's NCTHW), and frames pushed one at a time, give
    `encode_video`'s latents of the whole clip; the clip of 1 + 4k frames padded at its
    end as the reference pads it; a latent frame after frames 3, 7, 11."""
    video = clip()
    expected = to_wan(taehv.encode_video(video))  # (1, 16, 3, 4, 4)
    padded = to_wan(pad_to_groups(video)) * 2 - 1  # (1, 3, 12, 32, 32) in [-1, 1]
    stream = TAEHVStream(taehv)
    groups = []
    while stream.frames_in < padded.shape[2]:
        n = stream.frames_needed
        assert n == 4
        groups.append(stream.encode(padded[:, :, stream.frames_in:stream.frames_in + n]))
    assert [g.shape for g in groups] == [(1, 16, 1, 4, 4)] * 3
    assert expected.shape == (1, 16, 3, 4, 4)
    assert (torch.cat(groups, dim=2) - expected).abs().max() < ATOL
    stream.reset()
    pushed, ready_at = [], []
    for i in range(padded.shape[2]):
        out = stream.push(padded[:, :, i])
        if out is not None:
            pushed.append(out)
            ready_at.append(i)
    assert ready_at == [3, 7, 11]
    assert torch.cat(pushed, dim=2).shape == expected.shape
    assert (torch.cat(pushed, dim=2) - expected).abs().max() < ATOL


def test_streamed_decode_equals_one_shot(taehv):
    """Latent frames decoded one at a time (1 frame, then 4 each, in [-1, 1]) == `decode_video` on all."""
    z = latents(frames=4)
    expected = to_wan(taehv.decode_video(z)) * 2 - 1  # (1, 3, 13, 32, 32)
    stream = TAEHVStream(taehv)
    frames = [stream.decode(to_wan(z[:, j:j + 1])) for j in range(z.shape[1])]
    assert [f.shape[2] for f in frames] == [1, 4, 4, 4]
    ours = torch.cat(frames, dim=2)
    assert ours.shape == expected.shape == (1, 3, 13, SIZE, SIZE)
    assert (ours - expected).abs().max() < ATOL


def test_output_shapes_and_ranges(taehv):
    """A batch of 2 non-square streams: latents (2, 16, 1, H/8, W/8), each row its own stream;
    decoded frames (2, 3, n, H, W) clamped to [-1, 1]."""
    video = clip(frames=8, batch=2, height=48, width=32) * 2 - 1  # (2, 8, 3, 48, 32) in [-1, 1]
    both, alone = TAEHVStream(taehv), TAEHVStream(taehv)
    for j in range(2):
        group = to_wan(video[:, 4 * j:4 * j + 4])  # (2, 3, 4, 48, 32)
        z = both.encode(group)
        assert z.shape == (2, 16, 1, 6, 4)
        assert (z[1:] - alone.encode(group[1:])).abs().max() < ATOL
    stream = TAEHVStream(taehv)
    big = latents(frames=2, scale=6.0, batch=2)
    out = [stream.decode(to_wan(big[:, j:j + 1])) for j in range(2)]
    assert [o.shape for o in out] == [(2, 3, 1, 32, 32), (2, 3, 4, 32, 32)]
    frames = torch.cat(out, dim=2)
    assert frames.min() >= -1 and frames.max() <= 1
    assert (frames == -1).any() or (frames == 1).any()  # saturated: the clamp acted
    with pytest.raises(ValueError):
        TAEHVStream(taehv).encode(to_wan(video[:, :1]))  # the first group is 4 frames, not Wan's 1
    with pytest.raises(ValueError):
        stream.decode(to_wan(big))  # one latent frame at a time


def test_wan_vae_latent_space(taehv):
    """With the Wan VAE's latents_mean / latents_std, `encode` gives the VAE's raw latents
    (normalised as the pipeline does, TAEHV's own) and `decode` takes them."""
    gen = torch.Generator().manual_seed(5)
    mean, std = (torch.randn(16, generator=gen)).tolist(), (torch.rand(16, generator=gen) * 2 + 0.5).tolist()
    m, s = torch.tensor(mean).view(1, 16, 1, 1, 1), torch.tensor(std).view(1, 16, 1, 1, 1)
    group = to_wan(clip(frames=4)) * 2 - 1
    own = TAEHVStream(taehv).encode(group)
    raw = TAEHVStream(taehv, latents_mean=mean, latents_std=std).encode(group)
    assert (raw - (own * s + m)).abs().max() < ATOL
    assert ((raw - m) / s - own).abs().max() < ATOL  # WanComponents.normalize_latents
    z = to_wan(latents(frames=1))
    assert (TAEHVStream(taehv, mean, std).decode(z * s + m) - TAEHVStream(taehv).decode(z)).abs().max() < ATOL
    with pytest.raises(ValueError):
        TAEHVStream(taehv, latents_mean=mean)


def test_reset_starts_a_new_stream(taehv):
    """After reset() a stream gives what a new one gives; two interleaved streams on one
    model do not mix; a new frame size needs a reset."""
    a, b = to_wan(clip(frames=8, seed=2)) * 2 - 1, to_wan(clip(frames=8, seed=3)) * 2 - 1
    z = to_wan(latents(frames=2))

    def run(stream, video):
        lat = [stream.encode(video[:, :, 4 * j:4 * j + 4]) for j in range(2)]
        frames = [stream.decode(z[:, :, j:j + 1]) for j in range(2)]
        return torch.cat(lat, dim=2), torch.cat(frames, dim=2)

    fresh = run(TAEHVStream(taehv), a)
    s1, s2 = TAEHVStream(taehv), TAEHVStream(taehv)
    run(s1, b)
    s1.reset()
    again = run(s1, a)
    assert all(torch.equal(x, y) for x, y in zip(again, fresh))
    got = []
    for j in range(2):
        got.append(s2.encode(a[:, :, 4 * j:4 * j + 4]))
        s1.encode(b[:, :, 4 * j:4 * j + 4])
    assert torch.equal(torch.cat(got, dim=2), fresh[0])
    with pytest.raises(ValueError):
        s2.encode(to_wan(clip(frames=4, height=40)) * 2 - 1)  # another size mid-stream
    s2.reset()
    assert s2.encode(to_wan(clip(frames=4, height=40)) * 2 - 1).shape == (1, 16, 1, 5, 4)
