"""Prompt-to-Prompt's per-word cross-attention replacement schedule, by hand."""

import torch

from diffstream.attention.base import BatchLayout
from diffstream.attention.fatezero import FateZero, FateZeroAttnProcessor, FateZeroConfig, TokenFusion, probe_layers
from diffstream.attention.store import AttentionStore
from diffstream.pipelines.fatezero import FateZeroEditConfig, build_token_fusion

CROSS = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"
SWAN = "a black swan swimming in a river"


def test_per_word_schedules_from_the_prompts(tiny):
    config = FateZeroEditConfig(source_prompt=SWAN, prompt="a black duck swimming in a river",
                                word_replace=(("duck", 0.25),), fatezero=FateZeroConfig(steps=8, cross_replace=0.5))
    steps = build_token_fusion(tiny.tokenizer, config).word_steps
    assert steps[3] == 2 and steps[:3] == (4, 4, 4) and set(steps[4:]) == {4}  # "duck" is token 3


def test_a_word_past_its_schedule_keeps_its_own_map(tiny):
    """Word swap with "duck" (position 3) fused for 1 step, the others for 3: at step 2
    every column is the source's except column 3, which is the edit's own."""
    layers = probe_layers(tiny.unet, (4, 6))
    src_text, tgt_text = tiny.encode_prompt([SWAN, "a black duck swimming in a river"]).chunk(2)
    word_steps = (3, 3, 3, 1) + (3,) * 73
    fusion = TokenFusion(mapper=tuple(range(77)), word_steps=word_steps)
    fz = FateZero(FateZeroConfig(steps=4, cross_replace=0.25), layers, fusion, src_text)
    assert fz.plan.cross_steps == (0, 1, 2)  # the longest word schedule decides what is stored
    attn = tiny.unet.get_submodule(CROSS.rsplit(".processor", 1)[0])
    g = torch.Generator().manual_seed(3)
    src, edit = torch.randn(2, 6, 64, generator=g), torch.randn(2, 6, 64, generator=g)
    sink = AttentionStore(budget_bytes=None, dtype=torch.float32)
    fz.use_stores(sink=sink)
    fz.before_unet(BatchLayout.branch_major("store", 2, ("source",), 2, 4, refs=(0, 0)))
    with torch.no_grad():
        FateZeroAttnProcessor(fz.state, fz.layers[CROSS])(attn, src, src_text.expand(2, -1, -1))
        fz.use_stores(source=sink)
        fz.before_unet(BatchLayout.branch_major("fuse", 2, ("cond",), 2, 4, refs=(0, 0)))
        got = FateZeroAttnProcessor(fz.state, fz.layers[CROSS])(attn, edit, tgt_text.expand(2, -1, -1))
        split = lambda x: x.view(x.shape[0], x.shape[1], attn.heads, -1).transpose(1, 2)  # noqa: E731
        p = lambda q, k: torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)  # noqa: E731
        source = p(split(attn.to_q(src)), split(attn.to_k(src_text.expand(2, -1, -1))))
        own = p(split(attn.to_q(edit)), split(attn.to_k(tgt_text.expand(2, -1, -1))))
        maps = source.clone()
        maps[..., 3] = own[..., 3]  # "duck" is past its one step
        v = split(attn.to_v(tgt_text.expand(2, -1, -1)))
        expected = attn.to_out[0]((maps @ v).transpose(1, 2).flatten(2))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
