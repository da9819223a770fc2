"""FateZero's processors on the tiny UNet: Eq. 8 attention, store, fusion, blend mask."""

import dataclasses

import pytest
import torch

from diffstream.attention.base import BatchLayout, SDPAAttnProcessor, attend, attention_inputs, attention_output
from diffstream.attention.fatezero import (
    BLEND_KEY,
    FateZero,
    FateZeroAttnProcessor,
    FateZeroConfig,
    FusionPlan,
    TokenFusion,
    attention_probs,
    blend_mask,
    blend_mask_source,
    probe_layers,
)
from diffstream.attention.store import AttentionStore
from diffstream.errors import ConfigError

LATENT = (4, 6)  # (h, w): 24 latent cells; the tiny UNet attends only at half resolution, 6 (2x3) tokens
SELF = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"
CROSS = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"
PROMPT = "a black swan swimming in a river"


@pytest.fixture(scope="module")
def layers(tiny):
    return probe_layers(tiny.unet, LATENT)


@pytest.fixture(scope="module")
def text(tiny):
    return tiny.encode_prompt([PROMPT])  # (1, 77, 32)


def module(unet, name):
    return unet.get_submodule(name.rsplit(".processor", 1)[0])


def hidden(seed, rows=3, tokens=6, channels=64):
    return torch.randn(rows, tokens, channels, generator=torch.Generator().manual_seed(seed))


def make(tiny, layers, text, fusion=None, **config):
    # Eq. 8 at every layer: what these proofs write by hand
    config = FateZeroConfig(**{"steps": 4, "cross_replace": 1.0, "self_replace": 1.0, "frame_attention": "own+reference",
                               "cross_frame_min_downsample": 1, **config})
    return FateZero(config, layers, fusion, text)


def call(fz, phase, step, ref_rows, groups=1):
    """Publish the next call: `groups` branch groups (uncond, cond) of len(ref_rows) frames."""
    branches = ("uncond", "cond")[2 - groups :]
    fz.before_unet(BatchLayout.branch_major(phase, step, branches, len(ref_rows), fz.plan.num_steps, refs=ref_rows))


def run(fz, name, attn, x, enc=None):
    with torch.no_grad():
        return FateZeroAttnProcessor(fz.state, fz.layers[name])(attn, x, enc)


def test_probe_reads_every_layer_and_its_grid(layers):
    by_name = {l.name: l for l in layers}
    assert len(layers) == 8  # down_blocks.1, mid_block, up_blocks.0 (x2): self + cross each
    assert {l.downsample for l in layers} == {2}  # full resolution is DownBlock2D / UpBlock2D
    assert by_name[SELF].kv_tokens == 12 and by_name[CROSS].tokens == 6
    assert by_name[SELF].tokens == 6 and by_name[SELF].grid == (2, 3) and by_name[SELF].downsample == 2
    assert by_name[SELF].channels == 64 and by_name[SELF].heads == 8
    assert by_name[CROSS].kind == "cross" and by_name[CROSS].kv_tokens == 77


def test_plan_stores_only_what_the_schedule_reads(layers):
    config = FateZeroConfig(steps=10, cross_replace=0.5, self_replace=0.8)
    plan = FusionPlan.build(layers, config, blend=True)
    assert plan.cross_steps == (0, 1, 2, 3, 4) and plan.self_steps == tuple(range(8))
    # the reference's rule: only layers coarser than the latent are fused
    assert SELF in plan.self_layers
    coarser = FusionPlan.build(layers, dataclasses.replace(config, fuse_min_downsample=4), blend=False)
    assert coarser.self_layers == coarser.cross_layers == ()
    assert len(plan.self_layers) == len(plan.cross_layers) == 4
    # the blend mask comes from the coarsest down/up cross-attention layers (not mid)
    assert CROSS in plan.mask_layers and not any(n.startswith("mid_block") for n in plan.mask_layers)
    assert len(plan.mask_layers) == 3
    kinds = lambda step: sorted({k for k, _ in plan.keys_at(step)})  # noqa: E731
    assert kinds(0) == ["blend", "cross", "self"] and len(plan.keys_at(0)) == 9
    # after the cross-attention steps only self-attention and the blend map are read
    assert set(plan.keys_at(6)) == {("self", n) for n in plan.self_layers} | {BLEND_KEY}
    assert plan.keys_at(9) == []
    per_layer = 3 * 6 * 64 * 2  # rows x tokens x channels x fp16
    blend_map = 3 * 6 * 4  # rows x mask grid (2x3) x fp32
    assert plan.store_bytes(rows=3) == per_layer * (5 * 8 + 3 * 4) + blend_map * 8
    assert FusionPlan.build(layers, config, blend=False).store_bytes(rows=3) == per_layer * (5 * 8 + 3 * 4)


def test_config_is_validated():
    for bad in (dict(steps=0), dict(cross_replace=1.5), dict(self_replace=-0.1), dict(blend_threshold=1.0),
                dict(reference_frame="last"), dict(fuse_min_downsample=0)):
        with pytest.raises(ConfigError):
            FateZeroConfig(**bad)
    assert list(FateZeroConfig(steps=100, cross_replace=0.29).cross_steps) == list(range(29))


def test_eq8_with_each_frame_as_its_own_reference_is_plain_attention(tiny, layers, text):
    fz = make(tiny, layers, text)
    attn, x = module(tiny.unet, SELF), hidden(0)
    call(fz, "plain", 0, [0, 1, 2])
    with torch.no_grad():
        expected = SDPAAttnProcessor()(attn, x)
    torch.testing.assert_close(run(fz, SELF, attn, x), expected, rtol=1e-5, atol=1e-6)


def test_eq8_appends_the_reference_frame_keys_and_values(tiny, layers, text):
    fz = make(tiny, layers, text)
    attn, x = module(tiny.unet, SELF), hidden(1)
    call(fz, "plain", 0, [1, 1, 1])
    got = run(fz, SELF, attn, x)
    with torch.no_grad():
        for i in range(3):
            inp = attention_inputs(attn, x[i : i + 1])
            ref = attention_inputs(attn, x[1:2])
            k = torch.cat([inp.key, ref.key], dim=2)  # (1, heads, 2L, d): [z^i; z^w]
            v = torch.cat([inp.value, ref.value], dim=2)
            expected = attention_output(attn, attend(inp.query, k, v), inp)
            torch.testing.assert_close(got[i : i + 1], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [SELF, CROSS])
def test_store_call_keeps_the_layer_input_and_changes_nothing(tiny, layers, text, name):
    fz = make(tiny, layers, text)
    attn, x = module(tiny.unet, name), hidden(2)
    enc = text.expand(3, -1, -1) if name == CROSS else None
    call(fz, "plain", 0, [1, 1, 1])
    plain = run(fz, name, attn, x, enc)
    sink = AttentionStore(budget_bytes=None, dtype=torch.float32)
    fz.use_stores(sink=sink)
    call(fz, "store", 2, [1, 1, 1])
    assert torch.equal(run(fz, name, attn, x, enc), plain)
    kind = "self" if name == SELF else "cross"
    assert sink.keys() == [(kind, name, 2)] and torch.equal(sink.get((kind, name, 2)), x)
    # a layer the plan does not fuse stores nothing
    unfused = make(tiny, layers, text, fuse_min_downsample=4)  # every tiny layer is 2x down: none fused
    nothing = AttentionStore(budget_bytes=None)
    unfused.use_stores(sink=nothing)
    call(unfused, "store", 2, [0] * 3)
    run(unfused, name, attn, hidden(3), enc)
    assert len(nothing) == 0


def stored(fz, attn, name, x, enc, step=0, ref_rows=(1, 1, 1)):
    sink = AttentionStore(budget_bytes=None, dtype=torch.float32)
    fz.use_stores(sink=sink)
    call(fz, "store", step, ref_rows)
    return run(fz, name, attn, x, enc), sink


@pytest.mark.parametrize("name", [SELF, CROSS])
def test_fusing_maps_stored_from_the_same_input_reproduces_the_stored_call(tiny, layers, text, name):
    """Every map fused from the source equals the edit's own: the output must not move,
    for the conditional group only, with the unconditional group untouched."""
    fz = make(tiny, layers, text)
    attn, x = module(tiny.unet, name), hidden(4)
    enc = text.expand(3, -1, -1) if name == CROSS else None
    expected, sink = stored(fz, attn, name, x, enc)
    x2 = torch.cat([hidden(5), x])  # (2R, L, C): unconditional group, conditional group
    enc2 = torch.cat([enc, enc]) if enc is not None else None
    call(fz, "plain", 0, [1, 1, 1], groups=2)
    plain = run(fz, name, attn, x2, enc2)
    fz.use_stores(source=sink)
    call(fz, "fuse", 0, [1, 1, 1], groups=2)
    fused = run(fz, name, attn, x2, enc2)
    assert torch.equal(fused[:3], plain[:3])
    torch.testing.assert_close(fused[3:], expected, rtol=1e-5, atol=1e-6)
    if name == SELF:  # with a blend mask of any shape, both maps are the same map
        fz.state._mask_source = torch.rand(3, 1, 2, 3, generator=torch.Generator().manual_seed(0))
        fz.state._masks = {}
        torch.testing.assert_close(run(fz, name, attn, x2, enc2)[3:], expected, rtol=1e-5, atol=1e-6)


def self_fused(fz, attn, src, edit, mask_source):
    """Fused conditional rows of SELF with `src` stored and `edit` as the call's input."""
    _, sink = stored(fz, attn, SELF, src, None)
    fz.use_stores(source=sink)
    call(fz, "fuse", 0, [1, 1, 1], groups=1)
    fz.state._mask_source = mask_source  # set by hand (fuse() derives it from stored cross-attention)
    fz.state._masks = {}
    return run(fz, SELF, attn, edit)


def manual_self(attn, maps_from, values_from, ref=1):
    with torch.no_grad():
        q = attention_inputs(attn, maps_from)
        e = attention_inputs(attn, values_from)
        k = torch.cat([q.key, q.key[[ref] * 3]], dim=2)
        v = torch.cat([e.value, e.value[[ref] * 3]], dim=2)
        out = attention_probs(q.query, k) @ v  # (R, heads, L, d)
        out = out.transpose(1, 2).reshape(3, 6, -1)
        return attention_output(attn, out, e)


def test_self_attention_is_replaced_by_the_source_maps(tiny, layers, text):
    fz = make(tiny, layers, text)
    attn, src, edit = module(tiny.unet, SELF), hidden(10), hidden(11)
    got = self_fused(fz, attn, src, edit, None)
    # s_src (from the inversion's queries and keys) applied to the edit's values
    torch.testing.assert_close(got, manual_self(attn, src, edit), rtol=1e-5, atol=1e-6)


def test_blend_mask_all_ones_is_the_pure_edit_and_all_zeros_the_pure_source(tiny, layers, text):
    fz = make(tiny, layers, text)
    attn, src, edit = module(tiny.unet, SELF), hidden(12), hidden(13)
    ones = self_fused(fz, attn, src, edit, torch.ones(3, 1, 2, 3))  # M = 1 everywhere: s_edit
    torch.testing.assert_close(ones, manual_self(attn, edit, edit), rtol=1e-5, atol=1e-6)
    call(fz, "plain", 0, [1, 1, 1])
    torch.testing.assert_close(ones, run(fz, SELF, attn, edit), rtol=1e-5, atol=1e-6)
    zeros = self_fused(fz, attn, src, edit, torch.zeros(3, 1, 2, 3))  # M = 0: s_src
    torch.testing.assert_close(zeros, manual_self(attn, src, edit), rtol=1e-5, atol=1e-6)
    # a half mask blends per query position (Eq. 7): rows of the mask select the map
    half = torch.zeros(3, 1, 2, 3)
    half[:, :, 0] = 1.0  # first grid row: edit, second: source
    mixed = self_fused(fz, attn, src, edit, half)
    with torch.no_grad():
        q_s, q_e = attention_inputs(attn, src), attention_inputs(attn, edit)
        k_s = torch.cat([q_s.key, q_s.key[[1] * 3]], dim=2)
        k_e = torch.cat([q_e.key, q_e.key[[1] * 3]], dim=2)
        v = torch.cat([q_e.value, q_e.value[[1] * 3]], dim=2)
        m = torch.tensor([1.0, 1, 1, 0, 0, 0])[None, None, :, None]
        maps = m * attention_probs(q_e.query, k_e) + (1 - m) * attention_probs(q_s.query, k_s)
        out = (maps @ v).transpose(1, 2).reshape(3, 6, -1)
        torch.testing.assert_close(mixed, attention_output(attn, out, q_e), rtol=1e-5, atol=1e-6)


def test_blend_mask_of_a_synthetic_cross_attention_map():
    # 1 frame, 2 heads, an 8x8 grid, 5 tokens; the blend word (column 2) is hot at (3, 4).
    maps = torch.full((1, 2, 64, 5), 0.01)
    maps[0, :, 3 * 8 + 4, 2] = 0.9
    maps[0, :, 0, 2] = 0.2  # a weaker response, below tau after normalisation (0.2 / 0.9 < 0.3)
    maps[0, :, 63, 1] = 5.0  # another word: ignored
    source = blend_mask_source([maps, maps], [(8, 8), (8, 8)], columns=[2])
    assert source.shape == (1, 1, 8, 8)
    # 3x3 max pooling grows the hot cell into rows 2-4, columns 3-5
    expected = torch.zeros(8, 8)
    expected[2:5, 3:6] = 1
    assert torch.equal(blend_mask(source, (8, 8), 0.3).view(8, 8), expected)
    # at a coarser layer: nearest resizing picks cells (2i, 2j)
    assert torch.equal(blend_mask(source, (4, 4), 0.3).view(4, 4), expected[::2, ::2])
    assert blend_mask(source, (8, 8), 0.0).sum() == 64  # tau = 0: the edit everywhere
    assert blend_mask(torch.zeros(1, 1, 8, 8), (8, 8), 0.3).sum() == 0


def test_cross_attention_fusion_is_prompt_to_prompt_refinement(tiny, layers, text):
    target = tiny.encode_prompt(["a white duck swimming in a river"])
    mapper = tuple([0, 1, -1, -1] + list(range(4, 77)))  # "white duck" has no source counterpart
    weights = tuple([1.0] * 3 + [2.0] + [1.0] * 73)  # re-weight "duck"
    fz = make(tiny, layers, text, fusion=TokenFusion(mapper, weights))
    attn, src, edit = module(tiny.unet, CROSS), hidden(20), hidden(21)
    _, sink = stored(fz, attn, CROSS, src, text.expand(3, -1, -1))
    fz.use_stores(source=sink)
    call(fz, "fuse", 0, [0, 1, 2], groups=1)
    got = run(fz, CROSS, attn, edit, target.expand(3, -1, -1))
    with torch.no_grad():
        s = attention_inputs(attn, src, text.expand(3, -1, -1))
        e = attention_inputs(attn, edit, target.expand(3, -1, -1))
        m_s, m_e = attention_probs(s.query, s.key), attention_probs(e.query, e.key)
        alpha = torch.tensor([0.0 if j < 0 else 1.0 for j in mapper])
        fused = m_s[..., [max(j, 0) for j in mapper]] * alpha + m_e * (1 - alpha)
        fused = fused * torch.tensor(weights)
        out = (fused @ e.value).transpose(1, 2).reshape(3, 6, -1)
        torch.testing.assert_close(got, attention_output(attn, out, e), rtol=1e-5, atol=1e-6)
    # outside the cross-attention steps the edit keeps its own maps
    fz2 = make(tiny, layers, text, fusion=TokenFusion(mapper, weights), cross_replace=0.25)
    fz2.use_stores(source=sink)
    call(fz2, "fuse", 1, [0, 1, 2], groups=1)
    with torch.no_grad():
        plain = SDPAAttnProcessor()(attn, edit, target.expand(3, -1, -1))
    assert torch.equal(run(fz2, CROSS, attn, edit, target.expand(3, -1, -1)), plain)


def test_the_store_keeps_the_blend_map_and_fusion_reads_it(tiny, layers, text):
    """Inversion reduces the blend words' source cross-attention of the mask layers to one
    map per step (Eq. 6 before thresholding); the editing step's mask comes from it."""
    fz = make(tiny, layers, text, fusion=TokenFusion(tuple(range(77)), blend_columns=(3,)))
    sink = AttentionStore(budget_bytes=None)
    fz.use_stores(sink=sink)
    call(fz, "store", 0, [0, 1, 2])
    maps = []
    for i, name in enumerate(fz.plan.mask_layers):
        attn, x = module(tiny.unet, name), hidden(30 + i)
        run(fz, name, attn, x, text.expand(3, -1, -1))
        with torch.no_grad():
            inp = attention_inputs(attn, x, text.expand(3, -1, -1))
            maps.append(attention_probs(inp.query, inp.key))
    expected = blend_mask_source(maps, [(2, 3)] * len(maps), [3])
    stored_map = sink.get((*BLEND_KEY, 0))
    assert stored_map.dtype == torch.float32 and stored_map.shape == (3, 1, 2, 3)
    torch.testing.assert_close(stored_map, expected)
    fz.use_stores(source=sink)
    call(fz, "fuse", 0, [0, 1, 2], groups=1)
    assert torch.equal(fz.state.mask((2, 3)), blend_mask(expected, (2, 3), 0.3))


def test_attach_installs_and_restores_processors(tiny, layers, text):
    fz = make(tiny, layers, text)
    before = {k: type(v) for k, v in tiny.unet.attn_processors.items()}
    with fz.attach(tiny.unet) as installed:
        assert all(is_fz for is_fz in (isinstance(p, FateZeroAttnProcessor) for p in installed.values()))
        selfs = [n for n in installed if ".attn1." in n]
        assert len(selfs) == 4  # Eq. 8 in every self-attention layer
    with make(tiny, layers, text, fuse_min_downsample=4).attach(tiny.unet) as installed:  # nothing fused
        assert len([n for n in installed if ".attn1." in n]) == 4  # spatial-temporal even where nothing is fused
        assert "mid_block.attentions.0.transformer_blocks.0.attn2.processor" not in installed  # not fused, no mask
    assert {k: type(v) for k, v in tiny.unet.attn_processors.items()} == before
