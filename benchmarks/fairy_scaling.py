"""Fairy on long clips: memory that does not grow with length, and frames split across
Ray workers with the same result as one process. Tiny random model on the CPU.

Runs (instruction mode, the 8-channel tiny model, K = 3 anchors, chunk 4, 4 DDIM steps
by default (the pipeline's default is 10; time per frame grows linearly with steps, and 4
keeps the whole run to a few minutes on 2 CPU cores), 64 px; every process and worker
with 1 torch thread):
1. one process, 100 frames then 1,000 frames, decoded from an mp4 and written to an mp4:
   peak RSS of each run (sampled every 10 ms, the model already loaded, a warm-up run
   first) and seconds per frame (anchors and every frame; model loading excluded);
2. 2 Ray workers on the same 1,000 frames (workers started and models loaded before the
   clock starts), compared frame by frame with run 1;
3. the anchor cache handed over through Ray's object store instead of recomputed, on the
   100-frame clip: how long recomputing takes vs shipping, and the cache size.

The input is the shared `bikes.mp4` sample looped to length (generated frames when it is
absent). Prints a few lines, then (with --json) one JSON object as the last line:
peak_rss_100, peak_rss_1000 (bytes), rss_ratio (target <= 1.05),
seconds_per_frame_1_worker, seconds_per_frame_2_workers, identical_outputs, plus
worker_start_seconds, anchor_recompute_seconds, anchor_object_store_seconds,
anchor_cache_bytes, frames, steps, cpu_count.

    python benchmarks/fairy_scaling.py --json [--frames 100,1000] [--steps 4]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time

import torch


def make_clip(path: str, n: int, size: int) -> str:
    """An mp4 of n frames: the bikes sample looped (or generated frames)."""
    from diffstream.testing import benchmark_clip, write_video

    frames, origin = benchmark_clip(250, size, name="bikes.mp4")
    looped = [frames[i % len(frames)] for i in range(n)]
    write_video(path, looped, fps=25)
    return origin


def digest(frame) -> str:
    return hashlib.sha1(frame.tobytes()).hexdigest()


def run_one_process(pipe, clip_path: str, out_path: str):
    """Edit a clip in this process into an mp4. Returns (peak RSS bytes, seconds, frame digests)."""
    from diffstream.io.sinks import open_sink
    from diffstream.metrics.timing import PeakMemory
    from diffstream.io.clip import Clip

    clip = Clip(clip_path)
    digests = []
    with PeakMemory() as mem:
        start = time.perf_counter()
        with open_sink(out_path, fps=clip.fps, size=pipe.processing_size(clip.width, clip.height)) as sink:
            for frame in pipe.edit(clip):
                sink.write(frame)
                digests.append(digest(frame))
        seconds = time.perf_counter() - start
    return mem.peak_bytes, seconds, digests


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", default="100,1000", help="short,long clip lengths (default: 100,1000)")
    parser.add_argument("--steps", type=int, default=4, help="DDIM steps (default: 4; Fairy's setting is 10)")
    parser.add_argument("--size", type=int, default=64, help="processing size in pixels (default: 64)")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers for the parallel run (default: 2)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args(argv)
    short, long_ = (int(x) for x in args.frames.split(","))
    torch.set_num_threads(1)

    from diffstream.config import ModelConfig
    from diffstream.models.loading import load_components
    from diffstream.io.clip import Clip
    from diffstream.pipelines.fairy import FairyConfig, FairyPipeline

    model = ModelConfig(model="tiny", device="cpu", instruct=True)
    config = FairyConfig(instruction="Turn into a marble Roman sculpture", anchors=3, chunk_size=4,
                         steps=args.steps, size=args.size, seed=1, sampler="ddim")  # the README numbers are DDIM
    result = {"frames": [short, long_], "steps": args.steps, "size": args.size, "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        clips = {n: os.path.join(tmp, f"in{n}.mp4") for n in (short, long_)}
        for n, path in clips.items():
            result["input"] = make_clip(path, n, args.size)
        warm = os.path.join(tmp, "warm.mp4")
        make_clip(warm, 12, args.size)

        pipe = FairyPipeline(load_components(model), config)
        run_one_process(pipe, warm, os.path.join(tmp, "warm_out.mp4"))
        peak_short, _, _ = run_one_process(pipe, clips[short], os.path.join(tmp, "out_short.mp4"))
        peak_long, seconds_long, reference = run_one_process(pipe, clips[long_], os.path.join(tmp, "out_long.mp4"))
        pipe.close()
        result.update(
            peak_rss_100=peak_short,
            peak_rss_1000=peak_long,
            rss_ratio=round(peak_long / peak_short, 4),
            seconds_per_frame_1_worker=round(seconds_long / long_, 5),
        )
        print(f"1 process: peak RSS {peak_short / 2**20:.1f} MiB ({short} frames), "
              f"{peak_long / 2**20:.1f} MiB ({long_} frames); {seconds_long / long_ * 1000:.1f} ms/frame",
              file=sys.stderr)

        try:
            import ray  # noqa: F401
        except ImportError:
            print("Ray is not installed (pip install 'diffstream[ray]'): skipping the worker runs", file=sys.stderr)
            ray = None
        if ray is not None:
            from diffstream.pipelines.distributed import DistributedEdit, RayConfig, WorkerPool

            ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
            try:
                rc = RayConfig(workers=args.workers, cpus_per_worker=1)
                t0 = time.perf_counter()
                with WorkerPool(model, config, rc) as pool:
                    result["worker_start_seconds"] = round(time.perf_counter() - t0, 2)
                    start = time.perf_counter()
                    job = DistributedEdit(model, config, Clip(clips[long_]), rc, pool=pool)
                    digests = [digest(f) for f in job]
                    seconds = time.perf_counter() - start
                    result["seconds_per_frame_2_workers"] = round(seconds / long_, 5)
                    result["identical_outputs"] = digests == reference
                    job = DistributedEdit(model, config, Clip(clips[short]), rc, pool=pool)
                    job.start()
                    list(job)
                    result["anchor_recompute_seconds"] = round(job.timings["anchor_compute_s"], 4)
                    shipped = RayConfig(workers=args.workers, cpus_per_worker=1, anchor_transfer="object_store")
                    job = DistributedEdit(model, config, Clip(clips[short]), shipped, pool=pool)
                    job.start()
                    list(job)
                    result["anchor_object_store_seconds"] = round(job.timings["anchor_transfer_s"], 4)
                    result["anchor_cache_bytes"] = int(job.timings["anchor_cache_bytes"])
            finally:
                ray.shutdown()
            print(f"{args.workers} Ray workers: {result['seconds_per_frame_2_workers'] * 1000:.1f} ms/frame, "
                  f"identical to 1 process: {result['identical_outputs']}; anchors: recompute "
                  f"{result['anchor_recompute_seconds']:.3f} s vs object store {result['anchor_object_store_seconds']:.3f} s "
                  f"for {result['anchor_cache_bytes'] / 2**20:.2f} MiB", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
