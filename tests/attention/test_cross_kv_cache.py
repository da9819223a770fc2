"""Proofs of the per-prompt cross-attention K/V cache (issue #18, StreamDiffusionV2's
`crossattn_cache`; `diffstream.attention.cross_kv_cache`).

The oracle is the stock tiny Wan transformer (`models.wan`, diffusers' own
`WanAttnProcessor` everywhere) on the same inputs. With our processors on every `attn2`
and the text projection shared (`share_text_projection`), every call must equal it,
hit or miss, and the counts say which calls hit. The texts are chosen so that a stale
cache is visible: the stock outputs under the two texts differ by far more than the
tolerance (`test_the_texts_are_far_apart`). The processor-level proofs call one block's
`attn2` directly, so the per-layer key is proved without the text memo in between.
tests/mutants/m_cross_kv_cache.py lists the bugs these proofs catch.
"""

import contextlib
import weakref

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor

from diffstream.attention.base import install_processors
from diffstream.attention.cross_kv_cache import (
    CrossKVAttnProcessor,
    CrossKVCacheState,
    make_cross_processor,
    share_text_projection,
)
from diffstream.errors import ConfigError
from diffstream.models.wan import TINY_WAN_TEXT_DIM, WAN_LATENT_CHANNELS, tiny_wan_transformer

LAYERS = 2  # blocks of the tiny transformer: one attn2 each
ATOL = 1e-6
FAR = 1e-2  # a stale cache misses the stock output by more than this (10^4 x ATOL)
TEXT_LEN = 5
DIM = 48  # the tiny transformer's width (2 heads x 24)


@pytest.fixture(scope="module")
def wan():
    return tiny_wan_transformer(seed=0, num_layers=LAYERS)


def latents(seed: int, rows: int = 1) -> torch.Tensor:
    """(rows, 16, 2, 8, 8) latents, different in every row."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, WAN_LATENT_CHANNELS, 2, 8, 8, generator=g)


def text(seed: int, scale: float = 1.0, shift: float = 0.0, rows: int = 1) -> torch.Tensor:
    """(rows, 5, 32) a text embedding."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, TEXT_LEN, TINY_WAN_TEXT_DIM, generator=g) * scale + shift


def text_a() -> torch.Tensor:
    return text(11)


def text_b() -> torch.Tensor:
    """Far from `text_a`: other values, another scale and offset."""
    return text(12, scale=3.0, shift=1.0)


def run(model, x, t, prompt) -> torch.Tensor:
    with torch.no_grad():
        return model(x, t, encoder_hidden_states=prompt, return_dict=False)[0]


@contextlib.contextmanager
def cached(model, state: CrossKVCacheState, share: bool = True):
    """Our processors on every attn2 (and the text projection shared) for the context."""
    with contextlib.ExitStack() as stack:
        installed = stack.enter_context(install_processors(model, make_cross_processor(state)))
        if share:
            stack.enter_context(share_text_projection(model, state))
        yield installed


def close(ours, expected) -> bool:
    return (ours - expected).abs().max().item() <= ATOL


def test_the_texts_are_far_apart(wan):
    """The inputs make a stale cache visible: the stock model's outputs under the two texts
    differ by > FAR."""
    x, t = latents(0), torch.tensor([500])
    assert (run(wan, x, t, text_a()) - run(wan, x, t, text_b())).abs().max() > FAR


def test_installs_on_cross_attention_only(wan):
    state = CrossKVCacheState()
    before = dict(wan.attn_processors)
    with cached(wan, state) as installed:
        assert sorted(installed) == [f"blocks.{i}.attn2.processor" for i in range(LAYERS)]
        now = wan.attn_processors
        assert all(now[n] is p for n, p in before.items() if ".attn1." in n)  # self-attention stock
    assert all(wan.attn_processors[n] is p for n, p in before.items())


def test_same_text_hits_and_equals_stock(wan):
    """(1) Several calls with one text tensor: each equals the stock model; the first
    computes every layer's keys/values, the later ones reuse them."""
    prompt = text_a()
    calls = [(latents(s), torch.tensor([t])) for s, t in ((1, 900), (2, 500), (3, 0))]
    expected = [run(wan, x, t, prompt) for x, t in calls]
    state = CrossKVCacheState()
    with cached(wan, state):
        for i, ((x, t), want) in enumerate(zip(calls, expected)):
            assert close(run(wan, x, t, prompt), want), f"call {i}"
            assert (state.misses, state.hits) == (LAYERS, LAYERS * i), f"call {i}"
            assert (state.text_misses, state.text_hits) == (1, i), f"call {i}"


def test_new_text_recomputes(wan):
    """(2) Another text tensor (far from the first) recomputes: equals the stock model under it."""
    x, t = latents(4), torch.tensor([500])
    a, b = text_a(), text_b()
    want_a, want_b = run(wan, x, t, a), run(wan, x, t, b)
    state = CrossKVCacheState()
    with cached(wan, state):
        assert close(run(wan, x, t, a), want_a)
        assert close(run(wan, x, t, a), want_a)
        assert close(run(wan, x, t, b), want_b)
        assert close(run(wan, x, t, b), want_b)
        assert close(run(wan, x, t, a), want_a)  # and back
    assert (state.misses, state.hits) == (3 * LAYERS, 2 * LAYERS)


def test_in_place_edit_recomputes(wan):
    """(3) The same tensor edited in place (its version moves) recomputes."""
    x, t = latents(5), torch.tensor([500])
    prompt = text_a()
    want_a, want_b = run(wan, x, t, text_a()), run(wan, x, t, text_b())
    state = CrossKVCacheState()
    with cached(wan, state):
        assert close(run(wan, x, t, prompt), want_a)
        prompt.copy_(text_b())  # same tensor, same address, new values
        assert close(run(wan, x, t, prompt), want_b)
        assert close(run(wan, x, t, prompt), want_b)
    assert (state.misses, state.hits) == (2 * LAYERS, LAYERS)


def test_expanded_batch_equals_stock(wan):
    """(4) Three rows sharing one text through an expanded view (stride 0 over rows)."""
    x, t = latents(6, rows=3), torch.tensor([900, 500, 100])
    prompt = text_a().expand(3, -1, -1)
    want = run(wan, x, t, prompt)
    state = CrossKVCacheState()
    with cached(wan, state):
        assert close(run(wan, x, t, prompt), want)
        assert close(run(wan, x, t, prompt), want)
    assert (state.misses, state.hits) == (LAYERS, LAYERS)
    assert all(e.k.shape[0] == 3 for e in state.layers.values())


def test_reset_forces_a_miss_and_frees(wan):
    """(5) reset() drops every entry: the next call recomputes, and the tensors the cache
    held are released."""
    x, t = latents(7), torch.tensor([500])
    prompt = text_a()
    want = run(wan, x, t, prompt)
    state = CrossKVCacheState()
    with cached(wan, state):
        run(wan, x, t, prompt)
        held = [weakref.ref(e.k) for e in state.layers.values()]
        state.reset()
        assert not state.layers and state.text is None
        assert all(r() is None for r in held)
        assert close(run(wan, x, t, prompt), want)
        assert (state.misses, state.hits, state.text_misses) == (LAYERS, 0, 1)
        assert close(run(wan, x, t, prompt), want)
        assert (state.misses, state.hits) == (LAYERS, LAYERS)


def test_without_the_shared_projection_every_call_misses(wan):
    """Why `share_text_projection` exists: diffusers' Wan projects the text afresh at every
    call, so the layers' key (the tensor reaching attn2) never repeats. Still exact."""
    x, t = latents(8), torch.tensor([500])
    prompt = text_a()
    want = run(wan, x, t, prompt)
    state = CrossKVCacheState()
    with cached(wan, state, share=False):
        for _ in range(3):
            assert close(run(wan, x, t, prompt), want)
    assert (state.misses, state.hits) == (3 * LAYERS, 0)


def test_inference_mode_text_is_never_cached(wan):
    """Inference tensors have no version counter (an in-place edit leaves no trace): every
    call recomputes, still exact."""
    x, t = latents(9), torch.tensor([500])
    want_a, want_b = run(wan, x, t, text_a()), run(wan, x, t, text_b())
    state = CrossKVCacheState()
    with cached(wan, state), torch.inference_mode():
        prompt = text_a()
        for _ in range(2):
            assert close(run(wan, x, t, prompt), want_a)
        prompt.copy_(text_b())
        assert close(run(wan, x, t, prompt), want_b)
    assert (state.misses, state.hits, state.text_hits) == (3 * LAYERS, 0, 0)
    assert not state.layers and state.text is None


def test_fused_projections_equal_stock():
    """With `fuse_projections()` (one `to_kv` for the text) the cache equals the stock
    fused model, hit or miss."""
    model = tiny_wan_transformer(seed=1, num_layers=LAYERS)
    for block in model.blocks:
        block.attn2.fuse_projections()
    x, t, prompt = latents(10), torch.tensor([500]), text_a()
    want = run(model, x, t, prompt)
    state = CrossKVCacheState()
    with cached(model, state):
        for _ in range(2):
            assert close(run(model, x, t, prompt), want)
    assert (state.misses, state.hits) == (LAYERS, LAYERS)


# --- processor level: the per-layer key on the tensor reaching attn2 ---------------


@pytest.fixture(scope="module")
def attn2(wan):
    return wan.blocks[0].attn2


def tokens(seed: int, rows: int = 1, length: int = 16, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """(rows, length, 48) tokens at the transformer's width."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, length, DIM, generator=g) * scale + shift


def stock(attn, x, ehs) -> torch.Tensor:
    with torch.no_grad():
        return WanAttnProcessor()(attn, x, ehs)


def ours(proc, attn, x, ehs) -> torch.Tensor:
    with torch.no_grad():
        return proc(attn, x, ehs)


def test_processor_new_tensor_recomputes(attn2):
    """A new text tensor of the same shape reaching attn2 recomputes (the address in the key)."""
    x = tokens(20)
    a, b = tokens(21, length=TEXT_LEN), tokens(22, length=TEXT_LEN, scale=3.0, shift=1.0)
    assert (stock(attn2, x, a) - stock(attn2, x, b)).abs().max() > FAR
    state = CrossKVCacheState()
    proc = CrossKVAttnProcessor(state, "attn2")
    for ehs in (a, a, b, b):
        assert close(ours(proc, attn2, x, ehs), stock(attn2, x, ehs))
    assert (state.misses, state.hits) == (2, 2)


def test_processor_in_place_edit_recomputes(attn2):
    """The same tensor reaching attn2, edited in place, recomputes (the version in the key)."""
    x = tokens(23)
    ehs = tokens(24, length=TEXT_LEN)
    state = CrossKVCacheState()
    proc = CrossKVAttnProcessor(state, "attn2")
    assert close(ours(proc, attn2, x, ehs), stock(attn2, x, ehs))
    assert close(ours(proc, attn2, x, ehs), stock(attn2, x, ehs))
    ehs[:, 1:3].mul_(-4.0).add_(2.0)  # through a view: the version is shared
    assert close(ours(proc, attn2, x, ehs), stock(attn2, x, ehs))
    assert (state.misses, state.hits) == (2, 1)


def test_processor_holds_the_text_it_keyed_on(attn2):
    """The cache keeps its text alive (so no other tensor can take its address while it is
    cached); a text made after the first is freed by its owner is still recomputed."""
    x = tokens(25)
    state = CrossKVCacheState()
    proc = CrossKVAttnProcessor(state, "attn2")
    a = tokens(26, length=TEXT_LEN)
    ours(proc, attn2, x, a)
    held = weakref.ref(a)
    del a
    assert held() is not None
    b = tokens(27, length=TEXT_LEN, scale=3.0, shift=1.0)  # same size: would reuse a freed address
    assert close(ours(proc, attn2, x, b), stock(attn2, x, b))
    assert held() is None  # replaced: released


def test_processor_expanded_rows_equal_stock(attn2):
    """Rows sharing one text through an expanded view (stride 0)."""
    x = tokens(28, rows=3)
    ehs = tokens(29, length=TEXT_LEN).expand(3, -1, -1)
    state = CrossKVCacheState()
    proc = CrossKVAttnProcessor(state, "attn2")
    for _ in range(2):
        assert close(ours(proc, attn2, x, ehs), stock(attn2, x, ehs))
    assert (state.misses, state.hits) == (1, 1)


def test_misuse_is_refused(wan, attn2):
    state = CrossKVCacheState()
    proc = CrossKVAttnProcessor(state, "attn")
    x = tokens(30)
    with pytest.raises(RuntimeError, match="encoder_hidden_states"):
        proc(attn2, x, None)
    torch.manual_seed(0)
    i2v = WanAttention(dim=DIM, heads=2, dim_head=24, added_kv_proj_dim=DIM, cross_attention_dim_head=24)
    with pytest.raises(RuntimeError, match="I2V"):
        proc(i2v, x, tokens(31, length=TEXT_LEN))
    with pytest.raises(ConfigError):
        with share_text_projection(attn2, state):
            pass
