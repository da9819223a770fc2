"""Proofs of block-causal attention with sink chunks and a rolling KV cache (issue #18).

The tiny Wan transformer (`models.wan`, diffusers' `WanTransformer3DModel`) is fed a
video chunk by chunk through `BlockCausal`'s processors, and compared with an
independent oracle: the *whole* video in one call of the stock model, every
self-attention run by diffusers' own `WanAttnProcessor` with a block mask written here
from its definition (notes field-2026-12.md Sec. 1-2; Self-Forcing, LongLive):

    query chunk q sees key chunk k  iff  k == q, or k < q and (k < S or k >= q - W).

The stock model gives every frame its absolute position (one call over all frames), so
equality proves positions, eviction, sinks and the cache together. The inputs make each
of them visible: every chunk's latents (and every row's) differ, and deliberately wrong
oracles (no eviction, sinks evicted) miss by far more than the tolerance
(`test_wrong_oracles_are_far`). tests/mutants/m_block_causal.py lists the bugs these
proofs catch and which proof catches each.
"""

import collections
import contextlib

import diffusers.models.transformers.transformer_wan as transformer_wan
import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor, WanRotaryPosEmbed

from diffstream.attention.base import BatchLayout
from diffstream.attention.block_causal import (
    BlockCausal,
    BlockCausalAttnProcessor,
    BlockCausalConfig,
    BlockCausalState,
)
from diffstream.attention.cross_kv_cache import CrossKVAttnProcessor
from diffstream.errors import ConfigError
from diffstream.models.wan import TINY_WAN_TEXT_DIM, WAN_LATENT_CHANNELS, tiny_wan_transformer
from diffstream.testing import stock_wan_attention_with_mask

FRAMES = 8  # latent frames of the test video
SIZE = 8  # latent height = width: (8/2)^2 = 16 tokens per frame
ROWS = 2  # two streams (or guidance branches), each with its own cache
ATOL = 1e-5
# (chunk_frames, sink_chunks, window_chunks): the window rolls in each (chunk 7 of the
# first sees chunks 0, 5, 6 and itself); pure rolling window; two sinks; 2-frame chunks.
POLICIES = [(1, 1, 2), (1, 0, 3), (1, 2, 1), (2, 1, 1)]
IDS = [f"chunk{c}-sink{s}-window{w}" for c, s, w in POLICIES]


@pytest.fixture(scope="module")
def wan():
    return tiny_wan_transformer(seed=0)


def video(seed: int, frames: int = FRAMES) -> torch.Tensor:
    """(ROWS, 16, frames, SIZE, SIZE) latents, different in every frame and row."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(ROWS, WAN_LATENT_CHANNELS, frames, SIZE, SIZE, generator=g)


def text(seed: int = 7) -> torch.Tensor:
    """(ROWS, 5, 32) text embeddings, one prompt per row."""
    return torch.randn(ROWS, 5, TINY_WAN_TEXT_DIM, generator=torch.Generator().manual_seed(seed))


def chunk_of_token(frames: int, chunk: int, tokens: int) -> torch.Tensor:
    """(frames * tokens,) the chunk index of every token (tokens are frame-major in Wan)."""
    return torch.arange(frames).repeat_interleave(tokens) // chunk


def block_mask(frames: int, chunk: int, sinks: int, window: int, tokens: int = (SIZE // 2) ** 2,
               evict: bool = True, keep_sinks: bool = True) -> torch.Tensor:
    """(L, L) bool, True where a query token may attend to a key token, from the definition.

    Args:
        evict: False: an oracle that never evicts (every earlier chunk visible).
        keep_sinks: False: an oracle whose sinks roll out with the window.
    """
    c = chunk_of_token(frames, chunk, tokens)
    q, k = c[:, None], c[None, :]  # (L, 1), (1, L)
    past = k < q
    if not evict:
        return (k == q) | past
    return (k == q) | (past & (((k < sinks) & keep_sinks) | (k >= q - window)))


def oracle(model, latents, timestep, prompt, mask) -> torch.Tensor:
    """The stock model on the whole video in one call, self-attention masked.

    Args:
        latents: (B, 16, F, h, w); timestep: (B,) one per row, or (B, L) one per token.
    """
    with torch.no_grad(), stock_wan_attention_with_mask(model, mask):
        return model(latents, timestep, encoder_hidden_states=prompt, return_dict=False)[0]


def layout(phase: str) -> BatchLayout:
    """One chunk call of ROWS rows: "attend" or "record"."""
    return BatchLayout.branch_major(phase, 0, ("cond",), ROWS, 1)


def stream(model, mech: BlockCausal, latents, timestep, prompt) -> torch.Tensor:
    """Chunk by chunk through the cache: each chunk one "record" call on its latents.

    Returns:
        (B, 16, F, h, w) the chunks' outputs side by side.
    """
    chunk = mech.config.chunk_frames
    outs = []
    with torch.no_grad(), mech.attach(model):
        for start in range(0, latents.shape[2], chunk):
            x = latents[:, :, start:start + chunk]
            mech.before_unet(layout("record"))
            outs.append(mech.call_unet(model, x, timestep, prompt, layout("record")))
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
def test_stream_equals_full_sequence_with_block_mask(wan, policy):
    """Chunk by chunk with the cache == the stock model on the whole video under the
    block-causal sink + window mask (positions absolute, eviction, sinks kept)."""
    chunk, sinks, window = policy
    mech = BlockCausal(BlockCausalConfig(chunk_frames=chunk, sink_chunks=sinks, window_chunks=window))
    latents, prompt, t = video(1), text(), torch.tensor([500, 500])
    ours = stream(wan, mech, latents, t, prompt)
    expected = oracle(wan, latents, t, prompt, block_mask(FRAMES, chunk, sinks, window))
    assert (ours - expected).abs().max() < ATOL


def test_full_window_is_plain_block_causal(wan):
    """A window holding every past chunk (nothing evicted) == the plain block-causal mask."""
    mech = BlockCausal(BlockCausalConfig(chunk_frames=2, sink_chunks=1, window_chunks=FRAMES))
    latents, prompt, t = video(2), text(), torch.tensor([300, 300])
    ours = stream(wan, mech, latents, t, prompt)
    c = chunk_of_token(FRAMES, 2, (SIZE // 2) ** 2)
    expected = oracle(wan, latents, t, prompt, c[None, :] <= c[:, None])
    assert (ours - expected).abs().max() < ATOL


def test_attend_calls_leave_the_cache_and_record_commits(wan):
    """Self-Forcing's loop: each chunk denoised by "attend" calls on noisy latents, then
    its clean latents recorded at t = 0. Every call equals the stock model on [the clean
    chunks before it at t = 0, this chunk at its timestep] (per-token timesteps) under the
    block mask: attend calls never write the cache, record calls do, with their own inputs."""
    chunk, sinks, window = 1, 1, 2
    mech = BlockCausal(BlockCausalConfig(chunk_frames=chunk, sink_chunks=sinks, window_chunks=window))
    clean, noisy, prompt = video(3), video(4), text()
    tokens = (SIZE // 2) ** 2
    worst = 0.0
    with torch.no_grad(), mech.attach(wan):
        for n in range(FRAMES):
            for x, t, phase in ((noisy, 800, "attend"), (noisy, 400, "attend"), (clean, 0, "record")):
                mech.before_unet(layout(phase))
                ours = mech.call_unet(wan, x[:, :, n:n + 1], torch.tensor([t, t]), prompt, layout(phase))
                # the oracle swaps the stock processors in for its call and ours back after
                prefix = torch.cat([clean[:, :, :n], x[:, :, n:n + 1]], dim=2)  # (B, 16, n + 1, h, w)
                per_token = torch.tensor([0] * (n * tokens) + [t] * tokens).expand(ROWS, -1)  # (B, L)
                expected = oracle(wan, prefix, per_token, prompt, block_mask(n + 1, chunk, sinks, window))
                worst = max(worst, (ours - expected[:, :, n:]).abs().max().item())
    assert worst < ATOL


def test_wrong_oracles_are_far(wan):
    """The inputs make the property visible: oracles with the wrong cache policy (never
    evicting, evicting the sinks) miss the stream by > 100x the tolerance."""
    mech = BlockCausal(BlockCausalConfig(chunk_frames=1, sink_chunks=1, window_chunks=2))
    latents, prompt, t = video(1), text(), torch.tensor([500, 500])
    ours = stream(wan, mech, latents, t, prompt)
    for wrong in (block_mask(FRAMES, 1, 1, 2, evict=False), block_mask(FRAMES, 1, 1, 2, keep_sinks=False)):
        assert (ours - oracle(wan, latents, t, prompt, wrong)).abs().max() > 100 * ATOL


def test_reset_starts_a_new_stream(wan):
    """After reset() the same chunks give what a fresh state gives (the buffers are kept)."""
    mech = BlockCausal(BlockCausalConfig(chunk_frames=1, sink_chunks=1, window_chunks=1))
    latents, prompt, t = video(5, frames=4), text(), torch.tensor([500, 500])
    first = stream(wan, mech, video(6, frames=5), t, prompt)  # an earlier stream fills and rolls the cache
    assert first.abs().max() > 0
    storages = [x.untyped_storage().data_ptr() for x in mech.state.tensors()]
    mech.reset()
    again = stream(wan, mech, latents, t, prompt)
    fresh = stream(wan, BlockCausal(mech.config), latents, t, prompt)
    assert torch.equal(again, fresh)
    assert [x.untyped_storage().data_ptr() for x in mech.state.tensors()] == storages


# --- processor level: a long stream, cheaply --------------------------------------

HEADS, HEAD_DIM = 2, 24
DIM = HEADS * HEAD_DIM


def rotary_for(rope: WanRotaryPosEmbed, frames: list[int], tokens: int):
    """(cos, sin), each (1, len(frames) * tokens, 1, d): the rope table's rows at the given
    frame indices for the time channels, Wan's row/column ones for a 2x2 grid (tokens = 4)."""
    grid = rope(torch.zeros(1, 1, len(frames), 4, 4))  # positions 0..len-1, rows/cols of a 2x2 grid
    t = rope.t_dim
    out = []
    for table, full in zip(grid, (rope.freqs_cos, rope.freqs_sin)):
        table = table.clone().view(len(frames), tokens, HEAD_DIM)
        table[..., :t] = full[frames, :t].float()[:, None, :]
        out.append(table.view(1, len(frames) * tokens, 1, HEAD_DIM))
    return tuple(out)


def test_long_stream_memory_is_constant_and_positions_stay_absolute():
    """1,000 chunks through one processor: the cache tensors keep their storage and size
    from the first chunk on, and chunk 999 (the ring wrapped ~330 times) still equals the
    stock processor over [sink chunk 0, chunks 997, 998, 999] at those frame positions."""
    torch.manual_seed(0)
    attn = WanAttention(dim=DIM, heads=HEADS, dim_head=HEAD_DIM, eps=1e-6, processor=WanAttnProcessor()).eval()
    rope = WanRotaryPosEmbed(HEAD_DIM, (1, 2, 2), 1024)
    state = BlockCausalState(BlockCausalConfig(chunk_frames=1, sink_chunks=1, window_chunks=2))
    proc = BlockCausalAttnProcessor(state, "blocks.0.attn1.processor", rope.t_dim)
    local = rope(torch.zeros(1, 1, 1, 4, 4))  # what Wan's rope gives a chunk fed alone: frame 0
    hidden = torch.randn(1000, 1, 4, DIM, generator=torch.Generator().manual_seed(1))  # (chunks, B, N, C)
    seen = None
    with torch.no_grad():
        for n in range(1000):
            state.begin_call("record")
            out = proc(attn, hidden[n], rotary_emb=local)
            layout_now = [(x.untyped_storage().data_ptr(), x.untyped_storage().nbytes(), tuple(x.shape))
                          for x in state.tensors()]
            seen = seen or layout_now
            assert layout_now == seen, n
        frames = [0, 997, 998, 999]
        mask = chunk_of_token(4, 1, 4)[:, None] >= chunk_of_token(4, 1, 4)[None, :]  # the last chunk sees all 4
        expected = WanAttnProcessor()(attn, torch.cat([hidden[f] for f in frames], dim=1), None,
                                      attention_mask=mask, rotary_emb=rotary_for(rope, frames, 4))
    assert (out - expected[:, -4:]).abs().max() < ATOL
    assert state.nbytes() == 2 * (1 + 2 + 1) * 4 * DIM * 4  # K,V x slots x N tokens x C x fp32 bytes


# --- the protocol ----------------------------------------------------------------


@pytest.mark.parametrize("cross", [True, False], ids=["cross-cache", "no-cross-cache"])
def test_attach_installs_on_self_attention_and_restores(wan, cross):
    """Block-causal processors on every attn1; the cross-attention cache's on every attn2
    (or diffusers' left there); all restored, and the text projection unhooked, after."""
    mech = BlockCausal(BlockCausalConfig(chunk_frames=1, cross_kv_cache=cross))
    before = dict(wan.attn_processors)
    with mech.attach(wan):
        now = wan.attn_processors
        assert {n for n, p in now.items() if isinstance(p, BlockCausalAttnProcessor)} == {
            n for n in before if ".attn1." in n}
        if cross:
            assert {n for n, p in now.items() if isinstance(p, CrossKVAttnProcessor)} == {
                n for n in before if ".attn2." in n}
            assert wan.condition_embedder.text_embedder._forward_hooks
        else:
            assert all(now[n] is p for n, p in before.items() if ".attn2." in n)
    assert all(wan.attn_processors[n] is p for n, p in before.items())
    assert not wan.condition_embedder.text_embedder._forward_hooks


def test_config_errors_are_one_line():
    for bad in (dict(chunk_frames=0), dict(sink_chunks=-1), dict(sink_chunks=0, window_chunks=0),
                dict(sink_policy="sometimes"), dict(sink_policy="adaptive", adapt_sink_threshold=1.5),
                dict(sink_policy="adaptive", sink_chunks=0, window_chunks=2)):
        with pytest.raises(ConfigError) as e:
            BlockCausalConfig(**bad)
        assert "\n" not in str(e.value)


def test_misuse_is_refused(wan):
    mech = BlockCausal(BlockCausalConfig(chunk_frames=1, sink_chunks=1, window_chunks=1))
    latents, prompt, t = video(1, frames=2), text(), torch.tensor([1, 1])
    with torch.no_grad(), mech.attach(wan):
        with pytest.raises(RuntimeError, match="outside a chunk call"):
            wan(latents[:, :, :1], t, prompt)
        mech.before_unet(layout("record"))
        mech.call_unet(wan, latents[:, :, :1], t, prompt, layout("record"))
        mech.before_unet(layout("attend"))
        with pytest.raises(RuntimeError, match="reset"):  # another size mid-stream
            wan(torch.zeros(2, 16, 1, 4, 4), t, prompt)
    with pytest.raises(ValueError):
        mech.state.begin_call("sometimes")


# --- the adaptive sink (StreamDiffusionV2) ----------------------------------------
#
# The policy from its definition (BlockCausalConfig.sink_policy "adaptive"), per row: the
# kept chunks are `sink` (S chunk ids) and `ring` (the W most recent chunks that did not
# become sinks); chunk q attends to sink + ring + itself; then q < S becomes sink q; else,
# once q >= S + W, with score(s) = mean over layers of (cos(mean K_q, mean K_s) + cos(mean
# V_q, mean V_s)) / 2 (keys after rotary, means over the chunk's tokens, vectors over heads x
# d), if min_s score(s) < threshold the lowest-scoring sink is replaced by q; else q joins
# the ring (its oldest chunk leaves). The keys and values are the stock model's own, taken
# from its attention calls on the video so far under the masks of the chunks so far.

DRIFT_CHUNK = 5  # the chunk made dissimilar (row 0 only: row 1 stays a plain stream)


@contextlib.contextmanager
def captured_kv():
    """[(key, value), ...] of every masked (self-)attention call of the stock processor, in
    block order, each (B, L, heads, d): the keys after rotary, as diffusers computes them."""
    seen, original = [], transformer_wan.dispatch_attention_fn

    def spy(query, key, value, attn_mask=None, **kwargs):
        if attn_mask is not None:
            seen.append((key, value))
        return original(query, key, value, attn_mask=attn_mask, **kwargs)

    transformer_wan.dispatch_attention_fn = spy
    try:
        yield seen
    finally:
        transformer_wan.dispatch_attention_fn = original


def drifting_video(seed: int = 1) -> torch.Tensor:
    """video(seed) with row 0's chunk DRIFT_CHUNK replaced by very different latents."""
    latents = video(seed)
    latents[0, :, DRIFT_CHUNK] = 4.0 - 3.0 * latents[0, :, DRIFT_CHUNK].abs()
    return latents


def adaptive_reference(model, latents, t, prompt, sinks: int, window: int, threshold: float):
    """The adaptive policy written from its definition (above) on the stock model.

    Returns:
        (outputs (B, 16, F, h, w), {q: (B, S) scores}, {q: [replaced sink or -1, per row]}).
    """
    rows, frames, tokens = latents.shape[0], latents.shape[2], (SIZE // 2) ** 2
    sink = [[] for _ in range(rows)]
    ring = [collections.deque(maxlen=window) for _ in range(rows)]
    visible = [[] for _ in range(rows)]  # visible[b][q]: the chunks chunk q attends to

    def mask(chunks: int) -> torch.Tensor:  # (B, 1, L, L) over chunks 0..chunks-1
        c = chunk_of_token(chunks, 1, tokens)
        m = torch.zeros(rows, 1, len(c), len(c), dtype=torch.bool)
        for b in range(rows):
            for q in range(chunks):
                m[b, 0, c == q] = torch.isin(c, torch.tensor(sorted(visible[b][q])))
        return m

    scores, replaced = {}, {}
    for q in range(frames):
        for b in range(rows):
            visible[b].append(set(sink[b]) | set(ring[b]) | {q})
        if q < sinks:
            for b in range(rows):
                sink[b].append(q)
            continue
        if q < sinks + window:
            for b in range(rows):
                ring[b].append(q)
            continue
        with captured_kv() as layers:
            oracle(model, latents[:, :, :q + 1], t, prompt, mask(q + 1))
        score = torch.zeros(rows, sinks)
        for key, value in layers:
            for x in (key, value):
                pooled = x.reshape(rows, q + 1, tokens, -1).mean(2)  # (B, chunks, heads * d)
                for b in range(rows):
                    for j, c in enumerate(sink[b]):
                        score[b, j] += torch.nn.functional.cosine_similarity(pooled[b, q], pooled[b, c], dim=0)
        score /= 2 * len(layers)
        scores[q], replaced[q] = score, []
        for b in range(rows):
            j = int(score[b].argmin())
            if score[b, j] < threshold:
                sink[b][j] = q
                replaced[q].append(j)
            else:
                ring[b].append(q)
                replaced[q].append(-1)
    return oracle(model, latents, t, prompt, mask(frames)), scores, replaced


def stream_policy(model, config: BlockCausalConfig, latents, t, prompt):
    """Chunk by chunk (record calls) with `config`; every commit's scores and decisions, and
    whether the cache tensors kept their storage from the first chunk on.

    Returns:
        (outputs, {q: (B, S) scores}, {q: replaced per row}, storage unchanged).
    """
    mech = BlockCausal(config)
    outs, scores, replaced, storages, same = [], {}, {}, None, True
    with torch.no_grad(), mech.attach(model):
        for q in range(latents.shape[2] + 1):
            mech.before_unet(layout("record" if q < latents.shape[2] else "attend"))  # commits chunk q - 1
            if mech.state.sink_score is not None and q - 1 >= config.sink_chunks + config.window_chunks:
                scores[q - 1], replaced[q - 1] = mech.state.sink_score.clone(), mech.state.sink_replaced.tolist()
            now = [x.untyped_storage().data_ptr() for x in mech.state.tensors()]
            storages = storages or now
            same = same and now == storages
            if q < latents.shape[2]:
                outs.append(mech.call_unet(model, latents[:, :, q:q + 1], t, prompt, layout("record")))
    return torch.cat(outs, dim=2), scores, replaced, same


@pytest.mark.parametrize("sinks,window", [(1, 2), (2, 1)], ids=["sink1-window2", "sink2-window1"])
def test_adaptive_sink_replaces_the_drifted_sink(wan, sinks, window):
    """Row 0's chunk 5 made dissimilar: the stream's scores, replaced sinks and outputs ==
    the policy's definition on the stock model (its own keys/values, a per-row block mask
    from the chunks the policy keeps); row 1 (no drift) never replaces; memory constant.
    The threshold sits between the drifted chunk's scores (every sink below it) and every
    other chunk's, read off the definition with no replacement."""
    latents, prompt, t = drifting_video(), text(), torch.tensor([500, 500])
    _, plain, _ = adaptive_reference(wan, latents, t, prompt, sinks, window, threshold=-2.0)
    drifted = plain[DRIFT_CHUNK][0].max().item()
    others = min(plain[q][b].min().item() for q in plain for b in range(ROWS) if (q, b) != (DRIFT_CHUNK, 0))
    assert drifted + 0.05 < others, (drifted, others)  # the inputs make the drift visible
    threshold = (drifted + others) / 2
    expected, scores, replaced = adaptive_reference(wan, latents, t, prompt, sinks, window, threshold)
    row0, row1 = replaced[DRIFT_CHUNK]
    assert row0 == int(scores[DRIFT_CHUNK][0].argmin()) and row1 == -1  # row 0's drifted chunk takes a sink's place
    config = BlockCausalConfig(chunk_frames=1, sink_chunks=sinks, window_chunks=window, sink_policy="adaptive",
                               adapt_sink_threshold=threshold)
    ours, our_scores, our_replaced, constant = stream_policy(wan, config, latents, t, prompt)
    assert our_replaced == replaced
    assert max((our_scores[q] - scores[q]).abs().max().item() for q in scores) < ATOL
    assert (ours - expected).abs().max() < ATOL
    assert constant
    fixed = stream(wan, BlockCausal(BlockCausalConfig(chunk_frames=1, sink_chunks=sinks, window_chunks=window)),
                   latents, t, prompt)
    assert (ours[0] - fixed[0]).abs().max() > 100 * ATOL  # the replacement is visible


def test_adaptive_sink_without_drift_is_the_fixed_policy(wan):
    """Similar chunks (a plain random stream, every score above 0.2, StreamDiffusionV2's
    threshold) replace nothing: the outputs are the fixed policy's, bitwise. Threshold -1
    never replaces, even with the drifted chunk."""
    prompt, t = text(), torch.tensor([500, 500])
    for latents, threshold in ((video(1), 0.2), (drifting_video(), -1.0)):
        config = BlockCausalConfig(chunk_frames=1, sink_chunks=1, window_chunks=2, sink_policy="adaptive",
                                   adapt_sink_threshold=threshold)
        ours, _, replaced, constant = stream_policy(wan, config, latents, t, prompt)
        fixed = stream(wan, BlockCausal(BlockCausalConfig(chunk_frames=1, sink_chunks=1, window_chunks=2)),
                       latents, t, prompt)
        assert all(r == [-1] * ROWS for r in replaced.values())
        assert len(replaced) == (FRAMES - 3 if threshold > -1 else 0)  # decided at every commit, or never
        assert torch.equal(ours, fixed)
        assert constant


# --- re-recording cached chunks (LongLive's recache on a prompt switch) --------------


def test_rerecord_with_the_same_inputs_is_bitwise_the_cache(wan):
    """Before any eviction, re-recording every cached chunk with its own inputs rewrites
    the cache bitwise as it was, the counter stays, and the next chunk is what a stream
    that never re-recorded gives, bitwise."""
    config = BlockCausalConfig(chunk_frames=1, sink_chunks=1, window_chunks=2)
    mech = BlockCausal(config)
    latents, t = video(8, frames=4), torch.tensor([0, 0])
    with torch.no_grad(), mech.attach(wan):
        for q in range(3):
            mech.before_unet(layout("record"))
            mech.call_unet(wan, latents[:, :, q:q + 1], t, text(), layout("record"))
        mech.before_unet(layout("attend"))  # commits chunk 2
        before = [x.clone() for x in mech.state.tensors()]
        mech.state.rerecord([0, 1, 2])
        for q in range(3):
            mech.before_unet(layout("record"))
            mech.call_unet(wan, latents[:, :, q:q + 1], t, text(), layout("record"))
        mech.before_unet(layout("record"))  # commits the last re-recorded chunk: chunk 3 next
        assert mech.state.recorded == 3 and mech.state.chunk == 3
        assert all(torch.equal(a, b) for a, b in zip(mech.state.tensors(), before))
        last = mech.call_unet(wan, latents[:, :, 3:4], t, text(), layout("record"))
    assert torch.equal(last, stream(wan, BlockCausal(config), latents, t, text())[:, :, 3:4])


def test_rerecord_after_the_ring_wrapped_attends_the_cached_chunks():
    """After 7 chunks (sink 0, window 5, 6; the ring wrapped) chunks 0, 5, 6 re-recorded
    from new inputs (a new prompt): each call equals the stock processor over the cached
    chunks up to it at their frame positions (chunk 5 sees 0 and itself: slots out of
    order, masked), and chunk 7 then sees the new keys/values of 0, 5, 6."""
    torch.manual_seed(0)
    attn = WanAttention(dim=DIM, heads=HEADS, dim_head=HEAD_DIM, eps=1e-6, processor=WanAttnProcessor()).eval()
    rope = WanRotaryPosEmbed(HEAD_DIM, (1, 2, 2), 1024)
    state = BlockCausalState(BlockCausalConfig(chunk_frames=1, sink_chunks=1, window_chunks=2))
    proc = BlockCausalAttnProcessor(state, "blocks.0.attn1.processor", rope.t_dim)
    local = rope(torch.zeros(1, 1, 1, 4, 4))
    old = torch.randn(8, 1, 4, DIM, generator=torch.Generator().manual_seed(1))  # (chunks, B, N, C)
    new = torch.randn(8, 1, 4, DIM, generator=torch.Generator().manual_seed(2))

    def stock(chunks: list[int], hidden: dict) -> torch.Tensor:  # the last chunk's rows, seeing all of them
        x = torch.cat([hidden[c] for c in chunks], dim=1)
        mask = chunk_of_token(len(chunks), 1, 4)[:, None] >= chunk_of_token(len(chunks), 1, 4)[None, :]
        return WanAttnProcessor()(attn, x, None, attention_mask=mask, rotary_emb=rotary_for(rope, chunks, 4))[:, -4:]

    worst = 0.0
    with torch.no_grad():
        for n in range(7):
            state.begin_call("record")
            proc(attn, old[n], rotary_emb=local)
        state.rerecord([0, 5, 6])
        hidden = {c: old[c] for c in range(8)}
        for c, seen in ((0, [0]), (5, [0, 5]), (6, [0, 5, 6])):
            state.begin_call("record")
            hidden[c] = new[c]
            worst = max(worst, (proc(attn, new[c], rotary_emb=local) - stock(seen, hidden)).abs().max().item())
        state.begin_call("record")
        assert state.chunk == 7
        hidden[7] = new[7]
        worst = max(worst, (proc(attn, new[7], rotary_emb=local) - stock([0, 5, 6, 7], hidden)).abs().max().item())
    assert worst < ATOL


def test_rerecord_is_refused_for_uncached_chunks_and_attend_calls():
    state = BlockCausalState(BlockCausalConfig(chunk_frames=1, sink_chunks=1, window_chunks=1))
    state.recorded = 4  # cached: 0 and 3
    for bad in ([1], [3, 0], [4]):
        with pytest.raises(ValueError):
            state.rerecord(bad)
    state.rerecord([0, 3])
    with pytest.raises(RuntimeError, match="re-recorded"):
        state.begin_call("attend")
    adaptive = BlockCausalState(BlockCausalConfig(chunk_frames=1, sink_policy="adaptive"))
    with pytest.raises(ValueError):
        adaptive.rerecord([0])


# --- row calls: StreamDiffusionV2's stream batch (one stream per row, rows staggered) ---------


@pytest.mark.parametrize("policy", [(1, 1, 2), (2, 1, 1)], ids=["chunk1-sink1-window2", "chunk2-sink1-window1"])
def test_row_calls_equal_independent_streams(wan, policy):
    """Row calls staggered as a stream batch runs them (call c: row r at chunk c - r, the
    first and last calls with fewer rows) == each row's video alone through the stock
    model under the block mask. Every row has its own latents, text and timestep, so a
    row reading another row's cache, slot or positions shows; with a window of 2 and
    K = 3 rows the rows attend to unequal lengths in the first calls (the per-row mask)."""
    chunk, sinks, window = policy
    k = 3
    mech = BlockCausal(BlockCausalConfig(chunk_frames=chunk, sink_chunks=sinks, window_chunks=window))
    g = torch.Generator().manual_seed(11)
    latents = torch.randn(k, WAN_LATENT_CHANNELS, FRAMES, SIZE, SIZE, generator=g)  # (K, 16, F, h, w)
    prompt = torch.randn(k, 5, TINY_WAN_TEXT_DIM, generator=g)
    t = torch.tensor([900.0, 600.0, 250.0])
    chunks = FRAMES // chunk
    outs = [[None] * chunks for _ in range(k)]
    with torch.no_grad(), mech.attach(wan):
        for c in range(chunks + k - 1):
            rows = [r for r in range(k) if 0 <= c - r < chunks]
            lo, hi = rows[0], rows[-1] + 1
            x = torch.cat([latents[r:r + 1, :, (c - r) * chunk:(c - r + 1) * chunk] for r in rows])
            mech.before_rows([c - r for r in rows], lo, k)
            y = mech.call_unet(wan, x, t[lo:hi], prompt[lo:hi], BatchLayout.branch_major("record", 0, ("cond",),
                                                                                          hi - lo, 1))
            for i, r in enumerate(rows):
                outs[r][c - r] = y[i:i + 1]
    ours = torch.cat([torch.cat(row, dim=2) for row in outs])  # (K, 16, F, h, w)
    expected = oracle(wan, latents, t, prompt, block_mask(FRAMES, chunk, sinks, window))
    assert (ours - expected).abs().max() < ATOL


def test_row_calls_check_each_rows_order_and_policy(wan):
    """A row's chunks must come in order; row calls need the fixed sinks and a stream of
    their own (not mixed with chunk calls)."""
    state = BlockCausalState(BlockCausalConfig(chunk_frames=1, sink_chunks=1, window_chunks=1))
    state.begin_rows([0], 0, 2)
    with pytest.raises(RuntimeError, match="in order"):
        state.begin_rows([0, 0], 0, 2)  # row 0 is at chunk 1 now
    state.begin_rows([1, 0], 0, 2)
    with pytest.raises(RuntimeError, match="rows"):
        state.begin_rows([0], 0, 3)  # another row count mid-stream
    state.reset()
    state.begin_call("record")
    with pytest.raises(RuntimeError, match="reset"):
        state.begin_rows([0], 0, 2)
    adaptive = BlockCausalState(BlockCausalConfig(chunk_frames=1, sink_chunks=1, window_chunks=1,
                                                  sink_policy="adaptive"))
    with pytest.raises(ValueError, match="fixed"):
        adaptive.begin_rows([0], 0, 2)
