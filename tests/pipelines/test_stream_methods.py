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


# --- update(): every documented field, for every method (issue #20, bug 2) ------------------

# (field, new value, base-config overrides that make the field matter)
GUIDED = dict(guidance=1.5, cfg_type="self")
UPDATES = [
    ("prompt", "a blue car", {}),
    ("negative_prompt", "blurry, grey", dict(guidance=1.5, cfg_type="full")),
    ("strength", 0.8, {}),
    ("steps", 3, {}),
    ("t_index_list", (15, 40), {}),  # strength 0.6, 2 steps is (20, 35)
    ("seed", 9, {}),
    ("guidance", 2.5, GUIDED),
    ("guidance", 1.0, GUIDED),
    ("guidance", 1.8, {}),  # from the method's default (1.0 = none for streamv2v/live2diff)
    ("delta", 0.4, GUIDED),
    ("cfg_type", "initialize", dict(guidance=1.5, cfg_type="none")),  # adds an unconditional branch
    ("cfg_type", "full", dict(guidance=1.5, cfg_type="initialize")),  # unconditional rows at every step
    ("cfg_type", "none", dict(guidance=1.5, cfg_type="full")),
    ("noise", "per-frame", dict(noise="fixed")),
    ("noise", "fixed", dict(noise="per-frame")),
    ("vae_encode", "sample", {}),
    ("similarity_threshold", 0.2, {}),
    ("max_skip", 0, dict(similarity_threshold=0.2)),
]
_BASELINES: dict = {}


def update_run(components, method, base, change=None, frames=12, at=6):
    cfg = StreamConfig(prompt="a red fox", size=64, steps=2, strength=0.6, method=method, seed=3,
                       causal=CausalTemporalConfig(warmup_frames=2, window=4), **base)
    clip = make_frames(frames)
    with make_pipeline(components, cfg) as pipe:
        outs = []
        for i, f in enumerate(clip):
            if i == at and change is not None:
                pipe.update(**change)
            outs.extend(pipe.process(f))
        outs.extend(pipe.flush())
        return outs, pipe.skipped


@pytest.mark.parametrize("method", ["streamdiffusion", "streamv2v", "live2diff"])
@pytest.mark.parametrize("field, value, base", UPDATES, ids=[f"{f}={v}" for f, v, _ in UPDATES])
def test_every_update_field_works_for_every_method(request, tiny, method, field, value, base):
    """Each change is accepted mid-stream, loses no frame, and changes what comes after it."""
    components = request.getfixturevalue("video") if method == "live2diff" else tiny
    key = (method, tuple(sorted(base.items())))
    if key not in _BASELINES:
        _BASELINES[key] = update_run(components, method, base)
    before, skipped_before = _BASELINES[key]
    after, skipped_after = update_run(components, method, base, {field: value})
    assert len(before) == len(after) == 12
    # Frames that finished before the change are untouched (frame 5 was still in flight:
    # it takes the new settings at its remaining step).
    assert all(np.array_equal(a, b) for a, b in zip(before[:5], after[:5])), "frames before the change moved"
    if field in ("similarity_threshold", "max_skip"):
        assert skipped_after != skipped_before, (skipped_before, skipped_after)
    else:
        assert any(not np.array_equal(a, b) for a, b in zip(before[6:], after[6:])), "the change had no effect"


# --- noise and VAE encoding (issue #20, items 4 and 6) ----------------------------------

def test_method_defaults_are_their_papers():
    """StreamDiffusion: RCFG self at 1.2, fixed slot noise; StreamV2V: no guidance (Sec. 5.1);
    Live2Diff: no guidance, fresh noise per frame (its reference)."""
    sd, v2v, l2d = (StreamConfig(method=m) for m in ("streamdiffusion", "streamv2v", "live2diff"))
    assert (sd.resolved_guidance, sd.resolved_cfg_type(), sd.resolved_noise) == (1.2, "self", "fixed")
    assert (v2v.resolved_guidance, v2v.resolved_cfg_type(), v2v.resolved_noise) == (1.0, "none", "fixed")
    assert (l2d.resolved_guidance, l2d.resolved_cfg_type(), l2d.resolved_noise) == (1.0, "none", "per-frame")
    # RCFG stays available to every method
    assert StreamConfig(method="streamv2v", guidance=1.4).resolved_cfg_type() == "self"
    assert sd.vae_encode == v2v.vae_encode == l2d.vae_encode == "mean"


def test_per_frame_noise_is_drawn_from_seed_frame_and_step(tiny):
    """Per-frame mode: frame i's latent after admission is add_noise(z0_i, n_i[0]) with
    n_i = randn from a generator seeded by (seed, i); its re-noise after step k uses n_i[k+1]."""
    from diffstream import frames as FR
    from diffstream.schedule.noise import frame_noise, mix_seed
    from diffstream.schedule.timesteps import add_noise, make_step_table

    cfg = StreamConfig(prompt="x", size=64, steps=3, strength=0.6, noise="per-frame", seed=7)
    clip = make_frames(3)
    from diffstream.schedule.stream_batch import StreamBatch

    admitted = []
    original = StreamBatch.admit

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        admitted.append(self.x[0:1].clone())  # the newest frame right after its SDEdit noise

    with make_pipeline(tiny, cfg) as pipe, pytest.MonkeyPatch.context() as mp:
        mp.setattr(StreamBatch, "admit", spy)
        pipe.push(clip[0])
        pipe.push(clip[1])  # frame 0 is now at step 1, frame 1 at step 0 (newest first)
        batch = pipe._batch
        table = make_step_table(tiny.alphas_cumprod, cfg.t_indices())
        z = tiny.encode_image(FR.frames_to_tensor(FR.resize(clip[1], (64, 48))))
        n1 = torch.randn((3, 4, 6, 8), generator=torch.Generator().manual_seed(mix_seed(7, 1)))
        torch.testing.assert_close(admitted[1], add_noise(z, n1[0:1], table.alpha_sqrt[0], table.beta_sqrt[0]))
        assert torch.equal(batch.frame_noise[0], n1) and torch.equal(batch.frame_noise[1], frame_noise(7, 0, 3, (4, 6, 8)))
    assert not torch.equal(frame_noise(7, 0, 3, (4, 6, 8)), frame_noise(7, 1, 3, (4, 6, 8)))
    assert not torch.equal(frame_noise(7, 0, 3, (4, 6, 8)), frame_noise(8, 0, 3, (4, 6, 8)))
    noise = frame_noise(7, 0, 3, (4, 6, 8))
    assert not torch.equal(noise[0], noise[1])  # each re-noise is fresh too


def test_per_frame_noise_renoises_each_row_with_its_own_frame_and_step():
    """StreamBatch alone, on a toy table: row r (frame f_r at step lo + r) is re-noised with
    f_r's noise for step lo + r + 1, by hand."""
    from diffstream.schedule.stream_batch import StreamBatch
    from diffstream.schedule.timesteps import make_step_table

    table = make_step_table(torch.linspace(0.99, 0.01, 1000), (10, 25, 40))
    batch = StreamBatch(table, None)
    noises = [torch.full((3, 1, 1, 1), 10.0 * i) + torch.arange(3.0).view(3, 1, 1, 1) for i in range(3)]
    for i in range(2):
        batch.admit(torch.zeros(1, 1, 1, 1), i, noise=noises[i])
        if i == 0:
            batch.advance(torch.zeros(1, 1, 1, 1))
    # frame 1 at step 0, frame 0 at step 1: after the step both are re-noised from x0 = 0
    batch.advance(torch.zeros(2, 1, 1, 1))
    expected = torch.stack([noises[1][1], noises[0][2]]) * table.beta_sqrt[1:3].view(2, 1, 1, 1)
    torch.testing.assert_close(batch.x, expected)


def test_vae_sample_is_a_reproducible_posterior_sample(tiny):
    from diffstream import frames as FR
    from diffstream.schedule.noise import frame_generator

    pixels = FR.frames_to_tensor(FR.resize(make_frames(1)[0], (64, 48)))
    mean = tiny.encode_image(pixels)
    a = tiny.encode_image(pixels, generator=frame_generator(3, 0, 1))
    b = tiny.encode_image(pixels, generator=frame_generator(3, 0, 1))
    posterior = tiny.vae.encode(pixels).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=frame_generator(3, 0, 1))
    torch.testing.assert_close(a, (posterior.mean + posterior.std * noise) * tiny.vae.config.scaling_factor)
    assert torch.equal(a, b) and not torch.equal(a, mean)
    cfg = StreamConfig(prompt="x", size=64, steps=2, strength=0.6)
    clip = make_frames(4)
    with make_pipeline(tiny, cfg) as p1, make_pipeline(tiny, cfg.replace(vae_encode="sample")) as p2:
        assert any(not np.array_equal(x, y) for x, y in zip(run(p1, clip), run(p2, clip)))
