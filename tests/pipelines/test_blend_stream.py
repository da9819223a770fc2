"""Prompt and seed blending in the stream engine (issue #17): one step written out by hand,
weight 0 == leaving it out, and changes from the next frame."""

import numpy as np
import pytest
import torch

from diffstream import frames as F
from diffstream.config import StreamConfig
from diffstream.pipelines.stream import StreamPipeline
from diffstream.testing import assert_frames_close, make_frames, stream_with_update
from diffstream.testing import stream_all as run


def test_one_step_by_hand(tiny):
    """1 step, no guidance: x = a z0 + b n, n = (n_5 + 3 n_9) / sqrt(10); the UNet sees the
    weighted mean of the two prompts' embeddings; the LCM boundary step gives the output."""
    from diffstream.schedule.timesteps import lcm_boundary_scalings, lcm_timestep_table

    frame = make_frames(1)[0]
    cfg = StreamConfig(prompt="unused", size=64, t_index_list=(20,), cfg_type="none", guidance=1.0,
                       prompt_blend=(("a castle", 1.0), ("a forest", 3.0)), seed_blend=((5, 1.0), (9, 3.0)))
    ours, _ = run(StreamPipeline(tiny, cfg), [frame])

    t = lcm_timestep_table()[20]
    abar = tiny.alphas_cumprod[t]
    a, b = abar.sqrt(), (1 - abar).sqrt()
    n5 = torch.randn((1, 4, 6, 8), generator=torch.Generator().manual_seed(5))
    n9 = torch.randn((1, 4, 6, 8), generator=torch.Generator().manual_seed(9))
    noise = (n5 + 3 * n9) / 10**0.5
    z0 = tiny.encode_image(F.frames_to_tensor(F.resize(frame, (64, 48))))
    x = a * z0 + b * noise
    emb = (tiny.encode_prompt(["a castle"]) + 3 * tiny.encode_prompt(["a forest"])) / 4
    with torch.no_grad():
        eps = tiny.unet(x, t, encoder_hidden_states=emb).sample
    c_skip, c_out = lcm_boundary_scalings(torch.tensor(t))
    den = c_skip.float() * x + c_out.float() * (x - b * eps) / a
    assert_frames_close(ours, F.tensor_to_frames(tiny.decode_latents(den)))


@pytest.mark.parametrize("blend", ["linear", "slerp"])
def test_a_zero_weight_is_leaving_it_out(tiny, blend):
    frames = make_frames(4)
    base = StreamConfig(prompt="a castle", size=64, steps=2, strength=0.6, seed=5, blend=blend)
    plain, _ = run(StreamPipeline(tiny, base), frames)
    mixed, _ = run(StreamPipeline(tiny, base.replace(prompt_blend=(("a castle", 2.0), ("a forest", 0.0)),
                                                      seed_blend=((5, 1.0), (9, 0.0)))), frames)
    assert_frames_close(plain, mixed, tol=0 if blend == "linear" else 1)
    other, _ = run(StreamPipeline(tiny, base.replace(prompt_blend=(("a castle", 1.0), ("a forest", 1.0)))), frames)
    assert not all(np.array_equal(x, y) for x, y in zip(plain, other))


@pytest.mark.parametrize("change", [dict(prompt_blend=(("a castle", 1.0), ("a forest", 2.0))),
                                    dict(blend="slerp"), dict(seed_blend=((5, 1.0), (9, 1.0)))],
                         ids=["prompt_blend", "blend", "seed_blend"])
def test_changes_apply_from_the_next_frame(tiny, change):
    """One step: frames 0-2 are the first setting's, frames 3- the second's."""
    frames = make_frames(6)
    first = StreamConfig(prompt="x", size=64, steps=1, strength=0.5, seed=5,
                         prompt_blend=(("a castle", 1.0), ("a forest", 1.0)))
    before, _ = run(StreamPipeline(tiny, first), frames)
    after, _ = run(StreamPipeline(tiny, first.replace(**change)), frames)
    outs = stream_with_update(StreamPipeline(tiny, first), frames, 3, **change)
    for i in range(6):
        assert np.array_equal(outs[i], (before if i < 3 else after)[i]), i
    assert not np.array_equal(before[3], after[3])
