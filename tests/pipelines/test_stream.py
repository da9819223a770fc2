"""The stream engine's spec: equivalences and invariants on the tiny model."""

import numpy as np
import pytest
import torch

from diffstream import frames as F
from diffstream.attention.base import Mechanism
from diffstream.config import StreamConfig
from diffstream.errors import ConfigError
from diffstream.pipelines.stream import StreamPipeline
from diffstream.testing import assert_frames_close, make_frames
from diffstream.testing import stream_all as run


CFG = dict(guidance=1.8, delta=0.7)


@pytest.mark.parametrize("cfg_type", ["none", "self", "initialize", "full"])
def test_stream_batch_equals_sequential(tiny, frames, cfg_type):
    cfg = StreamConfig(prompt="a red fox", size=64, steps=3, strength=0.6, cfg_type=cfg_type, **CFG)
    streamed, returned = run(StreamPipeline(tiny, cfg), frames)
    sequential, _ = run(StreamPipeline(tiny, cfg.replace(stream_batch=False)), frames)
    assert returned == [False, False] + [True] * (len(frames) - 2)  # n - 1 = 2 frames of latency
    assert_frames_close(streamed, sequential)


def test_sequential_matches_diffusers_lcm_scheduler(tiny, frames, monkeypatch):
    """An independent reference: diffusers' LCMScheduler.step with the same fixed noise."""
    import diffusers.schedulers.scheduling_lcm as lcm_module

    from diffstream.models.tiny import sd_scheduler
    from diffstream.schedule.timesteps import lcm_timestep_table

    cfg = StreamConfig(prompt="a red fox", size=64, steps=3, strength=0.6, cfg_type="none", seed=5)
    ours, _ = run(StreamPipeline(tiny, cfg), frames[:3])

    indices = cfg.t_indices()
    timesteps = [lcm_timestep_table()[i] for i in indices]
    sched = sd_scheduler()
    sched.set_timesteps(timesteps=timesteps)
    assert sched.timesteps.tolist() == timesteps
    h, w = 48 // 8, 64 // 8
    noise = torch.randn((3, 4, h, w), generator=torch.Generator().manual_seed(5))
    emb = tiny.encode_prompt(["a red fox"])
    reference = []
    for frame in frames[:3]:
        z0 = tiny.encode_image(F.frames_to_tensor(F.resize(frame, (64, 48))))
        sched.set_timesteps(timesteps=timesteps)
        x = sched.add_noise(z0, noise[0:1], torch.tensor([timesteps[0]]))
        for k, t in enumerate(timesteps):
            fixed = noise[k + 1 : k + 2] if k + 1 < len(timesteps) else None
            monkeypatch.setattr(lcm_module, "randn_tensor", lambda *a, _n=fixed, **kw: _n)
            with torch.no_grad():
                eps = tiny.unet(x, t, encoder_hidden_states=emb).sample
            out = sched.step(eps, t, x)
            x = out.prev_sample if k + 1 < len(timesteps) else out.denoised
        reference.append(F.tensor_to_frames(tiny.decode_latents(x))[0])
    assert_frames_close(ours, reference)


@pytest.mark.parametrize("cfg_type", ["self", "initialize", "full"])
def test_guidance_one_step_by_hand(tiny, frames, cfg_type):
    """With one step, each guidance type is a short formula we can compute directly."""
    from diffstream.schedule.timesteps import lcm_timestep_table, lcm_boundary_scalings

    gamma, delta = 2.0, 0.6
    cfg = StreamConfig(prompt="a castle", negative_prompt="blurry", size=64, t_index_list=(20,),
                       cfg_type=cfg_type, guidance=gamma, delta=delta, seed=9)
    ours, _ = run(StreamPipeline(tiny, cfg), frames[:1])

    t = lcm_timestep_table()[20]
    abar = tiny.alphas_cumprod[t]
    a, b = abar.sqrt(), (1 - abar).sqrt()
    noise = torch.randn((1, 4, 6, 8), generator=torch.Generator().manual_seed(9))
    z0 = tiny.encode_image(F.frames_to_tensor(F.resize(frames[0], (64, 48))))
    x = a * z0 + b * noise
    cond, uncond = tiny.encode_prompt(["a castle"]), tiny.encode_prompt(["blurry"])
    with torch.no_grad():
        eps_c = tiny.unet(x, t, encoder_hidden_states=cond).sample
        eps_u = tiny.unet(x, t, encoder_hidden_states=uncond).sample
    if cfg_type == "self":
        eps = delta * noise + gamma * (eps_c - delta * noise)
    elif cfg_type == "initialize":
        eps = delta * eps_u + gamma * (eps_c - delta * eps_u)
    else:
        eps = eps_u + gamma * (eps_c - eps_u)
    c_skip, c_out = lcm_boundary_scalings(torch.tensor(t))
    den = c_skip.float() * x + c_out.float() * (x - b * eps) / a
    assert_frames_close(ours, F.tensor_to_frames(tiny.decode_latents(den)))


class Recorder(Mechanism):
    """Records the layout of every UNet call."""

    def __init__(self):
        self.layouts = []

    def before_unet(self, layout):
        self.layouts.append(layout)


@pytest.mark.parametrize("cfg_type,rows,uncond", [("none", 2, 0), ("self", 2, 0), ("initialize", 3, 1), ("full", 4, 2)])
def test_unconditional_work_per_guidance_type(tiny, frames, cfg_type, rows, uncond):
    rec = Recorder()
    pipe = StreamPipeline(tiny, StreamConfig(prompt="x", size=64, steps=2, strength=0.5, cfg_type=cfg_type, **CFG), rec)
    run(pipe, frames[:4])
    steady = rec.layouts[2]  # a call with two frames in flight
    assert steady.batch_size == rows
    assert steady.branches.count("uncond") == uncond
    assert pipe.unet_calls == 5  # 4 frames + 1 flush call for the tail


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("n", [1, 2, 5])
def test_output_count_and_order(tiny, steps, n):
    frames = make_frames(n)
    pipe = StreamPipeline(tiny, StreamConfig(prompt="x", size=64, steps=steps, strength=0.9))
    order = []
    pipe.on_output.append(order.append)
    outs, _ = run(pipe, frames)
    assert len(outs) == n and order == list(range(n))
    assert pipe.frames_in == pipe.frames_out == n


def test_each_output_belongs_to_its_input(tiny, frames):
    """Output i equals what a fresh pipeline makes from input i alone (no temporal state)."""
    cfg = StreamConfig(prompt="a boat", size=64, steps=3, strength=0.7)
    outs, _ = run(StreamPipeline(tiny, cfg), frames)
    for i in (0, 3, len(frames) - 1):
        alone, _ = run(StreamPipeline(tiny, cfg), [frames[i]])
        assert_frames_close([outs[i]], alone)


def test_prompt_update_takes_effect_on_next_frame(tiny, frames):
    base = StreamConfig(prompt="a dog", size=64, steps=2, strength=0.8)
    old, _ = run(StreamPipeline(tiny, base), frames)
    new, _ = run(StreamPipeline(tiny, base.replace(prompt="a spaceship", guidance=1.5)), frames)
    pipe = StreamPipeline(tiny, base)
    outs = []
    for i, f in enumerate(frames):
        if i == 3:
            pipe.update(prompt="a spaceship", guidance=1.5)
        o = pipe.push(f)
        if o is not None:
            outs.append(o)
    outs.extend(pipe.flush())
    assert len(outs) == len(frames)
    assert_frames_close(outs[:2], old[:2])  # finished before the change
    assert_frames_close(outs[3:], new[3:])  # pushed after the change: new prompt at every step
    assert not np.array_equal(outs[3], old[3])


def test_update_validates_immediately(tiny):
    pipe = StreamPipeline(tiny, StreamConfig(prompt="x", size=64))
    with pytest.raises(ConfigError):
        pipe.update(strength=2.0)
    with pytest.raises(ConfigError):
        pipe.update(steps=40)  # too many for strength 0.4


def test_strength_change_mid_stream_keeps_every_frame(tiny, frames):
    pipe = StreamPipeline(tiny, StreamConfig(prompt="x", size=64, steps=3, strength=0.6))
    outs = []
    for i, f in enumerate(frames):
        if i == 4:
            pipe.update(strength=0.9, steps=2)
        o = pipe.push(f)
        outs += [o] if o is not None else []
    outs += pipe.flush()
    assert len(outs) == len(frames) and pipe.num_steps == 2


def test_similarity_filter_skips_static_frames_without_unet_calls(tiny):
    frame = make_frames(1)[0]
    moving = make_frames(6, seed=1)
    stream = [frame] * 12 + moving
    pipe = StreamPipeline(tiny, StreamConfig(prompt="x", size=64, steps=2, strength=0.5,
                                             similarity_threshold=0.95, max_skip=3))
    outs, _ = run(pipe, stream)
    assert len(outs) == len(stream)
    # identical frames: cos = 1, P(skip) = 1, so runs of exactly max_skip skips
    assert pipe.skipped == 9  # frames 1-3, 5-7, 9-11 of the static run
    processed = len(stream) - pipe.skipped
    assert pipe.unet_calls == processed + 1  # one flush call for a 2-step schedule
    # a skipped frame repeats the output of the frame it resembled
    assert np.array_equal(outs[1], outs[0]) and np.array_equal(outs[3], outs[0])


def test_skipped_counts_since_the_reset_across_filter_changes(tiny):
    """A new threshold or max_skip replaces the filter; `skipped` still counts every skip
    since the last reset (the run's closing line reports it), and only reset zeroes it."""
    frame = make_frames(1)[0]
    pipe = StreamPipeline(tiny, StreamConfig(prompt="x", size=64, steps=2, strength=0.5,
                                             similarity_threshold=0.95, max_skip=3))
    for f in [frame] * 4:
        pipe.process(f)
    assert pipe.skipped == 3
    pipe.update(max_skip=2)
    for f in [frame] * 3:
        pipe.process(f)
    assert pipe.skipped == 3 + 2
    pipe.flush()
    pipe.reset()
    assert pipe.skipped == 0


def test_similarity_probability_formula():
    from diffstream.pipelines.similarity import SimilarityFilter

    f = SimilarityFilter(threshold=0.9)
    assert f.skip_probability(1.0) == 1.0
    assert f.skip_probability(0.95) == pytest.approx(0.5)
    assert f.skip_probability(0.5) == 0.0


def test_any_input_size_is_processed_at_model_multiple(tiny):
    frame = np.random.default_rng(0).integers(0, 255, (47, 63), dtype=np.uint8)  # grayscale, odd
    pipe = StreamPipeline(tiny, StreamConfig(prompt="x", size=80, steps=1, strength=0.5))
    out = pipe.push(frame)
    assert out.shape == (64, 80, 3)  # longer side 80, both sides multiples of 16
    rgba = np.zeros((30, 30, 4), dtype=np.uint8)
    pipe.reset()
    assert pipe.push(rgba).shape == (80, 80, 3)


def test_reset_starts_a_new_stream(tiny, frames):
    cfg = StreamConfig(prompt="x", size=64, steps=3, strength=0.6)
    pipe = StreamPipeline(tiny, cfg)
    first, _ = run(pipe, frames)
    pipe.push(frames[0])
    pipe.reset()
    second, _ = run(pipe, frames)
    assert_frames_close(first, second, tol=0)


def test_turbo_single_step_has_no_latency(tiny, frames):
    import dataclasses

    turbo = dataclasses.replace(tiny, turbo=True)
    pipe = StreamPipeline(turbo, StreamConfig(prompt="x", size=64, strength=0.5, guidance=3.0))
    assert pipe.num_steps == 1 and pipe._cfg_type == "none"
    assert all(pipe.push(f) is not None for f in frames)


def test_tiny_vae(tiny_taesd_model, frames):
    pipe = StreamPipeline(tiny_taesd_model, StreamConfig(prompt="x", size=64, steps=2, strength=0.5))
    outs, _ = run(pipe, frames)
    assert len(outs) == len(frames) and outs[0].shape == (48, 64, 3)


def test_process_drains_frames_that_finish_together(tiny):
    """A skipped frame is ready together with its predecessor; process() returns both,
    so the similarity filter never adds latency."""
    frame = make_frames(1)[0]
    pipe = StreamPipeline(tiny, StreamConfig(prompt="x", size=64, steps=2, strength=0.5,
                                             similarity_threshold=0.5, max_skip=100))
    counts = [len(pipe.process(f)) for f in [frame] * 6]
    # frame 0 in flight; frames 1.. skipped (identical): they wait for frame 0's output
    assert counts == [0, 0, 0, 0, 0, 0] and len(pipe.flush()) == 6
    pipe.reset()
    rng = np.random.default_rng(3)
    moving = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(4)]  # cosine ~0: never skipped
    counts = [len(pipe.process(f)) for f in [moving[0], moving[1], moving[1], moving[2], moving[3]]]
    assert counts == [0, 1, 0, 2, 1]  # the skip is emitted right after the frame it copies


def test_seed_change_keeps_the_stream_going(tiny, frames):
    """A new seed changes only the noise: no drain, no reset; frames pushed after it are
    exactly those of a stream seeded that way from the start."""
    base = StreamConfig(prompt="x", size=64, steps=3, strength=0.6, seed=1)
    reseeded, _ = run(StreamPipeline(tiny, base.replace(seed=7)), frames)
    pipe = StreamPipeline(tiny, base)
    outs = []
    for i, f in enumerate(frames):
        if i == 3:
            pipe.update(seed=7)
        outs += pipe.process(f)
    calls_before_flush = pipe.unet_calls
    outs += pipe.flush()
    assert calls_before_flush == len(frames)  # one UNet call per frame: nothing was drained
    assert len(outs) == len(frames)
    assert_frames_close(outs[3:], reseeded[3:])
