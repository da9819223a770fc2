"""Runtime measurement attached from outside the hot loop.

`FrameTimer` only records timestamps: the pipeline (or the code driving it) calls
``on_push(i)`` when input frame i enters and ``on_output(i)`` when output frame i comes
out; all statistics are computed afterwards in `summary()`. Latency is measured per
frame, from the push of input i to the output of output i: the quantity Live2Diff
§4.2 tabulates as "latency" ("the average time that goes by between receiving an input
frame and producing the corresponding output frame", `latency_mean` here). StreamV2V
§5.3.3 reports the total runtime of a 120-frame 512x512 clip (`wall_seconds`) and
frames per second (`fps` / `wall_fps`).

`PeakMemory` reports the peak memory of a block: on CUDA the allocator's peak
(`torch.cuda.max_memory_allocated`, reset on entry); otherwise the process resident
set size (RSS), sampled by a background thread every ~10 ms (and on entry/exit).
`resource.getrusage().ru_maxrss` is deliberately not used: it is the peak over the
whole process lifetime and cannot be reset, so it would report the model loading
rather than the block being measured.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Callable, Optional

__all__ = ["FrameTimer", "PeakMemory", "percentile", "current_rss_bytes"]


def percentile(values, q: float) -> Optional[float]:
    """The q-th percentile (0..100) with linear interpolation (numpy's default); None if empty."""
    data = sorted(float(v) for v in values)
    if not data:
        return None
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * (q / 100.0)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


class FrameTimer:
    """Per-frame push/output timestamps and the statistics derived from them.

    Args:
        clock: a function returning seconds (default `time.perf_counter`); tests
            inject a fake clock.

    Callbacks may come from different threads (e.g. a reader and a writer); they only
    store one timestamp under a lock. If a callback fires twice for one index, the
    first timestamp is kept.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._lock = threading.Lock()
        self._push: dict[int, float] = {}
        self._out: dict[int, float] = {}

    def reset(self) -> None:
        with self._lock:
            self._push.clear()
            self._out.clear()

    def on_push(self, frame_index: int) -> None:
        """Input frame `frame_index` entered the pipeline now."""
        t = self._clock()
        with self._lock:
            self._push.setdefault(int(frame_index), t)

    def on_output(self, frame_index: int) -> None:
        """Output frame `frame_index` left the pipeline now."""
        t = self._clock()
        with self._lock:
            self._out.setdefault(int(frame_index), t)

    def latencies(self) -> list[float]:
        """Seconds from push of input i to output of output i, in frame order."""
        with self._lock:
            return [self._out[i] - self._push[i] for i in sorted(self._out) if i in self._push]

    def summary(self) -> dict:
        """Throughput and latency statistics; values are None when undefined.

        Keys:
            frames_pushed, frames_output: counts of recorded indices.
            fps: steady-state throughput, (n_out - 1) / (last output - first output);
                it ignores the pipeline fill, so a pipelined stream (StreamDiffusion
                batch denoising) is credited with the rate it actually sustains.
                Needs two outputs.
            seconds_per_frame: 1 / fps.
            wall_seconds: first push to last output.
            wall_fps: n_out / wall_seconds (includes the start-up latency).
            latency_mean, latency_p50, latency_p95, latency_max: per-frame latency
                (push of input i -> output of output i), seconds.
            first_output_latency: first push -> first output, seconds (time to first
                frame, whatever its index).
        """
        with self._lock:
            push = dict(self._push)
            out = dict(self._out)
        lat = [out[i] - push[i] for i in sorted(out) if i in push]
        out_times = sorted(out.values())
        n_out = len(out_times)
        fps = None
        if n_out >= 2 and out_times[-1] > out_times[0]:
            fps = (n_out - 1) / (out_times[-1] - out_times[0])
        wall = first = None
        if push and out_times:
            wall = out_times[-1] - min(push.values())
            first = out_times[0] - min(push.values())
        return {
            "frames_pushed": len(push),
            "frames_output": n_out,
            "fps": fps,
            "seconds_per_frame": (1.0 / fps) if fps else None,
            "wall_seconds": wall,
            "wall_fps": (n_out / wall) if wall and wall > 0 else None,
            "latency_mean": (sum(lat) / len(lat)) if lat else None,
            "latency_p50": percentile(lat, 50),
            "latency_p95": percentile(lat, 95),
            "latency_max": max(lat) if lat else None,
            "first_output_latency": first,
        }


def current_rss_bytes() -> Optional[int]:
    """Resident set size of this process in bytes (psutil, else /proc), or None."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # psutil missing or restricted
        pass
    try:
        import os

        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except Exception:
        return None


class PeakMemory:
    """Peak memory of a block, in bytes.

    Usage::

        with PeakMemory() as mem:
            run()
        print(mem.peak_bytes)

    Args:
        device: the torch device the work runs on. A CUDA device selects
            `torch.cuda.max_memory_allocated` (peak reset on entry); anything else
            (default: "cpu") samples the process RSS.
        interval: RSS sampling period in seconds (default 0.01).
        sampler: function returning the current RSS in bytes (tests inject one);
            default `current_rss_bytes`.

    Attributes (valid after exit; `peak_bytes` is also readable while running):
        kind: "cuda" or "rss".
        peak_bytes: CUDA allocator peak, or the highest sampled RSS.
        start_bytes: memory in use on entry (allocated CUDA memory, or RSS).
        delta_bytes: peak_bytes - start_bytes (what the block added at its peak).
        rss_peak_bytes: the sampled RSS peak (also recorded on CUDA; None if RSS is
            unavailable).
    """

    def __init__(
        self,
        device=None,
        interval: float = 0.01,
        sampler: Optional[Callable[[], Optional[int]]] = None,
    ):
        self.device = device
        self.interval = float(interval)
        self._sampler = sampler or current_rss_bytes
        self.kind = "cuda" if str(device or "cpu").startswith("cuda") else "rss"
        self.start_bytes: Optional[int] = None
        self.rss_peak_bytes: Optional[int] = None
        self._cuda_peak: Optional[int] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    def _sample(self) -> None:
        value = self._sampler()
        if value is None:
            return
        with self._lock:
            if self.rss_peak_bytes is None or value > self.rss_peak_bytes:
                self.rss_peak_bytes = int(value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "PeakMemory":
        if self.kind == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = int(torch.cuda.memory_allocated(self.device))
        self._stop.clear()
        self.rss_peak_bytes = None
        self._sample()
        if self.kind == "rss":
            self.start_bytes = self.rss_peak_bytes
        self._thread = threading.Thread(
            target=self._run, name="diffstream-peak-memory", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._sample()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.kind == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            self._cuda_peak = int(torch.cuda.max_memory_allocated(self.device))

    @property
    def peak_bytes(self) -> Optional[int]:
        if self.kind == "cuda":
            if self._cuda_peak is not None:
                return self._cuda_peak
            import torch

            return int(torch.cuda.max_memory_allocated(self.device))
        return self.rss_peak_bytes

    @property
    def delta_bytes(self) -> Optional[int]:
        peak = self.peak_bytes
        if peak is None or self.start_bytes is None:
            return None
        return peak - self.start_bytes

    def summary(self) -> dict:
        return {
            "memory_kind": self.kind,
            "peak_bytes": self.peak_bytes,
            "start_bytes": self.start_bytes,
            "delta_bytes": self.delta_bytes,
            "rss_peak_bytes": self.rss_peak_bytes,
        }


def stream_rss_growth(pipe, frames, n: int = 1000, first: int = 100) -> tuple[float, int, int]:
    """Relative RSS growth of a stream between frame `first` and frame `n`.

    Pushes `n` frames (cycling through `frames`) and reads the process RSS after a
    garbage collection at both points: a stream whose state is bounded shows ~0.

    Returns:
        (growth as a fraction, RSS bytes at `first`, RSS bytes at `n`)
    """
    import gc

    at_first = None
    for i in range(n):
        pipe.process(frames[i % len(frames)])
        if i + 1 == first:
            gc.collect()
            at_first = current_rss_bytes()
    gc.collect()
    at_n = current_rss_bytes()
    return (at_n - at_first) / at_first, at_first, at_n
