"""NDI input and output (`ndi:NAME`), through cyndilib (which bundles the NDI runtime).

    diffstream run ndi:"CAMERA" -o out.mp4 ...      # restyle an NDI source
    diffstream run webcam:0 -o ndi:diffstream ...   # publish the restyled stream on NDI

An input name is either a source's full NDI name, "HOST (STREAM)", or its stream part
alone when one source on the network has it. NDI is a live source like a webcam: the
run reads it on a thread that drops the *oldest* waiting frame when inference falls
behind (`ThreadedReader(drop_oldest=True)`, counted and reported; the NDI runtime does
the same when frames come faster than the source reads them, e.g. 15 sent at once: the
oldest 5 dropped, here; the source reports the runtime's count when it closes), and
output frame i is the restyled frame i read, as for every input. An output is an NDI
sender of that name; every output frame is sent when it is made (not paced: the stream
runs at inference speed), as RGBX at the output size.

Every frame the NDI runtime receives and keeps comes out of the input, in order (1:1),
on two counts. cyndilib's `Receiver` binds an NDI frame-sync to itself when created (cyndilib
0.1.3, `Receiver.__init__`: `self.frame_sync = FrameSync(self)`, NDIlib_framesync_create),
and once a receiver is bound to a frame-sync, the frame-sync takes its video frames
(Processing.NDI.FrameSync.h: "you should use it in order to receive video frames"): a
frame it takes is counted received, not dropped, and never comes out of
`Receiver.receive`, which then delivers only the frames it wins a race for (half or
fewer here). The source destroys that frame-sync before connecting
(`_detach_frame_sync`). And `Receiver.receive` keeps the GIL while it waits, so the
source never asks it to wait: it polls without waiting and sleeps between polls
(`_POLL_S`), which lets the run's other threads (inference, an NDI output) go on.

Discovery: NDI finds sources by mDNS on the local network. Where mDNS does not reach
(containers, other subnets) NDI reads `$NDI_CONFIG_DIR/ndi-config.v1.json` (default
`~/.ndi/`), whose `{"ndi": {"networks": {"ips": "10.0.0.5,127.0.0.1"}}}` names the
hosts to ask directly; the tests use that with 127.0.0.1 in a network namespace of
their own.

The NDI runtime is Vizrt's, under the NDI SDK licence (cyndilib itself is MIT); see the
README's "Live I/O" section.
"""

from __future__ import annotations

import re
import time
from fractions import Fraction
from typing import Iterator

import numpy as np

from diffstream import frames as fr
from diffstream.errors import InputError, OutputError
from diffstream.io.base import DEFAULT_FPS, Sink, Source

__all__ = ["NDISource", "NDISink", "parse_spec", "check_available"]

PREFIX = "ndi:"
# Seconds to find the named source on the network, and to wait for a frame from it.
FIND_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 10.0
# Seconds between two polls of the receiver when no frame was waiting (`_generate`).
_POLL_S = 0.005
_MISSING = "NDI (ndi:NAME) needs cyndilib: pip install 'diffstream[ndi]'"


def parse_spec(spec: str, error=InputError) -> str | None:
    """NAME of an "ndi:NAME" spec (stripped of spaces), or None for other specs.

    Raises:
        `error` (InputError or OutputError): "ndi:" with no name.
    """
    if not spec.strip().lower().startswith(PREFIX):
        return None
    name = spec.strip()[len(PREFIX):].strip()
    if not name:
        raise error("ndi: needs a name: ndi:SOURCE_NAME for an input, ndi:NAME for an output")
    return name


def check_available(error=InputError) -> None:
    """Raise `error` (one line naming the extra) when cyndilib is not installed."""
    import importlib.util

    try:
        found = importlib.util.find_spec("cyndilib") is not None
    except ValueError:  # set to None in sys.modules
        found = False
    if not found:
        raise error(_MISSING)


def _ndi(error):
    """(the cyndilib module, its ReceiveFrameType), or `error` with the install line."""
    check_available(error)
    try:
        import cyndilib
        from cyndilib.receiver import ReceiveFrameType
    except ImportError as err:  # installed, but its NDI runtime does not load here
        raise error(f"NDI runtime cannot load: {' '.join(str(err).split())}; reinstall cyndilib "
                    f"(pip install --force-reinstall 'diffstream[ndi]')") from None
    return cyndilib, ReceiveFrameType


def _detach_frame_sync(receiver) -> bool:
    """Destroy the NDI frame-sync cyndilib binds to every `Receiver`; True when none is left.

    While bound, the frame-sync takes video frames from the receiver (see the module
    docstring). cyndilib offers no way to unbind it (`Receiver.frame_sync` is read-only
    and the `FrameSync` is destroyed with its receiver), so the receiver's reference slot
    is set to None, with the reference counts kept right, and cyndilib's own
    `FrameSync.__dealloc__` destroys the frame-sync (NDIlib_framesync_destroy). The slot
    is the one word of the receiver object that holds the frame-sync's address; anything
    else (no such word, or several) leaves the receiver alone and returns False.
    """
    import ctypes

    frame_sync = getattr(receiver, "frame_sync", None)
    if frame_sync is None:
        return True
    size = type(receiver).__basicsize__ // ctypes.sizeof(ctypes.c_void_p)
    words = (ctypes.c_void_p * size).from_address(id(receiver))
    slots = [i for i in range(size) if words[i] == id(frame_sync)]
    if len(slots) != 1:
        return False
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(None))
    words[slots[0]] = id(None)
    ctypes.pythonapi.Py_DecRef(ctypes.py_object(frame_sync))  # the receiver's reference
    del frame_sync  # the last one: the frame-sync is destroyed here
    return receiver.frame_sync is None


def match_source(name: str, names: list[str]) -> str | None:
    """The full NDI name among `names` that `name` means, or None.

    `name` is a full name ("HOST (STREAM)") or a stream name found in exactly one source.

    Raises:
        InputError: the stream name is found in several sources.
    """
    if name in names:
        return name
    hits = [n for n in names if (m := re.fullmatch(r".*\((.*)\)", n)) and m.group(1) == name]
    if len(hits) > 1:
        raise InputError(f"ndi:{name} matches several NDI sources ({', '.join(sorted(hits))}); "
                         f"give the full name, e.g. ndi:{sorted(hits)[0]}")
    return hits[0] if hits else None


class NDISource(Source):
    """An NDI source on the network, received as RGB frames (a live input).

    Args:
        name (str): the source's full NDI name or its stream name (`match_source`).
        max_frames (int | None): stop after this many frames.
        find_timeout (float): seconds to find the source.
        read_timeout (float): seconds without a frame after which the input ends
            (before the first frame: an InputError).
    Raises:
        InputError: cyndilib missing, source not found, or no frame from it.
    """

    def __init__(self, name: str, max_frames: int | None = None, find_timeout: float | None = None,
                 read_timeout: float | None = None):
        super().__init__(f"{PREFIX}{name}", max_frames)
        # Module constants read now, not at definition, so a caller (a test) can change them.
        self.read_timeout = float(READ_TIMEOUT_S if read_timeout is None else read_timeout)
        self._finder = self._receiver = None
        try:
            self._connect(name, float(FIND_TIMEOUT_S if find_timeout is None else find_timeout))
        except BaseException:
            self.close()
            raise
        self._start()

    def _connect(self, name: str, find_timeout: float) -> None:
        """Find the source and connect a receiver to it (RGB(X) frames, full bandwidth)."""
        lib, self._frame_types = _ndi(InputError)
        self._lib = lib
        # A live input: the run drops the oldest waiting frame when inference falls behind.
        self.is_live = True
        self._finder = lib.Finder()
        self._finder.open()
        source = self._find(name, find_timeout)
        receiver = lib.Receiver(color_format=lib.RecvColorFormat.RGBX_RGBA, bandwidth=lib.RecvBandwidth.highest)
        if not _detach_frame_sync(receiver):
            self.warnings.append(f"{self.spec}: cannot detach cyndilib's NDI frame-sync from its receiver "
                                 f"(an unknown cyndilib version?): frames will be lost")
        self._video = lib.VideoRecvFrame()
        receiver.set_video_frame(self._video)
        receiver.connect_to(source)
        self._receiver = receiver

    def _find(self, name: str, timeout: float):
        """The named source, waiting up to `timeout` seconds for discovery to see it."""
        deadline = time.monotonic() + timeout
        while True:
            names = list(self._finder.get_source_names())
            full = match_source(name, names)
            if full is not None:
                return self._finder.get_source(full)
            left = deadline - time.monotonic()
            if left <= 0:
                seen = ", ".join(sorted(names)) if names else "none"
                raise InputError(f"NDI source {name!r} not found within {timeout:g} s (sources seen: {seen}); "
                                 f"check the name and that the sender runs, and that NDI discovery reaches it "
                                 f"(mDNS, or networks.ips in $NDI_CONFIG_DIR/ndi-config.v1.json)")
            self._finder.wait_for_sources(min(left, 0.5))
            self._finder.update_sources()

    def _generate(self) -> Iterator[np.ndarray]:
        video_flag = self._frame_types.recv_video
        produced = 0
        last = time.monotonic()
        while not self._closed:
            # Never waits in receive (which keeps the GIL): the next frame waiting, or none.
            received = self._receiver.receive(video_flag, 0)
            if received & video_flag:
                try:
                    frame = self._read()
                except ValueError as err:  # an odd frame is damage, the next may be fine
                    self.warnings.append(f"{self.spec}: frame {produced} skipped: {err}")
                    continue
                produced += 1
                last = time.monotonic()
                yield frame
                continue
            if time.monotonic() - last > self.read_timeout:
                if produced:
                    self.warnings.append(f"NDI source {self.spec} stopped after frame {produced}: "
                                         f"nothing for {self.read_timeout:g} s")
                else:  # Source._start turns this into its InputError, after the ": "
                    self.warnings.append(f"NDI source {self.spec}: connected, but no frame came "
                                         f"within {self.read_timeout:g} s")
                return
            time.sleep(_POLL_S)

    def _read(self) -> np.ndarray:
        """The received frame as (H, W, 3) uint8 RGB (a copy: NDI reuses its buffers)."""
        video = self._video
        width, height = video.get_resolution()
        stride = video.get_line_stride() or 4 * width
        if self.fps is None:
            rate = video.get_frame_rate()
            self.fps = Fraction(rate).limit_denominator(1001) if rate else None
        fourcc = video.get_fourcc()
        view = memoryview(video)  # takes the oldest buffered frame
        try:
            data = np.array(view, dtype=np.uint8, copy=True)
        finally:
            view.release()
        if data.size < stride * height or stride < 4 * width:
            raise ValueError(f"{data.size} bytes for a {width}x{height} frame")
        pixels = data[: stride * height].reshape(height, stride)[:, : 4 * width].reshape(height, width, 4)
        four = self._lib.FourCC
        if fourcc in (four.RGBA, four.RGBX):
            return np.ascontiguousarray(pixels[..., :3])
        if fourcc in (four.BGRA, four.BGRX):
            return np.ascontiguousarray(pixels[..., 2::-1])
        raise ValueError(f"unexpected NDI pixel format {fourcc!r}")

    def _report_runtime_drops(self, receiver) -> None:
        """Warn of the frames the NDI runtime dropped (they came faster than they were read:
        it drops the oldest), from its own count."""
        try:
            dropped = int(receiver.get_performance_data()["video"]["frames_dropped"])
        except Exception:  # no count: nothing to report
            return
        if dropped > 0:
            self.warnings.append(f"NDI source {self.spec}: the NDI runtime dropped {dropped} frames "
                                 f"that came faster than they were read")

    def close(self) -> None:
        """Disconnect from the source and stop finding; idempotent."""
        if self._closed:
            return
        super().close()
        receiver, self._receiver = self._receiver, None
        if receiver is not None:
            self._report_runtime_drops(receiver)
            try:
                receiver.disconnect()
            except Exception:
                pass  # the runtime is going away anyway
        finder = getattr(self, "_finder", None)
        if finder is not None:
            try:
                finder.close()
            except Exception:
                pass


class NDISink(Sink):
    """An NDI sender: each written frame goes out as one NDI video frame.

    Args:
        name (str): the NDI stream name (receivers see "HOST (name)").
        fps: the frame rate announced to receivers (None: 30).
        size ((int, int)): (width, height) of the frames sent; others are resized.
    Raises:
        OutputError: cyndilib missing or the sender cannot start.
    """

    def __init__(self, name: str, fps, size: tuple[int, int]):
        super().__init__(f"{PREFIX}{name}")
        lib, _ = _ndi(OutputError)
        self.size = (int(size[0]), int(size[1]))
        rate = Fraction(fps).limit_denominator(1001) if fps else DEFAULT_FPS
        try:
            sender = lib.Sender(name, clock_video=False)
            video = lib.VideoSendFrame()
            video.set_resolution(*self.size)
            video.set_fourcc(lib.FourCC.RGBX)
            video.set_frame_rate(rate)
            sender.set_video_frame(video)
            sender.open()
        except Exception as err:
            raise OutputError(f"cannot start NDI sender {name!r}: {' '.join(str(err).split())}") from None
        self._sender = sender
        width, height = self.size
        self._rgbx = np.full((height, width, 4), 255, np.uint8)

    @property
    def connections(self) -> int:
        """Receivers connected now."""
        return int(self._sender.get_num_connections(0))

    def write(self, frame: np.ndarray) -> None:
        """Send one frame, (H, W, 3) uint8 RGB (resized to the output size if it differs)."""
        self._check_open()
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            frame = fr.to_rgb(frame)
        self._rgbx[..., :3] = fr.resize(frame, self.size)
        if not self._sender.write_video(self._rgbx.ravel()):
            raise OutputError(f"NDI sender {self.spec} refused a frame")
        self.frames_written += 1

    def close(self) -> None:
        """Stop the sender; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._sender.close()
        except Exception:
            pass
