"""Fairy pipeline spec, on the tiny models:

- mechanism off == diffusers' own InstructPix2Pix / img2img pipelines, frame by frame;
- every frame an anchor == full cross-frame attention over all frames (stock attention);
- chunk sizes 1, 3, 8 give identical frames (fp64 exactly; fp32 within one uint8 level,
  because oneDNN/MKL choose kernels by batch shape), and the same chunk layout is
  bit-identical however the clip is cut into segments (what the Ray workers do);
- peak memory for 400 frames is within 5% of 100 frames;
"""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from diffstream import frames as F
from diffstream.attention.base import install_processors, is_self_attention
from diffstream.config import ModelConfig
from diffstream.errors import ConfigError, ModelLoadError
from diffstream.models.loading import load_components
from diffstream.io.clip import Clip
from diffstream.pipelines.fairy import (
    EditPlan,
    FairyConfig,
    FairyPipeline,
    frame_noise,
)
from diffstream.testing import make_frames, write_video

INSTR = "Turn into a marble Roman sculpture"


@pytest.fixture(scope="module")
def instruct():
    """The tiny 8-channel InstructPix2Pix-style model, fp32 on the CPU."""
    return load_components(ModelConfig(model="tiny", device="cpu", instruct=True))


@pytest.fixture(scope="module")
def instruct64():
    """The same model in float64 (rounding differences between batch shapes vanish)."""
    comp = load_components(ModelConfig(model="tiny", device="cpu", instruct=True))
    for name in ("unet", "vae", "text_encoder"):
        setattr(comp, name, getattr(comp, name).to(torch.float64))
    comp.dtype = torch.float64
    return comp


def edit(comp, frames, **kw):
    kw.setdefault("instruction", INSTR)
    kw.setdefault("steps", 3)
    kw.setdefault("size", 64)
    # Per-frame noise: frames' keys then differ, so cross-frame attention changes outputs
    # visibly (with fixed noise and near-identical frames it can hide in rounding).
    kw.setdefault("noise", "per-frame")
    with FairyPipeline(comp, FairyConfig(**kw)) as pipe:
        return list(pipe.edit(frames))


def stack(frames):
    return np.stack(frames).astype(np.int16)


# --- mechanism off == stock diffusers ---------------------------------------------------

@pytest.mark.parametrize("sampler", ["euler-a", "ddim"])
def test_mechanism_off_equals_diffusers_instruct_pix2pix(instruct, sampler):
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    from diffstream.pipelines.fairy import frame_generator

    comp, frames, seed, steps = instruct, make_frames(3), 11, 3
    if sampler == "ddim":
        scheduler = DDIMScheduler.from_config(comp.scheduler.config, clip_sample=False, steps_offset=1)
    else:  # the oracle: diffusers' own Euler ancestral, drawing from the frame's generator
        scheduler = EulerAncestralDiscreteScheduler.from_config(comp.scheduler.config, steps_offset=1)
    stock = StableDiffusionInstructPix2PixPipeline(
        vae=comp.vae, text_encoder=comp.text_encoder, tokenizer=comp.tokenizer, unet=comp.unet,
        scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    stock.set_progress_bar_config(disable=True)
    config = FairyConfig(instruction=INSTR, anchors=0, chunk_size=1, steps=steps, seed=seed, size=64,
                         sampler=sampler, noise="per-frame")
    with FairyPipeline(comp, config) as pipe:
        assert pipe.num_branches == 3 and pipe.config.sampler == sampler
        ours = list(pipe.edit(frames))
        for i, frame in enumerate(frames):
            pixels = F.frames_to_tensor(frame)  # (1, 3, 48, 64)
            # diffusers draws the initial latent, then one noise per ancestral step, from one generator
            with install_processors(comp.unet, lambda n, p: AttnProcessor2_0()):
                expected = stock(INSTR, image=pixels, num_inference_steps=steps, guidance_scale=7.5,
                                 image_guidance_scale=1.5, generator=frame_generator(seed, i),
                                 output_type="latent").images
            latents = pipe.denoise(pixels, [i], "off")
            assert torch.equal(latents, expected)
            assert np.array_equal(ours[i], F.tensor_to_frames(comp.decode_latents(expected))[0])


@pytest.mark.parametrize("noise", ["per-frame", "fixed"])
@pytest.mark.parametrize("sampler", ["ddim", "euler-a"])
def test_mechanism_off_equals_diffusers_img2img(tiny, sampler, noise):
    """Frame i equals diffusers' img2img drawing from frame i's generator (per-frame noise)
    or from frame 0's for every frame (fixed noise, the default)."""
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, StableDiffusionImg2ImgPipeline

    from diffstream.pipelines.fairy import frame_generator

    comp, frames, seed = tiny, make_frames(2), 5
    if sampler == "ddim":
        scheduler = DDIMScheduler.from_config(comp.scheduler.config, clip_sample=False, steps_offset=1)
    else:
        scheduler = EulerAncestralDiscreteScheduler.from_config(comp.scheduler.config, steps_offset=1)
    stock = StableDiffusionImg2ImgPipeline(
        vae=comp.vae, text_encoder=comp.text_encoder, tokenizer=comp.tokenizer, unet=comp.unet,
        scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    stock.set_progress_bar_config(disable=True)
    config = FairyConfig(prompt="a bronze statue", anchors=0, chunk_size=1, steps=5, strength=0.6,
                         guidance=3.0, seed=seed, size=64, sampler="auto" if sampler == "ddim" else sampler,
                         noise=noise)
    with FairyPipeline(comp, config) as pipe:
        assert pipe.config.sampler == sampler and pipe.num_branches == 2 and pipe.num_steps == 3
        for i, frame in enumerate(frames):
            pixels = F.frames_to_tensor(frame)
            z0 = comp.encode_image(pixels)  # img2img takes 4-channel input as latents
            with install_processors(comp.unet, lambda n, p: AttnProcessor2_0()):
                expected = stock("a bronze statue", image=z0, strength=0.6, num_inference_steps=5,
                                 guidance_scale=3.0, generator=frame_generator(seed, i if noise == "per-frame" else 0),
                                 output_type="latent").images
            assert torch.equal(pipe.denoise(pixels, [i], "off"), expected)


# --- anchors ------------------------------------------------------------------------------

class FullCrossFrame:
    """Reference: stock attention over the tokens of all frames of the row's branch."""

    def __init__(self, branches):
        self.branches, self.stock = branches, AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        rows, length, channels = hidden_states.shape  # (branches*F, HW, C)
        frames = rows // self.branches
        context = hidden_states.reshape(self.branches, frames * length, channels).repeat_interleave(frames, dim=0)
        return self.stock(attn, hidden_states, encoder_hidden_states=context)


def test_every_frame_an_anchor_equals_full_cross_frame_attention(instruct):
    frames, n = make_frames(5), 5
    ours = edit(instruct, frames, anchors=n, chunk_size=2)
    # Reference: anchors off, all frames in one batch, self-attention replaced by stock
    # attention over all frames' tokens.
    ref = FullCrossFrame(branches=3)
    with install_processors(instruct.unet, lambda name, p: ref if is_self_attention(name) else None):
        full = edit(instruct, frames, anchors=0, chunk_size=n)
    independent = edit(instruct, frames, anchors=0, chunk_size=n)
    assert np.abs(stack(ours) - stack(full)).max() <= 1
    assert np.abs(stack(ours) - stack(independent)).max() > 2  # the attention really changed


def test_anchors_change_ordinary_frames_and_anchor_frames_come_from_the_anchor_pass(instruct):
    frames = make_frames(7)
    with FairyPipeline(instruct, FairyConfig(instruction=INSTR, anchors=2, steps=2, size=64,
                                                       noise="per-frame")) as pipe:
        out = list(pipe.edit(frames))
        plan = pipe.plan
        assert plan.anchors == (1, 5)
        anchors_alone = pipe.make_anchors([frames[1], frames[5]])
    assert np.array_equal(out[1], anchors_alone[0]) and np.array_equal(out[5], anchors_alone[1])
    off = edit(instruct, frames, anchors=0, steps=2)
    assert len(out) == len(off) == 7
    assert all(np.abs(stack([a]) - stack([b])).max() > 2 for a, b in zip(out, off))  # beyond rounding


# --- chunking and segments ------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["euler-a", "ddim"])
def test_chunk_sizes_give_identical_frames(instruct, instruct64, sampler):
    frames = make_frames(11)
    kw = dict(steps=2, sampler=sampler)
    exact = {c: stack(edit(instruct64, frames, chunk_size=c, **kw)) for c in (1, 3, 8)}
    assert np.array_equal(exact[1], exact[3]) and np.array_equal(exact[1], exact[8])
    fp32 = {c: stack(edit(instruct, frames, chunk_size=c, **kw)) for c in (1, 3, 8)}
    for c in (3, 8):  # last-bit differences between batch shapes, at most one level after rounding
        assert np.abs(fp32[1] - fp32[c]).max() <= 1
        assert (fp32[1] != fp32[c]).mean() < 1e-3
    assert np.array_equal(fp32[3], stack(edit(instruct, frames, chunk_size=3, **kw)))  # same layout: bit-identical
    # the noise really is per frame and per step: another seed moves the frames
    assert np.abs(fp32[3] - stack(edit(instruct, frames, chunk_size=3, seed=1, **kw))).max() > 2


@pytest.mark.parametrize("sampler", ["euler-a", "ddim"])
def test_segments_in_any_order_and_shipped_anchors_reproduce_one_run(instruct, sampler):
    frames = make_frames(13)
    config = FairyConfig(instruction=INSTR, anchors=3, chunk_size=2, steps=2, size=64, sampler=sampler,
                         noise="per-frame")
    with FairyPipeline(instruct, config) as pipe:
        whole = list(pipe.edit(frames))
        plan = pipe.plan
        cache, anchor_out = pipe.export_anchors()
        segments = list(plan.segments(chunks_per_segment=2))
        assert len(segments) > 2
        parts = {}
        for start, stop in reversed(segments):  # another order, one fresh anchor pass
            pipe.begin(len(frames), 64, 48)
            pipe.make_anchors([frames[i] for i in plan.anchors])
            parts[start] = list(pipe.edit_range(frames[start:stop], start, stop))
    with FairyPipeline(instruct, config) as other:  # a "worker" that receives the anchors
        other.begin(len(frames), 64, 48)
        other.load_anchors(cache, anchor_out)
        shipped = [f for start, stop in segments for f in other.edit_range(frames[start:stop], start, stop)]
    pieced = [f for start, _ in segments for f in parts[start]]
    assert len(pieced) == len(whole) == 13
    assert all(np.array_equal(a, b) for a, b in zip(pieced, whole))
    assert all(np.array_equal(a, b) for a, b in zip(shipped, whole))


def test_plan_chunks_and_segments():
    for n, k, c, m in [(1, 3, 4, 1), (10, 3, 3, 1), (31, 3, 4, 2), (8, 8, 2, 1), (50, 5, 7, 3), (6, 0, 4, 1)]:
        plan = EditPlan.build(n, k, c)
        ordinary = [i for i in range(n) if i not in plan.anchors]
        assert [plan.index_of_rank(r) for r in range(len(ordinary))] == ordinary
        assert all(plan.rank(i) == r for r, i in enumerate(ordinary))
        chunks = [ordinary[j:j + c] for j in range(0, len(ordinary), c)]
        assert [i for i in ordinary if plan.closes_chunk(i)] == [ch[-1] for ch in chunks]
        segs = list(plan.segments(m))
        assert segs[0][0] == 0 and segs[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(segs, segs[1:]))
        starts = {ch[0] for ch in chunks}
        assert all(start in starts for start, _ in segs[1:])  # segments start at chunk starts


def test_noise_depends_only_on_seed_and_frame_index():
    a = frame_noise(3, 10, 2, (4, 2, 2))
    assert torch.equal(a, frame_noise(3, 10, 2, (4, 2, 2)))
    assert torch.equal(a[:1], frame_noise(3, 10, 1, (4, 2, 2)))
    assert not torch.equal(a, frame_noise(3, 11, 2, (4, 2, 2)))
    assert not torch.equal(a, frame_noise(4, 10, 2, (4, 2, 2)))


def test_sdedit_with_the_lcm_sampler(tiny):
    frames = make_frames(6)
    out = {}
    for c in (1, 4):
        config = FairyConfig(prompt="in Van Gogh style", sampler="lcm", chunk_size=c, strength=0.5, size=64,
                             noise="per-frame")
        with FairyPipeline(tiny, config) as pipe:
            assert pipe.num_steps == 4 and pipe.num_branches == 1 and pipe.noise_count == 4
            out[c] = stack(list(pipe.edit(frames)))
    assert out[1].shape == (6, 48, 64, 3)
    assert np.abs(out[1] - out[4]).max() <= 1


# --- memory -----------------------------------------------------------------------------

class _CountingClip(Clip):
    """A clip whose every decoded frame is counted while it is alive (weakref finalizers),
    so a pipeline that holds the clip instead of streaming it shows up in `max_alive`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.alive = self.max_alive = 0

    def _gone(self):
        self.alive -= 1

    def __iter__(self):
        import weakref

        for frame in super().__iter__():
            frame = np.array(frame)  # a frame object of our own, nothing else refers to it
            self.alive += 1
            self.max_alive = max(self.max_alive, self.alive)
            weakref.finalize(frame, self._gone)
            yield frame
            del frame


@pytest.mark.slow
def test_frames_in_memory_do_not_grow_with_length(tiny, tmp_path):
    """Frames in flight, not the clip: at most about a chunk of decoded frames is alive at
    once, for 100 frames as for 400 (an absolute RSS comparison cannot see a few
    MB of frames in a 500 MB process; counting the frames can)."""
    config = FairyConfig(prompt="in low poly art style", anchors=3, chunk_size=8, steps=1, strength=1.0, size=32)
    alive = {}
    with FairyPipeline(tiny, config) as pipe:
        for n in (100, 400):
            clip = _CountingClip(write_video(tmp_path / f"{n}.mp4", make_frames(n, 32, 32, seed=n), fps=25))
            assert sum(1 for _ in pipe.edit(clip)) == n
            alive[n] = clip.max_alive
    # a chunk plus the frame being decoded; holding the clip would keep n alive
    assert max(alive.values()) <= 2 * config.chunk_size, alive


# --- configuration ----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(), "nothing to edit"),
    (dict(instruction="a", prompt="b"), "not both"),
    (dict(instruction="a", anchors=-1), "--anchors"),
    (dict(instruction="a", chunk_size=0), "--chunk-size"),
    (dict(instruction="a", strength=0.5), "--strength is for SDEdit"),
    (dict(prompt="a", strength=1.5), "--strength"),
    (dict(instruction="a", sampler="lcm"), "--sampler lcm"),
    (dict(instruction="a", sampler="euler"), "--sampler must be one of auto, euler-a, ddim, lcm"),
    (dict(prompt="a", sampler="euler-a", steps=1, strength=0.5), "runs no denoising step"),
    (dict(prompt="a", sampler="ddim", steps=1, strength=0.5), "runs no denoising step"),
    (dict(prompt="a", sampler="lcm", steps=40, strength=0.5), "too many"),
    (dict(instruction="a", guidance=-1.0), "--guidance"),
    (dict(instruction="a", size=8), "--size"),
])
def test_bad_options_are_one_line_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match) as err:
        FairyConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_defaults_resolve_per_sampler():
    c = FairyConfig(instruction="x").resolve()  # Fairy's Euler ancestral, 10 steps
    assert (c.sampler, c.steps, c.guidance, c.strength, c.num_branches) == ("euler-a", 10, 7.5, None, 3)
    c = FairyConfig(instruction="x", sampler="ddim").resolve()
    assert (c.sampler, c.steps) == ("ddim", 10)
    c = FairyConfig(prompt="x").resolve()
    assert (c.sampler, c.steps, c.guidance) == ("ddim", 10, 7.5)
    c = FairyConfig(prompt="x").resolve(lcm=True)
    assert (c.sampler, c.steps, c.guidance, c.strength, c.num_branches) == ("lcm", 4, 1.0, 0.5, 1)
    c = FairyConfig(prompt="x").resolve(turbo=True)
    assert (c.sampler, c.steps) == ("lcm", 1)
    assert FairyConfig(instruction="x", guidance=1.0).num_branches == 1


def test_model_must_fit_the_mode(tiny, instruct):
    with pytest.raises(ModelLoadError, match="InstructPix2Pix-style"):
        FairyPipeline(tiny, FairyConfig(instruction=INSTR))
    with pytest.raises(ModelLoadError, match="use --instruction"):
        FairyPipeline(instruct, FairyConfig(prompt="x"))


def test_fixed_noise_gives_a_static_clip_one_output(tiny):
    """With the default fixed noise, identical input frames give identical outputs (every
    frame starts from the same noise); per-frame noise makes them differ."""
    frames = [make_frames(1)[0]] * 3
    outs = {}
    for noise in ("fixed", "per-frame"):
        config = FairyConfig(prompt="a bronze statue", anchors=0, steps=4, strength=0.8, seed=1, size=64,
                             sampler="ddim", noise=noise)
        with FairyPipeline(tiny, config) as pipe:
            outs[noise] = list(pipe.edit(frames))
    assert all(np.array_equal(outs["fixed"][0], f) for f in outs["fixed"][1:])
    assert not np.array_equal(outs["per-frame"][0], outs["per-frame"][1])
    with pytest.raises(ConfigError, match="--noise"):
        FairyConfig(prompt="x", noise="shared")
