"""Mutants of `--int8` / `--fp8` (issue #18, torchao weight-only quantization) and of the
memory estimate's terms they and the cross-attention cache add. Proofs:
tests/models/test_wan_quantize.py (what is quantized, bytes stored against the estimate,
refusals) and tests/models/test_wan_checkpoints.py (the text K/V cache item)."""

from mutation import Patch, mutant

QUANT = "diffstream.models.quantize"
PROOFS = "tests/models/test_wan_quantize.py"
WHAT = f"{PROOFS}::test_int8_quantizes_every_linear_but_the_fp32_modules_and_the_estimate_is_the_bytes_stored"
REFUSALS = f"{PROOFS}::test_refusals_are_one_line"
CLOSE = f"{PROOFS}::test_a_stream_on_int8_weights_stays_close_to_full_precision"
KV_ITEM = "tests/models/test_wan_checkpoints.py::test_kv_cache_item_is_the_cache"

MUTANTS = [
    mutant("wanq-fp32-modules-quantized", "the modules the model keeps in fp32 (Wan's time embedder) quantized too",
           WHAT, Patch(f"{QUANT}:quantize_weights", "keep = tuple(getattr(module, \"_keep_in_fp32_modules\", None) or ())",
                       "keep = ()")),
    mutant("wanq-not-applied", "--int8 accepted but the weights loaded as they are", [WHAT, CLOSE],
           Patch("diffstream.models.loading:load_wan_components", 'if config.quantize and key != "vae":',
                 "if False:")),
    mutant("wanq-zero-points-uncounted", "the estimate's int8 weights without torchao's zero point per row", WHAT,
           Patch("diffstream.models.wan_checkpoints:_weights_bytes", 'b += (dtype_bytes + 1) * params["linear_rows"]',
                 'b += dtype_bytes * params["linear_rows"]')),
    mutant("wanq-fp8-anywhere", "fp8 weights allowed off a recent CUDA GPU", REFUSALS,
           Patch(f"{QUANT}:check_quantize",
                 'if device.type != "cuda" or torch.cuda.get_device_capability(device) < FP8_CAPABILITY:',
                 "if False:")),
    mutant("wanq-text-kv-uncounted", "the estimate leaves out the cross-attention cache", KV_ITEM,
           Patch("diffstream.models.wan_checkpoints:estimate_vram",
                 '"text_kv_cache": (2 * layers + 1) * r * text_len * d * dtype_bytes if text_kv_cache else 0,',
                 '"text_kv_cache": 0,')),
    mutant("wanq-estimate-ignores-int8", "--vram-estimate and the GPU check count full-precision weights with --int8",
           "tests/models/test_wan_loading_wiring.py::test_vram_estimate_prints_the_table_and_loads_nothing_on_cpu",
           Patch("diffstream.commands.common:check_memory", "weights_int8=resolved.quantize is not None)",
                 "weights_int8=False)")),
]
