"""Proofs of Live2Diff's causal temporal attention at processor level (issue #20).

End to end, the tiny motion modules attend almost uniformly (mean top weight ~1/S), so
window order, positions and cache identity barely move a frame. Here the processor is
driven directly, exactly as the stream engine drives it (warmup calls, then stream-batch
calls whose rows are frames at different steps, unconditional rows first), on a small
diffusers `Attention` whose q/k weights are scaled so that attention is sharp, with
windows of W warmup + 3 recent frames + the current one (the ring wraps several times)
and guidance branches ("full": uncond rows at every step; "initialize": at step 0 only).

Oracles, never the code under test:
- `fig1d_oracle`: the mask of Live2Diff Fig. 1 (d) over the whole clip written as a
  boolean matrix, each query's window positions from it (Appendix A.2: positions are
  window positions 0..S-1, oldest first, so a frame's position changes as the window
  rolls), the sinusoidal table written by hand, and softmax attention by einsum.
- diffusers' own `AttnProcessor2_0` on each query's window (checked equal to the first).
"""

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from diffstream.attention.base import BatchLayout
from diffstream.attention.causal_temporal import (
    CausalTemporal,
    CausalTemporalAttnProcessor,
    CausalTemporalConfig,
    CausalTemporalState,
)

W, WINDOW, STEPS = 3, 7, 3  # R = WINDOW - W - 1 = 3 recent frames: a ring of 4 entries per slot
RECENT = WINDOW - W - 1
STREAMED = 11  # frames after the warmup: every ring wraps twice
TOTAL = W + STREAMED
TOKENS, CHANNELS, HEADS = 3, 32, 2
GAIN = 4.0  # q/k weight scale: sharp attention (see test_inputs_make_order_and_position_visible)


def sinusoids(length: int, channels: int) -> torch.Tensor:
    """AnimateDiff's positional table written from its definition: P[p, 2i] = sin(p w_i),
    P[p, 2i + 1] = cos(p w_i), w_i = 10000^(-2i / C). (length, C)."""
    p = torch.arange(length, dtype=torch.float64)[:, None]
    w = torch.pow(10000.0, -torch.arange(0, channels, 2, dtype=torch.float64) / channels)[None]
    table = torch.zeros(length, channels, dtype=torch.float64)
    table[:, 0::2] = torch.sin(p * w)
    table[:, 1::2] = torch.cos(p * w)
    return table.float()


PE = sinusoids(32, CHANNELS)


def sharpened_attention(bias: bool, seed: int = 0) -> Attention:
    """A temporal self-attention layer like a motion module's (diffusers `Attention`),
    random weights, q/k scaled by GAIN so each query picks out a few frames."""
    torch.manual_seed(seed)
    attn = Attention(query_dim=CHANNELS, heads=HEADS, dim_head=CHANNELS // HEADS, bias=bias, out_bias=True).eval()
    with torch.no_grad():
        for lin in (attn.to_q, attn.to_k):
            lin.weight.mul_(GAIN)
    return attn


@pytest.fixture(scope="module", params=["no-bias", "bias"])
def attn(request):
    """Without q/k/v bias (AnimateDiff's motion modules) and with it (so a bias counted
    into the position terms would show)."""
    return sharpened_attention(bias=request.param == "bias")


def uncond_steps(cfg: str) -> set:
    """Steps whose rows also run an unconditional branch (the stream engine's guidance)."""
    return {"full": set(range(STEPS)), "initialize": {0}, "none": set()}[cfg]


def slot_features(cfg: str, seed: int = 1) -> dict:
    """Position-free layer inputs, distinct per (step, branch) slot: {(k, b): (TOTAL, N, C)}."""
    g = torch.Generator().manual_seed(seed)
    feats = {}
    for k in range(STEPS):
        for b in (["uncond"] if k in uncond_steps(cfg) else []) + ["cond"]:
            # std 0.5 against the unit sinusoids: content and position both steer attention
            feats[(k, b)] = 0.5 * torch.randn(TOTAL, TOKENS, CHANNELS, generator=g)
    return feats


def warmup_layouts(cfg: str):
    """The warmup calls: every step of the W frames, one clip per branch (uncond first)."""
    for k in range(STEPS):
        u = W if k in uncond_steps(cfg) else 0
        yield BatchLayout((k,) * (u + W), ("uncond",) * u + ("cond",) * W, STEPS, "warmup")


def stream_calls(cfg: str):
    """The stream engine's UNet calls after the warmup, as (rows, layout): rows are
    (step, branch, frame), unconditional rows first, each branch newest frame first
    (frame W + tau at step 0, the one before at step 1, ...; the last calls drain)."""
    for tau in range(STREAMED + STEPS - 1):
        rows = [(k, W + tau - k) for k in range(STEPS) if 0 <= tau - k < STREAMED]
        uncond = [(k, "uncond", f) for k, f in rows if k in uncond_steps(cfg)]
        cond = [(k, "cond", f) for k, f in rows]
        both = uncond + cond
        yield both, BatchLayout(tuple(k for k, _, _ in both), tuple(b for _, b, _ in both), STEPS, "stream")


def drive(attn, feats: dict, cfg: str, state: CausalTemporalState | None = None) -> dict:
    """Run the processor under test through a whole stream: {(k, b, frame): (N, C)}.

    The inputs are what the motion block hands its attention: x + P[0..W-1] for a
    warmup clip, x + P[0] for a streamed row (one frame per row).

    Args:
        state: the caches to use (default: new ones).
    """
    state = state or CausalTemporalState(CausalTemporalConfig(warmup_frames=W, window=WINDOW))
    proc = CausalTemporalAttnProcessor(state, "layer", PE)
    out = {}
    with torch.no_grad():
        for k, layout in enumerate(warmup_layouts(cfg)):
            branches = list(dict.fromkeys(layout.branches))  # ["uncond", "cond"] or ["cond"]
            state.begin_call(layout)
            hidden = torch.cat([feats[(k, b)][:W].transpose(0, 1) for b in branches]) + PE[:W]  # (videos*N, W, C)
            result = proc(attn, hidden).view(len(branches), TOKENS, W, CHANNELS)
            for v, b in enumerate(branches):
                for f in range(W):
                    out[(k, b, f)] = result[v, :, f]
        for rows, layout in stream_calls(cfg):
            state.begin_call(layout)
            hidden = torch.stack([feats[(k, b)][f] for k, b, f in rows]) + PE[0]  # (rows, N, C)
            result = proc(attn, hidden.reshape(len(rows) * TOKENS, 1, CHANNELS)).view(len(rows), TOKENS, CHANNELS)
            for r, key in enumerate(rows):
                out[key] = result[r]
    return out


def fig1d_mask(total: int, warmup: int, recent: int) -> torch.Tensor:
    """Live2Diff Fig. 1 (d): M[t, j] = frame t attends to frame j. The warmup frames attend
    to each other both ways; a later frame attends to the warmup frames, its `recent`
    predecessors and itself. (total, total) bool."""
    t = torch.arange(total)[:, None]
    j = torch.arange(total)[None, :]
    warm = (t < warmup) & (j < warmup)
    streamed = (t >= warmup) & ((j < warmup) | ((j >= t - recent) & (j <= t)))
    return warm | streamed


def fig1d_oracle(attn, x: torch.Tensor, recent: int = RECENT, newest_first: bool = False, tops: list | None = None):
    """Masked attention over the whole clip of one (step, branch) slot, by hand.

    Args:
        x: (T, N, C) position-free inputs of every frame.
        newest_first: a deliberately wrong window (recent frames newest first), only for
            the visibility check.
        tops: if given, each streamed frame's mean top attention weight is appended.
    Returns:
        (T, N, C): each frame's attention output (after to_out).
    """
    total = x.shape[0]
    mask = fig1d_mask(total, W, recent)
    d = CHANNELS // HEADS
    out = torch.empty_like(x)
    with torch.no_grad():
        for t in range(total):
            visible = mask[t].nonzero()[:, 0].tolist()  # oldest first
            if newest_first and t >= W:
                visible = visible[:W] + visible[W:-1][::-1] + visible[-1:]
            keys_in = x[visible] + PE[: len(visible), None]  # (S, N, C): K = W_k (x + P[window position]) + b
            q = attn.to_q(x[t] + PE[visible.index(t)]).view(TOKENS, HEADS, d)
            k = attn.to_k(keys_in).view(len(visible), TOKENS, HEADS, d)
            v = attn.to_v(keys_in).view(len(visible), TOKENS, HEADS, d)
            weights = torch.softmax(torch.einsum("nhd,snhd->nhs", q, k) / math.sqrt(d), dim=-1)  # (N, heads, S)
            if tops is not None and t >= W:
                tops.append(float(weights.amax(-1).mean()))
            out[t] = attn.to_out[0](torch.einsum("nhs,snhd->nhd", weights, v).reshape(TOKENS, CHANNELS))
    return out


def window_oracle_diffusers(attn, x: torch.Tensor, t: int) -> torch.Tensor:
    """Frame t's output from diffusers' stock attention over its window, as the motion
    block would run it on that window alone (positions 0..S-1). (N, C)."""
    visible = fig1d_mask(x.shape[0], W, RECENT)[t].nonzero()[:, 0].tolist()
    window = (x[visible] + PE[: len(visible)][:, None]).transpose(0, 1)  # (N, S, C)
    with torch.no_grad():
        return AttnProcessor2_0()(attn, window)[:, visible.index(t)]


def assert_matches(ours: dict, feats: dict, attn, keys=None):
    """Every (step, branch, frame) output equals the Fig. 1 (d) oracle of its slot."""
    expected = {slot: fig1d_oracle(attn, x) for slot, x in feats.items()}
    keys = keys or sorted(ours)
    assert len(ours) == len(feats) * TOTAL
    for k, b, f in keys:
        torch.testing.assert_close(ours[(k, b, f)], expected[(k, b)][f], atol=2e-5, rtol=1e-4,
                                   msg=lambda m: f"step {k} {b} frame {f}: {m}")


# --- the oracles themselves -------------------------------------------------------------


def test_hand_sinusoids_are_the_motion_modules_table():
    from diffusers.models.embeddings import SinusoidalPositionalEmbedding

    torch.testing.assert_close(PE, SinusoidalPositionalEmbedding(CHANNELS, 32).pe[0])


def test_fig1d_oracle_equals_diffusers_attention_on_each_window(attn):
    """The hand-written masked attention is diffusers' own attention on each frame's window."""
    x = slot_features("none")[(0, "cond")]
    expected = fig1d_oracle(attn, x)
    for t in range(TOTAL):
        torch.testing.assert_close(expected[t], window_oracle_diffusers(attn, x, t), atol=2e-5, rtol=1e-4)


def test_inputs_make_order_and_position_visible(attn):
    """Guard against vacuous proofs: with these inputs attention is sharp, and a window
    in the wrong order changes the streamed outputs by far more than the tolerance."""
    x = slot_features("none")[(0, "cond")]
    tops = []
    right, wrong = fig1d_oracle(attn, x, tops=tops), fig1d_oracle(attn, x, newest_first=True)
    assert sum(tops) / len(tops) > 0.6, tops  # uniform over a full window would be 1/7
    gap = (right[W + RECENT + 1 :] - wrong[W + RECENT + 1 :]).abs().amax(dim=(1, 2))
    assert gap.min() > 0.02, gap  # every full-window frame moves, >> the 2e-5 tolerance


# --- the processor under test -----------------------------------------------------------


@pytest.mark.parametrize("cfg", ["full", "initialize"])
def test_stream_equals_fig1d_masked_attention(attn, cfg):
    """Warmup, ring filling, ring wrapping and draining: every row of every call (both
    branches, every step) equals the masked full-clip attention of Fig. 1 (d) with
    window positions (Appendix A.2), although the processor saw each frame once and
    read every past key/value from its KV cache."""
    feats = slot_features(cfg)
    assert_matches(drive(attn, feats, cfg), feats, attn)


def test_branches_do_not_share_caches(attn):
    """Sec. 3.4 keeps one cache per (layer, step) and guidance branch: changing every
    unconditional input leaves every conditional output as it was, and vice versa."""
    feats = slot_features("full")
    base = drive(attn, feats, "full")
    for changed in ("uncond", "cond"):
        other = {slot: x + (torch.randn_like(x) if slot[1] == changed else 0) for slot, x in feats.items()}
        moved = drive(attn, other, "full")
        kept = "cond" if changed == "uncond" else "uncond"
        for key in base:
            if key[1] == kept:
                torch.testing.assert_close(moved[key], base[key], atol=1e-6, rtol=0, msg=f"{key} read {changed}")
            else:
                assert (moved[key] - base[key]).abs().max() > 1e-3, key


def test_steps_do_not_share_caches(attn):
    """One cache per denoising step: changing step k's inputs changes step k's outputs only."""
    feats = slot_features("full")
    base = drive(attn, feats, "full")
    for step in range(STEPS):
        other = {slot: x + (torch.randn_like(x) if slot[0] == step else 0) for slot, x in feats.items()}
        moved = drive(attn, other, "full")
        for key in base:
            if key[0] != step:
                torch.testing.assert_close(moved[key], base[key], atol=1e-6, rtol=0, msg=f"{key} read step {step}")


def test_no_frame_sees_the_future(attn):
    """Uni-directional attention: changing frames after t changes nothing up to t (the
    warmup frames only see each other)."""
    feats = slot_features("initialize")
    base = drive(attn, feats, "initialize")
    for t in (W - 1, W + 2, W + 6):
        other = {slot: torch.cat([x[: t + 1], x[t + 1 :] + torch.randn_like(x[t + 1 :])]) for slot, x in feats.items()}
        moved = drive(attn, other, "initialize")
        for key in base:
            if key[2] <= t:
                torch.testing.assert_close(moved[key], base[key], atol=1e-6, rtol=0)


def test_a_new_warmup_starts_new_caches(attn):
    """A warmup after streaming is a new stream (e.g. after a schedule change): nothing of
    the old stream's caches is read; the second stream equals the oracle on its own inputs."""
    state = CausalTemporalState(CausalTemporalConfig(warmup_frames=W, window=WINDOW))
    drive(attn, slot_features("full", seed=5), "full", state)
    feats = slot_features("full", seed=6)
    assert_matches(drive(attn, feats, "full", state), feats, attn)


def test_warmup_is_bidirectional_diffusers_attention(attn):
    """Sec. 3.3: the W warmup frames attend to each other both ways: their outputs are
    diffusers' stock (unmasked) attention over the clip, and the first frame moves when
    the last warmup frame changes."""
    feats = slot_features("full")
    ours = drive(attn, feats, "full")
    for (k, b), x in feats.items():
        with torch.no_grad():
            stock = AttnProcessor2_0()(attn, (x[:W] + PE[:W, None]).transpose(0, 1))  # (N, W, C)
        for f in range(W):
            torch.testing.assert_close(ours[(k, b, f)], stock[:, f], atol=2e-5, rtol=1e-4)
    other = {slot: torch.cat([x[: W - 1], x[W - 1 :] + 1.0]) for slot, x in feats.items()}
    moved = drive(attn, other, "full")
    assert all((moved[(k, b, 0)] - ours[(k, b, 0)]).abs().max() > 1e-3 for k, b in feats)


# --- depth prior (Sec. 3.2): each row's residual is its own frame's --------------------

DEPTH_W, DEPTH_WINDOW, DEPTH_STEPS = 3, 6, 2


@pytest.fixture(scope="module")
def video():
    from diffstream.config import ModelConfig
    from diffstream.models.loading import load_components

    return load_components(ModelConfig(model="tiny", motion_adapter="tiny", device="cpu"))


def trained_depth_prior(video):
    """A depth module with non-zero output (Live2Diff zero-initialises it; trained, it is not)."""
    from diffstream.models.motion import DepthPrior
    from diffstream.models.tiny import randomize

    return randomize(DepthPrior(out_channels=video.unet.conv_in.out_channels), seed=1, std=0.05)


def test_call_unet_adds_each_rows_own_depth_residual(video):
    """Through `CausalTemporal.call_unet` and its conv_in hook, in a warmup call (two
    videos: uncond and cond clips, rows in (video, frame) order) and a stream-batch call
    (rows = different frames at different steps, uncond rows first): conv_in's output
    for row r is conv_in(sample_r) + prior(depth_r), with a distinct depth latent per frame
    (the prior run on that frame alone)."""
    prior = trained_depth_prior(video)
    mech = CausalTemporal(CausalTemporalConfig(warmup_frames=DEPTH_W, window=DEPTH_WINDOW),
                          conditioner=video.encode_image, depth_prior=prior)
    unet = video.unet
    g = torch.Generator().manual_seed(3)
    latent = (unet.config.in_channels, 6, 8)
    emb = video.encode_prompt(["a fox"])  # (1, 77, D)
    seen = []
    with mech.attach(unet), torch.no_grad():
        hook = unet.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
        try:
            def call(layout, depth):
                rows = layout.batch_size
                # small inputs: the tiny conv_in's output is large, and the residual is read off it
                sample = 1e-3 * torch.randn((rows, *latent), generator=g)
                timesteps = torch.tensor([900 - 300 * k for k in layout.steps])
                mech.before_unet(layout)
                seen.clear()
                mech.call_unet(unet, sample, timesteps, emb.expand(rows, -1, -1), layout, depth)
                got = list(seen)  # conv_in ran once, for all rows
                assert len(got) == 1
                residual = got[0] - unet.conv_in(sample)  # what the hook added to each row
                expected = torch.cat([prior(depth[r : r + 1]) for r in range(rows)])  # row r: its own frame's depth
                assert expected.abs().amax() > 0.1
                torch.testing.assert_close(residual, expected, atol=1e-5, rtol=1e-5)

            depth = torch.randn((DEPTH_W + 1, *latent), generator=g)  # one latent per frame
            for k in range(DEPTH_STEPS):  # warmup, cfg full: [uncond f0..f2 | cond f0..f2]
                layout = BatchLayout((k,) * (2 * DEPTH_W), ("uncond",) * DEPTH_W + ("cond",) * DEPTH_W,
                                     DEPTH_STEPS, "warmup")
                call(layout, torch.cat([depth[:DEPTH_W], depth[:DEPTH_W]]))
            # streaming: frame 3 at step 0 and frame 2 at step 1, uncond rows first
            layout = BatchLayout((0, 1, 0, 1), ("uncond", "uncond", "cond", "cond"), DEPTH_STEPS, "stream")
            newest_first = depth[[DEPTH_W, DEPTH_W - 1]]
            call(layout, torch.cat([newest_first, newest_first]))
        finally:
            hook.remove()


class _Recording(CausalTemporal):
    """Live2Diff as the engine runs it, recording (layout, per-row depth latents) of each UNet call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def call_unet(self, unet, sample, timesteps, encoder_hidden_states, layout, cond=None):
        self.calls.append((layout, None if cond is None else cond.clone()))
        return super().call_unet(unet, sample, timesteps, encoder_hidden_states, layout, cond)


@pytest.mark.parametrize("cfg", ["full", "initialize"])
def test_engine_gives_every_row_its_own_frames_depth(video, cfg):
    """The stream engine hands the mechanism, for every row of every UNet call, the depth
    latent of that row's own frame: warmup rows the clip's frames in order, a streamed row
    at step s the frame admitted s - lo calls before the newest (stream-batch rows are
    newest first), an unconditional row the same frame as its conditional twin."""
    from diffstream.config import StreamConfig
    from diffstream.pipelines.stream import StreamPipeline
    from diffstream.testing import make_frames

    latents = []  # the conditioner's output for each frame, in arrival order

    def conditioner(pixels):
        latents.append(video.encode_image(pixels))
        return latents[-1]

    config = CausalTemporalConfig(warmup_frames=DEPTH_W, window=DEPTH_WINDOW, depth=True, depth_model="tiny")
    mech = _Recording(config, conditioner=conditioner, depth_prior=trained_depth_prior(video))
    cfg_ = StreamConfig(prompt="a fox", negative_prompt="blur", size=64, steps=DEPTH_STEPS, strength=0.6,
                        guidance=1.5, cfg_type=cfg, method="live2diff", causal=config)
    frames = make_frames(DEPTH_W + 5)
    with StreamPipeline(video, cfg_, mech) as pipe:
        outs = [o for f in frames if (o := pipe.push(f)) is not None] + pipe.flush()
    assert len(outs) == len(frames)
    assert len(latents) == len(frames)
    checked = 0
    admitted = 0  # frames already in the stream batch when the call ran
    for layout, cond in mech.calls:
        assert cond is not None and cond.shape[0] == layout.batch_size
        if layout.phase == "warmup":
            per_clip = layout.branches.count("cond")
            for r in range(layout.batch_size):
                assert torch.equal(cond[r], latents[r % per_clip][0]), (layout, r)
            admitted = per_clip
            continue
        steps = [s for s, b in zip(layout.steps, layout.branches) if b == "cond"]
        lo = steps[0]
        if lo == 0:  # a new frame entered before this call
            admitted += 1
        for r, (s, b) in enumerate(zip(layout.steps, layout.branches)):
            frame = admitted - 1 - (s - lo)
            assert torch.equal(cond[r], latents[frame][0]), (layout, r, b, frame)
            checked += 1
    assert admitted == len(frames)
    assert checked >= DEPTH_STEPS * (len(frames) - DEPTH_W)  # every streamed frame at every step


@pytest.mark.parametrize("cfg", ["full", "initialize"])
def test_driver_replays_the_engines_calls(video, cfg):
    """The processor-level proofs drive the attention with exactly the UNet calls the
    stream engine makes for this stream (same layouts, same order), so what they prove
    holds for the engine."""
    from diffstream.config import StreamConfig
    from diffstream.pipelines.stream import StreamPipeline
    from diffstream.testing import make_frames

    mech = _Recording(CausalTemporalConfig(warmup_frames=W, window=WINDOW))
    config = StreamConfig(prompt="a fox", negative_prompt="blur", size=64, steps=STEPS, strength=0.9,
                          guidance=1.5, cfg_type=cfg, method="live2diff", causal=mech.config)
    with StreamPipeline(video, config, mech) as pipe:
        for f in make_frames(TOTAL):
            pipe.push(f)
        pipe.flush()
    engine = [layout for layout, _ in mech.calls]
    replay = list(warmup_layouts(cfg)) + [layout for _, layout in stream_calls(cfg)]
    assert engine == replay
