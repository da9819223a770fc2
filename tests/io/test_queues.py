"""ThreadedReader / ThreadedWriter: order, back-pressure, dropping, errors, shutdown."""

from __future__ import annotations

import time

import numpy as np
import pytest

from diffstream.io.queues import ThreadedReader, ThreadedWriter
from diffstream.io.sources import open_source


def numbered(count: int, delay: float = 0.0):
    """Tiny frames whose first pixel holds their index (0..255 wraps are not used)."""
    for i in range(count):
        if delay:
            time.sleep(delay)
        yield np.full((2, 2, 3), i, np.uint8)


def index(frame) -> int:
    return int(frame[0, 0, 0])


class FakeSink:
    """Records frames; optionally slow, optionally failing at a given frame."""

    def __init__(self, delay: float = 0.0, fail_at: int | None = None):
        self.frames: list[int] = []
        self.delay = delay
        self.fail_at = fail_at
        self.closed = False

    def write(self, frame):
        if self.fail_at is not None and len(self.frames) == self.fail_at:
            raise RuntimeError("disk full")
        if self.delay:
            time.sleep(self.delay)
        self.frames.append(index(frame))

    def close(self):
        self.closed = True


# --- reader --------------------------------------------------------------------------


def test_reader_preserves_order():
    with ThreadedReader(numbered(50), maxsize=4) as reader:
        assert [index(f) for f in reader] == list(range(50))
        assert reader.dropped == 0


def test_reader_never_drops_without_drop_oldest():
    with ThreadedReader(numbered(30), maxsize=3, drop_oldest=False) as reader:
        seen = []
        for frame in reader:
            time.sleep(0.003)  # consumer slower than the source
            seen.append(index(frame))
    assert seen == list(range(30)) and reader.dropped == 0


def test_reader_drops_oldest_when_consumer_is_slow():
    with ThreadedReader(numbered(60), maxsize=2, drop_oldest=True) as reader:
        seen = []
        for frame in reader:
            time.sleep(0.01)
            seen.append(index(frame))
    assert reader.dropped > 0
    assert all(a < b for a, b in zip(seen, seen[1:]))  # still in order
    assert len(seen) + reader.dropped == 60
    assert seen[-1] == 59  # the newest frame is never the one dropped


def test_reader_reraises_source_exception():
    def failing():
        yield from numbered(3)
        raise ValueError("decoder exploded")

    reader = ThreadedReader(failing())
    seen = []
    with pytest.raises(ValueError, match="decoder exploded"):
        for frame in reader:
            seen.append(index(frame))
    assert seen == [0, 1, 2]
    reader.close()


def test_reader_close_returns_promptly_when_blocked():
    def endless():
        i = 0
        while True:
            yield np.full((2, 2, 3), i % 256, np.uint8)
            i += 1

    reader = ThreadedReader(endless(), maxsize=2)
    deadline = time.monotonic() + 5
    while reader.buffered < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert reader.buffered == 2  # the reader thread now waits on a full queue
    time.sleep(0.02)
    start = time.monotonic()
    reader.close()
    assert time.monotonic() - start < 0.5
    assert not reader._thread.is_alive()
    assert list(reader) == []


def test_reader_does_not_close_the_source(clip):
    with open_source(clip) as src:
        with ThreadedReader(src, maxsize=2) as reader:
            assert len(list(reader)) == 12
        assert not src._closed


def test_reader_threads_are_daemons():
    reader = ThreadedReader(numbered(1))
    writer = ThreadedWriter(FakeSink())
    assert reader._thread.daemon and writer._thread.daemon
    reader.close()
    writer.close()


# --- writer --------------------------------------------------------------------------


def test_writer_drains_everything_in_order():
    sink = FakeSink(delay=0.002)
    writer = ThreadedWriter(sink, maxsize=3)
    for frame in numbered(25):
        writer.write(frame)
    writer.close()
    assert sink.frames == list(range(25))
    assert not sink.closed  # the caller closes the sink
    writer.close()  # idempotent


def test_writer_blocks_instead_of_dropping():
    sink = FakeSink(delay=0.01)
    writer = ThreadedWriter(sink, maxsize=2)
    start = time.monotonic()
    for frame in numbered(10):
        writer.write(frame)
    # With 2 slots, the producer had to wait for most of the 10 slow writes.
    assert time.monotonic() - start >= 0.05
    writer.close()
    assert sink.frames == list(range(10))


def test_writer_reraises_sink_error():
    sink = FakeSink(fail_at=3)
    writer = ThreadedWriter(sink, maxsize=2)
    with pytest.raises(RuntimeError, match="disk full"):
        for frame in numbered(50):
            writer.write(frame)
        writer.close()
    assert sink.frames == [0, 1, 2]
    writer.close()  # the error was reported once; closing again is quiet


def test_writer_error_surfaces_at_close():
    writer = ThreadedWriter(FakeSink(fail_at=0))
    writer.write(np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(RuntimeError, match="disk full"):
        writer.close()


def test_writer_context_keeps_the_original_exception():
    sink = FakeSink(fail_at=0)
    with pytest.raises(KeyError):
        with ThreadedWriter(sink) as writer:
            writer.write(np.zeros((2, 2, 3), np.uint8))
            raise KeyError("engine")


def test_writer_with_context_manager_drains():
    sink = FakeSink(delay=0.001)
    with ThreadedWriter(sink, maxsize=4) as writer:
        for frame in numbered(12):
            writer.write(frame)
    assert sink.frames == list(range(12))


def test_reader_and_writer_overlap(tmp_path, clip):
    """End to end: file -> reader thread -> writer thread -> mp4."""
    import av

    from diffstream.io.sinks import open_sink

    out = tmp_path / "copy.mp4"
    with open_source(clip) as src, open_sink(str(out), src.fps, (src.width, src.height)) as sink:
        with ThreadedReader(src) as reader, ThreadedWriter(sink) as writer:
            for frame in reader:
                writer.write(frame)
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 12
