"""The streaming Wan VAE (`models.wan.WanVAEStream`) equals one-shot encode/decode (issue #18).

Wan's VAE is causal in time: frame 0 alone, then 4 frames per latent frame, each causal
convolution carrying its last input frames in a feature cache. Streamed across calls with
the stream's own caches, the latents and frames must be those of diffusers'
`AutoencoderKLWan.encode` / `decode` on the whole clip (notes field-2026-12.md Sec. 5:
"streaming Wan VAE encode ... max diff 0.0").
"""

import pytest
import torch

from diffstream.models.wan import WanVAEStream, tiny_wan_vae

FRAMES = 9  # 1 + 4 * 2: three latent frames
ATOL = 1e-5


@pytest.fixture(scope="module")
def vae():
    return tiny_wan_vae(seed=0)


def clip(seed: int = 0) -> torch.Tensor:
    """(1, 3, FRAMES, 32, 32) in [-1, 1], every frame different."""
    return torch.rand(1, 3, FRAMES, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_streamed_encode_equals_one_shot(vae):
    """Frames pushed one at a time: a latent frame after frame 0, then after every 4th,
    equal to `vae.encode(clip).latent_dist.mode()`; the model's own caches untouched."""
    video = clip()
    with torch.no_grad():
        expected = vae.encode(video).latent_dist.mode()  # (1, 16, 3, 4, 4)
    stream = WanVAEStream(vae)
    latents, ready_at = [], []
    for i in range(FRAMES):
        out = stream.push(video[:, :, i])
        if out is not None:
            latents.append(out)
            ready_at.append(i)
    assert ready_at == [0, 4, 8]
    ours = torch.cat(latents, dim=2)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max() < ATOL


def test_streamed_decode_equals_one_shot(vae):
    """Latent frames decoded one at a time (1 frame, then 4 each) == `vae.decode` on all."""
    latents = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = vae.decode(latents).sample  # (1, 3, 9, 32, 32)
    stream = WanVAEStream(vae)
    frames = [stream.decode(latents[:, :, i:i + 1]) for i in range(latents.shape[2])]
    assert [f.shape[2] for f in frames] == [1, 4, 4]
    ours = torch.cat(frames, dim=2)
    assert (ours - expected).abs().max() < ATOL


def test_reset_and_two_streams_share_one_vae(vae):
    """Two interleaved streams on one VAE, and a stream after reset(), give what one stream alone gives."""
    a, b = clip(2), clip(3)
    alone = WanVAEStream(vae)
    expected = [out for i in range(FRAMES) if (out := alone.push(a[:, :, i])) is not None]
    s1, s2 = WanVAEStream(vae), WanVAEStream(vae)
    got = []
    for i in range(FRAMES):
        out = s1.push(a[:, :, i])
        s2.push(b[:, :, i])
        if out is not None:
            got.append(out)
    assert all(torch.equal(x, y) for x, y in zip(got, expected)) and len(got) == len(expected)
    alone.reset()
    again = [out for i in range(FRAMES) if (out := alone.push(a[:, :, i])) is not None]
    assert all(torch.equal(x, y) for x, y in zip(again, expected))
    with pytest.raises(ValueError):
        WanVAEStream(vae).encode(a[:, :, :4])  # the first group is one frame
