"""Tiny test clips generated with PyAV in tmp_path (64x48, a few dozen frames)."""

from __future__ import annotations

import av
import numpy as np
import pytest

# Solid colours far apart from each other, so a decoded (lossy) frame can be matched
# to the frame index it came from by picking the nearest palette colour.
PALETTE = np.array(
    [
        (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
        (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
        (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
        (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
        (255, 255, 255), (0, 0, 0),
    ],
    dtype=np.uint8,
)


def solid(index: int, size=(64, 48)) -> np.ndarray:
    """Frame `index` of a colour clip: a solid palette colour."""
    w, h = size
    return np.broadcast_to(PALETTE[index % len(PALETTE)], (h, w, 3)).copy()


def palette_index(frame: np.ndarray) -> int:
    """Index of the palette colour nearest to the frame's mean colour."""
    mean = frame.reshape(-1, 3).mean(axis=0)
    return int(np.argmin(((PALETTE.astype(np.float64) - mean) ** 2).sum(axis=1)))


def _sine(sample_rate: int, start: int, count: int, channels: int) -> np.ndarray:
    t = np.arange(start, start + count) / sample_rate
    tone = (0.3 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    return np.repeat(tone[None, :], channels, axis=0)  # planar (channels, samples)


def write_clip(
    path,
    num_frames: int = 12,
    fps: int = 25,
    size=(64, 48),
    pattern: str = "solid",
    audio: bool = False,
    faststart: bool = False,
) -> str:
    """Write an H.264 clip; `pattern` "solid" (palette colours) or "noise" (large packets).

    With `audio`, an AAC sine track as long as the video is added.
    """
    options = {"movflags": "+faststart"} if faststart else {}
    container = av.open(str(path), "w", options=options)
    video = container.add_stream("libx264", rate=fps)
    video.width, video.height = size
    video.pix_fmt = "yuv420p"
    video.options = {"crf": "12"}
    rate = 44100
    if audio:
        sound = container.add_stream("aac", rate=rate)
        sound.layout = "mono"
    rng = np.random.default_rng(0)
    samples_done = 0
    for i in range(num_frames):
        if pattern == "noise":
            image = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        else:
            image = solid(i, size)
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = i
        container.mux(video.encode(frame))
        # Interleave audio with the video, as real files do.
        while audio and samples_done < (i + 1) * rate // fps:
            chunk = av.AudioFrame.from_ndarray(_sine(rate, samples_done, 1024, 1), format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts = rate, samples_done
            samples_done += 1024
            container.mux(sound.encode(chunk))
    container.mux(video.encode(None))
    if audio:
        container.mux(sound.encode(None))
    container.close()
    return str(path)


def write_audio(path, seconds: float = 2.0, codec: str = "aac", sample_rate: int = 44100) -> str:
    """Write an audio-only file (sine tone): codec "aac" (.m4a) or "pcm_s16le" (.wav)."""
    container = av.open(str(path), "w")
    stream = container.add_stream(codec, rate=sample_rate)
    stream.layout = "stereo"
    total = int(seconds * sample_rate)
    done = 0
    while done < total:
        count = min(1024, total - done)
        chunk = av.AudioFrame.from_ndarray(_sine(sample_rate, done, count, 2), format="fltp", layout="stereo")
        chunk.sample_rate, chunk.pts = sample_rate, done
        done += count
        container.mux(stream.encode(chunk))
    container.mux(stream.encode(None))
    container.close()
    return str(path)


@pytest.fixture
def clip(tmp_path):
    """A 12-frame, 25 fps, 64x48 mp4 of solid palette colours (no audio)."""
    return write_clip(tmp_path / "clip.mp4")


@pytest.fixture
def clip_with_audio(tmp_path):
    """Like `clip`, plus an AAC sine track."""
    return write_clip(tmp_path / "clip_audio.mp4", audio=True)


# Helpers handed to tests as fixtures: importing from a conftest module is fragile
# when several test folders each have one.
@pytest.fixture
def make_clip():
    """`write_clip(path, num_frames=12, fps=25, size=(64, 48), pattern, audio, faststart)`."""
    return write_clip


@pytest.fixture
def make_audio():
    """`write_audio(path, seconds=2.0, codec="aac", sample_rate=44100)`."""
    return write_audio


@pytest.fixture
def solid_frame():
    """`solid(index, size=(64, 48))`: the frame of a colour clip at `index`."""
    return solid


@pytest.fixture
def color_index():
    """`palette_index(frame)`: which colour-clip frame a decoded frame shows."""
    return palette_index
