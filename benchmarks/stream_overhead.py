"""Engine overhead and speed against diffusers' img2img pipeline, side by side, on the CPU.

A full-size SD 1.5-architecture UNet and CLIP text encoder with random weights, a
TAESD-size AutoencoderTiny (ours) and an SD-size AutoencoderKL (diffusers'), 256 px,
2 denoising steps. Random weights time exactly like real ones.

Prints human-readable lines, then as its last line one JSON object (with --json):
- fps, seconds_per_frame: our stream (stream batch, RCFG self, tiny VAE), fp32 eager;
- model_seconds_per_frame: the same UNet call (same batch shape) + VAE encode + decode,
  timed in isolation in this process, interleaved with the stream's frames (medians);
  overhead_ratio = seconds_per_frame / that;
- vs_diffusers_img2img: our best CPU throughput (the fastest of the settings tried,
  named in best_settings) over a plain loop of StableDiffusionImg2ImgPipeline at its
  defaults (CFG 7.5, strength 0.8, full VAE) with the same UNet, 2 denoising steps;
- vs_diffusers_img2img_same_settings: both sides fp32 eager;
- backends: for each method (streamdiffusion, streamv2v, live2diff: the same UNet with
  AnimateDiff-v1.5-shaped motion modules, warmup 8, window 16), s/frame of fp32 eager,
  bf16 eager and the compiled backends (inductor in bf16; OpenVINO in fp32 for
  streamdiffusion, the one method it runs), each frame of each timed in turn
  (interleaved) and summarised by medians, `speedup_vs_fp32_eager`, and the compiled
  backends' first-start and second-start seconds (from compiling until the stream's
  first steady-state output: every shape of the stream built), the second start in a new
  process reading the on-disk cache the first one wrote; `best_speedup_vs_fp32_eager`
  per method. Each method runs in a child process of its own, one after the other.

    python benchmarks/stream_overhead.py --json [--frames 4] [--no-bf16] [--methods ...]
        [--backends-only] [--no-backends]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from diffstream.models.tiny import sd15_random_components, sd15_unet, sd15_vae
from diffstream.testing import benchmark_clip



def time_stream_and_models(components, frames, steps: int):
    """Seconds per frame of our stream in steady state, and of the same model calls alone.

    The two are measured interleaved (one streamed frame, then the same UNet batch, VAE
    encode and decode called directly, and again), and each is summarised by its median,
    so drift in the machine's speed hits both sides alike.

    Returns:
        (stream seconds per frame, model-only seconds per frame)
    """
    import statistics

    from diffstream import frames as F
    from diffstream.config import StreamConfig
    from diffstream.pipelines.stream import StreamPipeline

    cfg = StreamConfig(prompt="a watercolor painting", size=max(frames[0].shape[:2]), steps=steps,
                       strength=0.5, guidance=1.2, cfg_type="self")
    pipe = StreamPipeline(components, cfg)
    for f in frames[:steps]:  # fill the stream batch; first UNet calls also warm up kernels
        pipe.push(f)
    pixels = F.frames_to_tensor(frames[0], device=components.device, dtype=components.dtype)
    with torch.no_grad():
        z = components.encode_image(pixels)
        x = z.repeat(steps, 1, 1, 1)  # the stream's UNet batch: one row per step
        t = torch.arange(steps, dtype=torch.long) * 200 + 99
        emb = components.encode_prompt(["a watercolor painting"]).expand(steps, -1, -1).contiguous()
    stream_times, model_times = [], []
    for f in frames[steps:]:
        start = time.perf_counter()
        out = pipe.push(f)
        stream_times.append(time.perf_counter() - start)
        assert out is not None
        with torch.no_grad():
            start = time.perf_counter()
            components.encode_image(pixels)
            components.unet(x, t, encoder_hidden_states=emb)
            components.decode_latents(z)
            model_times.append(time.perf_counter() - start)
    pipe.flush()
    pipe.close()
    return statistics.median(stream_times), statistics.median(model_times)


def time_stream(components, frames, steps: int) -> float:
    """Seconds per frame of our stream in steady state (median)."""
    return time_stream_and_models(components, frames, steps)[0]


def time_diffusers_img2img(unet, text_encoder, tokenizer, frames):
    """A plain loop of StableDiffusionImg2ImgPipeline at its defaults (guidance 7.5,
    strength 0.8), num_inference_steps=3 so that int(3 * 0.8) = 2 steps are denoised."""
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline
    from PIL import Image

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionImg2ImgPipeline(vae=sd15_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    handle = unet.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(args[0].shape[0]), with_kwargs=True)
    images = [Image.fromarray(f) for f in frames]
    pipe("a watercolor painting", image=images[0], num_inference_steps=3)  # warm-up
    calls.clear()
    start = time.perf_counter()
    for img in images[1:]:
        pipe("a watercolor painting", image=img, num_inference_steps=3)
    elapsed = time.perf_counter() - start
    handle.remove()
    per_frame_calls = len(calls) / (len(images) - 1)
    return elapsed / (len(images) - 1), per_frame_calls, sorted(set(calls))


def sd15_method_components(method: str):
    """fp32 SD 1.5-size components for `method` (live2diff: with AnimateDiff-v1.5-shaped
    motion modules, as benchmarks/kv_cache.py builds them)."""
    base = sd15_random_components()
    if method != "live2diff":
        return base
    import dataclasses

    from diffusers import MotionAdapter

    from diffstream.models.motion import motion_unet

    torch.manual_seed(5)
    adapter = MotionAdapter(block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2,
                            motion_num_attention_heads=8, motion_max_seq_length=32, use_motion_mid_block=False)
    return dataclasses.replace(base, unet=motion_unet(base.unet, adapter).eval().requires_grad_(False))


def variant(base, dtype: torch.dtype, backend: str, device: torch.device):
    """A copy of `base` in `dtype` on `device`, compiled in place for `backend`."""
    import dataclasses

    from diffstream.models.backends import apply_backend

    def moved(module):
        return copy.deepcopy(module).to(device=device, dtype=dtype)

    comp = dataclasses.replace(base, unet=moved(base.unet), vae=moved(base.vae), text_encoder=moved(base.text_encoder),
                               dtype=dtype, device=device)
    apply_backend(comp, backend)
    return comp


def method_config(method: str, size: int, steps: int):
    from diffstream.config import StreamConfig

    # RCFG self at 1.2 for the image methods (StreamDiffusion's setting), none for
    # live2diff (its reference); the same settings on every backend.
    guidance = 1.0 if method == "live2diff" else 1.2
    return StreamConfig(prompt="a watercolor painting", size=size, steps=steps, strength=0.5, guidance=guidance,
                        cfg_type="self", method=method)


def start_stream(components, config, frames) -> tuple[object, int, float]:
    """Open a stream and push frames until its first steady-state output (the stream batch
    full, Live2Diff's warmup done: every shape the stream uses has run once).

    Returns:
        (pipeline, frames pushed, seconds)
    """
    from diffstream.pipelines.factory import make_pipeline

    pipe = make_pipeline(components, config)
    fill = pipe.mechanism.warmup_frames + config.steps
    start = time.perf_counter()
    for f in frames[:fill]:
        pipe.process(f)
    return pipe, fill, time.perf_counter() - start


def backend_child(method: str, args) -> dict:
    """In a child process: time one method on fp32 eager, bf16 eager and the compiled
    backends, interleaved; or, with --second-start, only the compiled starts."""
    import dataclasses

    frames, _ = benchmark_clip(args.frames + 12, args.size)
    config = method_config(method, args.size, args.steps)
    base = sd15_method_components(method)
    # On CUDA (absolute fps there) the half type is fp16; on a CPU bf16, which CPUs with
    # bf16 units (AVX-512 BF16, AMX) run natively. OpenVINO is a CPU backend.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    compiled = [("compile", half)]
    if method == "streamdiffusion" and not args.no_openvino and device.type == "cpu":
        compiled.append(("openvino", torch.float32))
    if args.second_start:
        out = {}
        for backend, dtype in compiled:
            pipe, _, seconds = start_stream(variant(base, dtype, backend, device), config, frames)
            pipe.close()
            out[f"{backend} {str(dtype)[6:]}"] = seconds
        return {"second_start_seconds": out}
    rows = [("eager", torch.float32), ("eager", half)] + compiled
    # Every copy is made before any stream starts: a started stream's processors (with
    # their state) sit on the model it runs on.
    models = {}
    for backend, dtype in rows:
        name = f"{backend} {str(dtype)[6:]}"
        if (backend, dtype) == ("eager", torch.float32):  # the reference runs on the original modules
            models[name] = dataclasses.replace(base, unet=base.unet.to(device), vae=base.vae.to(device),
                                               text_encoder=base.text_encoder.to(device), device=device)
        else:
            models[name] = variant(base, dtype, backend, device)
    pipes, starts, filled = {}, {}, 0
    for name, comp in models.items():
        pipes[name], filled, starts[name] = start_stream(comp, config, frames)
        print(f"  {method} {name}: started in {starts[name]:.1f} s", file=sys.stderr, flush=True)
    times = {name: [] for name in pipes}
    for f in frames[filled : filled + args.frames]:
        for name, pipe in pipes.items():  # interleaved: one frame on each, in turn
            start = time.perf_counter()
            out = pipe.process(f)
            times[name].append(time.perf_counter() - start)
            assert len(out) == 1, f"{name}: {len(out)} outputs for one steady-state frame"
    for pipe in pipes.values():
        pipe.close()
    spf = {name: statistics.median(t) for name, t in times.items()}
    return {"seconds_per_frame": spf, "first_start_seconds": starts, "device": device.type}


def time_backends(methods, args) -> dict:
    """Each method in child processes (first start, then second start on the same cache)."""
    results = {}
    for method in methods:
        with tempfile.TemporaryDirectory(prefix="diffstream-bench-cache-") as cache:
            env = dict(os.environ, DIFFSTREAM_CACHE=cache, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"))
            child = [sys.executable, __file__, "--child-method", method, "--frames", str(args.frames),
                     "--size", str(args.size), "--steps", str(args.steps)] + (["--no-openvino"] if args.no_openvino else [])
            first = json.loads(subprocess.run(child, env=env, check=True, stdout=subprocess.PIPE,
                                              text=True).stdout.strip().splitlines()[-1])
            second = json.loads(subprocess.run(child + ["--second-start"], env=env, check=True,
                                               stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1])
        spf = first["seconds_per_frame"]
        ref = spf["eager float32"]
        row = {}
        for name, seconds in spf.items():
            row[name] = {"seconds_per_frame": seconds, "fps": 1 / seconds, "speedup_vs_fp32_eager": ref / seconds,
                         "device": first["device"],
                         # with the stream batch a frame leaves `steps` frames after it entered
                         "latency_seconds": seconds * args.steps,
                         "first_start_seconds": first["first_start_seconds"][name],
                         "second_start_seconds": second["second_start_seconds"].get(name)}
            print(f"{method} {name}: {seconds:.3f} s/frame, x{ref / seconds:.2f} vs fp32 eager, start "
                  f"{row[name]['first_start_seconds']:.1f} s"
                  + (f" / second start {row[name]['second_start_seconds']:.1f} s" if row[name]["second_start_seconds"]
                     else ""), file=sys.stderr, flush=True)
        best = max(row, key=lambda n: row[n]["speedup_vs_fp32_eager"])
        results[method] = {"backends": row, "best": best,
                           "best_speedup_vs_fp32_eager": row[best]["speedup_vs_fp32_eager"]}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    parser.add_argument("--frames", type=int, default=4, help="frames timed per configuration")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 configuration")
    parser.add_argument("--methods", default="streamdiffusion,streamv2v,live2diff",
                        help="methods timed on each backend (comma-separated)")
    parser.add_argument("--backends-only", action="store_true", help="only the backends table")
    parser.add_argument("--no-backends", action="store_true", help="skip the backends table")
    parser.add_argument("--no-openvino", action="store_true", help="leave OpenVINO out of the backends table")
    parser.add_argument("--child-method", help=argparse.SUPPRESS)
    parser.add_argument("--second-start", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.child_method:
        print(json.dumps(backend_child(args.child_method, args)))
        return 0
    if args.backends_only:
        backends = time_backends(args.methods.split(","), args)
        results = {"backends": backends, "best_speedup_vs_fp32_eager":
                   {m: r["best_speedup_vs_fp32_eager"] for m, r in backends.items()}}
        if args.json:
            print(json.dumps(results))
        return 0

    import dataclasses

    frames, origin = benchmark_clip(args.frames + args.steps + 1, args.size)
    h, w = frames[0].shape[:2]
    print(f"clip: {origin}, {w}x{h}, {args.steps} steps, {torch.get_num_threads()} threads", file=sys.stderr)
    base = sd15_random_components()
    unet, text_encoder, tokenizer = base.unet, base.text_encoder, base.tokenizer

    results = {"clip": origin, "width": w, "height": h, "steps": args.steps, "threads": torch.get_num_threads()}
    spf, model_spf = time_stream_and_models(base, frames, args.steps)
    results.update(fps=1 / spf, seconds_per_frame=spf, model_seconds_per_frame=model_spf,
                   overhead_ratio=spf / model_spf)
    print(f"ours fp32 eager: {spf:.3f} s/frame; model calls alone {model_spf:.3f} s -> overhead {spf / model_spf:.3f}",
          file=sys.stderr)

    settings = {"fp32 eager, tiny VAE, RCFG self": spf}
    if not args.no_bf16:
        bf16 = dataclasses.replace(base, unet=sd15_unet().to(torch.bfloat16), vae=base.vae.to(torch.bfloat16),
                                   text_encoder=text_encoder.to(torch.bfloat16), dtype=torch.bfloat16)
        settings["bf16 eager, tiny VAE, RCFG self"] = time_stream(bf16, frames, args.steps)
        print(f"ours bf16 eager: {settings['bf16 eager, tiny VAE, RCFG self']:.3f} s/frame", file=sys.stderr)
        del bf16
        base.vae.float()
        text_encoder.float()

    ref_spf, calls, batch_sizes = time_diffusers_img2img(unet, text_encoder, tokenizer, frames[: args.frames + 1])
    print(f"diffusers img2img fp32 eager: {ref_spf:.3f} s/frame ({calls:.0f} UNet calls/frame, batch {batch_sizes})",
          file=sys.stderr)
    best_name = min(settings, key=settings.get)
    results.update(
        settings_seconds_per_frame=settings,
        best_settings=best_name,
        diffusers_img2img_seconds_per_frame=ref_spf,
        diffusers_unet_calls_per_frame=calls,
        vs_diffusers_img2img=ref_spf / settings[best_name],
        vs_diffusers_img2img_same_settings=ref_spf / spf,
    )
    if not args.no_backends:
        del base, unet, text_encoder
        backends = time_backends(args.methods.split(","), args)
        results.update(backends=backends, best_speedup_vs_fp32_eager={
            m: r["best_speedup_vs_fp32_eager"] for m, r in backends.items()})
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
