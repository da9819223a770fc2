"""The shared attention halves reproduce diffusers exactly; install/restore is clean."""

import torch

from diffstream.attention.base import SDPAAttnProcessor, block_of, install_processors, is_self_attention


def unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    emb = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([100, 700]), encoder_hidden_states=emb).sample


def test_our_processor_equals_diffusers_sdpa(tiny):
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = tiny.unet
    with install_processors(unet, lambda name, proc: AttnProcessor2_0()):
        stock = unet_out(unet)
    with install_processors(unet, lambda name, proc: SDPAAttnProcessor()) as installed:
        ours = unet_out(unet)
        assert len(installed) == len(unet.attn_processors)
    assert torch.equal(ours, stock)


def test_install_restores_original_processors(tiny):
    unet = tiny.unet
    before = dict(unet.attn_processors)
    try:
        with install_processors(unet, lambda name, proc: SDPAAttnProcessor() if is_self_attention(name) else None) as inst:
            assert all(".attn1." in n for n in inst)
            assert all(isinstance(p, SDPAAttnProcessor) for n, p in unet.attn_processors.items() if ".attn1." in n)
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    after = unet.attn_processors
    assert all(after[n] is before[n] for n in before)


def test_block_names():
    assert block_of("up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor") == "up_blocks.1"
    assert block_of("mid_block.attentions.0.transformer_blocks.0.attn1.processor") == "mid_block"
