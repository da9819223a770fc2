"""VRAM of a causal Wan video stream: the estimate for Wan2.1-T2V-1.3B, and its exact items checked.

1. Estimated (`models.wan_checkpoints.estimate_vram`, every item's formula documented
   there), for Wan2.1-T2V-1.3B (its config, notes field-2026-12.md Sec. 1: 30 blocks, 12
   heads x 128, ffn 8960, UMT5-XXL text encoder) at StreamDiffusionV2's 480x832, 2 denoising
   steps as a stream batch (2 rows, each with its own cache), chunks of 1 latent frame, 1
   sink chunk + a window of 5 (SDV2's num_kv_cache 6 counts the current frame in its 6;
   diffstream's buffer adds the current chunk's slot to sinks + window: 7 chunks), bf16;
   four variants: as is, text encoder offloaded, int8 weights (torchao int8 weight-only:
   Linear weights 1 B + a scale per row), both. For each, which card sizes it fits
   (12, 16, 24 GiB) and `check_fits`'s one-line refusal on a 12 GiB card.
2. Checked on the tiny model (CPU, fp32): the estimate's exact items against what they
   count: the KV cache against `BlockCausalState.nbytes()` after a stream has wrapped its
   ring, the weights against the parameters' bytes; and the 1.3B's weights item against
   the model built on the meta device (shapes only) and loaded in bf16 through the
   checkpoint loader.

Activations and the VAE's working memory are rough terms (assumptions in the estimate's
docstring); nothing here ran on a GPU.

Prints human-readable lines, then (with --json) one JSON object as the last line.

    python benchmarks/causal_video_memory.py --json [--height 480 --width 832] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from diffstream.attention.base import BatchLayout
from diffstream.attention.block_causal import BlockCausal, BlockCausalConfig
from diffstream.errors import ConfigError
from diffstream.models.wan import TINY_WAN_TEXT_DIM, WAN_LATENT_CHANNELS, tiny_wan_transformer
from diffstream.models.wan_checkpoints import (
    WAN21_T2V_1_3B,
    check_fits,
    estimate_vram,
    format_estimate,
    wan_transformer_from_state_dict,
)

GiB = 2**30
CARDS = (12, 16, 24)
VARIANTS = {
    "as is": dict(),
    "text encoder offloaded": dict(text_encoder_offload=True),
    "int8 weights": dict(weights_int8=True),
    "offload + int8": dict(text_encoder_offload=True, weights_int8=True),
}


def estimates(height: int, width: int, steps: int, chunk: int, sinks: int, window: int) -> dict:
    """{variant: estimate} for the 1.3B."""
    common = dict(steps=steps, chunk_frames=chunk, sink_chunks=sinks, window_chunks=window, dtype_bytes=2)
    return {name: estimate_vram(WAN21_T2V_1_3B, height, width, **common, **change)
            for name, change in VARIANTS.items()}


def refusal(estimate: dict, gib: int) -> str | None:
    try:
        check_fits(estimate, gib * GiB, WAN21_T2V_1_3B)
    except ConfigError as exc:
        return str(exc)
    return None


@torch.no_grad()
def tiny_check(rows: int = 2, size: int = 64, chunk: int = 1, sinks: int = 1, window: int = 2) -> dict:
    """The tiny model streamed past its ring: estimate vs measured cache and weights bytes."""
    model = tiny_wan_transformer(seed=0)
    mech = BlockCausal(BlockCausalConfig(chunk_frames=chunk, sink_chunks=sinks, window_chunks=window))
    layout = BatchLayout.branch_major("record", 0, ("cond",), rows, 1)
    g = torch.Generator().manual_seed(0)
    with mech.attach(model):
        for _ in range(sinks + window + 3):
            x = torch.randn(rows, WAN_LATENT_CHANNELS, chunk, size // 8, size // 8, generator=g)
            mech.before_unet(layout)
            mech.call_unet(model, x, torch.full((rows,), 500), torch.randn(rows, 5, TINY_WAN_TEXT_DIM, generator=g),
                           layout)
    est = estimate_vram(model.config, size, size, steps=rows, chunk_frames=chunk, sink_chunks=sinks,
                        window_chunks=window, dtype_bytes=4)
    return {"kv_cache_estimated": est["kv_cache"], "kv_cache_measured": mech.state.nbytes(),
            "weights_estimated": est["transformer"],
            "weights_measured": sum(p.numel() * p.element_size() for p in model.parameters())}


def tiny_peak(rows: int = 2, size: int = 256, text_len: int = 512) -> dict | None:
    """Estimate vs the profiler's measured memory of one tiny-model chunk call (None if the
    private memory-timeline API is unavailable)."""
    from torch.profiler import ProfilerActivity, profile

    model = tiny_wan_transformer(seed=0)
    mech = BlockCausal(BlockCausalConfig(chunk_frames=1, sink_chunks=1, window_chunks=2))
    layout = BatchLayout.branch_major("record", 0, ("cond",), rows, 1)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(rows, text_len, TINY_WAN_TEXT_DIM, generator=g)
    t = torch.full((rows,), 500)
    chunks = [torch.randn(rows, WAN_LATENT_CHANNELS, 1, size // 8, size // 8, generator=g) for _ in range(6)]
    try:
        from torch.profiler._memory_profiler import MemoryProfileTimeline

        with torch.no_grad(), mech.attach(model):
            for x in chunks[:-1]:  # past the ring: 5 chunks through 4 slots
                mech.before_unet(layout)
                mech.call_unet(model, x, t, text, layout)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                         with_stack=True) as prof:
                mech.before_unet(layout)
                mech.call_unet(model, chunks[-1], t, text, layout)
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
        live = [sum(s) if isinstance(s, (list, tuple)) else s for s in sizes]
    except Exception as exc:  # noqa: BLE001  (a private API)
        print(f"tiny peak: memory timeline unavailable ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None
    est = estimate_vram(model.config, size, size, steps=rows, chunk_frames=1, sink_chunks=1, window_chunks=2,
                        dtype_bytes=4, text_len=text_len, text_encoder_params={}, vae_params=None)
    resident = est["transformer"] + est["kv_cache"] + est["prompt_embeds"] + est["text_kv_cache"]
    return {"size": size, "rows": rows, "text_len": text_len,
            "start_measured": live[0], "start_estimated": resident,
            "peak_measured": max(live), "peak_estimated": resident + est["activations"],
            "activations_measured": max(live) - live[0], "activations_estimated": est["activations"]}


def meta_1_3b_weights() -> dict:
    """The 1.3B built on the meta device and loaded in bf16 by the checkpoint loader (diffusers'
    fp32 modules kept in fp32): its parameters' bytes vs the estimate's item."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        state = WanTransformer3DModel(**WAN21_T2V_1_3B).state_dict()
    model = wan_transformer_from_state_dict(state, dtype=torch.bfloat16)
    return {"params": sum(p.numel() for p in model.parameters()),
            "bytes_measured": sum(p.numel() * p.element_size() for p in model.parameters()),
            "bytes_estimated": estimate_vram(WAN21_T2V_1_3B, 480, 832, dtype_bytes=2)["transformer"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--chunk-frames", type=int, default=1)
    parser.add_argument("--sink-chunks", type=int, default=1)
    parser.add_argument("--window-chunks", type=int, default=5)
    args = parser.parse_args()

    table = estimates(args.height, args.width, args.steps, args.chunk_frames, args.sink_chunks, args.window_chunks)
    result = {"model": "Wan2.1-T2V-1.3B", "height": args.height, "width": args.width, "steps": args.steps,
              "chunk_frames": args.chunk_frames, "sink_chunks": args.sink_chunks,
              "window_chunks": args.window_chunks, "dtype": "bf16", "estimates": {}}
    print(f"Wan2.1-T2V-1.3B at {args.width}x{args.height}, {args.steps} steps (stream batch), chunk "
          f"{args.chunk_frames} latent frame(s), sink {args.sink_chunks} + window {args.window_chunks}, bf16")
    for name, est in table.items():
        fits = [gib for gib in CARDS if est["total"] <= gib * GiB]
        print(format_estimate(est, f"{name} (fits: {', '.join(f'{g} GiB' for g in fits) or 'none of 12/16/24 GiB'})"))
        result["estimates"][name] = {**{k: v for k, v in est.items() if k != "settings"},
                                     "fits_gib": fits, "refusal_12gib": refusal(est, 12)}
    print("on a 12 GiB card, as is:", refusal(table["as is"], 12))

    tiny = tiny_check()
    print(f"tiny model: KV cache estimated {tiny['kv_cache_estimated']} B, measured {tiny['kv_cache_measured']} B; "
          f"weights estimated {tiny['weights_estimated']} B, measured {tiny['weights_measured']} B")
    big = meta_1_3b_weights()
    print(f"1.3B on the meta device, bf16: {big['params']:,} parameters, {big['bytes_measured']:,} B measured, "
          f"{big['bytes_estimated']:,} B estimated")
    peak = tiny_peak()
    if peak:
        print(f"tiny model, one chunk call at {peak['size']}x{peak['size']}, {peak['rows']} rows: live at its start "
              f"{peak['start_measured']:,} B measured, {peak['start_estimated']:,} B estimated (weights + cache + "
              f"prompts); peak {peak['peak_measured']:,} B measured, {peak['peak_estimated']:,} B estimated; "
              f"activations {peak['activations_measured']:,} B measured, {peak['activations_estimated']:,} B "
              "estimated")
    result["tiny"] = tiny
    result["tiny_peak"] = peak
    result["meta_1_3b_weights"] = big
    result["exact_items_match"] = (tiny["kv_cache_estimated"] == tiny["kv_cache_measured"]
                                   and tiny["weights_estimated"] == tiny["weights_measured"]
                                   and big["bytes_measured"] == big["bytes_estimated"])
    if args.json:
        print(json.dumps(result))
    return 0 if result["exact_items_match"] else 1


if __name__ == "__main__":
    sys.exit(main())
