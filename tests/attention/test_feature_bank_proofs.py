"""Proofs of StreamV2V's feature bank against the paper's formulas written by hand.

Liang et al., "Looking Backward" (seeds/002): Eq. 1 (extended self-attention), Eq. 2
(feature fusion with a similarity threshold), Sec. 4.3 (DyMe's bipartite merge), and
one bank per (step, branch) slot of the stream batch. End-to-end frames of the tiny
model hardly move under the bank, so these work at processor level on a small diffusers
`Attention` (2 heads, q/k weights scaled up so attention is sharp) with inputs built to
make each property visible: a spatially shifted frame (the nearest banked token is not
the one at the same position), fresh tokens that must not pass the threshold, and
stream layouts with unconditional rows (rows != slots). The oracles use only torch
primitives and diffusers' own `AttnProcessor2_0`, never the code under test.
"""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from diffstream.attention.base import BatchLayout
from diffstream.attention.feature_bank import FeatureBank, FeatureBankAttnProcessor, FeatureBankConfig, FeatureBankState

L, C, HEADS = 16, 16, 2  # tokens per frame, channels, heads (d = 8)


@pytest.fixture
def attn():
    torch.manual_seed(0)
    module = Attention(query_dim=C, heads=HEADS, dim_head=C // HEADS, out_bias=True)
    with torch.no_grad():  # sharpen: logits x9, so which keys are present and where matters
        module.to_q.weight.mul_(3.0)
        module.to_k.weight.mul_(3.0)
    return module.eval()


def frame(seed, n=1):
    return torch.randn(n, L, C, generator=torch.Generator().manual_seed(seed))


def layout(steps, branches, num_steps):
    return BatchLayout(steps=tuple(steps), branches=tuple(branches), num_steps=num_steps)


ONE = layout((0,), ("cond",), 1)


def call(proc, state, attn, x, lay=ONE, update=True):
    """One UNet call of one layer; `update` forces whether this call banks (the
    interval's own proofs live elsewhere; interval=1 configs bank every call)."""
    state.begin_call(lay)
    if not update:
        state.update_now = False
    with torch.no_grad():
        return proc(attn, x)


def heads(t):  # (B, L, C) -> (B, heads, L, d)
    return t.view(t.shape[0], t.shape[1], HEADS, C // HEADS).transpose(1, 2)


def eq1(attn, x, banked):
    """Eq. 1 by hand: softmax(Q [K_t, K_fb]^T / sqrt(d)) [V_t, V_fb], then the output
    projection. x (B, L, C) the frames, banked (B, M, C) the banked frames' inputs or None."""
    with torch.no_grad():
        src = x if banked is None else torch.cat([x, banked], dim=1)  # (B, L + M, C)
        q, k, v = heads(attn.to_q(x)), heads(attn.to_k(src)), heads(attn.to_v(src))
        weights = torch.softmax(q @ k.transpose(-1, -2) / (C // HEADS) ** 0.5, dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(x.shape[0], L, C)
        return attn.to_out[0](out)


def plain(attn, x):
    with torch.no_grad():
        return AttnProcessor2_0()(attn, x)


def eq2(out, bank_out, alpha, threshold):
    """Eq. 2 by hand: blend each token with its most cosine-similar banked token where
    the similarity is at least the threshold. out (L, C), bank_out (M, C)."""
    fused = out.clone()
    nearest = []
    for p in range(out.shape[0]):
        sims = torch.stack([F.cosine_similarity(out[p], b, dim=0) for b in bank_out])
        q = int(sims.argmax())
        nearest.append(q)
        if sims[q] >= threshold:
            fused[p] = (1 - alpha) * out[p] + alpha * bank_out[q]
    return fused, nearest


# --- Eq. 1 -----------------------------------------------------------------------------
def test_extended_attention_is_eq1_by_hand(attn):
    """Frame B attends to its own tokens and to the banked keys/values of frame A (a
    shifted copy), per head: equal to Eq. 1 written with softmax and matmuls, and far from
    attention over the bank alone or over the frame alone."""
    state = FeatureBankState(FeatureBankConfig(fusion=False, interval=1))
    proc = FeatureBankAttnProcessor(state, "layer", fuse=False)
    a = frame(1)
    b = torch.roll(a, 5, dims=1) + 0.5 * frame(2)
    call(proc, state, attn, a)  # banks A
    got = call(proc, state, attn, b, update=False)
    assert torch.allclose(got, eq1(attn, b, a), atol=1e-5)
    with torch.no_grad():  # attention over the bank alone (no own tokens), to show the difference
        q, k, v = heads(attn.to_q(b)), heads(attn.to_k(a)), heads(attn.to_v(a))
        w = torch.softmax(q @ k.transpose(-1, -2) / (C // HEADS) ** 0.5, dim=-1)
        bank_only = attn.to_out[0]((w @ v).transpose(1, 2).reshape(1, L, C))
    assert (got - bank_only).abs().max() > 1e-2 and (got - plain(attn, b)).abs().max() > 1e-2


def test_extended_attention_masks_unfilled_banks_per_row(attn):
    """Rows whose slot's bank is still empty attend to their own tokens only (the zero
    padding of the gathered bank is masked); rows with a bank follow Eq. 1."""
    state = FeatureBankState(FeatureBankConfig(fusion=False, interval=1))
    proc = FeatureBankAttnProcessor(state, "layer", fuse=False)
    two = layout((0, 1), ("cond", "cond"), 2)
    a = frame(3)
    call(proc, state, attn, torch.cat([a, frame(4)]), lay=two)  # both slots banked
    state.layers["layer"].filled[1] = 0  # slot 1 empty again: a mixed fill pattern
    x = frame(5, 2)
    got = call(proc, state, attn, x, lay=two, update=False)
    assert torch.allclose(got[0:1], eq1(attn, x[0:1], a), atol=1e-5)
    assert torch.allclose(got[1:2], plain(attn, x[1:2]), atol=1e-5)


def test_bank_stores_keys_values_with_heads_merged_in_order(attn):
    """The bank of a queue of one frame holds exactly that frame's to_k / to_v / output."""
    state = FeatureBankState(FeatureBankConfig(bank="queue", bank_size=1, fusion=False, interval=1))
    proc = FeatureBankAttnProcessor(state, "layer", fuse=False)
    a = frame(6)
    call(proc, state, attn, a)
    b = torch.roll(a, 3, dims=1)
    out_b = call(proc, state, attn, b)  # extends over A, then replaces A in the queue
    bank = state.layers["layer"]
    with torch.no_grad():
        assert torch.allclose(bank.key[0], attn.to_k(b)[0], atol=1e-6)
        assert torch.allclose(bank.value[0], attn.to_v(b)[0], atol=1e-6)
    assert torch.allclose(bank.output[0], out_b[0], atol=1e-6)


# --- Eq. 2 -----------------------------------------------------------------------------
def shifted_pair(seed=7, shift=5, fresh=6):
    """Frame A and frame B = A moved by `shift` tokens, with the last `fresh` tokens
    replaced by new content (a region new to the scene: it must not fuse)."""
    a = frame(seed)
    b = torch.roll(a, shift, dims=1).clone()
    b[:, L - fresh:] = frame(seed + 1)[:, :fresh]
    return a, b


def fusion_case(attn, alpha=0.75):
    """Fusion alone (no extended attention): A banked, then B fused against A's outputs.
    Returns (got, oracle, nearest, plain B, A's outputs, threshold)."""
    a, b = shifted_pair()
    out_a, out_b = plain(attn, a)[0], plain(attn, b)[0]
    sims = F.normalize(out_b, dim=-1) @ F.normalize(out_a, dim=-1).T  # (L, L)
    best = sims.max(dim=-1).values.sort().values
    threshold = float(best[L // 2 - 1: L // 2 + 1].mean())  # half the tokens pass
    state = FeatureBankState(FeatureBankConfig(extended_attention=False, fusion_strength=alpha,
                                               fusion_threshold=threshold, interval=1))
    proc = FeatureBankAttnProcessor(state, "layer", fuse=True)
    call(proc, state, attn, a)
    got = call(proc, state, attn, b, update=False)[0]
    oracle, nearest = eq2(out_b, out_a, alpha, threshold)
    return got, oracle, nearest, out_b, out_a, threshold


def test_fusion_is_eq2_by_hand_on_a_shifted_frame(attn):
    """Eq. 2: the nearest banked token is the shifted one (not the same position), the
    blend is (1 - alpha) O_t + alpha O_fb with alpha = 0.75, and tokens below the
    threshold are left alone."""
    got, oracle, nearest, out_b, _, _ = fusion_case(attn)
    assert sum(q != p for p, q in enumerate(nearest)) >= L // 2  # visibility: shift matters
    fused = (got - out_b).abs().amax(dim=-1) > 1e-6
    assert 0 < int(fused.sum()) < L  # some tokens fuse, some do not
    assert torch.allclose(got, oracle, atol=1e-5)


def test_fusion_threshold_is_inclusive():
    """A similarity exactly at the threshold fuses ("minimum cosine similarity"). Built
    exactly: with to_out's weight zero every output is the bias, so the banked outputs
    are 2 e0 and the current ones e0, cosine exactly 1.0 = the threshold."""
    torch.manual_seed(0)
    attn = Attention(query_dim=C, heads=HEADS, dim_head=C // HEADS, out_bias=True).eval()
    e0 = torch.zeros(C)
    e0[0] = 1.0
    with torch.no_grad():
        attn.to_out[0].weight.zero_()
        attn.to_out[0].bias.copy_(2 * e0)
    state = FeatureBankState(FeatureBankConfig(extended_attention=False, fusion_strength=0.75,
                                               fusion_threshold=1.0, interval=1))
    proc = FeatureBankAttnProcessor(state, "layer", fuse=True)
    call(proc, state, attn, frame(8))
    with torch.no_grad():
        attn.to_out[0].bias.copy_(e0)
    got = call(proc, state, attn, frame(9), update=False)
    assert torch.equal(got, (0.25 * e0 + 0.75 * 2 * e0).expand(1, L, C))


def test_fusion_never_picks_an_unfilled_bank_token(attn):
    """Threshold -1 fuses every token with its nearest banked one; a row whose slot has
    no bank yet must still be left alone (its zero padding is not a token)."""
    state = FeatureBankState(FeatureBankConfig(extended_attention=False, fusion_threshold=-1.0, interval=1))
    proc = FeatureBankAttnProcessor(state, "layer", fuse=True)
    two = layout((0, 1), ("cond", "cond"), 2)
    call(proc, state, attn, frame(10, 2), lay=two)
    state.layers["layer"].filled[1] = 0
    x = frame(11, 2)
    got = call(proc, state, attn, x, lay=two, update=False)
    out = plain(attn, x)
    assert torch.allclose(got[1], out[1], atol=1e-6)
    oracle, _ = eq2(out[0], state.layers["layer"].output[0], 0.75, -1.0)
    assert torch.allclose(got[0], oracle, atol=1e-5)


def test_processor_without_fuse_does_not_fuse(attn):
    """Layers outside the fusion blocks extend attention but never blend outputs."""
    state = FeatureBankState(FeatureBankConfig(fusion_threshold=-1.0, interval=1))
    proc = FeatureBankAttnProcessor(state, "layer", fuse=False)
    a, b = shifted_pair()
    call(proc, state, attn, a)
    assert torch.allclose(call(proc, state, attn, b, update=False), eq1(attn, b, a), atol=1e-5)


def test_bank_keeps_pre_fusion_outputs(attn):
    """The output banked in a fusing update is the frame's own (Eq. 1) output, not the
    fused one (the bank holds what the frame computed)."""
    state = FeatureBankState(FeatureBankConfig(bank="queue", bank_size=1, fusion_threshold=-1.0, interval=1))
    proc = FeatureBankAttnProcessor(state, "layer", fuse=True)
    a, b = shifted_pair()
    call(proc, state, attn, a)
    got = call(proc, state, attn, b)
    own = eq1(attn, b, a)
    assert (got - own).abs().max() > 1e-3  # fusion did change the output
    assert torch.allclose(state.layers["layer"].output[0], own[0], atol=1e-5)


# --- which layers fuse ------------------------------------------------------------------
SD15_FUSED = ["mid_block.attentions.0.transformer_blocks.0.attn1.processor"] + [
    f"up_blocks.1.attentions.{i}.transformer_blocks.0.attn1.processor" for i in range(3)]


def sd15_shaped_unet():
    """SD 1.5's UNet layout (block types, 2 layers per block, 1 transformer per attention)
    with tiny widths: up_blocks.0 is an UpBlock2D without attention."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 8, 8, 8), layers_per_block=2, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=8, attention_head_dim=2)


def fused_layers(unet):
    with FeatureBank().attach(unet) as installed:
        procs = dict(unet.attn_processors)
        assert set(installed) == {n for n in procs if ".attn1." in n}  # every self-attention layer banks
        return sorted(n for n, p in procs.items() if isinstance(p, FeatureBankAttnProcessor) and p.fuse)


def test_fusion_layers_on_sd15_are_mid_and_up_blocks_1():
    """Appendix A.3's low-resolution blocks on SD 1.5's real layer set: 16 self-attention
    layers, of which only the mid block's and up_blocks.1's three fuse."""
    unet = sd15_shaped_unet()
    assert len([n for n in unet.attn_processors if ".attn1." in n]) == 16
    assert fused_layers(unet) == sorted(SD15_FUSED)


def test_fusion_layers_on_the_tiny_unet(tiny):
    expected = ["mid_block.attentions.0.transformer_blocks.0.attn1.processor"] + [
        f"up_blocks.0.attentions.{i}.transformer_blocks.0.attn1.processor" for i in range(2)]
    assert fused_layers(tiny.unet) == sorted(expected)


# --- DyMe ---------------------------------------------------------------------------------
def test_dyme_update_is_the_bipartite_merge_by_hand(attn):
    """Sec. 4.3 through the processor: concatenate [current; bank], split by the drawn
    permutation into L destinations and L sources, send every source to its most
    cosine-similar destination *key*, and average keys, values and outputs of each group
    (destination included)."""
    state = FeatureBankState(FeatureBankConfig(fusion=False, extended_attention=False, interval=1))
    proc = FeatureBankAttnProcessor(state, "layer", fuse=False)
    a = frame(12) * torch.linspace(0.2, 3.0, L)[None, :, None]  # varied norms: cosine != dot
    call(proc, state, attn, a)
    bank = state.layers["layer"]
    old = [t[0].clone() for t in (bank.key, bank.value, bank.output)]
    b = frame(13)
    state.begin_call(ONE)
    order = state.order("layer", 0)
    with torch.no_grad():
        out_b = proc(attn, b)[0]
        new = [attn.to_k(b)[0], attn.to_v(b)[0], out_b]
    cat = [torch.cat([n, o]) for n, o in zip(new, old)]  # (2L, C) each, current first
    dst, src = order[:L].tolist(), order[L:].tolist()
    keys = cat[0]
    target = [max(range(L), key=lambda j: float(F.cosine_similarity(keys[s], keys[dst[j]], dim=0))) for s in src]
    by_value = [max(range(L), key=lambda j: float(F.cosine_similarity(cat[1][s], cat[1][dst[j]], dim=0))) for s in src]
    by_dot = [max(range(L), key=lambda j: float(keys[s] @ keys[dst[j]])) for s in src]
    assert target != by_value and target != by_dot  # visibility
    assert len(set(target)) < L  # some destination takes several sources, some none
    for store, tokens in zip((bank.key, bank.value, bank.output), cat):
        for j in range(L):
            group = [tokens[dst[j]]] + [tokens[s] for s, t in zip(src, target) if t == j]
            assert torch.allclose(store[0, j], torch.stack(group).mean(0), atol=1e-5)


# --- slots -------------------------------------------------------------------------------
def slot_of(step, branch, num_steps):
    return step + (num_steps if branch == "uncond" else 0)


@pytest.mark.parametrize("steps,branches", [
    ((0, 1, 0, 1), ("uncond", "uncond", "cond", "cond")),  # full CFG: slots 2, 3, 0, 1
    ((0, 0, 1), ("uncond", "cond", "cond")),  # onetime negative: slots 2, 0, 1
])
def test_each_row_reads_and_writes_the_bank_of_its_step_and_branch(attn, steps, branches):
    """Rows are not slots: with guidance rows, row r banks into slot (step, branch), and
    the next call's row with that (step, branch) attends to it (Eq. 1 per row)."""
    n = 2
    state = FeatureBankState(FeatureBankConfig(bank="queue", bank_size=1, fusion=False, interval=1))
    proc = FeatureBankAttnProcessor(state, "layer", fuse=False)
    full = layout((0, 1, 0, 1), ("uncond", "uncond", "cond", "cond"), n)
    first = frame(14, 4)
    call(proc, state, attn, first, lay=full)  # every slot banked with a different frame
    banked = {slot_of(s, br, n): first[r] for r, (s, br) in enumerate(zip(full.steps, full.branches))}
    bank = state.layers["layer"]
    with torch.no_grad():
        for slot, x in banked.items():
            assert torch.allclose(bank.key[slot], attn.to_k(x), atol=1e-6), slot
    x = frame(15, len(steps))
    got = call(proc, state, attn, x, lay=layout(steps, branches, n), update=False)
    for r, (s, br) in enumerate(zip(steps, branches)):
        assert torch.allclose(got[r:r + 1], eq1(attn, x[r:r + 1], banked[slot_of(s, br, n)][None]), atol=1e-5), r


@pytest.mark.parametrize("cfg_type", ["full", "initialize"])
def test_stream_banks_every_row_into_its_step_and_branch(tiny, cfg_type):
    """The engine's real layouts (guidance 2, both branches): after each UNet call, a
    one-frame queue bank of slot (step, branch) holds that row's keys, read from the
    layer's own key projection."""
    from diffstream.config import StreamConfig
    from diffstream.pipelines.factory import make_pipeline
    from diffstream.testing import make_frames

    config = StreamConfig(prompt="a fox", size=64, steps=2, strength=0.6, method="streamv2v", guidance=2.0,
                          cfg_type=cfg_type, feature_bank=FeatureBankConfig(bank="queue", bank_size=1, interval=1))
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    module = tiny.unet.get_submodule(name)
    seen = []
    handle = module.to_k.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        with make_pipeline(tiny, config) as pipe:
            state = pipe.mechanism.state
            checked = 0
            for f in make_frames(4, 64, 64):
                seen.clear()
                pipe.push(f)
                lay = state.layout
                bank = state.layers[name + ".processor"]
                uncond = sum(b == "uncond" for b in lay.branches)
                assert uncond > 0
                for r, (s, br) in enumerate(zip(lay.steps, lay.branches)):
                    assert torch.allclose(bank.key[slot_of(s, br, 2)], seen[-1][r], atol=1e-6), (r, s, br)
                    checked += 1
            assert checked >= 8
    finally:
        handle.remove()


def test_a_new_step_count_starts_with_empty_banks(attn):
    """Banks of another schedule's steps mean nothing: after the step count changes, the
    first call attends to its own tokens only (plain attention), even at slot 0."""
    state = FeatureBankState(FeatureBankConfig(fusion=False, interval=1))
    proc = FeatureBankAttnProcessor(state, "layer", fuse=False)
    call(proc, state, attn, frame(16, 2), lay=layout((0, 1), ("cond", "cond"), 2))
    x = frame(17)
    got = call(proc, state, attn, x, lay=layout((0,), ("cond",), 3), update=False)
    assert (got - eq1(attn, x, frame(16))).abs().max() > 1e-3  # slot 0's old bank (frame(16, 2)[0]) would change it
    assert torch.allclose(got, plain(attn, x), atol=1e-6)
