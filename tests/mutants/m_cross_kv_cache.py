"""Mutants of the per-prompt cross-attention K/V cache (issue #18, StreamDiffusionV2's
`crossattn_cache`): the cache key, what is cached, the shared text projection, reset.
Their proofs are in tests/attention/test_cross_kv_cache.py (the tiny Wan transformer with
our processors on every attn2 against the stock model, and one attn2 called directly)."""

from mutation import Patch, mutant

MOD = "diffstream.attention.cross_kv_cache"
PROC = f"{MOD}:CrossKVAttnProcessor"
STATE = f"{MOD}:CrossKVCacheState"
KEY = f"{MOD}:text_key"
KV = f"{MOD}:text_keys_values"
SHARE = f"{MOD}:share_text_projection"

PROOFS = "tests/attention/test_cross_kv_cache.py"
SAME = f"{PROOFS}::test_same_text_hits_and_equals_stock"
NEW = f"{PROOFS}::test_new_text_recomputes"
IN_PLACE = f"{PROOFS}::test_in_place_edit_recomputes"
EXPANDED = f"{PROOFS}::test_expanded_batch_equals_stock"
RESET = f"{PROOFS}::test_reset_forces_a_miss_and_frees"
INFERENCE = f"{PROOFS}::test_inference_mode_text_is_never_cached"
FUSED = f"{PROOFS}::test_fused_projections_equal_stock"
PROC_NEW = f"{PROOFS}::test_processor_new_tensor_recomputes"
PROC_IN_PLACE = f"{PROOFS}::test_processor_in_place_edit_recomputes"
PROC_HOLDS = f"{PROOFS}::test_processor_holds_the_text_it_keyed_on"
PROC_EXPANDED = f"{PROOFS}::test_processor_expanded_rows_equal_stock"


MUTANTS = [
    # --- the key ------------------------------------------------------------------------
    mutant("cross-kv-version-ignored", "the key ignores the tensor's version: a text edited in place keeps "
           "the old prompt's keys/values", [PROC_IN_PLACE, IN_PLACE],
           Patch(KEY, "text._version, ", "")),
    mutant("cross-kv-address-ignored", "the key ignores the address (shape, strides, dtype only): any new "
           "prompt of the same length keeps the old one's keys/values", [PROC_NEW, NEW],
           Patch(KEY, "(text.data_ptr(), tuple(text.shape)", "(tuple(text.shape)")),
    mutant("cross-kv-text-not-held", "the entry keeps the key but not the tensor, so a freed text's address "
           "can be taken by the next prompt while its keys/values are still cached", PROC_HOLDS,
           Patch(f"{MOD}:CrossKV.__init__", "self.source = source", "self.source = None")),
    mutant("cross-kv-inference-version-zero", "inference tensors (no version counter) cached with version 0: "
           "an in-place edit under inference_mode keeps the old keys/values", INFERENCE,
           Patch(KEY, "return None",
                 "return (text.data_ptr(), tuple(text.shape), tuple(text.stride()), 0, text.dtype, text.device)")),
    mutant("cross-kv-layers-share-an-entry", "the lookup ignores the layer name: every layer reads the first "
           "layer's keys/values", [SAME, PROC_EXPANDED],
           Patch(f"{STATE}.lookup", "entry = self.layers.get(name)", "entry = next(iter(self.layers.values()), None)")),
    # --- what is cached (diffusers' WanAttnProcessor) --------------------------------------
    mutant("cross-kv-cached-key-unnormed", "the key is normalised on a miss but cached before norm_k: every "
           "hit attends with un-normalised keys", [SAME, PROC_EXPANDED],
           Patch(f"{PROC}.__call__", "self.state.store(self.name, key, encoder_hidden_states, k, v)",
                 "self.state.store(self.name, key, encoder_hidden_states, "
                 "attn.to_k(encoder_hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2), v)")),
    mutant("cross-kv-value-from-to-k", "the values projected with to_k", [SAME, PROC_NEW],
           Patch(KV, "k, v = attn.to_k(text), attn.to_v(text)", "k, v = attn.to_k(text), attn.to_k(text)")),
    mutant("cross-kv-fused-halves-swapped", "with fused projections, keys and values taken from the wrong "
           "halves of to_kv", FUSED,
           Patch(KV, "k, v = attn.to_kv(text).chunk(2, dim=-1)", "v, k = attn.to_kv(text).chunk(2, dim=-1)")),
    mutant("cross-kv-query-unnormed", "the query's RMS norm (norm_q) skipped", [SAME, PROC_NEW],
           Patch(f"{PROC}.__call__", "query = attn.norm_q(attn.to_q(hidden_states))",
                 "query = attn.to_q(hidden_states)")),
    # --- the shared text projection, reset -------------------------------------------------
    mutant("cross-kv-projection-memo-stale", "the text projection memo returns its output whatever the text: "
           "a new prompt reaches attn2 as the old one's projection", [NEW, IN_PLACE],
           Patch(SHARE, "if key is not None and entry is not None and entry.key == key:", "if entry is not None:")),
    mutant("cross-kv-reset-keeps-cache", "reset() zeroes the counts but keeps the layers' entries (and the "
           "tensors they hold)", RESET,
           Patch(f"{STATE}.reset", "self.layers.clear()", "pass")),
]
