"""FateZero attention-store memory: our schedule against the reference implementation's scheme.

1. Computed, from the real SD 1.5 UNet architecture (built on the meta device from
   its configuration: every layer shape, no weights, no download) at 512x512 (64x64
   latents), 8 frames, 50 DDIM steps, the paper's fusion interval (0.8 of the steps):
   - ours: fp16 attention *inputs* of the fused layers (<= 32x32 tokens, the
     reference's own rule) at the fused steps only (`FusionPlan.store_bytes`);
   - what the reference actually does (`store_bytes_reference_real`, the ratio's
     denominator): attention *maps* of every layer with <= 32x32 query tokens, self
     and cross, at every one of the 50 steps, in fp16 (its pipelines run the fp16
     model, and its maps have the model's dtype), with its configs' sparse-causal keys
     (SparseCausalAttention_index ['mid']: the middle frame only, 1 frame of keys);
   - for comparison, the same maps in fp32 with the paper's Eq. 8 keys (own + middle,
     2 frames: `store_bytes_reference_scheme`, a scheme nobody runs) and in fp32 with
     middle-frame keys (`store_bytes_reference_code_layout`).
2. Measured on the tiny model: an 8-frame inversion's store holds exactly the bytes
   the plan computes for the tiny model's layers.
3. Store vs recompute on the tiny model: wall time and peak RSS of invert + edit.

Prints human-readable lines, then (with --json) one JSON object as the last line.

    python benchmarks/fatezero_memory.py --json [--frames 8] [--steps 50]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from diffstream.attention.fatezero import ATTENTION_KINDS, FateZeroConfig, FusionPlan, probe_layers
from diffstream.attention.store import format_bytes

GiB = 2**30


def sd15_layers(latent_hw=(64, 64)):
    """Attention layers of SD 1.5 at a latent size, read from a weightless (meta) UNet."""
    from diffstream.models.tiny import sd15_unet

    with torch.device("meta"):
        unet = sd15_unet()
    return probe_layers(unet, latent_hw)


def reference_scheme_bytes(layers, frames: int, steps: int, key_frames: int = 2, itemsize: int = 4,
                           max_tokens: int = 32 * 32) -> int:
    """What the reference AttentionStore keeps: per step, every self and cross map
    (frames x heads x L x L_kv) of layers with at most `max_tokens` queries, in fp32."""
    per_step = 0
    for l in layers:
        if l.tokens > max_tokens:
            continue
        kv = key_frames * l.tokens if l.kind == "self" else l.kv_tokens
        per_step += frames * l.heads * l.tokens * kv * itemsize
    return per_step * steps


def measure_tiny(frames: int, steps: int, repeats: int = 3):
    """Invert and edit `frames` frames on the tiny model in both fusion-source modes.

    Returns:
        dict mode -> (attention-store bytes, planned bytes, best seconds, peak RSS delta);
        modes alternate and the fastest of `repeats` runs counts (the machine is shared).
    """
    from diffstream.config import ModelConfig
    from diffstream.metrics.timing import PeakMemory
    from diffstream.models.loading import load_components
    from diffstream.pipelines.fatezero import FateZeroEditConfig, FateZeroEditor, reference_index
    from diffstream.testing import make_frames

    components = load_components(ModelConfig(model="tiny", device="cpu"))
    clip = make_frames(frames, 64, 64)
    ref = [reference_index(frames, "middle")] * frames
    results = {}
    for _ in range(repeats):
        for mode in ("store", "recompute"):
            config = FateZeroEditConfig(
                source_prompt="a black swan swimming in a river", prompt="a white duck swimming in a river",
                blend_words=("swan", "duck"), fusion_source=mode, fatezero=FateZeroConfig(steps=steps),
            )
            editor = FateZeroEditor(components, config, (8, 8))
            z0 = editor.encode(clip)
            with PeakMemory(interval=0.002) as mem:
                start = time.perf_counter()
                store = editor.new_store()
                editor.invert(z0, ref, store)
                stored = store.nbytes_of(ATTENTION_KINDS)
                editor.edit(store, ref)
                seconds = time.perf_counter() - start
            store.close()
            best = results.get(mode)
            peak = max(mem.delta_bytes or 0, best[3] if best else 0)
            seconds = min(seconds, best[2]) if best else seconds
            results[mode] = (stored, editor.store_bytes(frames), seconds, peak)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    torch.set_num_threads(1)

    layers = sd15_layers()
    config = FateZeroConfig(steps=args.steps)
    ours = FusionPlan.build(layers, config, blend=False).store_bytes(args.frames, itemsize=2)
    ours_blend = FusionPlan.build(layers, config, blend=True).store_bytes(args.frames, itemsize=2)
    reference = reference_scheme_bytes(layers, args.frames, args.steps, key_frames=2)
    reference_code = reference_scheme_bytes(layers, args.frames, args.steps, key_frames=1)
    reference_real = reference_scheme_bytes(layers, args.frames, args.steps, key_frames=1, itemsize=2)
    ours_fp32 = FusionPlan.build(layers, config, blend=False).store_bytes(args.frames, itemsize=4)
    # recompute keeps only the inversion latents of the fused steps (+ z_T), fp32
    fused = len(FusionPlan.build(layers, config, blend=False).fused_steps)
    recompute = (fused + 1) * args.frames * 4 * 64 * 64 * 4
    print(f"SD 1.5, 512x512, {args.frames} frames, {args.steps} steps, fusion on {fused} steps, "
          f"{sum(l.tokens <= 1024 for l in layers)} of {len(layers)} attention layers fused")
    print(f"  ours (fp16 attention inputs, fused layers and steps): {format_bytes(ours)}"
          f" (with blend words: {format_bytes(ours_blend)})")
    print(f"  reference as it runs (fp16 maps, all steps, <=32x32 layers, middle-frame keys): "
          f"{format_bytes(reference_real)}, {reference_real / ours:.1f}x ours")
    print(f"  ours on an fp32 model (--store-dtype model on the CPU): {format_bytes(ours_fp32)}")
    print(f"  fp32 maps with Eq. 8 keys (own + middle, not what the reference runs): {format_bytes(reference)}")
    print(f"  reference code layout (sparse-causal keys of the middle frame): {format_bytes(reference_code)}")
    print(f"  --fusion-source recompute: {format_bytes(recompute)} of latents, one extra UNet call of the frames "
          f"per fused step")

    tiny = measure_tiny(args.frames, args.steps)
    tiny_stored, tiny_planned, t_store, m_store = tiny["store"]
    _, _, t_recompute, m_recompute = tiny["recompute"]
    print(f"tiny model, {args.frames} frames of 64x64, {args.steps} steps: store measured {tiny_stored} B, "
          f"planned {tiny_planned} B")
    print(f"  store:     {t_store:.2f} s (best of 3), peak RSS +{format_bytes(max(m_store or 0, 0))}")
    print(f"  recompute: {t_recompute:.2f} s ({t_recompute / t_store:.2f}x), "
          f"peak RSS +{format_bytes(max(m_recompute or 0, 0))}")
    result = dict(
        store_bytes_ours=ours,
        store_bytes_reference_scheme=reference,
        store_bytes_reference_real=reference_real,
        ratio=round(reference_real / ours, 2),
        ratio_vs_fp32_eq8_scheme=round(reference / ours, 2),
        store_bytes_ours_fp32_model=ours_fp32,
        ours_under_8GB=ours < 8 * GiB,
        store_bytes_ours_with_blend=ours_blend,
        store_bytes_reference_code_layout=reference_code,
        recompute_latent_bytes=recompute,
        tiny_store_bytes_measured=tiny_stored,
        tiny_store_bytes_computed=tiny_planned,
        tiny_measured_matches_computed=tiny_stored == tiny_planned,
        tiny_seconds_store=round(t_store, 3),
        tiny_seconds_recompute=round(t_recompute, 3),
        tiny_peak_rss_delta_store=m_store,
        tiny_peak_rss_delta_recompute=m_recompute,
        frames=args.frames,
        steps=args.steps,
    )
    if args.json:
        print(json.dumps(result))
    return 0 if result["tiny_measured_matches_computed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
