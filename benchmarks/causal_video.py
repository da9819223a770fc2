"""Causal video (issue #18): the block-causal KV cache against recomputing the window, and memory over a long stream.

On a Wan transformer built from config with random weights (diffusers'
`WanTransformer3DModel`; default 4 blocks, 8 heads x 32, latents 64 x 64 = 1,024 tokens
per latent frame, chunks of 1 latent frame, StreamDiffusionV2's 3 sinks and a rolling
window of 6 latent frames: 9 latent frames of context), 2 denoising steps, on the CPU:

- seconds_per_chunk_cached: one chunk as the pipeline denoises it with clean records
  (`kv_record` "clean", `pipelines.causal_video._denoise`): `steps` attend calls on the
  chunk alone and one record call, through `BlockCausal`'s KV cache, once the window is
  full (median over `--chunks` chunks);
- seconds_per_chunk_cached_steps: the same with StreamDiffusionV2's cache per step
  (`kv_record` "steps": `steps` row calls, no record call);
- seconds_per_chunk_recompute: what a stream without a cache pays for the same context:
  every step the stock transformer (diffusers' own attention) over the whole [sinks,
  window, current] = 10 latent frames, the past at t = 0 (per-token timesteps), no record
  call needed (median). Unmasked: a block mask changes which scores count, not the cost
  (and on the CPU a masked SDPA is slower: the baseline is favoured);
- speedup = recompute / cached; speedup_steps likewise; speedup_per_call = (recompute
  call) / (cached attend call); frames_ratio = context frames + 1 (10): the bound of the
  per-call speedup, since both costs scale with it: a recompute call runs every linear
  layer on (context + 1)x the tokens, and its attention on (context + 1)x the queries
  against the same keys. So >= 10x needs >= 9 frames of context. Per chunk the clean
  cache pays `steps + 1` calls to the recompute's `steps`, the per-step cache `steps`;
- rss_growth: the whole `CausalVideoPipeline` on `--model tiny-wan` (VAE, KV cache, clean-
  latent ring) streaming `--rss-chunks` chunks with a prompt switch (recache) every 50
  chunks: RSS at the last chunk against chunk 100 (after two recaches, the allocator warm),
  after a gc (memory must not grow).

Prints human-readable lines, then (with --json) one JSON object as the last line.

    python benchmarks/causal_video.py --json [--latent 64] [--layers 4] [--chunks 5] [--rss-chunks 300]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

from diffstream.attention.base import BatchLayout
from diffstream.attention.block_causal import BlockCausal, BlockCausalConfig
from diffstream.metrics.timing import current_rss_bytes
from diffstream.models.wan import TINY_WAN_TEXT_DIM, WAN_LATENT_CHANNELS

ATTEND = BatchLayout.branch_major("attend", 0, ("cond",), 1, 1)
RECORD = BatchLayout.branch_major("record", 0, ("cond",), 1, 1)
SIGMAS = (0.7, 0.35)  # the pipeline's 2-step default
FIRST = 100  # the long stream's RSS baseline chunk


def transformer(layers: int, heads: int, head_dim: int):
    """A `WanTransformer3DModel` with Wan's layout at the given width (random weights)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
        in_channels=WAN_LATENT_CHANNELS, out_channels=WAN_LATENT_CHANNELS, text_dim=TINY_WAN_TEXT_DIM,
        freq_dim=64, ffn_dim=4 * heads * head_dim, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    ).eval().requires_grad_(False)


@torch.no_grad()
def cached(model, latent: int, sinks: int, window: int, chunks: int, text) -> tuple[list[float], list[float]]:
    """(seconds per chunk, seconds per attend call) once the window is full, through the KV cache."""
    mech = BlockCausal(BlockCausalConfig(chunk_frames=1, sink_chunks=sinks, window_chunks=window))
    g = torch.Generator().manual_seed(1)
    per_chunk, per_call = [], []
    with mech.attach(model):
        for n in range(sinks + window + chunks):
            x = torch.randn(1, WAN_LATENT_CHANNELS, 1, latent, latent, generator=g)
            start = time.perf_counter()
            for s in SIGMAS:
                mech.before_unet(ATTEND)
                t0 = time.perf_counter()
                flow = mech.call_unet(model, x, torch.tensor([1000 * s]), text, ATTEND)
                per_call.append(time.perf_counter() - t0)
                x = x - s * flow
            mech.before_unet(RECORD)
            mech.call_unet(model, x, torch.zeros(1), text, RECORD)
            per_chunk.append(time.perf_counter() - start)
    timed = slice(sinks + window, None)  # the window full: every chunk attends to all S + W
    return per_chunk[timed], per_call[len(SIGMAS) * (sinks + window):]


@torch.no_grad()
def cached_steps(model, latent: int, sinks: int, window: int, chunks: int, text) -> list[float]:
    """Seconds per chunk once the window is full with a KV cache per step (row calls, no record call)."""
    mech = BlockCausal(BlockCausalConfig(chunk_frames=1, sink_chunks=sinks, window_chunks=window))
    g = torch.Generator().manual_seed(1)
    per_chunk = []
    with mech.attach(model):
        for n in range(sinks + window + chunks):
            x = torch.randn(1, WAN_LATENT_CHANNELS, 1, latent, latent, generator=g)
            start = time.perf_counter()
            for k, s in enumerate(SIGMAS):
                mech.before_rows([n], k, len(SIGMAS))
                x = x - s * mech.call_unet(model, x, torch.tensor([1000 * s]), text, ATTEND)
            per_chunk.append(time.perf_counter() - start)
    return per_chunk[sinks + window:]


@torch.no_grad()
def recompute(model, latent: int, context: int, chunks: int, text) -> tuple[list[float], list[float]]:
    """(seconds per chunk, seconds per call): every step the stock model over [context frames, current]."""
    g = torch.Generator().manual_seed(2)
    past = torch.randn(1, WAN_LATENT_CHANNELS, context, latent, latent, generator=g)
    tokens = (latent // 2) ** 2
    per_chunk, per_call = [], []
    for _ in range(chunks + 1):  # the first one warms up
        x = torch.randn(1, WAN_LATENT_CHANNELS, 1, latent, latent, generator=g)
        start = time.perf_counter()
        for s in SIGMAS:
            t = torch.tensor([0.0] * (context * tokens) + [1000 * s] * tokens)[None]  # (1, L)
            t0 = time.perf_counter()
            flow = model(torch.cat([past, x], dim=2), t, encoder_hidden_states=text, return_dict=False)[0][:, :, -1:]
            per_call.append(time.perf_counter() - t0)
            x = x - s * flow
        per_chunk.append(time.perf_counter() - start)
    return per_chunk[1:], per_call[len(SIGMAS):]


def rss_growth(chunks: int, sinks: int, window: int) -> tuple[float, int, int, int]:
    """(growth, RSS at chunk `FIRST`, RSS at the last, unet calls) of the tiny-wan pipeline over `chunks` chunks."""
    from diffstream.config import CausalVideoConfig, ModelConfig, StreamConfig
    from diffstream.models.loading import load_components
    from diffstream.pipelines.factory import make_pipeline
    from diffstream.testing import make_frames

    wan = load_components(ModelConfig(model="tiny-wan", device="cpu"))
    video = CausalVideoConfig(block_causal=BlockCausalConfig(chunk_frames=1, sink_chunks=sinks, window_chunks=window))
    cfg = StreamConfig(prompt="a watercolor", method="causal-video", video=video, size=64, steps=2, strength=0.7)
    frames = make_frames(8, 48, 64)
    at_first = None
    with make_pipeline(wan, cfg) as pipe:
        pipe.process(frames[0])  # chunk 0
        for n in range(1, chunks):
            if n % 50 == 0:
                pipe.update(prompt=("a watercolor", "a pencil sketch")[n // 50 % 2])  # a switch: recache before chunk n
            for f in frames[4 * (n % 2):4 * (n % 2) + 4]:
                pipe.process(f)
            if n + 1 == FIRST:
                gc.collect()
                at_first = current_rss_bytes()
        gc.collect()
        at_n = current_rss_bytes()
        return (at_n - at_first) / at_first, at_first, at_n, pipe.unet_calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--latent", type=int, default=64, help="latent height = width (8x fewer than pixels)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--sinks", type=int, default=3)
    parser.add_argument("--window", type=int, default=6)
    parser.add_argument("--chunks", type=int, default=3, help="chunks timed per side (medians)")
    parser.add_argument("--rss-chunks", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    model = transformer(args.layers, args.heads, args.head_dim)
    text = torch.randn(1, 77, TINY_WAN_TEXT_DIM, generator=torch.Generator().manual_seed(3))
    context = args.sinks + args.window
    print(f"Wan DiT {args.layers} blocks, {args.heads} heads x {args.head_dim}, latents {args.latent}x{args.latent} "
          f"({(args.latent // 2) ** 2} tokens/frame), context {args.sinks} sink + {args.window} window, "
          f"{len(SIGMAS)} steps, {os.cpu_count()} threads", file=sys.stderr)
    c_chunk, c_call = cached(model, args.latent, args.sinks, args.window, args.chunks, text)
    print(f"cached:    {statistics.median(c_chunk):.3f} s/chunk ({len(SIGMAS)} attend + 1 record), "
          f"attend call {statistics.median(c_call):.3f} s", file=sys.stderr)
    s_chunk = cached_steps(model, args.latent, args.sinks, args.window, args.chunks, text)
    print(f"cached, a cache per step: {statistics.median(s_chunk):.3f} s/chunk ({len(SIGMAS)} row calls)",
          file=sys.stderr)
    r_chunk, r_call = recompute(model, args.latent, context, args.chunks, text)
    print(f"recompute: {statistics.median(r_chunk):.3f} s/chunk ({len(SIGMAS)} calls over {context + 1} frames), "
          f"call {statistics.median(r_call):.3f} s", file=sys.stderr)
    del model
    gc.collect()
    torch.set_num_threads(1)
    growth, at_first, at_n, calls = rss_growth(args.rss_chunks, args.sinks, args.window)
    print(f"tiny-wan pipeline, {args.rss_chunks} chunks, recache every 50: RSS {at_first / 2**20:.1f} MiB at chunk "
          f"{FIRST}, "
          f"{at_n / 2**20:.1f} MiB at the end ({100 * growth:+.2f}%)", file=sys.stderr)
    result = {
        "layers": args.layers, "heads": args.heads, "head_dim": args.head_dim, "latent": args.latent,
        "tokens_per_frame": (args.latent // 2) ** 2, "sinks": args.sinks, "window": args.window,
        "steps": len(SIGMAS), "threads": os.cpu_count() or 1,
        "seconds_per_chunk_cached": statistics.median(c_chunk),
        "seconds_per_chunk_recompute": statistics.median(r_chunk),
        "speedup": statistics.median(r_chunk) / statistics.median(c_chunk),
        "seconds_per_chunk_cached_steps": statistics.median(s_chunk),
        "speedup_steps": statistics.median(r_chunk) / statistics.median(s_chunk),
        "seconds_per_call_cached": statistics.median(c_call),
        "seconds_per_call_recompute": statistics.median(r_call),
        "speedup_per_call": statistics.median(r_call) / statistics.median(c_call),
        "frames_ratio": context + 1,
        "rss_chunks": args.rss_chunks, "rss_at_100": at_first, "rss_at_n": at_n, "rss_growth_100_to_n": growth,
        "rss_unet_calls": calls,
    }
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
