"""The reference implementation's frame-attention layouts, against attention written by
hand on small tensors (3 frames of 6 tokens, the tiny UNet's weights)."""

import pytest
import torch

from diffstream.attention.base import BatchLayout, SDPAAttnProcessor
from diffstream.attention.fatezero import FateZero, FateZeroAttnProcessor, FateZeroConfig, probe_layers
from diffstream.attention.store import AttentionStore
from diffstream.errors import ConfigError
from diffstream.pipelines.fatezero import plan_windows

LATENT = (4, 6)
SELF = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"


@pytest.fixture(scope="module")
def layers(tiny):
    return probe_layers(tiny.unet, LATENT)


def hand(attn, h, sources):
    """softmax(q_i [k_s for s in sources(i)]^T / sqrt(d)) [v_s ...] per row, by hand."""
    split = lambda x: x.view(x.shape[0], x.shape[1], attn.heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(attn.to_q(h)), split(attn.to_k(h)), split(attn.to_v(h))
    rows = []
    for i, src in enumerate(sources):
        keys = torch.cat([k[s] for s in src], dim=1)  # (heads, S*L, d)
        vals = torch.cat([v[s] for s in src], dim=1)
        p = torch.softmax(q[i] @ keys.transpose(-1, -2) * attn.scale, dim=-1)
        rows.append((p @ vals).transpose(0, 1).flatten(1))
    return attn.to_out[0](torch.stack(rows))


def run(tiny, layers, refs, phase="plain", sink=None, source=None, **config):
    fz = FateZero(FateZeroConfig(steps=2, cross_replace=1.0, self_replace=1.0, **config), layers)
    fz.use_stores(sink=sink, source=source)
    fz.before_unet(BatchLayout.branch_major(phase, 0, ("cond",), len(refs), 2, refs=refs))
    attn = tiny.unet.get_submodule(SELF.rsplit(".processor", 1)[0])
    h = torch.randn(len(refs), 6, 64, generator=torch.Generator().manual_seed(len(refs)))
    with torch.no_grad():
        return FateZeroAttnProcessor(fz.state, fz.layers[SELF])(attn, h), attn, h


@pytest.mark.parametrize("layout, refs, sources", [
    ("own+reference", (1, 1, 1), [(0, 1), (1, 1), (2, 1)]),  # Eq. 8, middle frame
    ("reference", (1, 1, 1), [(1,), (1,), (1,)]),  # the reference configs' ['mid']: no own tokens
    ("previous+first", (0, 0, 1), [(0, 0), (0, 0), (1, 0)]),  # the code default [-1, 'first']
])
def test_each_layout_attends_to_the_frames_it_names(tiny, layers, layout, refs, sources):
    reference = "previous" if layout == "previous+first" else "middle"
    got, attn, h = run(tiny, layers, refs, frame_attention=layout, reference_frame=reference)
    with torch.no_grad():
        torch.testing.assert_close(got, hand(attn, h, sources), rtol=1e-5, atol=1e-6)


def test_layers_finer_than_the_cross_frame_bound_attend_within_their_frame(tiny, layers):
    got, attn, h = run(tiny, layers, (1, 1, 1), frame_attention="reference", cross_frame_min_downsample=4)
    with torch.no_grad():  # the tiny UNet's attention is 2x down: below 4, per-frame
        torch.testing.assert_close(got, hand(attn, h, [(0,), (1,), (2,)]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, SDPAAttnProcessor()(attn, h), rtol=1e-5, atol=1e-6)
    same, _, _ = run(tiny, layers, (1, 1, 1), frame_attention="reference", cross_frame_min_downsample=2)
    torch.testing.assert_close(same, hand(attn, h, [(1,), (1,), (1,)]), rtol=1e-5, atol=1e-6)


def test_fused_source_maps_use_the_same_layout(tiny, layers):
    """Replacing self-attention by the source's keeps the layout: source maps over the
    reference frame's keys only, applied to the edit's values of that frame."""
    sink = AttentionStore(budget_bytes=None, dtype=torch.float32)
    _, attn, src = run(tiny, layers, (1, 1, 1), "store", sink=sink, frame_attention="reference")
    fz = FateZero(FateZeroConfig(steps=2, cross_replace=1.0, self_replace=1.0, frame_attention="reference"), layers)
    fz.use_stores(source=sink)
    fz.before_unet(BatchLayout.branch_major("fuse", 0, ("cond",), 3, 2, refs=(1, 1, 1)))
    edit = torch.randn(3, 6, 64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        got = FateZeroAttnProcessor(fz.state, fz.layers[SELF])(attn, edit)
        split = lambda x: x.view(3, 6, attn.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(attn.to_q(src)), split(attn.to_k(src)), split(attn.to_v(edit))
        p = torch.softmax(q @ k[[1, 1, 1]].transpose(-1, -2) * attn.scale, dim=-1)  # source maps, frame 1's keys
        expected = attn.to_out[0]((p @ v[[1, 1, 1]]).transpose(1, 2).flatten(2))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_previous_and_first_windows_carry_frame_zero_in_row_zero():
    w = plan_windows(5, 2, "previous", first=True)
    assert [x.rows for x in w] == [(0, 1), (0, 1, 2, 3), (0, 3, 4)]
    assert [x.ref_rows for x in w] == [(0, 0), (0, 0, 1, 2), (0, 1, 1)]
    assert [x.frames for x in w] == [(0, 1), (2, 3), (4,)]
    with pytest.raises(ConfigError, match="--reference-frame previous"):
        FateZeroConfig(frame_attention="previous+first")
    with pytest.raises(ConfigError, match="--frame-attention"):
        FateZeroConfig(frame_attention="middle")
