"""Every streaming method, every guidance type: the stream batch is only a schedule.

`--no-stream-batch` denoises each frame to completion before the next; the stream batch
runs one UNet call per frame with every in-flight frame at its own step. The temporal
state each frame sees (the feature bank of its step slot, the KV cache of its step) must
be the same either way, so the frames are the same (issue #20, bug 1: the bank interval
used to count UNet calls, so without the stream batch step 0's bank was refreshed every
frame and steps 1-3 never got one).
"""

import numpy as np
import pytest
import torch

from diffstream.attention.causal_temporal import CausalTemporalConfig
from diffstream.attention.feature_bank import FeatureBankConfig
from diffstream.config import ModelConfig, StreamConfig
from diffstream.models.loading import load_components
from diffstream.pipelines.factory import make_pipeline
from diffstream.testing import make_frames


@pytest.fixture(scope="module")
def video():
    """The tiny model with tiny motion modules (a video UNet, for live2diff)."""
    return load_components(ModelConfig(model="tiny", motion_adapter="tiny", device="cpu"))


def run(pipe, frames):
    outs = [o for o in (pipe.push(f) for f in frames) if o is not None]
    return outs + pipe.flush()


def close(a, b, tol=1):
    assert len(a) == len(b)
    worst = max(int(np.abs(x.astype(np.int16) - y).max()) for x, y in zip(a, b))
    assert worst <= tol, f"frames differ by {worst} grey levels"


STEPS = 4


def config(method, cfg_type, **kw):
    return StreamConfig(prompt="a red fox", size=64, steps=STEPS, strength=0.9, method=method, seed=3,
                        guidance=1.6 if cfg_type != "none" else 1.0, cfg_type=cfg_type,
                        feature_bank=FeatureBankConfig(interval=4),
                        causal=CausalTemporalConfig(warmup_frames=2, window=5), **kw)


def both_ways(components, cfg, frames):
    with make_pipeline(components, cfg) as batched, make_pipeline(components, cfg.replace(stream_batch=False)) as seq:
        a = run(batched, frames)
        b = run(seq, frames)
        return (a, batched.mechanism.state), (b, seq.mechanism.state)


@pytest.mark.parametrize("cfg_type", ["none", "self", "initialize", "full"])
def test_streamv2v_without_stream_batch_banks_the_same_frames_at_every_step(tiny, cfg_type):
    frames = make_frames(13)
    (a, bank_a), (b, bank_b) = both_ways(tiny, config("streamv2v", cfg_type), frames)
    close(a, b)
    assert bank_a.layers.keys() == bank_b.layers.keys()
    for name in bank_a.layers:
        la, lb = bank_a.layers[name], bank_b.layers[name]
        assert la.filled == lb.filled, name
        # Every step slot of the conditional branch has been banked (not [48, 0, 0, 0]).
        assert all(f == la.capacity for f in la.filled[:STEPS]), (name, la.filled)
        for store_a, store_b in ((la.key, lb.key), (la.value, lb.value), (la.output, lb.output)):
            torch.testing.assert_close(store_a, store_b, atol=2e-4, rtol=1e-4)


def test_bank_update_frames_follow_frame_plus_step(tiny):
    """Which (frame, step) pairs enter the bank: (f + k) % interval == 0, in both modes."""
    frames = make_frames(9)
    for stream_batch in (True, False):
        cfg = config("streamv2v", "none", stream_batch=stream_batch)
        with make_pipeline(tiny, cfg) as pipe:
            state, seen = pipe.mechanism.state, []
            begin = state.begin_call

            def spy(layout, begin=begin, state=state, seen=seen):
                begin(layout)
                if state.update_now:
                    seen.extend(zip(range(state.frames - 1, -1, -1), layout.steps))
            state.begin_call = spy
            run(pipe, frames)
        expected = sorted((f, k) for f in range(9) for k in range(STEPS) if (f + k) % 4 == 0)
        assert sorted(seen) == expected, stream_batch


@pytest.mark.parametrize("cfg_type", ["none", "initialize", "full"])
def test_live2diff_without_stream_batch_gives_the_same_frames_and_caches(video, cfg_type):
    frames = make_frames(11)
    (a, cache_a), (b, cache_b) = both_ways(video, config("live2diff", cfg_type), frames)
    close(a, b)
    assert cache_a.slots == cache_b.slots and cache_a.filled == cache_b.filled
    assert cache_a.write == cache_b.write
    for name in cache_a.rings:
        torch.testing.assert_close(cache_a.rings[name].key, cache_b.rings[name].key, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("cfg_type", ["none", "self", "initialize", "full"])
def test_streamdiffusion_without_stream_batch(tiny, cfg_type):
    frames = make_frames(7)
    with make_pipeline(tiny, config("streamdiffusion", cfg_type)) as a, \
            make_pipeline(tiny, config("streamdiffusion", cfg_type, stream_batch=False)) as b:
        close(run(a, frames), run(b, frames))
