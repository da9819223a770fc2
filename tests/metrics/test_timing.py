import threading

import numpy as np
import pytest

from diffstream.metrics.timing import FrameTimer, PeakMemory, current_rss_bytes, percentile


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_percentile_matches_numpy():
    values = [0.3, 0.1, 0.7, 0.2, 0.9, 0.4]
    for q in (0, 50, 95, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([], 50) is None
    assert percentile([2.5], 95) == 2.5


def test_pipelined_stream_summary():
    # A pipeline that fills for 1 s, then emits one frame every 0.1 s; each output i
    # appears 1.0 s after its input was pushed (inputs arrive every 0.1 s).
    clock = FakeClock()
    timer = FrameTimer(clock=clock)
    events = []
    for i in range(10):
        events.append((0.1 * i, "push", i))
        events.append((0.1 * i + 1.0, "out", i))
    for t, kind, i in sorted(events):
        clock.now = t
        (timer.on_push if kind == "push" else timer.on_output)(i)
    s = timer.summary()
    assert s["frames_pushed"] == 10 and s["frames_output"] == 10
    assert s["fps"] == pytest.approx(10.0)
    assert s["seconds_per_frame"] == pytest.approx(0.1)
    assert s["wall_seconds"] == pytest.approx(1.9)
    assert s["wall_fps"] == pytest.approx(10 / 1.9)
    keys = ("latency_mean", "latency_p50", "latency_p95", "latency_max", "first_output_latency")
    for key in keys:
        assert s[key] == pytest.approx(1.0), key


def test_latency_percentiles_and_first_output():
    clock = FakeClock()
    timer = FrameTimer(clock=clock)
    latencies = [0.5, 0.1, 0.2, 0.3, 0.4]
    for i, lat in enumerate(latencies):
        clock.now = float(i)
        timer.on_push(i)
        clock.now = i + lat
        timer.on_output(i)
    clock.now = 100.0
    timer.on_push(5)  # never comes out: counted as pushed, no latency
    timer.on_output(0)  # duplicate callback: first timestamp wins
    s = timer.summary()
    assert s["frames_pushed"] == 6 and s["frames_output"] == 5
    assert timer.latencies() == pytest.approx(latencies)
    assert s["latency_p50"] == pytest.approx(np.percentile(latencies, 50))
    assert s["latency_p95"] == pytest.approx(np.percentile(latencies, 95))
    assert s["latency_mean"] == pytest.approx(np.mean(latencies))
    assert s["first_output_latency"] == pytest.approx(0.5)
    assert s["fps"] == pytest.approx(4 / (4.4 - 0.5))


def test_empty_and_single_frame_summaries():
    clock = FakeClock()
    timer = FrameTimer(clock=clock)
    s = timer.summary()
    assert s["fps"] is None and s["latency_p50"] is None and s["first_output_latency"] is None
    timer.on_push(0)
    clock.now = 2.0
    timer.on_output(0)
    s = timer.summary()
    assert s["fps"] is None and s["seconds_per_frame"] is None
    assert s["latency_p95"] == pytest.approx(2.0)
    assert s["wall_fps"] == pytest.approx(0.5)
    timer.reset()
    assert timer.summary()["frames_output"] == 0


def test_callbacks_from_several_threads():
    timer = FrameTimer()

    def push():
        for i in range(500):
            timer.on_push(i)

    def out():
        for i in range(500):
            timer.on_output(i)

    threads = [threading.Thread(target=push), threading.Thread(target=out)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = timer.summary()
    assert s["frames_pushed"] == 500 and s["frames_output"] == 500


def test_peak_memory_with_injected_sampler():
    readings = iter([100, 250, 180])
    last = [180]

    def sampler():
        last[0] = next(readings, last[0])
        return last[0]

    with PeakMemory(sampler=sampler, interval=1000.0) as mem:  # thread never wakes
        pass
    # entry sample 100, exit sample 250
    assert mem.kind == "rss"
    assert mem.start_bytes == 100
    assert mem.peak_bytes == 250
    assert mem.delta_bytes == 150
    assert mem.summary()["peak_bytes"] == 250


def test_peak_memory_sees_a_real_allocation():
    size = 64 * 1024 * 1024
    with PeakMemory() as mem:
        block = np.ones(size, dtype=np.uint8)  # touched, so resident
        block[::4096] = 2
    del block
    if current_rss_bytes() is None:
        pytest.skip("RSS not available on this platform")
    assert mem.peak_bytes >= mem.start_bytes
    assert mem.delta_bytes >= size // 2


def test_stream_rss_growth_reads_rss_at_both_points(monkeypatch):
    import diffstream.metrics.timing as timing

    class Pipe:
        pushed = 0

        def process(self, frame):
            self.pushed += 1
            return []

    pipe = Pipe()
    monkeypatch.setattr(timing, "current_rss_bytes", lambda: 1000 + pipe.pushed)
    growth, first, last = timing.stream_rss_growth(pipe, [object()], n=300, first=100)
    assert (first, last) == (1100, 1300) and growth == pytest.approx(0.2 / 1.1)
