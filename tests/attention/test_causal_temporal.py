"""Live2Diff's causal temporal attention: the spec from the issue, on a tiny UNetMotionModel."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffstream import frames as FR
from diffstream.attention.base import install_processors
from diffstream.attention.causal_temporal import CausalTemporalConfig, is_temporal
from diffstream.config import ModelConfig, StreamConfig
from diffstream.models.loading import load_components
from diffstream.pipelines.factory import make_pipeline
from diffstream.schedule.noise import frame_noise
from diffstream.schedule.timesteps import add_noise, denoise, model_output_to_eps
from diffstream.testing import make_frames

W, WINDOW = 3, 5  # small warmup and window so the window rolls many times in a short clip


@pytest.fixture(scope="module")
def video():
    return load_components(ModelConfig(model="tiny", motion_adapter="tiny", device="cpu"))


def stream(components, frames, **kw):
    cfg = StreamConfig(prompt="a fox", size=64, steps=2, strength=0.6, guidance=1.0, method="live2diff",
                       causal=CausalTemporalConfig(warmup_frames=W, window=WINDOW), **kw)
    with make_pipeline(components, cfg) as pipe:
        outs = [o for o in (pipe.push(f) for f in frames) if o is not None] + pipe.flush()
        return outs, pipe


class MaskedFullAttention:
    """Reference: every frame of the clip at once, each query with its own window mask
    and window positions, keys/values recomputed from scratch."""

    def __init__(self, pe):
        self.pe = pe

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        n = hidden_states.shape[1]
        x = hidden_states - self.pe[:n]  # undo the block's positions 0..N-1
        recent = WINDOW - W - 1
        out = torch.zeros_like(x)
        for t in range(n):
            if t < W:
                window = list(range(min(W, n)))
            else:
                window = list(range(W)) + list(range(max(W, t - recent), t)) + [t]
            pos = self.pe[: len(window)]
            keys = attn.to_k(x[:, window] + pos)
            values = attn.to_v(x[:, window] + pos)
            q = attn.to_q(x[:, t : t + 1] + self.pe[window.index(t)])
            heads, d = attn.heads, q.shape[-1] // attn.heads
            split = lambda z: z.view(z.shape[0], z.shape[1], heads, d).transpose(1, 2)  # noqa: E731
            o = F.scaled_dot_product_attention(split(q), split(keys), split(values))
            out[:, t : t + 1] = o.transpose(1, 2).reshape(x.shape[0], 1, heads * d)
        return attn.to_out[1](attn.to_out[0](out))


def reference_clip(components, frames, processors=None):
    """Denoise the whole clip as one video, all frames at the same step, step by step."""
    cfg = StreamConfig(prompt="a fox", size=64, steps=2, strength=0.6, guidance=1.0)
    from diffstream.schedule.timesteps import make_step_table

    table = make_step_table(components.alphas_cumprod, cfg.t_indices())
    pixels = FR.frames_to_tensor([FR.resize(f, (64, 48)) for f in frames])
    z0 = components.encode_image(pixels)  # (N, 4, 6, 8)
    # Live2Diff's per-frame noise (its reference's): frame i's own noise for each step, (2, N, 4, 6, 8)
    noise = torch.stack([frame_noise(cfg.seed, i, 2, (4, 6, 8)) for i in range(len(frames))], dim=1)
    emb = components.encode_prompt(["a fox"]).expand(len(frames), -1, -1)
    unet = components.unet

    def make(name, proc):
        if processors is None or not is_temporal(name):
            return None
        block = unet.get_submodule(name.rsplit(".", 2)[0])
        return processors(block.pos_embed.pe[0])

    with install_processors(unet, make), torch.no_grad():
        rows = table.rows(0, 1)
        x = add_noise(z0, noise[0], rows.alpha_sqrt, rows.beta_sqrt)
        for k in range(2):
            rows = table.rows(k, k + 1)
            video = x.transpose(0, 1)[None]  # (1, C, N, h, w)
            out = unet(video, rows.timesteps, encoder_hidden_states=emb).sample[0].transpose(0, 1)
            x = denoise(model_output_to_eps(out, x, rows.alpha_sqrt, rows.beta_sqrt, "epsilon"), x, rows)
            if k == 0:
                nxt = table.rows(1, 2)
                x = add_noise(x, noise[1], nxt.alpha_sqrt, nxt.beta_sqrt)
    return FR.tensor_to_frames(components.decode_latents(x))


def close(a, b, tol=1):
    assert len(a) == len(b)
    worst = max(int(np.abs(x.astype(np.int16) - y).max()) for x, y in zip(a, b))
    assert worst <= tol, worst


def test_kv_cached_stream_equals_masked_full_attention(video):
    frames = make_frames(12)  # 3 warmup + 9 streamed: the 1-frame recent window rolls 8 times
    ours, _ = stream(video, frames)
    reference = reference_clip(video, frames, MaskedFullAttention)
    close(ours, reference)


def test_warmup_frames_equal_bidirectional_batch(video):
    frames = make_frames(W)
    ours, _ = stream(video, frames)
    stock = reference_clip(video, frames, processors=None)  # diffusers' own temporal attention
    close(ours, stock)


def test_motion_modules_zeroed_equal_the_image_model(video):
    import copy

    zeroed = dataclasses.replace(video, unet=copy.deepcopy(video.unet))
    for name, module in zeroed.unet.named_modules():
        if name.endswith("motion_modules.0") or ".motion_modules." in name and name.endswith("proj_out"):
            if hasattr(module, "proj_out"):
                torch.nn.init.zeros_(module.proj_out.weight)
                torch.nn.init.zeros_(module.proj_out.bias)
            elif name.endswith("proj_out"):
                torch.nn.init.zeros_(module.weight)
                torch.nn.init.zeros_(module.bias)
    image = load_components(ModelConfig(model="tiny", device="cpu"))
    frames = make_frames(8)
    ours, _ = stream(zeroed, frames)
    cfg = StreamConfig(prompt="a fox", size=64, steps=2, strength=0.6, guidance=1.0, noise="per-frame")
    with make_pipeline(image, cfg) as pipe:
        plain = [o for o in (pipe.push(f) for f in frames) if o is not None] + pipe.flush()
    close(ours, plain)


def test_motion_modules_matter(video):
    frames = make_frames(6)
    ours, _ = stream(video, frames)
    image = load_components(ModelConfig(model="tiny", device="cpu"))
    with make_pipeline(image, StreamConfig(prompt="a fox", size=64, steps=2, strength=0.6, guidance=1.0)) as pipe:
        plain = [o for o in (pipe.push(f) for f in frames) if o is not None] + pipe.flush()
    assert max(int(np.abs(a.astype(np.int16) - b).max()) for a, b in zip(ours, plain)) > 5


@pytest.mark.slow
def test_cache_memory_is_constant_over_1000_frames(video):
    cfg = StreamConfig(prompt="x", size=64, steps=1, strength=0.5, guidance=1.0, method="live2diff",
                       causal=CausalTemporalConfig(warmup_frames=2, window=4))
    frames = make_frames(10, 64, 64)
    sizes = set()
    with make_pipeline(video, cfg) as pipe:
        for i in range(1000):
            assert len(pipe.process(frames[i % 10])) == (0 if i == 0 else 2 if i == 1 else 1)
            if i >= 10:
                sizes.add(pipe.mechanism.cache_bytes())
        assert pipe.frames_out == 1000  # 1 step: no frame left in flight, none queued
    assert len(sizes) == 1


def test_output_count_short_stream_and_prompt_change_keeps_cache(video):
    outs, _ = stream(video, make_frames(2))  # shorter than the warmup: still 1:1
    assert len(outs) == 2
    cfg = StreamConfig(prompt="x", size=64, steps=2, strength=0.6, guidance=1.0, method="live2diff",
                       causal=CausalTemporalConfig(warmup_frames=W, window=WINDOW))
    with make_pipeline(video, cfg) as pipe:
        for f in make_frames(6):
            pipe.push(f)
        warm = {k: c.warm_k for k, c in pipe.mechanism.state.caches.items()}
        pipe.update(prompt="y")
        pipe.push(make_frames(1)[0])
        assert all(pipe.mechanism.state.caches[k].warm_k is v for k, v in warm.items())
        pipe.reset()
        assert not pipe.mechanism.state.caches


def test_depth_prior(video):
    """A zero depth module (untrained, as Live2Diff initialises it) changes nothing; a
    trained one changes the frames; frame count stays 1:1."""
    from diffstream.attention.causal_temporal import CausalTemporal
    from diffstream.models.depth import DepthConditioner
    from diffstream.models.motion import DepthPrior
    from diffstream.models.tiny import randomize, tiny_depth_estimator
    from diffstream.pipelines.stream import StreamPipeline

    frames = make_frames(6)
    cfg = StreamConfig(prompt="a fox", size=64, steps=2, strength=0.6, guidance=1.0, method="live2diff",
                       causal=CausalTemporalConfig(warmup_frames=W, window=WINDOW, depth=True, depth_model="tiny"))

    def run(prior):
        conditioner = DepthConditioner(tiny_depth_estimator(), video.encode_image)
        mech = CausalTemporal(cfg.causal, conditioner=conditioner, depth_prior=prior)
        with StreamPipeline(video, cfg, mech) as pipe:
            return [o for o in (pipe.push(f) for f in frames) if o is not None] + pipe.flush()

    plain, _ = stream(video, frames)
    zero = run(DepthPrior(out_channels=32))
    assert all(np.array_equal(a, b) for a, b in zip(zero, plain))
    trained = run(randomize(DepthPrior(out_channels=32), seed=1, std=0.2))
    assert len(trained) == 6
    assert max(int(np.abs(a.astype(np.int16) - b).max()) for a, b in zip(trained, plain)) > 0


def test_depth_needs_the_checkpoint_module():
    from diffstream.errors import ConfigError

    image = load_components(ModelConfig(model="tiny", motion_adapter="tiny", device="cpu"))
    image = dataclasses.replace(image, name="some/real-model")
    cfg = StreamConfig(prompt="x", size=64, method="live2diff", causal=CausalTemporalConfig(depth=True))
    with pytest.raises(ConfigError, match="--motion-adapter"):
        make_pipeline(image, cfg)


def test_schedule_change_warms_up_again(video):
    cfg = StreamConfig(prompt="x", size=64, steps=2, strength=0.6, guidance=1.0, method="live2diff",
                       causal=CausalTemporalConfig(warmup_frames=W, window=WINDOW))
    frames = make_frames(12)
    with make_pipeline(video, cfg) as pipe:
        outs = []
        for i, f in enumerate(frames):
            if i == 6:
                pipe.update(strength=0.8, steps=3)  # new steps: old caches mean nothing
            outs += pipe.process(f)
        outs += pipe.flush()
    assert len(outs) == 12


def test_full_windows_are_one_sdpa_call_per_layer_over_preallocated_rings(video, monkeypatch):
    """Once every window is full, each temporal layer attends for all rows of a UNet call
    at once, and the ring buffers are the same tensors frame after frame."""
    from diffstream.attention.causal_temporal import CausalTemporalAttnProcessor

    calls = []
    attend = CausalTemporalAttnProcessor._attend

    def counting(attn, query, key, value, heads, mask=None):
        calls.append(query.shape[0])
        return attend(attn, query, key, value, heads, mask)

    monkeypatch.setattr(CausalTemporalAttnProcessor, "_attend", staticmethod(counting))
    cfg = StreamConfig(prompt="x", size=64, steps=2, strength=0.6, guidance=1.0, method="live2diff",
                       causal=CausalTemporalConfig(warmup_frames=W, window=WINDOW))
    frames = make_frames(12)
    with make_pipeline(video, cfg) as pipe:
        for f in frames[:W + 4]:  # warmup, then the stream batch fills and every ring wraps
            pipe.push(f)
        state = pipe.mechanism.state
        layers = len(state.rings)
        buffers = {name: (ring.key, ring.value) for name, ring in state.rings.items()}
        for f in frames[W + 4 :]:
            calls.clear()
            pipe.push(f)
            assert len(calls) == layers  # one SDPA per temporal layer, over both rows
            assert all(state.rings[n].key is k and state.rings[n].value is v for n, (k, v) in buffers.items())
