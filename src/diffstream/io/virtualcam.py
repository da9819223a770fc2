"""A virtual camera output (`-o virtualcam`): video apps (Zoom, Meet, OBS, a browser)
see the restyled stream as a webcam. Through pyvirtualcam, whose backends are
v4l2loopback on Linux and OBS Studio's Virtual Camera on Windows and macOS.

    diffstream run webcam:0 -o virtualcam --prompt "..."
    diffstream run webcam:0 -o virtualcam:/dev/video9 --prompt "..."   # that device

Every output frame is sent as it is made (RGB at the output size); nothing paces it,
the camera runs at inference speed.
"""

from __future__ import annotations

import sys

import numpy as np

from diffstream import frames as fr
from diffstream.errors import OutputError, one_line
from diffstream.io.base import DEFAULT_FPS, Sink

__all__ = ["VirtualCamSink", "parse_spec", "check_available"]

NAME = "virtualcam"
_MISSING = "a virtual camera (-o virtualcam) needs pyvirtualcam: pip install 'diffstream[virtualcam]'"
# The size the availability check opens a camera at: one every backend takes.
_PROBE_SIZE = (640, 480)


def parse_spec(spec: str) -> tuple[bool, str | None]:
    """(whether `spec` is a virtual camera, its device or None): "virtualcam" or
    "virtualcam:DEVICE"."""
    text = spec.strip()
    if text.lower() == NAME:
        return True, None
    if text.lower().startswith(NAME + ":"):
        return True, text[len(NAME) + 1:].strip() or None
    return False, None


def install_hint(platform: str | None = None) -> str:
    """What to install for a virtual camera on this (or `platform`'s) system."""
    platform = platform or sys.platform
    if platform.startswith("linux"):
        return ("install v4l2loopback and load it: sudo apt install v4l2loopback-dkms && "
                "sudo modprobe v4l2loopback exclusive_caps=1")
    return "install OBS Studio (https://obsproject.com) and start its Virtual Camera once"


def _pyvirtualcam():
    try:
        import pyvirtualcam
    except ImportError:
        raise OutputError(_MISSING) from None
    return pyvirtualcam


def _no_camera(err: BaseException, device: str | None) -> OutputError:
    """One line for a camera that could not be opened: why, and what to install."""
    reason = one_line(str(err).splitlines()[0] if str(err) else type(err).__name__, 120)
    where = f" {device}" if device else ""
    return OutputError(f"no virtual camera{where} ({reason}); {install_hint()}")


def check_available(device: str | None = None) -> None:
    """Open and close a camera, so a missing package or device fails before a model loads.

    Raises:
        OutputError: one line naming what to install.
    """
    pyvirtualcam = _pyvirtualcam()
    try:
        camera = pyvirtualcam.Camera(*_PROBE_SIZE, 30.0, fmt=pyvirtualcam.PixelFormat.RGB, device=device)
    except Exception as err:  # each backend raises its own type
        raise _no_camera(err, device) from None
    camera.close()


class VirtualCamSink(Sink):
    """Frames to a virtual camera device.

    Args:
        fps: the frame rate announced to the device (None: 30).
        size ((int, int)): (width, height) of the camera; frames of another size are resized.
        device (str | None): a device (e.g. /dev/video9, "OBS Virtual Camera"); None:
            the first one found.
    Raises:
        OutputError: pyvirtualcam missing, or no camera device (names what to install).
    """

    def __init__(self, fps, size: tuple[int, int], device: str | None = None):
        super().__init__(NAME if device is None else f"{NAME}:{device}")
        pyvirtualcam = _pyvirtualcam()
        self.size = (int(size[0]), int(size[1]))
        rate = float(fps) if fps else float(DEFAULT_FPS)
        try:
            self._camera = pyvirtualcam.Camera(*self.size, rate, fmt=pyvirtualcam.PixelFormat.RGB, device=device)
        except Exception as err:
            raise _no_camera(err, device) from None
        self.device = self._camera.device

    def write(self, frame: np.ndarray) -> None:
        """Send one frame, (H, W, 3) uint8 RGB (resized to the camera's size if it differs)."""
        self._check_open()
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            frame = fr.to_rgb(frame)
        self._camera.send(np.ascontiguousarray(fr.resize(frame, self.size)))
        self.frames_written += 1

    def close(self) -> None:
        """Release the camera device; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._camera.close()
