"""Mutants of Wan checkpoint loading and the VRAM estimate (issue #18): the format prefix,
which generator of a training checkpoint, diffusers' fp32 modules, the head count, and
the estimate's exact items (cache slots, rows, tokens per frame, fp32 bytes, counts).
Their proofs are in tests/models/test_wan_checkpoints.py."""

from mutation import Patch, mutant

MOD = "diffstream.models.wan_checkpoints"
PROOFS = "tests/models/test_wan_checkpoints.py"
LANDS = f"{PROOFS}::test_1_3b_every_tensor_lands_once"
NESTED = f"{PROOFS}::test_nested_training_checkpoint"
META = f"{PROOFS}::test_1_3b_loads_on_meta_with_diffusers_dtypes"
TINY_NESTED = f"{PROOFS}::test_tiny_training_checkpoint_and_folders"
DTYPES = f"{PROOFS}::test_dtypes_match_diffusers_from_pretrained"
KV = f"{PROOFS}::test_kv_cache_item_is_the_cache"
COUNTS = f"{PROOFS}::test_weight_counts_of_each_part"
BIG = f"{PROOFS}::test_1_3b_estimate_and_refusal"

MUTANTS = [
    # --- loading ---------------------------------------------------------------------
    mutant("wck-prefix-kept", "the model. prefix of Self-Forcing / StreamDiffusionV2 keys left on",
           [f"{LANDS}[self-forcing]"],
           Patch(f"{MOD}:convert_to_diffusers",
                 "stripped = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in flat.items()}",
                 "stripped = dict(flat)")),
    mutant("wck-plain-generator-first", "a training checkpoint's plain generator taken before its EMA by default",
           [f"{NESTED}[None]", TINY_NESTED],
           Patch(f"{MOD}:unwrap_checkpoint", "order = NESTED_KEYS",
                 'order = ("generator", "generator_ema", "state_dict", "model")')),
    mutant("wck-fp32-modules-cast", "every tensor cast to the load dtype, diffusers' fp32 modules (time "
           "embedder, modulation tables, cross-attention norm) included", [DTYPES, META],
           Patch(f"{MOD}:wan_transformer_from_state_dict",
                 "t = t.to(torch.float32 if keeps_fp32(k) else dtype)", "t = t.to(dtype)")),
    mutant("wck-safetensors-unaligned", "safetensors' tensors used where they lie, 8 bytes off the 64-byte "
           "alignment vectorised CPU kernels assume (the loaded model's outputs then differ by ~4e-7)",
           [f"{PROOFS}::test_tiny_round_trip_is_exact[wan-.safetensors]"],
           Patch(f"{MOD}:read_checkpoint", "tensors[key] = t.clone() if t.data_ptr() % 64 else t",
                 "tensors[key] = t")),
    mutant("wck-heads-of-64", "the head count guessed as width / 64 (T5's head width) instead of Wan's 128",
           [f"{LANDS}[wan]"],
           Patch(f"{MOD}:infer_config", "heads, head_dim = HEADS_BY_WIDTH[dim]",
                 "heads, head_dim = dim // 64, 64")),
    # --- the estimate ----------------------------------------------------------------
    mutant("wck-kv-no-current-slot", "the cache counted as sinks + window, without the current chunk's slot "
           "(StreamDiffusionV2 counts it inside its num_kv_cache)", [KV, BIG],
           Patch(f"{MOD}:estimate_vram", "slots = sink_chunks + window_chunks + 1",
                 "slots = sink_chunks + window_chunks")),
    mutant("wck-kv-one-row", "one cache for the whole stream batch instead of one per row", [KV, BIG],
           Patch(f"{MOD}:estimate_vram", '"kv_cache": layers * 2 * r * slots', '"kv_cache": layers * 2 * slots')),
    mutant("wck-tokens-without-patch", "tokens per latent frame counted per latent pixel (the 2x2 patch "
           "forgotten)", [KV, BIG],
           Patch(f"{MOD}:estimate_vram", "n = (height // 8 // ph) * (width // 8 // pw)",
                 "n = (height // 8) * (width // 8)")),
    mutant("wck-fp32-bytes-at-dtype", "the fp32 modules' weights counted at the load dtype's size", [META],
           Patch(f"{MOD}:_weights_bytes", "b = 4 * fp32 + dtype_bytes * rest", "b = dtype_bytes * params['total']")),
    mutant("wck-cross-norm-uncounted", "the cross-attention norm's weights left out of the count", [COUNTS, KV],
           Patch(f"{MOD}:transformer_parameters", "fp32 += 2 * d * layers if", "fp32 += 0 * d * layers if")),
    mutant("wck-umt5-shared-position-bias", "UMT5's position bias counted once (T5's sharing) instead of per "
           "layer", [COUNTS, BIG],
           Patch(f"{MOD}:umt5_encoder_parameters", "layers * (2 * d_model + buckets * heads)",
                 "layers * 2 * d_model + buckets * heads")),
]
