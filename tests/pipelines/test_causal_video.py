"""`--method causal-video` on `--model tiny-wan` (issue #18): the chunked, block-causal
stream pipeline against an independent reference, frames 1:1, reset, update, the CLI,
and the refusals.

The reference (`reference_latents`) is written here from the formulas alone: the whole
clip VAE-encoded in one shot (diffusers' `AutoencoderKLWan.encode`), normalised as
Wan's pipelines do; each chunk noised SDEdit-style for flow matching, x = (1 - s) z0 + s e;
each denoising step the *stock* transformer (diffusers' own `WanAttnProcessor`, no KV
cache) over [the clean chunks before it at t = 0, this chunk at its timestep] under the
sink + window block mask; x0 = x - s v, re-noised with fresh noise for the next step;
the noise of every chunk drawn from one generator seeded by the seed, (steps, 1, 16, F,
h, w) per chunk. Then the latents decoded in one shot. The pipeline streams frames
one at a time through the streamed VAE, the KV cache and its record calls: it must
give the reference's latents and frames.
"""

import numpy as np
import pytest
import torch

from diffstream.attention.base import BatchLayout
from diffstream.attention.block_causal import BlockCausalConfig
from diffstream.config import CausalVideoConfig, ModelConfig, RunConfig, StreamConfig
from diffstream.errors import ConfigError
from diffstream.pipelines.factory import make_mechanism, make_pipeline
from diffstream.schedule.motion_noise import MotionNoiseConfig
from diffstream.testing import make_frames, stock_wan_attention_with_mask

SEED = 5
ATOL = 1e-4


@pytest.fixture(scope="module")
def wan():
    from diffstream.models.loading import load_components

    return load_components(ModelConfig(model="tiny-wan", device="cpu"))


def config(prompt="a watercolor", chunk=1, sinks=1, window=1, video=None, **kw) -> StreamConfig:
    video = video or CausalVideoConfig(block_causal=BlockCausalConfig(chunk_frames=chunk, sink_chunks=sinks,
                                                                      window_chunks=window))
    kw = {"strength": 0.7, "steps": 2, "size": 64, "seed": SEED, **kw}
    return StreamConfig(prompt=prompt, method="causal-video", video=video, **kw)


def clip(n: int, seed: int = 0) -> list[np.ndarray]:
    """n frames of 48 x 64 (the processing size at --size 64: latents 6 x 8, 12 tokens per frame)."""
    return make_frames(n, 48, 64, seed=seed)


def stream(pipe, frames, flush=True) -> list[np.ndarray]:
    out = []
    for f in frames:
        out.extend(pipe.process(f))
    if flush:
        out.extend(pipe.flush())
    return out


# --- the reference ------------------------------------------------------------------


def block_mask(frames: int, chunk: int, sinks: int, window: int, tokens: int) -> torch.Tensor:
    """(L, L): query chunk q sees key chunk k iff k == q, or k < q and (k < S or k >= q - W)."""
    c = torch.arange(frames).repeat_interleave(tokens) // chunk
    q, k = c[:, None], c[None, :]
    return (k == q) | ((k < q) & ((k < sinks) | (k >= q - window)))


def text(wan, prompt: str) -> torch.Tensor:
    """(1, 77, 32): UMT5's last hidden states, padding positions zeroed (diffusers' Wan pipelines)."""
    tokens = wan.tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = wan.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    return hidden * tokens.attention_mask[..., None]


def latent_stats(vae):
    shape = (1, vae.config.z_dim, 1, 1, 1)
    return torch.tensor(vae.config.latents_mean).view(shape), torch.tensor(vae.config.latents_std).view(shape)


def encoded_clip(wan, frames, cfg: StreamConfig):
    """What both references start from: (chunk, sinks, window), the schedule's sigmas, and
    the clip VAE-encoded in one shot and normalised, (1, 16, T, h, w)."""
    policy = cfg.video.block_causal
    sigmas = [cfg.strength * (cfg.steps - k) / cfg.steps for k in range(cfg.steps)]
    video = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # (1, 3, N, H, W)
    mean, std = latent_stats(wan.vae)
    with torch.no_grad():
        z = (wan.vae.encode(video).latent_dist.mode() - mean) / std  # (1, 16, T, h, w)
    return (policy.chunk_frames, policy.sink_chunks, policy.window_chunks), sigmas, z


def reference_latents(wan, frames, cfg: StreamConfig, first_sigmas=None) -> torch.Tensor:
    """The clip's denoised latents (1, 16, T, h, w), T = its latent frames, from the formulas (module docstring).

    Args:
        first_sigmas: each chunk's first sigma (motion-aware noise), or None: the schedule's.
    """
    (chunk, sinks, window), sigmas, z = encoded_clip(wan, frames, cfg)
    emb = text(wan, cfg.prompt)
    generator = torch.Generator().manual_seed(cfg.seed)
    tokens = (z.shape[3] // 2) * (z.shape[4] // 2)
    clean = z[:, :, :0]
    schedule = sigmas
    for n in range(z.shape[2] // chunk):
        sigmas = schedule if first_sigmas is None else [first_sigmas[n], *schedule[1:]]
        z0 = z[:, :, n * chunk:(n + 1) * chunk]
        noise = torch.randn((len(sigmas), *z0.shape), generator=generator)
        x = (1 - sigmas[0]) * z0 + sigmas[0] * noise[0]
        prefix = n * chunk
        mask = block_mask(prefix + chunk, chunk, sinks, window, tokens)
        for k, s in enumerate(sigmas):
            t = torch.tensor([0.0] * (prefix * tokens) + [1000 * s] * (chunk * tokens))[None]  # (1, L)
            with torch.no_grad(), stock_wan_attention_with_mask(wan.transformer, mask):
                v = wan.transformer(torch.cat([clean, x], dim=2), t, encoder_hidden_states=emb,
                                    return_dict=False)[0][:, :, prefix:]
            x0 = x - s * v
            if k + 1 < len(sigmas):
                x = (1 - sigmas[k + 1]) * x0 + sigmas[k + 1] * noise[k + 1]
        clean = torch.cat([clean, x0], dim=2)
    return clean


def reference_frames(wan, latents) -> np.ndarray:
    """(N, H, W, 3) uint8: the latents decoded in one shot."""
    mean, std = latent_stats(wan.vae)
    with torch.no_grad():
        pixels = wan.vae.decode(latents * std + mean).sample.clamp(-1, 1)  # (1, 3, N, H, W)
    return ((pixels[0].permute(1, 2, 3, 0) + 1) * 127.5).round().to(torch.uint8).numpy()


def assert_matches_reference(wan, latents, out, expected, chunks: int, n: int) -> None:
    """The pipeline's chunks' latents equal the reference's (< ATOL) and its n frames the
    reference latents decoded in one shot (within one grey level)."""
    ours = torch.cat(latents, dim=2)
    assert ours.shape == expected.shape and len(latents) == chunks
    assert (ours - expected).abs().max() < ATOL
    decoded = reference_frames(wan, expected)
    assert len(out) == n
    assert max(int(np.abs(o.astype(int) - e.astype(int)).max()) for o, e in zip(out, decoded)) <= 1


# --- proofs ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 2], ids=["chunk1", "chunk2"])
def test_stream_equals_reference(wan, chunk):
    """Frames pushed one at a time == the reference loop: latents of every chunk (the
    window rolls: with 1 sink and a window of 1, chunk 3 sees chunks 0 and 2, chunk 4
    chunks 0 and 3) and the decoded frames, in order."""
    chunks = 5 if chunk == 1 else 4
    n = 1 + 4 * (chunk * chunks - 1)  # 17 or 29 frames: whole chunks
    cfg = config(chunk=chunk)
    frames = clip(n)
    pipe = make_pipeline(wan, cfg)
    latents = []
    denoise = pipe._denoise
    pipe._denoise = lambda z0: latents.append(denoise(z0)) or latents[-1]
    out = stream(pipe, frames)
    pipe.close()
    assert_matches_reference(wan, latents, out, reference_latents(wan, frames, cfg), chunks, n)


def test_frames_one_to_one_in_order_with_a_partial_last_chunk(wan):
    """15 frames (not whole chunks: 1 + 4 + 4 + 4 + 2) of another size in -> 15 out at the
    processing size, in input order; outputs arrive when a chunk completes (after frame
    0, then every 4th), and flush finishes the 2-frame tail."""
    pipe = make_pipeline(wan, config())
    done = []
    pipe.on_output.append(done.append)
    sizes = [len(pipe.process(f)) for f in make_frames(15, 60, 80)]
    assert sizes == [1, 0, 0, 0, 4, 0, 0, 0, 4, 0, 0, 0, 4, 0, 0]
    tail = pipe.flush()
    pipe.close()
    assert len(tail) == 2 and done == list(range(15))
    assert pipe.frames_in == pipe.frames_out == 15
    assert all(o.shape == (48, 64, 3) and o.dtype == np.uint8 for o in tail)
    assert pipe.flush() == []


def test_flush_pads_and_the_padding_never_shows(wan):
    """The flushed tail's outputs are those of a run where the padding frames were real
    inputs (the last frame repeated), and the stream after such a flush starts afresh."""
    frames = clip(11)  # 1 + 4 + 4 + 2
    pipe = make_pipeline(wan, config())
    flushed = stream(pipe, frames)
    padded = stream(pipe, frames[:11] + [frames[10]] * 2, flush=False)  # a new stream after the padded flush
    pipe.close()
    assert len(flushed) == 11 and len(padded) == 13
    assert all(np.array_equal(a, b) for a, b in zip(flushed, padded[:11]))


def test_reset_gives_a_fresh_stream(wan):
    """After part of another clip and a reset, a clip comes out as from a new pipeline
    (KV cache, VAE caches, chunk count and noise all start again)."""
    pipe = make_pipeline(wan, config())
    stream(pipe, clip(7, seed=3), flush=False)
    pipe.reset()
    again = stream(pipe, clip(9))
    pipe.close()
    fresh_pipe = make_pipeline(wan, config())
    fresh = stream(fresh_pipe, clip(9))
    fresh_pipe.close()
    assert len(again) == len(fresh) == 9
    assert all(np.array_equal(a, b) for a, b in zip(again, fresh))


def test_update_prompt_applies_from_the_next_chunk(wan):
    """update(prompt) in the middle of chunk 2 (frames 5-8) leaves it alone and changes
    chunk 3 on (frames 9-12): the same frames as an update right after chunk 2 ends."""
    frames = clip(13)

    def run(update_after: int | None):
        pipe = make_pipeline(wan, config(prompt="a watercolor"))
        out = []
        for i, f in enumerate(frames):
            out.extend(pipe.process(f))
            if i == update_after:
                pipe.update(prompt="a pencil sketch")
        out.extend(pipe.flush())
        pipe.close()
        return out

    mid, boundary, never = run(6), run(8), run(None)
    assert len(mid) == len(boundary) == len(never) == 13
    assert all(np.array_equal(a, b) for a, b in zip(mid, boundary))
    assert all(np.array_equal(a, b) for a, b in zip(mid[:9], never[:9]))
    assert all(not np.array_equal(a, b) for a, b in zip(mid[9:], never[9:]))


# --- recache on a prompt switch (LongLive) ----------------------------------------------


def switched_stream(wan, cfg, chunks: int, switch_at: int, prompt: str, recache: bool):
    """Stream `chunks` chunks of 1 latent frame, switching to `prompt` before chunk `switch_at`.

    Returns:
        (the denoiser's inputs z0 and outputs x0 per chunk, each (1, 16, 1, h, w), the pipeline).
    """
    pipe = make_pipeline(wan, cfg)
    pipe.recache = recache
    z0s, x0s = [], []
    denoise = pipe._denoise

    def spy(z0):
        z0s.append(z0)
        x0s.append(denoise(z0))
        return x0s[-1]

    pipe._denoise = spy
    for i, f in enumerate(clip(1 + 4 * (chunks - 1), seed=2)):
        pipe.process(f)
        if i == 4 * (switch_at - 1):  # the last frame of chunk switch_at - 1
            pipe.update(prompt=prompt)
    pipe.close()
    return z0s, x0s, pipe


def reference_after_switch(wan, cfg, z0s, clean, switch_at: int, prompt: str) -> list[torch.Tensor]:
    """The chunks from `switch_at` on, from the formulas, after a recache under `prompt`.

    A fresh stream under `prompt` fed the chunks cached at the switch: the stock
    transformer over every frame position 0..m, the clean latents of the cached chunks
    (sinks 0..S-1, window n-W..n-1: `clean`, what the stream recorded before the switch)
    at t = 0, under a block mask where a cached chunk attends to the cached chunks before
    it, every later chunk to the sinks and its window, and the evicted chunks (zeros here)
    to nobody else and by nobody. Noise as in `reference_latents`.
    """
    policy = cfg.video.block_causal
    sinks, window, n = policy.sink_chunks, policy.window_chunks, switch_at
    kept = set(range(min(sinks, n))) | set(range(max(sinks, n - window), n))
    sigmas = [cfg.strength * (cfg.steps - k) / cfg.steps for k in range(cfg.steps)]
    emb = text(wan, prompt)
    generator = torch.Generator().manual_seed(cfg.seed)
    for _ in range(n):  # the noise of the chunks before the switch
        torch.randn((len(sigmas), *z0s[0].shape), generator=generator)
    tokens = (z0s[0].shape[3] // 2) * (z0s[0].shape[4] // 2)
    prefix = [clean[c] if c in kept else torch.zeros_like(clean[c]) for c in range(n)]
    out = []
    for m in range(n, len(z0s)):
        def sees(q, k):
            if q in kept:
                return k in kept and k < q
            return q >= n and k < q and (k < sinks or k >= q - window)

        c = torch.arange(m + 1).repeat_interleave(tokens)
        mask = (c[:, None] == c[None, :]) | torch.tensor([[sees(q, k) for k in range(m + 1)] for q in range(m + 1)]
                                                         ).repeat_interleave(tokens, 0).repeat_interleave(tokens, 1)
        noise = torch.randn((len(sigmas), *z0s[m].shape), generator=generator)
        x = (1 - sigmas[0]) * z0s[m] + sigmas[0] * noise[0]
        for k, s in enumerate(sigmas):
            t = torch.tensor([0.0] * (m * tokens) + [1000 * s] * tokens)[None]  # (1, L)
            with torch.no_grad(), stock_wan_attention_with_mask(wan.transformer, mask):
                v = wan.transformer(torch.cat([*prefix, x], dim=2), t, encoder_hidden_states=emb,
                                    return_dict=False)[0][:, :, m:]
            x0 = x - s * v
            if k + 1 < len(sigmas):
                x = (1 - sigmas[k + 1]) * x0 + sigmas[k + 1] * noise[k + 1]
        prefix.append(x0)
        out.append(x0)
    return out


def test_recache_equals_a_fresh_stream_over_the_cached_chunks(wan):
    """The prompt switches before chunk 5 (1 sink, window 2: chunks 1 and 2 already
    evicted, the window {3, 4} not contiguous with the sink, its ring rotated): with the
    recache, chunks 5-7 equal the reference of a fresh stream under the new prompt fed
    the cached chunks 0, 3, 4 at their own positions (ATOL 1e-5); without it chunk 5
    differs by far more. 3 extra transformer calls, once; the KV cache and the latent
    ring keep their storage."""
    cfg = config(prompt="a watercolor", sinks=1, window=2)
    z0s, x0s, pipe = switched_stream(wan, cfg, chunks=8, switch_at=5, prompt="a pencil sketch", recache=True)
    expected = reference_after_switch(wan, cfg, z0s, x0s[:5], 5, "a pencil sketch")
    worst = max((a - b).abs().max().item() for a, b in zip(x0s[5:], expected))
    assert worst < 1e-5
    assert pipe.unet_calls == 8 * (cfg.steps + 1) + 3
    _, stale, _ = switched_stream(wan, cfg, chunks=6, switch_at=5, prompt="a pencil sketch", recache=False)
    assert (stale[5] - expected[0]).abs().max() > 100 * 1e-5


def test_recache_before_the_window_rolls_equals_fresh_record_calls(wan):
    """Before anything is evicted (switch before chunk 2, 1 sink, window 2) the recache is
    what a fresh mechanism under the new prompt gives when fed the cached chunks' clean
    latents by record calls (its public calls), then the next chunk's attend calls with
    the stream's noise: equal to 1e-5. Storage of the caches unchanged by the switch."""
    cfg = config(prompt="a watercolor", sinks=1, window=2)
    pipe = make_pipeline(wan, cfg)
    z0s, x0s = [], []
    denoise = pipe._denoise
    pipe._denoise = lambda z0: z0s.append(z0) or x0s.append(denoise(z0)) or x0s[-1]
    frames = clip(9, seed=4)
    stream(pipe, frames[:5], flush=False)
    storages = [t.untyped_storage().data_ptr() for t in pipe.mechanism.state.tensors()] + [pipe._clean.data_ptr()]
    pipe.update(prompt="a pencil sketch", recache=True)
    stream(pipe, frames[5:], flush=False)
    assert storages == [t.untyped_storage().data_ptr() for t in pipe.mechanism.state.tensors()] + [
        pipe._clean.data_ptr()]
    pipe.close()

    mech = make_mechanism(cfg, wan)
    emb = wan.encode_text(["a pencil sketch"])
    sigmas = cfg.video.sigmas(cfg.strength, cfg.steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    for _ in range(2):
        torch.randn((len(sigmas), *z0s[0].shape), generator=generator)
    record = BatchLayout.branch_major("record", 0, ("cond",), 1, 1)
    attend = BatchLayout.branch_major("attend", 0, ("cond",), 1, 1)
    with torch.no_grad(), mech.attach(wan.transformer):
        for c in range(2):
            mech.before_unet(record)
            mech.call_unet(wan.transformer, x0s[c], torch.zeros(1), emb, record)
        noise = torch.randn((len(sigmas), *z0s[2].shape), generator=generator)
        x = (1 - sigmas[0]) * z0s[2] + sigmas[0] * noise[0]
        for k, s in enumerate(sigmas):
            mech.before_unet(attend)
            x0 = x - s * mech.call_unet(wan.transformer, x, torch.tensor([1000 * s]), emb, attend)
            if k + 1 < len(sigmas):
                x = (1 - sigmas[k + 1]) * x0 + sigmas[k + 1] * noise[k + 1]
    assert (x0s[2] - x0).abs().max() < 1e-5


def test_recache_policy_refused_when_not_a_bool(wan):
    pipe = make_pipeline(wan, config())
    with pytest.raises(ConfigError):
        pipe.update(recache="yes")
    pipe.update(recache=False)
    assert pipe.recache is False


def test_same_seed_same_frames_and_seed_changes_noise(wan):
    a, b, c = (make_pipeline(wan, config(seed=s)) for s in (SEED, SEED, SEED + 1))
    outs = [stream(p, clip(5)) for p in (a, b, c)]
    for p in (a, b, c):
        p.close()
    assert all(np.array_equal(x, y) for x, y in zip(outs[0], outs[1]))
    assert not all(np.array_equal(x, y) for x, y in zip(outs[0], outs[2]))


def test_sigmas():
    """Default: --steps levels evenly spaced from the strength down; explicit timesteps /
    1000 (StreamDiffusionV2's); warped by the shift as FlowMatchEulerDiscreteScheduler."""
    assert CausalVideoConfig().sigmas(0.7, None) == pytest.approx((0.7, 0.35))
    assert CausalVideoConfig(timesteps=(700, 500)).sigmas(0.3, 4) == pytest.approx((0.7, 0.5))
    assert CausalVideoConfig(timesteps=(500,), warp=True).sigmas(0.3, 4, shift=3.0) == pytest.approx((0.75,))
    with pytest.raises(ConfigError):
        CausalVideoConfig(timesteps=(500, 700))


# --- the CLI, the model bundle and the refusals ---------------------------------------


@pytest.mark.parametrize("options", [[], ["--video-stream-batch", "--steps", "3"],
                                     ["--sink-policy", "adaptive", "--adapt-sink-threshold", "0.5"],
                                     ["--motion-noise", "--motion-max-drop", "0.2"]],
                         ids=["default", "stream-batch", "adaptive-sink", "motion-noise"])
def test_cli_run_causal_video_end_to_end(tmp_path, capsys, options):
    import av

    from diffstream.cli import main
    from diffstream.testing import write_video

    path = write_video(tmp_path / "clip.mp4", make_frames(11, 48, 64), fps=25)
    out = tmp_path / "out.mp4"
    assert main(["run", path, "-o", str(out), "--method", "causal-video", "--model", "tiny-wan", "--prompt", "x",
                 "--size", "64", "--no-progress", *options]) == 0
    with av.open(str(out)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 11
    assert "wrote 11 frames" in capsys.readouterr().err


def test_cli_cache_policy_options_reach_the_config_and_bad_pairs_are_one_line(tmp_path, capsys):
    from diffstream.cli import build_parser, main
    from diffstream.commands.run import run_config

    args = build_parser().parse_args(["run", "in.mp4", "-o", "o.mp4", "--method", "causal-video", "--model",
                                      "tiny-wan", "--prompt", "x", "--sink-policy", "adaptive", "--adapt-sink-threshold", "0.3",
                                      "--no-recache", "--sink-chunks", "2"])
    video = run_config(args).stream.video
    assert (video.block_causal.sink_policy, video.block_causal.adapt_sink_threshold) == ("adaptive", 0.3)
    assert (video.kv_record, video.stream_batch, video.recache) == ("clean", False, False)
    args = build_parser().parse_args(["run", "in.mp4", "-o", "o.mp4", "--method", "causal-video", "--model",
                                      "tiny-wan", "--prompt", "x", "--video-stream-batch", "--steps", "3"])
    config = run_config(args)
    assert (config.stream.video.kv_record, config.stream.video.stream_batch) == ("steps", True)
    assert config.stream.video_cache_rows == 3 and config.stream.video.motion_noise is None
    args = build_parser().parse_args(["run", "in.mp4", "-o", "o.mp4", "--method", "causal-video", "--model",
                                      "tiny-wan", "--prompt", "x", "--motion-noise", "--motion-momentum", "0.5"])
    assert run_config(args).stream.video.motion_noise == MotionNoiseConfig(momentum=0.5)
    for bad, says in ((["--video-stream-batch", "--kv-record", "clean"], "--kv-record"),
                      (["--video-stream-batch", "--sink-policy", "adaptive"], "--sink-policy fixed"),
                      (["--motion-noise", "--motion-momentum", "1"], "--motion-momentum")):
        assert main(["run", str(tmp_path / "missing.mp4"), "-o", str(tmp_path / "o.mp4"), "--method",
                     "causal-video", "--model", "tiny-wan", "--prompt", "x", *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and len(err.splitlines()) == 1


def test_saved_folder_loads_by_path(wan, tmp_path):
    """The tiny model saved as a Wan diffusers folder (save_pretrained of each part) loads
    through `load_components` by path, every part by its from_pretrained, equal weights."""
    import json

    from diffstream.models.loading import load_components
    from diffstream.models.wan import WanComponents

    for part in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        getattr(wan, part).save_pretrained(tmp_path / part)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    loaded = load_components(ModelConfig(model=str(tmp_path), device="cpu"))
    assert isinstance(loaded, WanComponents) and loaded.shift == wan.shift
    for part in ("transformer", "vae", "text_encoder"):
        ours, theirs = getattr(wan, part).state_dict(), getattr(loaded, part).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), part
    assert torch.equal(loaded.encode_text(["a cat"]), wan.encode_text(["a cat"]))


def test_methods_and_models_refuse_each_other(wan, tiny):
    from diffstream.server.engine import probe_methods

    assert probe_methods(wan, StreamConfig(prompt="x"))[0] == ("causal-video",)
    usable, reasons = probe_methods(tiny, StreamConfig(prompt="x"))
    assert "causal-video" not in usable and "Wan" in reasons["causal-video"]
    for bad in (lambda: make_pipeline(tiny, config()), lambda: make_mechanism(StreamConfig(method="streamv2v"), wan),
                lambda: RunConfig(model=ModelConfig(model="tiny-wan"), stream=StreamConfig()),
                lambda: RunConfig(model=ModelConfig(model="tiny"), stream=config()),
                lambda: StreamConfig(method="causal-video", guidance=2.0),
                lambda: StreamConfig(method="causal-video", noise="fixed"),
                lambda: StreamConfig(method="causal-video", similarity_threshold=0.9),
                lambda: make_pipeline(wan, config()).update(video=CausalVideoConfig())):
        with pytest.raises(ConfigError) as e:
            bad()
        assert "\n" not in str(e.value)
    from diffstream.models.loading import load_components

    with pytest.raises(ConfigError):
        load_components(ModelConfig(model="tiny-wan", device="cpu", controlnets=(("canny", "tiny"),)))


# --- StreamDiffusionV2's KV policy and stream batch ---------------------------------------
# Every denoising step writes a KV cache of its own (`kv_record="steps"`), and the K steps
# of K consecutive chunks run as one transformer call (`stream_batch`). The oracle
# (`reference_steps_latents`), from the formulas alone: the whole clip VAE-encoded in one
# shot; each chunk's noise drawn in chunk order from one generator seeded by the seed,
# (steps, 1, 16, F, h, w) per chunk; then *step by step over the whole clip*: the stock
# transformer on every chunk at once at step k's timestep under the sink + window block
# mask, x0 = x - s v, re-noised with each chunk's own noise for the next step. Chunk n's
# step k thus sees chunks < n as they are at step k, which is what a cache per step
# holds. Sequential (one call per step) and stream-batched (one call per K chunks' steps)
# pipelines must both give it.


def steps_config(prompt="a watercolor", chunk=1, sinks=1, window=1, batch=True, steps=3, video=None,
                 **kw) -> StreamConfig:
    video = video or CausalVideoConfig(block_causal=BlockCausalConfig(chunk_frames=chunk, sink_chunks=sinks,
                                                                      window_chunks=window),
                                       kv_record="steps", stream_batch=batch)
    kw = {"strength": 0.8, "steps": steps, "size": 64, "seed": SEED, **kw}
    return StreamConfig(prompt=prompt, method="causal-video", video=video, **kw)


def run_steps(wan, cfg, frames, updates=None, notices=None):
    """Frames through a pipeline; `updates`: {frame index: update kwargs} applied after that push.
    Returns (outputs, the finished chunks' latents in order, the pipeline)."""
    pipe = make_pipeline(wan, cfg)
    if notices is not None:
        pipe.on_notice.append(notices.append)
    latents = []
    decode = pipe._decode
    pipe._decode = lambda x0, indices: latents.append(x0.clone()) or decode(x0, indices)
    out = []
    for i, f in enumerate(frames):
        out.extend(pipe.process(f))
        if updates and i in updates:
            pipe.update(**updates[i])
    out.extend(pipe.flush())
    pipe.close()
    return out, latents, pipe


def reference_steps_latents(wan, frames, cfg: StreamConfig) -> torch.Tensor:
    """(1, 16, T, h, w) the clip's denoised latents under the per-step-cache policy (module docstring)."""
    (chunk, sinks, window), sigmas, z = encoded_clip(wan, frames, cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    per_chunk = [torch.randn((len(sigmas), *z[:, :, :chunk].shape), generator=generator)
                 for _ in range(z.shape[2] // chunk)]
    noise = [torch.cat([n[k] for n in per_chunk], dim=2) for k in range(len(sigmas))]  # K x (1, 16, T, h, w)
    mask = block_mask(z.shape[2], chunk, sinks, window, (z.shape[3] // 2) * (z.shape[4] // 2))
    emb = text(wan, cfg.prompt)
    x = (1 - sigmas[0]) * z + sigmas[0] * noise[0]
    for k, s in enumerate(sigmas):
        with torch.no_grad(), stock_wan_attention_with_mask(wan.transformer, mask):
            v = wan.transformer(x, torch.tensor([1000.0 * s]), encoder_hidden_states=emb, return_dict=False)[0]
        x0 = x - s * v
        if k + 1 < len(sigmas):
            x = (1 - sigmas[k + 1]) * x0 + sigmas[k + 1] * noise[k + 1]
    return x0


@pytest.mark.parametrize("batch", [False, True], ids=["sequential", "stream-batch"])
@pytest.mark.parametrize("chunk", [1, 2], ids=["chunk1", "chunk2"])
def test_steps_policy_equals_the_step_by_step_reference(wan, batch, chunk):
    """One call per step, or the stream batch (3 steps: 3 chunks in one call, the first
    and last two calls with fewer rows), == the stock model over the whole clip step by
    step: every chunk's latents (the window rolls: 1 sink, window 1) and the frames."""
    chunks = 6 if chunk == 1 else 4
    n = 1 + 4 * (chunk * chunks - 1)
    cfg = steps_config(chunk=chunk, batch=batch)
    frames = clip(n)
    out, latents, pipe = run_steps(wan, cfg, frames)
    assert_matches_reference(wan, latents, out, reference_steps_latents(wan, frames, cfg), chunks, n)
    # one transformer call per chunk step, or per K chunk steps (plus the K - 1 draining calls)
    assert pipe.unet_calls == (chunks + 2 if batch else 3 * chunks)


def test_the_reference_tells_the_policies_apart(wan):
    """The clean-record policy (Self-Forcing's) gives other latents on the same clip: the
    proof above would catch a pipeline that records clean chunks."""
    frames = clip(17)
    cfg = steps_config(batch=False)
    clean = StreamConfig(**{**cfg.__dict__, "video": CausalVideoConfig(block_causal=cfg.video.block_causal)})
    _, latents, _ = run_steps(wan, clean, frames)
    assert (torch.cat(latents, dim=2) - reference_steps_latents(wan, frames, cfg)).abs().max() > 100 * ATOL


def test_stream_batch_equals_sequential_across_a_prompt_switch(wan):
    """A prompt switch mid-stream: each chunk keeps the text it began with through its
    steps (per-row text), so the stream batch gives the sequential frames; a notice says
    that this cache policy has no recache."""
    frames = clip(21)
    notices = []
    switch = {6: dict(prompt="a pencil sketch")}
    batched, batched_z, _ = run_steps(wan, steps_config(batch=True), frames, switch, notices)
    sequential, sequential_z, _ = run_steps(wan, steps_config(batch=False), frames, switch)
    _, unswitched_z, _ = run_steps(wan, steps_config(batch=False), frames)
    assert len(batched) == len(sequential) == 21
    assert (torch.cat(batched_z, dim=2) - torch.cat(sequential_z, dim=2)).abs().max() < ATOL
    assert max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(batched, sequential)) <= 1
    assert (torch.cat(sequential_z, dim=2) - torch.cat(unswitched_z, dim=2)).abs().max() > 100 * ATOL
    assert len(notices) == 1 and "recache" in notices[0]


def test_a_schedule_change_finishes_the_chunks_in_flight(wan):
    """update(strength) mid-stream: the chunks in flight finish under the old schedule
    (drained early), later chunks take the new one: the sequential frames. A change of
    the number of steps restarts the per-step caches with a notice; frames stay 1:1."""
    frames = clip(25)
    change = {8: dict(strength=0.6)}
    batched, batched_z, _ = run_steps(wan, steps_config(batch=True), frames, change)
    sequential, sequential_z, _ = run_steps(wan, steps_config(batch=False), frames, change)
    assert len(batched) == len(sequential) == 25
    assert (torch.cat(batched_z, dim=2) - torch.cat(sequential_z, dim=2)).abs().max() < ATOL
    assert max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(batched, sequential)) <= 1
    notices = []
    steps_b, steps_bz, pipe = run_steps(wan, steps_config(batch=True), frames, {8: dict(steps=2)}, notices)
    steps_s, steps_sz, _ = run_steps(wan, steps_config(batch=False), frames, {8: dict(steps=2)})
    assert len(steps_b) == 25 and pipe.frames_out == 25
    assert (torch.cat(steps_bz, dim=2) - torch.cat(steps_sz, dim=2)).abs().max() < ATOL
    assert max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(steps_b, steps_s)) <= 1
    assert len(notices) == 1 and "starts again" in notices[0]


def test_stream_batch_latency_and_flush(wan):
    """With K = 3 steps the first output comes 2 chunks later than without; flush drains the
    chunks in flight and the padded tail: 14 frames in, 14 out, in order."""
    pipe = make_pipeline(wan, steps_config(batch=True))
    done = []
    pipe.on_output.append(done.append)
    sizes = [len(pipe.process(f)) for f in clip(14)]
    assert sizes == [0] * 8 + [1, 0, 0, 0, 4, 0]
    assert pipe.latency_frames == 3 + 2 * 4
    tail = pipe.flush()
    pipe.close()
    assert len(tail) == 9 and done == list(range(14))


def test_policies_that_cannot_go_together_are_refused(wan):
    """The stream batch needs per-step caches and fixed sinks; the recache needs clean records."""
    with pytest.raises(ConfigError, match="kv-record"):
        CausalVideoConfig(kv_record="clean", stream_batch=True)
    with pytest.raises(ConfigError, match="sink-policy fixed"):
        CausalVideoConfig(block_causal=BlockCausalConfig(sink_policy="adaptive"), stream_batch=True)
    with pytest.raises(ConfigError, match="no-recache"):
        CausalVideoConfig(stream_batch=True, recache=True)
    pipe = make_pipeline(wan, steps_config(batch=True))  # recache left out: off for this policy
    assert pipe.recache is False
    with pytest.raises(ConfigError, match="no-recache"):
        pipe.update(recache=True)
    assert pipe.recache is False
    pipe.close()


@pytest.mark.parametrize("batch", [False, True], ids=["sequential", "stream-batch"])
def test_text_keys_values_are_projected_once_per_prompt(wan, batch):
    """The cross-attention cache (StreamDiffusionV2's `crossattn_cache`) computes each
    block's text keys/values once per prompt: a stream with one switch misses in every
    layer at the start and at the switch, and hits everywhere else. With the stream batch
    (K = 3) also once per batch size and in the calls whose rows mix the two prompts:
    rows 1, 2, 3 at the start, 2 mixed calls, the new prompt at 3 rows, draining at 2, 1."""
    frames = clip(21)
    cfg = steps_config(batch=True) if batch else config()
    pipe = make_pipeline(wan, cfg)
    for i, f in enumerate(frames):
        pipe.process(f)
        if i == 6:
            pipe.update(prompt="a pencil sketch")
    pipe.flush()
    pipe.close()
    cross = pipe.mechanism.cross
    layers = len(wan.transformer.blocks)
    rounds = 3 + 2 + 1 + 2 if batch else 2
    assert cross.misses == layers * rounds
    assert cross.hits == layers * pipe.unet_calls - cross.misses


# --- motion-aware noise (StreamDiffusionV2) ------------------------------------------------


def moving_clip(steps) -> list[np.ndarray]:
    """Frames that move by the given amounts: frame i = a + (b - a) * position_i, position
    advancing by steps[i - 1], so each consecutive difference is a known multiple of b - a."""
    a = clip(1, seed=9)[0].astype(np.float64)
    b = 255.0 - a  # far from a: a whole step is past full motion
    positions = np.concatenate([[0.0], np.cumsum(steps)])
    return [np.clip(np.round(a + (b - a) * p), 0, 255).astype(np.uint8) for p in positions]


def motion_sigmas(frames, chunk_frames: int, init: float, reference=0.2, max_drop=0.1, momentum=0.1) -> list[float]:
    """Each chunk's first sigma by StreamDiffusionV2's rule, written here in numpy: the largest
    per-frame RMS difference (pixels in [-1, 1], the frame before the chunk included) over
    `reference`, clamped to [0, 1], lowers init by max_drop; an EMA with weight `momentum`."""
    pixels = [f.astype(np.float64) / 127.5 - 1 for f in frames]
    sizes = [1 + 4 * (chunk_frames - 1)] + [4 * chunk_frames] * ((len(frames) - 1) // (4 * chunk_frames))
    out, start, previous = [], 0, init
    for size in sizes:
        group = pixels[max(0, start - 1):start + size]
        rms = [np.sqrt(np.mean((y - x) ** 2)) for x, y in zip(group, group[1:])]
        d = min(max(max(rms, default=0.0) / reference, 0.0), 1.0)
        previous = (init - max_drop * d) * (1 - momentum) + previous * momentum
        out.append(previous)
        start += size
    return out


def test_motion_aware_noise_equals_the_rule_by_hand(wan):
    """With --motion-noise each chunk is noised, and its first step run, at the sigma its
    motion gives (the rule in numpy above, fed to the reference loop): a still chunk, slow
    ones, a jump past full motion, so the EMA and the clamp both show."""
    steps = [0.0] * 4 + [0.02] * 4 + [0.0] * 4 + [0.05] * 4 + [1.0] + [0.0] * 3
    frames = moving_clip(steps)  # 21 frames: chunks 1 + 4 x 5
    cfg = config(video=CausalVideoConfig(
        block_causal=BlockCausalConfig(chunk_frames=1, sink_chunks=1, window_chunks=2),
        motion_noise=MotionNoiseConfig()))
    first = motion_sigmas(frames, 1, cfg.strength)
    assert first[1] == pytest.approx(cfg.strength) and 0 < cfg.strength - first[2] < 0.09
    assert min(first) == pytest.approx(cfg.strength - 0.09, abs=0.01)  # the jump: clamped at full motion
    pipe = make_pipeline(wan, cfg)
    latents = []
    denoise = pipe._denoise
    pipe._denoise = lambda z0: latents.append(denoise(z0)) or latents[-1]
    stream(pipe, frames[:9], flush=False)
    pipe.reset()  # a new stream: no frame before its first, the EMA from init
    latents.clear()
    out = stream(pipe, frames)
    pipe.close()
    expected = reference_latents(wan, frames, cfg, first_sigmas=first)
    assert len(out) == 21
    assert (torch.cat(latents, dim=2) - expected).abs().max() < ATOL
    schedule_only = reference_latents(wan, frames, cfg)
    assert (torch.cat(latents, dim=2) - schedule_only).abs().max() > 100 * ATOL


def test_motion_aware_noise_in_the_stream_batch_equals_sequential(wan):
    """Row 0 of the stream batch carries the new chunk's own first sigma: the same latents
    as one call per step."""
    steps = [0.03] * 8 + [0.0] * 4 + [0.3] * 8
    frames = moving_clip(steps)
    video = dict(block_causal=BlockCausalConfig(chunk_frames=1, sink_chunks=1, window_chunks=1),
                 kv_record="steps", motion_noise=MotionNoiseConfig())
    runs = []
    for batch in (True, False):
        cfg = steps_config(video=CausalVideoConfig(stream_batch=batch, **video))
        _, latents, _ = run_steps(wan, cfg, frames)
        runs.append(torch.cat(latents, dim=2))
    assert (runs[0] - runs[1]).abs().max() < ATOL


def test_motion_aware_noise_on_a_still_clip_is_the_plain_schedule(wan):
    frames = [clip(1)[0]] * 13
    cfg = config()
    moving = StreamConfig(**{**cfg.__dict__, "video": CausalVideoConfig(block_causal=cfg.video.block_causal,
                                                                         motion_noise=MotionNoiseConfig())})
    a, b = make_pipeline(wan, cfg), make_pipeline(wan, moving)
    plain, still = stream(a, frames), stream(b, frames)
    assert all(np.array_equal(x, y) for x, y in zip(plain, still))


# --- TAEHV decodes (--tiny-vae, StreamDiffusionV2's --use_taehv) ---------------------------


def test_tiny_vae_decodes_the_stream_as_taehv_does_in_one_shot(tmp_path, capsys):
    """With `--tiny-vae` (a random TAEHV here) the Wan VAE still encodes and TAEHV decodes,
    latent frame by latent frame through its stream: the frames equal TAEHV's own one-shot
    `decode_video` of the stream's latents (its first 3 frames dropped), 1:1 with the
    inputs, and are not the Wan VAE's. A missing file is one line, before the model loads."""
    from diffstream.cli import main
    from diffstream.models.loading import load_components
    from diffstream.testing import write_video

    wan_t = load_components(ModelConfig(model="tiny-wan", device="cpu", tiny_vae="tiny"))
    frames = clip(13)
    pipe = make_pipeline(wan_t, config())
    latents = []
    denoise = pipe._denoise
    pipe._denoise = lambda z0: latents.append(denoise(z0)) or latents[-1]
    out = stream(pipe, frames)
    pipe.close()
    z = torch.cat(latents, dim=2).permute(0, 2, 1, 3, 4)  # (1, T, 16, h, w): the DiT's (normalised) latents
    with torch.no_grad():
        expected = wan_t.tiny_vae.decode_video(z)[0]  # (4T - 3, 3, H, W) in [0, 1]
    expected = (expected.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    assert len(out) == len(expected) == 13
    assert max(int(np.abs(o.astype(int) - e.astype(int)).max()) for o, e in zip(out, expected)) <= 1
    full = reference_frames(wan_t, torch.cat(latents, dim=2))  # the Wan VAE's decoding of the same latents
    assert np.abs(np.stack(out).astype(int) - full.astype(int)).mean() > 10
    path = write_video(tmp_path / "clip.mp4", frames[:5], fps=25)
    assert main(["run", path, "-o", str(tmp_path / "o.mp4"), "--method", "causal-video", "--model", "tiny-wan",
                 "--prompt", "x", "--size", "64", "--tiny-vae", str(tmp_path / "taew2_1.pth")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "taew2_1" in err[-1] and not (tmp_path / "o.mp4").exists()
