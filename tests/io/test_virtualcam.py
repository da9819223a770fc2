"""The virtual camera output (`-o virtualcam`, `diffstream.io.virtualcam`).

No camera device exists here: pyvirtualcam's backends are replaced by a fake one that
records the frames it gets; the real backend list (v4l2loopback, none loaded here) gives
the missing-device error.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

pyvirtualcam = pytest.importorskip("pyvirtualcam", reason="the virtualcam extra (pyvirtualcam) is not installed")

from diffstream.errors import OutputError  # noqa: E402
from diffstream.io import virtualcam  # noqa: E402
from diffstream.io.sinks import check_output, open_sink  # noqa: E402


class FakeBackend:
    """A pyvirtualcam backend that keeps every frame sent (as pyvirtualcam hands it: 1-D)."""

    opened: list = []

    def __init__(self, *, width, height, fps, fourcc, device, **kw):
        self.width, self.height, self.fps, self.fourcc, self._device = width, height, fps, fourcc, device
        self.frames: list[np.ndarray] = []
        self.closed = False
        FakeBackend.opened.append(self)

    def send(self, frame):
        self.frames.append(frame.reshape(self.height, self.width, 3).copy())

    def close(self):
        self.closed = True

    def device(self):
        return self._device or "/dev/video-fake"

    def native_fourcc(self):
        return None


@pytest.fixture
def fake_camera(monkeypatch):
    FakeBackend.opened = []
    monkeypatch.setattr(pyvirtualcam.camera, "BACKENDS", {"fake": FakeBackend})
    return FakeBackend


def test_frames_reach_the_camera_resized_to_its_size(fake_camera):
    from diffstream.testing import make_frames

    frames = make_frames(3, height=40, width=50)
    check_output("virtualcam")  # opens and closes a camera: there is one
    with open_sink("virtualcam", 25, (64, 48)) as sink:
        for frame in frames:
            sink.write(frame)
    camera = fake_camera.opened[-1]
    assert (camera.width, camera.height, camera.fps) == (64, 48, 25.0) and camera.closed
    assert sink.frames_written == 3 and len(camera.frames) == 3
    from diffstream.frames import resize

    assert np.array_equal(camera.frames[2], resize(frames[2], (64, 48)))
    with open_sink("virtualcam:/dev/video7", None, (64, 48)) as named:
        assert named.device == "/dev/video7" and fake_camera.opened[-1].fps == 30.0


def test_run_to_a_virtual_camera_sends_the_same_frames_as_a_folder(fake_camera, tiny, monkeypatch, tmp_path, capsys):
    import diffstream.models.loading as loading
    from diffstream.cli import main
    from diffstream.frames import load_image
    from diffstream.testing import make_frames
    from PIL import Image

    monkeypatch.setattr(loading, "load_components", lambda config: tiny)
    src = tmp_path / "in"
    src.mkdir()
    for i, frame in enumerate(make_frames(5)):
        Image.fromarray(frame).save(src / f"{i:03d}.png")
    args = ["--model", "tiny", "--size", "64", "--steps", "2", "--prompt", "x", "--no-progress"]
    assert main(["run", str(src), "-o", "virtualcam", *args]) == 0
    assert main(["run", str(src), "-o", str(tmp_path / "out"), *args]) == 0
    sent = fake_camera.opened[-1].frames
    written = [load_image(p) for p in sorted((tmp_path / "out").glob("*.png"))]
    assert len(sent) == len(written) == 5
    assert all(np.array_equal(a, b) for a, b in zip(sent, written))


def test_no_camera_device_is_one_line_naming_what_to_install(monkeypatch):
    # The real backends: v4l2loopback on Linux, with no /dev/video loopback device here.
    if sys.platform.startswith("linux") and any(
            __import__("glob").glob("/sys/devices/virtual/video4linux/video*")):
        pytest.skip("a v4l2loopback device exists on this machine")
    with pytest.raises(OutputError) as err:
        check_output("virtualcam")
    message = str(err.value)
    assert "\n" not in message and message.startswith("no virtual camera (")
    assert virtualcam.install_hint() in message
    assert "v4l2loopback" in virtualcam.install_hint("linux")
    assert "OBS Studio" in virtualcam.install_hint("win32") and "OBS Studio" in virtualcam.install_hint("darwin")


def test_missing_pyvirtualcam_fails_before_the_model_loads(monkeypatch, tmp_path, capsys):
    import diffstream.models.loading as loading
    from diffstream.cli import main

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load_components", refuse)
    monkeypatch.setitem(sys.modules, "pyvirtualcam", None)
    src = tmp_path / "in"
    src.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(src / "0.png")
    assert main(["run", str(src), "-o", "virtualcam", "--model", "tiny", "--prompt", "x"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "diffstream: error: a virtual camera (-o virtualcam) needs pyvirtualcam: pip install 'diffstream[virtualcam]'"]
    with pytest.raises(OutputError, match="this command writes a file"):
        check_output("virtualcam", live_ok=False)
