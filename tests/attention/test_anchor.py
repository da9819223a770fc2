"""Anchor-based cross-frame attention (Fairy) against independent references built from
diffusers' stock AttnProcessor2_0:

- every frame an anchor == full cross-frame attention over all frames' tokens;
- an ordinary frame == stock attention whose keys/values come from [own tokens, anchor tokens];
- mode "off" == stock self-attention, bit for bit.
"""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from diffstream.attention.anchor import (
    AnchorAttention,
    AnchorAttnProcessor,
    AnchorConfig,
    anchor_indices,
)
from diffstream.attention.base import BatchLayout, install_processors, is_self_attention

STEP_T = 500


def layout(phase, step, branches, frames):
    """The layout of a branch-major call of `frames` frames per branch at `step`."""
    return BatchLayout.branch_major(phase, step, [f"branch{i}" for i in range(branches)], frames, num_steps=10)


class FullCrossFrame:
    """Reference: stock diffusers attention whose keys/values are the tokens of all frames
    of the row's guidance branch (rows are branch-major)."""

    def __init__(self, branches):
        self.branches = branches
        self.stock = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        rows, length, channels = hidden_states.shape  # (branches*F, HW, C)
        frames = rows // self.branches
        tokens = hidden_states.reshape(self.branches, frames * length, channels)  # frame-major tokens per branch
        context = tokens.repeat_interleave(frames, dim=0)  # (branches*F, F*HW, C)
        return self.stock(attn, hidden_states, encoder_hidden_states=context)


class AnchorReference:
    """Reference for Fig. 4b: records the anchors' hidden states per layer (attending across
    them like FullCrossFrame), then lets ordinary frames attend to [own tokens, anchor tokens]
    through the stock processor."""

    def __init__(self, name, branches, store):
        self.name, self.branches, self.store = name, branches, store
        self.stock = AttnProcessor2_0()
        self.recording = True

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        rows, length, channels = hidden_states.shape
        frames = rows // self.branches
        if self.recording:
            self.store[self.name] = hidden_states.reshape(self.branches, frames * length, channels)
            context = self.store[self.name].repeat_interleave(frames, dim=0)
        else:
            anchors = self.store[self.name].repeat_interleave(frames, dim=0)  # (rows, K*HW, C)
            context = torch.cat([hidden_states, anchors], dim=1)
        return self.stock(attn, hidden_states, encoder_hidden_states=context)


def unet_batch(branches, frames, seed):
    """Random branch-major UNet inputs: x (branches*F, 4, 8, 8), text (branches*F, 77, 32)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(frames, 4, 8, 8, generator=g).repeat(branches, 1, 1, 1)
    emb = torch.randn(branches, 1, 77, 32, generator=g).expand(branches, frames, 77, 32).reshape(-1, 77, 32)
    return x, emb


def run(unet, x, emb):
    with torch.no_grad():
        return unet(x, torch.full((x.shape[0],), STEP_T), encoder_hidden_states=emb).sample


def test_anchor_indices_are_even_and_distinct():
    assert anchor_indices(9, 3) == (1, 4, 7)
    assert anchor_indices(100, 1) == (50,)
    assert anchor_indices(4, 7) == (0, 1, 2, 3)
    assert anchor_indices(10, 0) == ()
    for n in range(1, 40):
        for k in range(1, 9):
            idx = anchor_indices(n, k)
            assert len(idx) == min(n, k) and len(set(idx)) == len(idx)
            assert list(idx) == sorted(idx) and 0 <= idx[0] and idx[-1] < n
    with pytest.raises(ValueError):
        AnchorConfig(num_anchors=-1)


def test_off_mode_is_stock_attention_exactly(tiny):
    x, emb = unet_batch(2, 3, seed=1)
    with install_processors(tiny.unet, lambda n, p: AttnProcessor2_0()):
        stock = run(tiny.unet, x, emb)
    fairy = AnchorAttention()
    with fairy.attach(tiny.unet) as installed:
        assert installed and all(is_self_attention(n) for n in installed)
        ours = run(tiny.unet, x, emb)
    assert torch.equal(ours, stock)


@pytest.mark.parametrize("branches", [1, 3])
def test_every_frame_an_anchor_is_full_cross_frame_attention(tiny, branches):
    frames = 4
    x, emb = unet_batch(branches, frames, seed=2)
    ref = FullCrossFrame(branches)
    with install_processors(tiny.unet, lambda n, p: ref if is_self_attention(n) else AttnProcessor2_0()):
        full = run(tiny.unet, x, emb)
    fairy = AnchorAttention(AnchorConfig(num_anchors=frames))
    with fairy.attach(tiny.unet):
        fairy.before_unet(layout("record", 0, branches, frames))
        ours = run(tiny.unet, x, emb)
    torch.testing.assert_close(ours, full, rtol=0, atol=1e-5)
    # And it really is cross-frame: per-frame attention gives something else.
    assert (run(tiny.unet, x, emb) - full).abs().max() > 1e-3


def test_ordinary_frames_attend_to_own_plus_anchor_tokens(tiny):
    branches, num_anchors, frames = 3, 2, 3
    xa, emb_a = unet_batch(branches, num_anchors, seed=3)
    xf, emb_f = unet_batch(branches, frames, seed=4)
    store = {}
    refs = {}

    def make_ref(name, proc):
        if not is_self_attention(name):
            return AttnProcessor2_0()
        refs[name] = AnchorReference(name, branches, store)
        return refs[name]

    with install_processors(tiny.unet, make_ref):
        anchors_ref = run(tiny.unet, xa, emb_a)
        for r in refs.values():
            r.recording = False
        frames_ref = run(tiny.unet, xf, emb_f)

    fairy = AnchorAttention(AnchorConfig(num_anchors=num_anchors))
    state = fairy.state
    with fairy.attach(tiny.unet) as installed:
        fairy.before_unet(layout("record", 5, branches, num_anchors))
        anchors_ours = run(tiny.unet, xa, emb_a)
        fairy.before_unet(layout("attend", 5, branches, frames))
        frames_ours = run(tiny.unet, xf, emb_f)
        # One cache entry per self-attention layer for this step, all branches inside.
        assert set(state.cache) == {(name, 5) for name in installed}
        for keys, values in state.cache.values():
            assert keys.shape[0] == branches and keys.shape == values.shape
        # The cache survives a trip through another process's memory (export/load).
        shipped = AnchorAttention()
        shipped.state.load(state.export())
        shipped.before_unet(layout("attend", 5, branches, frames))
    with shipped.attach(tiny.unet):
        frames_shipped = run(tiny.unet, xf, emb_f)
    torch.testing.assert_close(anchors_ours, anchors_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(frames_ours, frames_ref, rtol=0, atol=1e-5)
    assert torch.equal(frames_shipped, frames_ours)
    assert state.nbytes > 0


def test_attend_without_cache_is_a_clear_error(tiny):
    fairy = AnchorAttention()
    x, emb = unet_batch(1, 1, seed=5)
    with fairy.attach(tiny.unet):
        fairy.before_unet(layout("attend", 0, 1, 1))
        with pytest.raises(RuntimeError, match="generate the anchors first"):
            run(tiny.unet, x, emb)


def test_processors_are_restored(tiny):
    before = dict(tiny.unet.attn_processors)
    with AnchorAttention().attach(tiny.unet):
        assert any(isinstance(p, AnchorAttnProcessor) for p in tiny.unet.attn_processors.values())
    assert all(tiny.unet.attn_processors[n] is before[n] for n in before)
