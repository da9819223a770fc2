"""Cross-attention keys/values cached per prompt: causal Wan video DiTs (issue #18).

StreamDiffusionV2's `crossattn_cache` (from Self-Forcing / CausVid's causal Wan model):
a streamed video is denoised in many model calls (chunks x steps, plus record calls),
all under one prompt, and every call of every Wan block's cross-attention (`attn2`)
projects the same text into the same keys and values: `norm_k(to_k(text))` and
`to_v(text)`, split into heads. They only change with the prompt, so each block keeps
them and projects only the queries per call. In those repositories the cache is a
per-block dict with an `is_init` flag, filled at the first call and reused until the
pipeline resets it (on a prompt switch); forgetting the reset silently keeps the old
prompt. Here the cache knows when it is stale by itself, and `reset()` only frees it:

- Key (per layer): the identity of the text tensor reaching `attn2` (`text_key`):
  its address, shape, strides, dtype, device and version counter. A new prompt is a
  new tensor (another address: the state holds the tensor it keyed on, so its address
  cannot be reused by another tensor while cached); an in-place edit of the same tensor
  bumps its version (shared by all its views). Host-side metadata only: no sync, the
  tensor's values are never read. A key that differs recomputes and replaces (one
  entry per layer: one prompt per stream, as in StreamDiffusionV2).
- The text the transformer hands `attn2` is *not* the tensor the pipeline passes:
  diffusers' `WanTransformer3DModel` projects the text embedding afresh at every call
  (`condition_embedder.text_embedder`, a new tensor each time), so keyed on what
  reaches `attn2` alone every call would miss. `share_text_projection` closes that gap:
  it memoises the text projection on the tensor the pipeline passes (the same key), so
  every call with one prompt hands `attn2` the same tensor. diffusers' own text K/V
  cache (`diffusers.hooks.text_kv_cache`, 0.42.1) meets the same problem the same way,
  capturing its key at the transformer's input. Without `share_text_projection` the
  processors stay exact, they just never hit.
- Exactness: a hit returns the keys/values a miss would compute from the same tensor
  (values unchanged: same address, same version), so the output equals diffusers'
  `WanAttnProcessor` (tests/attention/test_cross_kv_cache.py). Text tensors made under
  `torch.inference_mode` carry no version counter: they are never cached (every call
  recomputes, still exact).
- Not in the key: the weights. After changing `to_k`/`to_v`/`norm_k` or the text
  projection (loading or fusing a LoRA, changing adapter scales) call `reset()`. One
  state per transformer (layers are keyed by processor name).

Memory: per layer and row, keys and values of L_text tokens (Wan 2.1 1.3B, 512 tokens,
30 blocks, bf16: about 94 MB per row), held until the prompt changes or `reset()`.
T2V only: Wan's I2V cross-attention (`add_k_proj`, image context concatenated to the
text) is refused.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F

from diffstream.attention.base import compiler_opaque, is_self_attention
from diffstream.errors import ConfigError


def text_key(text: torch.Tensor) -> tuple | None:
    """What identifies a text tensor's contents without reading them (host metadata only).

    Args:
        text: (B, L_text, D) a text embedding, any layout (views and expanded views too).
    Returns:
        (address, shape, strides, version, dtype, device), or None for an inference
        tensor (`torch.inference_mode`), which has no version counter: never cached.
    """
    if text.is_inference():
        return None
    return (text.data_ptr(), tuple(text.shape), tuple(text.stride()), text._version, text.dtype, text.device)


class CrossKV:
    """One layer's cached text keys and values.

    Attributes:
        key: the cache key (`text_key` of `source`, and whether projections were fused).
        source: the text tensor the entry was computed from, held so that its address
            cannot be taken by another tensor while the entry lives.
        k, v: (B, heads, L_text, d) the projected keys (after `norm_k`) and values.
    """

    __slots__ = ("key", "source", "k", "v")

    def __init__(self, key: tuple, source: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.key = key
        self.source = source
        self.k = k
        self.v = v


class CrossKVCacheState:
    """The text keys/values of every cross-attention layer of one stream, and the
    memoised text projection (`share_text_projection`).

    `hits` / `misses` count the layers' lookups, `text_hits` / `text_misses` the text
    projection's (host ints, for tests and stats).
    """

    def __init__(self):
        self.layers: dict[str, CrossKV] = {}
        self.reset()

    def reset(self) -> None:
        """Drop every cached tensor and zero the counts (a new stream, or new weights)."""
        self.layers.clear()
        self.text: CrossKV | None = None  # the text projection: source = its input, k = its output
        self.hits = 0
        self.misses = 0
        self.text_hits = 0
        self.text_misses = 0

    def lookup(self, name: str, key: tuple | None) -> CrossKV | None:
        """Layer `name`'s entry if it was computed under `key` (None: never cached), else None."""
        entry = self.layers.get(name)
        if key is not None and entry is not None and entry.key == key:
            self.hits += 1
            return entry
        self.misses += 1
        return None

    def store(self, name: str, key: tuple | None, source: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Make (k, v) layer `name`'s entry, replacing the previous one (one per layer)."""
        if key is None:
            self.layers.pop(name, None)  # an uncacheable text: keep nothing stale either
        else:
            self.layers[name] = CrossKV(key, source, k, v)

    def nbytes(self) -> int:
        """Bytes of the cached keys/values (the text tensors held are the caller's)."""
        return sum(t.nbytes for e in self.layers.values() for t in (e.k, e.v))


class CrossKVAttnProcessor:
    """Cross-attention (`attn2`) of one Wan transformer block with the text keys/values cached.

    Args:
        state: the stream's cache.
        name: processor name (cache key).
    """

    def __init__(self, state: CrossKVCacheState, name: str):
        self.state = state
        self.name = name

    @compiler_opaque  # stateful: the compiled graphs stop here (attention.base)
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        """(B, L, C) video tokens attending to (B, L_text, C) text -> (B, L, C).

        Args:
            attention_mask: passed to the attention as diffusers does (Wan passes None).
        """
        if encoder_hidden_states is None or rotary_emb is not None:
            raise RuntimeError("CrossKVAttnProcessor is for a Wan block's cross-attention (attn2): it needs the text "
                               "(encoder_hidden_states) and no rotary table")
        if attn.add_k_proj is not None:
            raise RuntimeError("CrossKVAttnProcessor is text-to-video only: this cross-attention has image keys "
                               "(Wan I2V, add_k_proj)")
        # Adapted from diffusers WanAttnProcessor (0.42.1), its cross-attention path: q/k RMS
        # norms over all heads, split into heads, attention, output projection; the text's
        # keys/values come from the cache when the text is the one they were computed from.
        fused = getattr(attn, "fused_projections", False)
        query = attn.norm_q(attn.to_q(hidden_states))
        query = query.unflatten(2, (attn.heads, -1)).transpose(1, 2)  # (B, heads, L, d)
        key = text_key(encoder_hidden_states)
        key = None if key is None else key + (fused,)
        entry = self.state.lookup(self.name, key)
        if entry is None:
            k, v = text_keys_values(attn, encoder_hidden_states, fused)
            self.state.store(self.name, key, encoder_hidden_states, k, v)
        else:
            k, v = entry.k, entry.v
        out = F.scaled_dot_product_attention(query, k, v, attn_mask=attention_mask)  # (B, heads, L, d)
        out = out.transpose(1, 2).flatten(2).type_as(query)  # (B, L, heads * d)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)  # dropout (identity at inference)


def text_keys_values(attn, text: torch.Tensor, fused: bool):
    """The text's keys and values of a Wan cross-attention, split into heads.

    Args:
        attn: a diffusers `WanAttention` (cross-attention).
        text: (B, L_text, C) the text tokens reaching it.
        fused: the projections are fused (`attn.fuse_projections()`: one `to_kv`).
    Returns:
        (k, v), each (B, heads, L_text, d): k after `norm_k` (RMS norm over all heads).
    """
    if fused:
        k, v = attn.to_kv(text).chunk(2, dim=-1)  # (B, L_text, heads * d) each
    else:
        k, v = attn.to_k(text), attn.to_v(text)
    k = attn.norm_k(k)
    k = k.unflatten(2, (attn.heads, -1)).transpose(1, 2)  # (B, heads, L_text, d)
    v = v.unflatten(2, (attn.heads, -1)).transpose(1, 2)
    return k, v


def make_cross_processor(state: CrossKVCacheState) -> Callable[[str, object], CrossKVAttnProcessor | None]:
    """A `make(name, proc)` for `attention.base.install_processors`: a `CrossKVAttnProcessor`
    on every cross-attention (`attn2`), None (keep the current one) elsewhere."""

    def make(name, proc):
        return None if is_self_attention(name) else CrossKVAttnProcessor(state, name)

    return make


@contextlib.contextmanager
def share_text_projection(transformer, state: CrossKVCacheState):
    """Memoise a Wan transformer's text projection on its input for the context.

    `WanTransformer3DModel` runs `condition_embedder.text_embedder` on the text at every
    call, so `attn2` gets a new tensor each time and its cache never hits (module
    docstring). With this, a call whose text is the previous one (`text_key`: same
    tensor, not modified in place) returns the previous projection, the same tensor
    object. The projection still runs at every call (a forward hook replaces its
    output; its cost is a small fraction of the keys/values it lets the layers skip).

    Args:
        transformer: a `WanTransformer3DModel`.
        state: the stream's cache; `reset()` also drops the memoised projection.
    """
    embedder = getattr(getattr(transformer, "condition_embedder", None), "text_embedder", None)
    if embedder is None:
        raise ConfigError("the cross-attention cache needs a Wan video transformer (condition_embedder.text_embedder)")

    @compiler_opaque  # stateful, like the processors
    def memo(module, args, output):
        text = args[0]  # (B, L_text, text_dim) the tensor the pipeline passed
        key = text_key(text)
        entry = state.text
        if key is not None and entry is not None and entry.key == key:
            state.text_hits += 1
            return entry.k
        state.text_misses += 1
        state.text = None if key is None else CrossKV(key, text, output, None)
        return output

    handle = embedder.register_forward_hook(memo)
    try:
        yield state
    finally:
        handle.remove()
