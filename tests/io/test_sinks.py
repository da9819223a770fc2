"""open_sink: H.264 files (with audio copy), PNG folders, the preview window."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from diffstream.errors import OutputError
from diffstream.io import sinks
from diffstream.io.sinks import PngFolderSink, VideoSink, open_sink


def _stream_end(container, stream) -> float:
    """End time in seconds of a stream's last packet (timeline, not sample count)."""
    return float(max((p.pts + p.duration) * p.time_base for p in container.demux(stream) if p.size))


def probe(path):
    """(frames, fps, (w, h), video end seconds, audio info or None) of a written file."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        fps = video.average_rate
        size = (video.codec_context.width, video.codec_context.height)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video)]
    with av.open(str(path)) as container:
        video_end = _stream_end(container, container.streams.video[0])
    audio = None
    with av.open(str(path)) as container:
        if container.streams.audio:
            stream = container.streams.audio[0]
            audio = {"codec": stream.codec_context.name, "end": _stream_end(container, stream),
                     "frame": (stream.codec_context.frame_size or 1024) / stream.sample_rate}
    return frames, fps, size, video_end, audio


def write_colors(sink, solid_frame, count, size=(64, 48)):
    for i in range(count):
        sink.write(solid_frame(i, size))


# --- video files -------------------------------------------------------------------


def test_mp4_roundtrip(tmp_path, solid_frame, color_index):
    path = tmp_path / "out.mp4"
    with open_sink(str(path), Fraction(25), (64, 48)) as sink:
        assert isinstance(sink, VideoSink)
        write_colors(sink, solid_frame, 10)
        assert sink.frames_written == 10
    frames, fps, size, _, audio = probe(path)
    assert len(frames) == 10 and fps == 25 and size == (64, 48) and audio is None
    assert [color_index(f) for f in frames] == list(range(10))
    assert sink.warnings == []


def test_odd_size_is_rounded_to_even_and_frames_resized(tmp_path, solid_frame, color_index):
    path = tmp_path / "odd.mp4"
    with open_sink(str(path), 25, (65, 49)) as sink:
        assert sink.size == (64, 48)
        write_colors(sink, solid_frame, 3, size=(65, 49))
        sink.write(solid_frame(3, (30, 20)))  # any other size is resized too
    frames, _, size, _, _ = probe(path)
    assert size == (64, 48)
    assert [color_index(f) for f in frames] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "fps, expected",
    [(None, Fraction(30)), (Fraction(30000, 1001), Fraction(30000, 1001)), (12.5, Fraction(25, 2))],
)
def test_frame_rate(tmp_path, solid_frame, fps, expected):
    path = tmp_path / "rate.mkv"
    with open_sink(str(path), fps, (64, 48)) as sink:
        write_colors(sink, solid_frame, 4)
    frames, got, _, _, _ = probe(path)
    assert len(frames) == 4 and got == expected


def test_close_is_idempotent_and_file_valid_after_exception(tmp_path, solid_frame):
    path = tmp_path / "crash.mp4"
    with pytest.raises(RuntimeError, match="engine failed"):
        with open_sink(str(path), 25, (64, 48)) as sink:
            write_colors(sink, solid_frame, 5)
            raise RuntimeError("engine failed")
    sink.close()
    sink.close()
    assert len(probe(path)[0]) == 5
    with pytest.raises(ValueError):
        sink.write(solid_frame(0))


def test_file_valid_after_keyboard_interrupt(tmp_path, solid_frame):
    path = tmp_path / "ctrl_c.mp4"
    with pytest.raises(KeyboardInterrupt):
        with open_sink(str(path), 25, (64, 48)) as sink:
            write_colors(sink, solid_frame, 7)
            raise KeyboardInterrupt
    assert len(probe(path)[0]) == 7


@pytest.mark.parametrize(
    "audio_kind, out_suffix",
    [("aac", ".mp4"), ("pcm_s16le", ".mp4"), ("pcm_s16le", ".mkv"), ("aac", ".mov")],
)
def test_audio_is_cut_to_the_video_length(tmp_path, make_audio, solid_frame, audio_kind, out_suffix):
    """2 s of audio, 0.5 s of video: the output audio ends with the video."""
    suffix = ".m4a" if audio_kind == "aac" else ".wav"
    audio_path = make_audio(tmp_path / f"tone{suffix}", seconds=2.0, codec=audio_kind)
    path = tmp_path / f"with_audio{out_suffix}"
    with open_sink(str(path), 24, (64, 48), audio_path=audio_path) as sink:
        write_colors(sink, solid_frame, 12)
    frames, _, _, video_end, audio = probe(path)
    assert len(frames) == 12 and video_end == pytest.approx(0.5, abs=0.002)  # mkv: ms ticks
    assert audio is not None and audio["codec"] == "aac"  # copied, or transcoded from PCM
    assert video_end - 0.05 <= audio["end"] <= video_end + audio["frame"] + 1e-6
    assert sink.warnings == []


def test_audio_of_the_input_clip_is_copied(tmp_path, clip_with_audio, solid_frame):
    path = tmp_path / "copy.mkv"
    with open_sink(str(path), 25, (64, 48), audio_path=clip_with_audio) as sink:
        write_colors(sink, solid_frame, 6)
    _, _, _, video_end, audio = probe(path)
    assert audio is not None and audio["codec"] == "aac"
    assert video_end - 0.05 <= audio["end"] <= video_end + audio["frame"] + 1e-6


def test_audio_path_without_audio_adds_nothing(tmp_path, clip, solid_frame):
    path = tmp_path / "silent.mp4"
    with open_sink(str(path), 25, (64, 48), audio_path=clip) as sink:
        write_colors(sink, solid_frame, 3)
    assert probe(path)[4] is None and sink.warnings == []


def test_unreadable_audio_warns_and_keeps_the_video(tmp_path, solid_frame):
    bogus = tmp_path / "bogus.m4a"
    bogus.write_text("not audio")
    path = tmp_path / "video_only.mp4"
    with open_sink(str(path), 25, (64, 48), audio_path=str(bogus)) as sink:
        write_colors(sink, solid_frame, 3)
    assert len(probe(path)[0]) == 3
    assert len(sink.warnings) == 1 and "bogus.m4a" in sink.warnings[0]


def test_audio_failure_mid_run_keeps_the_video(tmp_path, make_audio, solid_frame, monkeypatch):
    audio_path = make_audio(tmp_path / "tone.m4a", seconds=2.0)
    path = tmp_path / "broken_audio.mp4"
    sink = open_sink(str(path), 25, (64, 48), audio_path=audio_path)

    def fail(*args, **kwargs):
        raise av.InvalidDataError(1094995529, "Invalid data found when processing input")

    monkeypatch.setattr(sink._audio, "feed_until", fail)
    with sink:
        write_colors(sink, solid_frame, 5)
    assert len(probe(path)[0]) == 5
    assert len(sink.warnings) == 1 and "audio" in sink.warnings[0]


def test_unwritable_path(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    spec = str(blocker / "out.mp4")
    with pytest.raises(OutputError) as info:
        open_sink(spec, 25, (64, 48))
    assert "\n" not in str(info.value) and spec in str(info.value)


def test_unsupported_video_suffix(tmp_path):
    with pytest.raises(OutputError) as info:
        open_sink(str(tmp_path / "out.webm"), 25, (64, 48))
    assert ".mp4" in str(info.value) and "\n" not in str(info.value)


# --- PNG folders ---------------------------------------------------------------------


@pytest.mark.parametrize("spec_kind", ["trailing_slash", "no_suffix", "existing"])
def test_png_folder(tmp_path, solid_frame, spec_kind):
    folder = tmp_path / "pngs"
    if spec_kind == "existing":
        folder.mkdir()
    spec = str(folder) + ("/" if spec_kind == "trailing_slash" else "")
    with open_sink(spec, None, (64, 48)) as sink:
        assert isinstance(sink, PngFolderSink)
        write_colors(sink, solid_frame, 3)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["frame_000000.png", "frame_000001.png", "frame_000002.png"]
    for i, name in enumerate(names):
        assert np.array_equal(np.asarray(Image.open(folder / name)), solid_frame(i))  # lossless


def test_png_folder_resizes_to_requested_size(tmp_path, solid_frame):
    with open_sink(str(tmp_path / "out"), None, (33, 21)) as sink:
        sink.write(solid_frame(0))
    assert Image.open(tmp_path / "out" / "frame_000000.png").size == (33, 21)


def test_png_folder_warns_about_older_frames(tmp_path, solid_frame):
    with open_sink(str(tmp_path / "o"), None, (8, 8)) as sink:
        write_colors(sink, solid_frame, 3, size=(8, 8))
    with open_sink(str(tmp_path / "o"), None, (8, 8)) as sink:
        write_colors(sink, solid_frame, 1, size=(8, 8))
    assert len(sink.warnings) == 1 and "2 older frames" in sink.warnings[0]


def test_png_folder_unwritable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError):
        open_sink(str(blocker / "frames"), None, (8, 8))


# --- window --------------------------------------------------------------------------


def test_window_needs_gui_opencv():
    import cv2

    if sinks._opencv_has_gui(cv2):
        pytest.skip("this OpenCV build has GUI support")
    with pytest.raises(OutputError) as info:
        open_sink("window", 25, (64, 48))
    assert str(info.value) == (
        "window preview needs an OpenCV build with GUI support: pip install opencv-python"
    )


def test_window_q_key_raises_keyboard_interrupt(monkeypatch, solid_frame):
    """With a (faked) GUI build: frames are shown as BGR; q stops the run."""
    import cv2

    shown, keys = [], iter([-1, ord("q")])
    monkeypatch.setattr(cv2, "getBuildInformation", lambda: "  GUI:  GTK3\n")
    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.setattr(cv2, "namedWindow", lambda *a: None, raising=False)
    monkeypatch.setattr(cv2, "resizeWindow", lambda *a: None, raising=False)
    monkeypatch.setattr(cv2, "imshow", lambda name, image: shown.append(image), raising=False)
    monkeypatch.setattr(cv2, "waitKey", lambda delay: next(keys, -1), raising=False)
    monkeypatch.setattr(cv2, "getWindowProperty", lambda *a: 1.0, raising=False)
    monkeypatch.setattr(cv2, "destroyWindow", lambda *a: None, raising=False)

    with pytest.raises(KeyboardInterrupt):
        with open_sink("window", 25, (64, 48)) as sink:
            sink.write(solid_frame(0))
            sink.write(solid_frame(1))
    assert len(shown) == 2 and sink.closed
    assert tuple(shown[0][0, 0]) == tuple(solid_frame(0)[0, 0, ::-1])
