"""open_source: files, image folders, streams, errors and damaged inputs."""

from __future__ import annotations

import socket
import threading
import time
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from diffstream.errors import InputError
from diffstream.io.sources import ImageFolderSource, VideoSource, open_source


def assert_one_line_naming(err: InputError, name: str) -> None:
    message = str(err)
    assert "\n" not in message and message.strip() == message
    assert name in message


# --- video files -------------------------------------------------------------------


def test_video_file_yields_every_frame_in_order(clip, color_index):
    with open_source(clip) as src:
        assert isinstance(src, VideoSource)
        assert src.fps == Fraction(25)
        assert (src.width, src.height) == (64, 48)
        assert src.num_frames == 12
        assert src.is_live is False
        assert src.audio_path is None
        frames = list(src)
    assert len(frames) == 12
    for i, frame in enumerate(frames):
        assert frame.dtype == np.uint8 and frame.shape == (48, 64, 3)
        assert frame.flags["C_CONTIGUOUS"]
        assert color_index(frame) == i
    assert src.warnings == []
    assert src.frames_read == 12


def test_audio_path_is_the_file_when_it_has_audio(clip_with_audio, color_index):
    with open_source(clip_with_audio) as src:
        assert src.audio_path == clip_with_audio
        assert src.num_frames == 12
        assert [color_index(f) for f in src] == list(range(12))


def test_max_frames_stops_early(clip, color_index):
    with open_source(clip, max_frames=5) as src:
        assert src.num_frames == 5
        assert [color_index(f) for f in src] == [0, 1, 2, 3, 4]
        assert list(src) == []  # the limit holds across loops
    with open_source(clip, max_frames=100) as src:
        assert src.num_frames == 12
        assert len(list(src)) == 12


def test_iteration_is_a_stream(clip, color_index):
    """Breaking out of a loop and iterating again continues, nothing is decoded twice."""
    with open_source(clip) as src:
        first = []
        for frame in src:
            first.append(color_index(frame))
            if len(first) == 4:
                break
        rest = [color_index(f) for f in src]
    assert first + rest == list(range(12))


def test_odd_sized_video(tmp_path, make_clip):
    path = make_clip(tmp_path / "odd.mkv", num_frames=3, size=(66, 38))
    with open_source(path) as src:
        assert (src.width, src.height) == (66, 38)
        assert [f.shape for f in src] == [(38, 66, 3)] * 3


# --- image folders -----------------------------------------------------------------


def test_folder_natural_order_and_mixed_formats(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    Image.fromarray(np.full((48, 64, 3), (200, 0, 0), np.uint8)).save(folder / "1.png")
    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[..., 1], rgba[..., 3] = 200, 255
    Image.fromarray(rgba).save(folder / "2.png")
    Image.fromarray(np.full((48, 64), 40000, np.uint16)).save(folder / "3.png")  # 16-bit gray
    Image.fromarray(np.full((24, 32), 60, np.uint8)).save(folder / "10.png")  # gray, smaller
    Image.fromarray(np.full((48, 64, 3), (0, 0, 200), np.uint8)).save(folder / "11.bmp")
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub.png").mkdir()  # a folder with an image suffix is not an image

    with open_source(str(folder)) as src:
        assert isinstance(src, ImageFolderSource)
        assert src.fps is None and src.audio_path is None and src.is_live is False
        assert src.num_frames == 5
        assert (src.width, src.height) == (64, 48)
        frames = list(src)
    assert all(f.dtype == np.uint8 and f.shape == (48, 64, 3) for f in frames)
    means = [tuple(int(round(v)) for v in f.reshape(-1, 3).mean(axis=0)) for f in frames]
    assert means[0] == (200, 0, 0)  # 1.png
    assert means[1] == (0, 200, 0)  # 2.png (RGBA, opaque)
    assert abs(means[2][0] - 40000 / 65535 * 255) <= 1 and means[2][0] == means[2][2]  # 3.png
    assert means[3] == (60, 60, 60)  # 10.png, resized to 64x48
    assert means[4] == (0, 0, 200)  # 11.bmp
    assert src.warnings == []


def test_folder_letterboxes_other_sizes_to_the_first_image(tmp_path):
    """Later images of another shape keep their aspect ratio: scaled to fit inside the
    first image's size, centred, black bars around (never stretched)."""
    Image.fromarray(np.full((48, 64, 3), (200, 0, 0), np.uint8)).save(tmp_path / "1.png")  # 4:3
    Image.fromarray(np.full((32, 32, 3), (0, 200, 0), np.uint8)).save(tmp_path / "2.png")  # square
    Image.fromarray(np.full((16, 64, 3), (0, 0, 200), np.uint8)).save(tmp_path / "3.png")  # 4:1
    Image.fromarray(np.full((96, 128, 3), (90, 90, 90), np.uint8)).save(tmp_path / "4.png")  # 4:3, larger
    with open_source(str(tmp_path)) as src:
        first, square, wide, large = list(src)
    assert all(f.shape == (48, 64, 3) for f in (first, square, wide, large))
    assert (first == (200, 0, 0)).all()
    # square -> 48x48 in the middle, 8-pixel black bars left and right
    assert (square[:, 8:56] == (0, 200, 0)).all()
    assert (square[:, :8] == 0).all() and (square[:, 56:] == 0).all()
    # 4:1 -> 64x16 in the middle, 16-pixel black bars above and below
    assert (wide[16:32] == (0, 0, 200)).all()
    assert (wide[:16] == 0).all() and (wide[32:] == 0).all()
    # the same aspect ratio: just resized, no bars
    assert (large == 90).all()
    assert src.warnings == []


def test_folder_fps_option(tmp_path):
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / f"{i}.png")
    with open_source(str(tmp_path)) as src:
        assert src.fps is None  # unknown: the sinks write 30 fps
    with open_source(str(tmp_path), fps=12) as src:
        assert src.fps == Fraction(12) and len(list(src)) == 2
    with open_source(str(tmp_path), fps=29.97) as src:
        assert src.fps == Fraction(2997, 100)
    with open_source(str(tmp_path), fps=30000 / 1001) as src:
        assert src.fps == Fraction(30000, 1001)
    with open_source(str(tmp_path), fps=Fraction(24000, 1001)) as src:
        assert src.fps == Fraction(24000, 1001)
    for bad in (0, -5, "fast", float("nan")):
        with pytest.raises(InputError) as info:
            open_source(str(tmp_path), fps=bad)
        assert "\n" not in str(info.value) and "frame rate" in str(info.value)


def test_fps_option_does_not_change_a_video_rate(clip):
    with open_source(clip, fps=12) as src:
        assert src.fps == Fraction(25)


def test_folder_skips_unreadable_image_with_one_warning(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in (1, 3):
        Image.fromarray(np.full((8, 8, 3), i * 50, np.uint8)).save(folder / f"f{i}.png")
    (folder / "f2.png").write_bytes(b"\x89PNG broken")
    with open_source(str(folder)) as src:
        assert [int(f[0, 0, 0]) for f in src] == [50, 150]
    assert len(src.warnings) == 1 and "f2.png" in src.warnings[0]


def test_folder_max_frames(tmp_path):
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / f"{i}.jpg")
    with open_source(str(tmp_path), max_frames=2) as src:
        assert src.num_frames == 2
        assert len(list(src)) == 2


# --- errors --------------------------------------------------------------------------


def test_missing_path(tmp_path):
    path = str(tmp_path / "nope.mp4")
    with pytest.raises(InputError) as info:
        open_source(path)
    assert_one_line_naming(info.value, path)
    assert "not found" in str(info.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(InputError) as info:
        open_source(str(path))
    assert_one_line_naming(info.value, str(path))
    assert "empty" in str(info.value)


@pytest.mark.parametrize("name", ["notes.mp4", "notes.txt"])
def test_text_file_is_not_a_video(tmp_path, name):
    path = tmp_path / name
    path.write_text("just some text\nover two lines\n")
    with pytest.raises(InputError) as info:
        open_source(str(path))
    assert_one_line_naming(info.value, str(path))


def test_audio_only_file_has_no_video_stream(tmp_path, make_audio):
    path = make_audio(tmp_path / "sound.m4a", seconds=0.2)
    with pytest.raises(InputError) as info:
        open_source(path)
    assert_one_line_naming(info.value, path)
    assert "no video stream" in str(info.value)


@pytest.mark.parametrize("content", [None, "readme.txt"])
def test_folder_without_images(tmp_path, content):
    folder = tmp_path / "empty"
    folder.mkdir()
    if content:
        (folder / content).write_text("hi")
    with pytest.raises(InputError) as info:
        open_source(str(folder))
    assert_one_line_naming(info.value, str(folder))
    assert "no images" in str(info.value)


def test_folder_with_only_broken_images(tmp_path):
    (tmp_path / "a.png").write_bytes(b"garbage")
    with pytest.raises(InputError) as info:
        open_source(str(tmp_path))
    assert_one_line_naming(info.value, str(tmp_path))


def test_video_without_decodable_frames(tmp_path, make_clip):
    """Header intact but every video packet destroyed: no frame, so an InputError."""
    path = tmp_path / "hollow.mp4"
    make_clip(path, num_frames=5, pattern="noise", faststart=True)
    data = bytearray(path.read_bytes())
    start = data.index(b"mdat") + 4
    data[start:] = bytes(len(data) - start)  # zero every sample
    path.write_bytes(bytes(data))
    with pytest.raises(InputError) as info:
        open_source(str(path))
    assert_one_line_naming(info.value, str(path))


def test_unreachable_stream_fails_fast():
    url = "rtsp://127.0.0.1:1/live"  # port 1: connection refused at once
    start = time.monotonic()
    with pytest.raises(InputError) as info:
        open_source(url)
    assert time.monotonic() - start < 8
    assert_one_line_naming(info.value, url)


def test_missing_webcam():
    with pytest.raises(InputError) as info:
        open_source("webcam:57")
    assert_one_line_naming(info.value, "webcam:57")


def test_max_frames_must_be_positive(clip):
    with pytest.raises(InputError):
        open_source(clip, max_frames=0)


# --- damaged inputs ------------------------------------------------------------------


def test_truncated_file_yields_what_it_can(tmp_path, make_clip):
    path = tmp_path / "cut.mp4"
    # faststart puts the index first, as in files from cameras and the web; without
    # it a truncated mp4 has no index at all and cannot be opened.
    make_clip(path, num_frames=30, pattern="noise", faststart=True)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    with open_source(str(path)) as src:
        frames = list(src)
    assert 0 < len(frames) < 30
    assert all(f.shape == (48, 64, 3) for f in frames)
    assert len(src.warnings) == 1
    assert "damaged" in src.warnings[0] and str(path) in src.warnings[0]


def test_overwritten_middle_yields_what_it_can(tmp_path, make_clip):
    path = tmp_path / "hole.mp4"
    make_clip(path, num_frames=30, pattern="noise")
    data = bytearray(path.read_bytes())
    mdat = data.index(b"mdat")
    middle = mdat + (data.index(b"moov") - mdat) // 2
    data[middle : middle + 3000] = np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    with open_source(str(path)) as src:
        frames = list(src)
    assert 0 < len(frames) <= 30
    assert len(src.warnings) == 1 and "damaged after frame" in src.warnings[0]


def test_dropped_live_stream_ends_with_a_warning(tmp_path):
    """A TCP sender that goes away mid-stream: frames so far, then one warning."""
    ts = tmp_path / "live.ts"
    out = av.open(str(ts), "w")
    stream = out.add_stream("libx264", rate=25)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    stream.options = {"tune": "zerolatency"}
    for i in range(30):
        frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 8, np.uint8), format="rgb24")
        frame.pts = i
        out.mux(stream.encode(frame))
    out.mux(stream.encode(None))
    out.close()
    payload = ts.read_bytes()

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(10)
    port = server.getsockname()[1]

    def send_half():
        conn, _ = server.accept()
        conn.sendall(payload[: len(payload) // 2])
        time.sleep(0.1)
        conn.close()

    sender = threading.Thread(target=send_half, daemon=True)
    sender.start()
    try:
        with open_source(f"tcp://127.0.0.1:{port}") as src:
            assert src.is_live and src.num_frames is None and src.audio_path is None
            frames = list(src)
    finally:
        sender.join(5)
        server.close()
    assert 0 < len(frames) < 30
    assert len(src.warnings) == 1 and "stopped after frame" in src.warnings[0]
