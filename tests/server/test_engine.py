"""The session engine without a web framework: the output rate the page shows, and the
engine's own stats (no model is loaded: the engine is built with a factory it never calls)."""

import pytest

from diffstream.config import StreamConfig
from diffstream.server.engine import FPS_WINDOW_SECONDS, STATS_WINDOW, Engine, output_rate


def evenly(rate: float, count: int, start: float = 100.0) -> list[float]:
    return [start + i / rate for i in range(count)]


@pytest.mark.parametrize("rate", [0.2, 0.5, 0.8, 1.0, 3.0, 25.9, 140.0])
def test_output_rate_is_right_at_any_speed(rate):
    """Evenly spaced outputs read as their rate, whenever the page asks (any phase)."""
    count = 200
    times = evenly(rate, count)
    for frac in (0.0, 0.3, 0.7, 0.99):
        now = times[-1] + frac / rate
        kept = times[-STATS_WINDOW:]  # what a session remembers
        assert output_rate(kept, now, start=times[0] - 1 / rate, total=count) == pytest.approx(rate, rel=0.01)


def test_output_rate_of_a_new_stream_counts_from_its_first_input():
    # Frames in at 1/s from t=0; a 4-step stream batch emits its first output at t=3.
    assert output_rate([], 3.5, start=0.0, total=0) is None
    assert output_rate([3.0], 3.5, start=0.0, total=1) == pytest.approx(1 / 3)
    times = [3.0, 4.0, 5.0, 6.0]
    assert output_rate(times, 6.2, start=0.0, total=4) == pytest.approx(1.0)


def test_a_warmup_burst_is_not_a_frame_rate():
    """Live2Diff emits its 8 warmup frames at once, after 8 s of input at 1 frame/s: the
    figure is the rate they were made at, not 7 frames over the milliseconds between them."""
    burst = [8.0 + k * 0.001 for k in range(8)]
    assert output_rate(burst, 8.01, start=0.0, total=8) == pytest.approx(1.0, rel=0.01)
    then = burst + [9.0, 10.0, 11.0]
    assert output_rate(then, 11.5, start=0.0, total=11) == pytest.approx(1.0, rel=0.01)


def test_output_rate_decays_when_outputs_stop():
    times = evenly(1.0, 10, start=1.0)  # 1, 2, ..., 10
    assert output_rate(times, 10.9, start=0.0, total=10) == pytest.approx(1.0)
    stalled = output_rate(times, 20.0, start=0.0, total=10)
    assert stalled == pytest.approx(0.1)
    assert output_rate(times, 100.0, start=0.0, total=10) < 0.02


def test_output_rate_jitter_stays_near_the_mean():
    rng = __import__("random").Random(0)
    times, t = [], 0.0
    for _ in range(60):
        t += 1.0 + rng.uniform(-0.2, 0.2)
        times.append(t)
    for now in (t, t + 0.3, t + 0.8):
        assert 0.8 < output_rate(times, now, start=0.0, total=60) < 1.25


def test_engine_stats_report_the_output_rate_at_one_frame_per_second():
    """The stats event's fps at ~1 output/s (it read 0.0 there: 2 s held at most 2 outputs)."""
    engine = Engine(lambda: None, StreamConfig())  # a factory: nothing loads until start()
    session = engine.open_session(None)
    rate = 0.8
    times = evenly(rate, 20)
    session.started = times[0] - 1.0
    session.output_times.extend(times)
    session.outputs = len(times)
    for frac in (0.1, 0.5, 0.9):
        stats = engine.stats(session, now=times[-1] + frac / rate)
        assert stats["fps"] == pytest.approx(rate, rel=0.01)
    assert FPS_WINDOW_SECONDS > 1 / rate  # the case that read 0.0 before
    assert engine.stats(engine.open_session(None))["fps"] is None  # nothing out yet: no figure


def test_sessions_start_on_a_method_the_model_can_run():
    """With motion modules only live2diff works: a new session must not start on the
    default streamdiffusion and fail every frame."""
    engine = Engine(lambda: None, StreamConfig())
    engine.methods = ("live2diff",)
    assert engine.open_session(None).applied.method == "live2diff"
    engine.methods = ("streamdiffusion", "streamv2v")
    assert engine.open_session(None).applied.method == "streamdiffusion"
