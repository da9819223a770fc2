"""Frame sources: video files, image folders, webcams and network streams.

Every source yields RGB uint8 frames (see `diffstream.frames`) one at a time, so a long
video never sits in memory. `open_source` validates eagerly: it decodes the first frame
before returning, so a missing, empty or non-video input fails at once with a one-line
`InputError` instead of somewhere inside the processing loop.

Damage is not an error: a file that breaks mid-stream, or a network stream that drops,
yields every frame that could be decoded, then ends normally and leaves one message in
`Source.warnings` for the caller to print.
"""

from __future__ import annotations

import os
import re
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np

from diffstream import frames as fr
from diffstream.errors import InputError
from diffstream.io.base import Source

__all__ = ["Source", "VideoSource", "ImageFolderSource", "WebcamSource", "open_source"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})

# Protocols opened with PyAV as network streams. rtsp/rtmp/udp/tcp/srt never end on
# their own, so they are always live; http(s) is live only when it has no duration (HLS
# live playlists, MJPEG cameras), otherwise it is a remote file.
_STREAM_URL = re.compile(r"^(rtsps?|rtmps?|udp|tcp|srt|https?)://", re.IGNORECASE)
_ALWAYS_LIVE_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "udp", "tcp", "srt")

# Seconds PyAV waits for a network stream to open / to deliver the next packet. Long
# enough for a slow camera, short enough that an unreachable URL fails quickly.
OPEN_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 10.0


def _one_line(text: str) -> str:
    """Collapse a (possibly multi-line) library message so user errors stay one line."""
    return " ".join(str(text).split())


def _av_reason(err: BaseException) -> str:
    """Short human description of a PyAV/FFmpeg error (without errno and file name)."""
    reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return _one_line(reason)


class VideoSource(Source):
    """A video file or network stream decoded with PyAV."""

    def __init__(self, spec: str, max_frames: int | None = None, live: bool | None = None):
        """Open `spec` (a path or URL) and decode its first frame.

        Args:
            live: force live/non-live; None decides from the URL scheme and duration.
        Raises:
            InputError: cannot be opened, has no video stream or no decodable frame.
        """
        super().__init__(spec, max_frames)
        import av

        is_url = bool(_STREAM_URL.match(spec))
        kwargs: dict = {}
        if is_url:
            options = {}
            if spec.lower().startswith(("rtsp://", "rtsps://")):
                # UDP transport is often blocked by NAT/firewalls; TCP just works.
                options["rtsp_transport"] = "tcp"
            kwargs = {"options": options, "timeout": (OPEN_TIMEOUT_S, READ_TIMEOUT_S)}
        try:
            self._container = av.open(spec, "r", **kwargs)
        except av.ExitError:
            # PyAV's timeout interrupts FFmpeg, which reports "Immediate exit requested".
            raise InputError(
                f"cannot connect to stream {spec}: no data within {OPEN_TIMEOUT_S:g} s"
            ) from None
        except av.FFmpegError as err:
            what = "cannot connect to stream" if is_url else "cannot read input"
            hint = "" if is_url else " (not a video file, or damaged)"
            raise InputError(f"{what} {spec}: {_av_reason(err)}{hint}") from None
        except OSError as err:
            raise InputError(f"cannot read input {spec}: {_av_reason(err)}") from None

        container = self._container
        # FFmpeg's "tty" demuxer renders text files as ANSI art; nobody means that.
        if not container.streams.video or container.format.name == "tty":
            kinds = sorted({s.type for s in container.streams})
            self._container.close()
            found = f" (found: {', '.join(kinds)})" if kinds else ""
            raise InputError(f"input {spec} has no video stream{found}")

        stream = container.streams.video[0]
        self._stream = stream
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        self.fps = Fraction(rate) if rate else None

        if live is None:
            scheme = spec.split("://", 1)[0].lower() if is_url else ""
            live = scheme in _ALWAYS_LIVE_SCHEMES or (is_url and container.duration is None)
        self.is_live = bool(live)
        if not self.is_live:
            self.num_frames = self._estimate_frames(container, stream)
            if container.streams.audio:
                self.audio_path = spec
        # The header's packet count lets us notice a file that ends early (truncated
        # downloads): the demuxer just reports end-of-file there, not an error.
        self._expected_packets = stream.frames or None
        self._start()

    def _estimate_frames(self, container, stream) -> int | None:
        """Frame count from the header, or duration x fps; None when neither is known."""
        if stream.frames:
            return int(stream.frames)
        seconds = None
        if stream.duration is not None and stream.time_base is not None:
            seconds = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            seconds = container.duration / 1_000_000  # AV_TIME_BASE
        if seconds is None or not self.fps:
            return None
        return max(1, round(seconds * float(self.fps)))

    def _generate(self) -> Iterator[np.ndarray]:
        import av

        stream = self._stream
        produced = 0
        packets_read = 0
        damaged_after: int | None = None  # frames yielded before the first damage
        first_reason = ""
        bad_packets = 0
        stopped_by: str | None = None  # why demuxing ended early (read error, drop)

        packets = self._container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.ExitError:
                stopped_by = f"no data for {READ_TIMEOUT_S:g} s"
                break
            except (av.FFmpegError, OSError) as err:
                # The demuxer cannot continue: truncated file, dropped connection or
                # read timeout. Whatever was decoded so far is still good.
                stopped_by = _av_reason(err)
                break
            if packet.size:
                packets_read += 1
            try:
                # The empty packet at the end flushes frames buffered by the decoder.
                decoded = packet.decode()
            except (av.FFmpegError, ValueError) as err:
                # One corrupt packet: skip it, the decoder resynchronises at the next
                # keyframe, so later frames may still be fine.
                bad_packets += 1
                if damaged_after is None:
                    damaged_after, first_reason = produced, _av_reason(err)
                continue
            for av_frame in decoded:
                try:
                    frame = fr.av_frame_to_frame(av_frame)
                except (av.FFmpegError, ValueError) as err:
                    # A frame the converter rejects (e.g. garbage dimensions) is
                    # damage too; the next frames may be fine.
                    bad_packets += 1
                    if damaged_after is None:
                        damaged_after, first_reason = produced, _av_reason(err)
                    continue
                produced += 1
                yield frame

        if stopped_by is not None:
            # Flush the decoder ourselves: the demuxer never sent its final empty packet.
            try:
                for av_frame in stream.codec_context.decode(None):
                    produced += 1
                    yield fr.av_frame_to_frame(av_frame)
            except (av.FFmpegError, ValueError):
                pass

        if self.is_live:
            # A live stream has no natural end: any end means the sender went away.
            reason = stopped_by or "the sender closed the stream"
            self.warnings.append(f"stream {self.spec} stopped after frame {produced}: {reason}")
            return
        problems = []
        if damaged_after is not None:
            plural = "s" if bad_packets != 1 else ""
            problems.append(f"{bad_packets} undecodable packet{plural} skipped ({first_reason})")
        if stopped_by is not None:
            problems.append(f"reading stopped: {stopped_by}")
        # Packets, not decoded frames, are compared: edit lists (e.g. lossless cuts)
        # legitimately make the decoder drop a few frames, which is no damage.
        expected = self._expected_packets
        if expected and packets_read < expected and not stopped_by:
            problems.append(f"file ends early ({packets_read} of {expected} frames present)")
        if problems:
            where = produced if damaged_after is None else damaged_after
            self.warnings.append(f"input {self.spec} damaged after frame {where}: {'; '.join(problems)}")

    def close(self) -> None:
        """Close the PyAV container; idempotent."""
        if not self._closed:
            super().close()
            container = getattr(self, "_container", None)
            if container is not None:
                try:
                    container.close()
                except Exception:
                    pass  # closing a broken network stream may fail; nothing to save


def _natural_key(name: str) -> list:
    """Sort key that orders embedded numbers numerically (frame2 before frame10)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


class ImageFolderSource(Source):
    """Images of a folder in natural filename order, all at the first image's size.

    The engine needs one frame size per run, so every later image of another size is
    *letterboxed* to the first image's size: scaled to fit inside it with its own aspect
    ratio kept, centred, and padded with black bars (`diffstream.frames.letterbox`).
    Images are never stretched.
    """

    def __init__(self, folder: str, max_frames: int | None = None, fps=None) -> None:
        """List the images of `folder` and load the first readable one.

        Args:
            fps: the frame rate the images stand for (a number or Fraction > 0); None
                leaves `fps` unknown, which sinks write as 30 fps.
        Raises:
            InputError: the folder cannot be listed, holds no images, none is readable,
                or `fps` is not a positive number.
        """
        super().__init__(folder, max_frames)
        self.fps = _as_fps(fps)
        try:
            names = os.listdir(folder)
        except OSError as err:
            raise InputError(f"cannot list input folder {folder}: {err.strerror}") from None
        # Hidden files include macOS "._name.png" resource forks that are not images.
        images = [
            n for n in names
            if not n.startswith(".")
            and Path(n).suffix.lower() in IMAGE_SUFFIXES
            and os.path.isfile(os.path.join(folder, n))
        ]
        if not images:
            kinds = ", ".join(sorted(s.lstrip(".") for s in IMAGE_SUFFIXES))
            raise InputError(f"input folder {folder} has no images ({kinds})")
        images.sort(key=_natural_key)
        self._paths = [os.path.join(folder, n) for n in images]
        self.num_frames = len(self._paths)
        self._size: tuple[int, int] | None = None
        self._start()

    def _generate(self) -> Iterator[np.ndarray]:
        skipped: list[str] = []
        for path in self._paths:
            try:
                frame = fr.load_image(path)
            except Exception as err:  # PIL raises many types for broken files
                skipped.append(f"{os.path.basename(path)} ({_one_line(err)})")
                if self._size is None and len(skipped) == len(self._paths):
                    self.warnings.append(f"unreadable images: {skipped[0]}")
                continue
            if self._size is None:
                self._size = (frame.shape[1], frame.shape[0])
            else:
                # The engine needs one frame size per run: fit into the first image's
                # size, keeping this image's aspect ratio (black bars).
                frame = fr.letterbox(frame, self._size)
            yield frame
        if skipped and self._size is not None:
            shown = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
            self.warnings.append(
                f"input folder {self.spec}: skipped {len(skipped)} unreadable image(s): {shown}"
            )


def _quiet_capture(cv2, index: int):
    """cv2.VideoCapture(index) without OpenCV's backend chatter on stderr.

    A missing camera makes every backend log a warning; our InputError says it in
    one line instead.
    """
    logging = getattr(getattr(cv2, "utils", None), "logging", None)
    previous = None
    try:
        if logging is not None:
            previous = logging.getLogLevel()
            logging.setLogLevel(logging.LOG_LEVEL_ERROR)
    except Exception:
        logging = None
    try:
        return cv2.VideoCapture(index)
    finally:
        if logging is not None and previous is not None:
            logging.setLogLevel(previous)


class WebcamSource(Source):
    """A camera opened with OpenCV (`webcam:N`)."""

    def __init__(self, index: int, max_frames: int | None = None) -> None:
        """Open camera `index` and grab its first frame.

        Raises:
            InputError: the camera cannot be opened or delivers no frame.
        """
        super().__init__(f"webcam:{index}", max_frames)
        import cv2

        self._cap = _quiet_capture(cv2, index)
        if not self._cap.isOpened():
            self._cap.release()
            raise InputError(f"cannot open webcam:{index} (no camera with that index, or it is busy)")
        # A one-frame driver buffer keeps latency low: we want the newest image.
        self._cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        cam_fps = self._cap.get(cv2.CAP_PROP_FPS)
        self.fps = Fraction(cam_fps).limit_denominator(1001) if cam_fps and cam_fps > 0 else None
        self.is_live = True
        self._start()

    def _generate(self) -> Iterator[np.ndarray]:
        produced = 0
        while True:
            ok, image = self._cap.read()
            if not ok or image is None:
                if produced:
                    self.warnings.append(f"{self.spec} stopped delivering frames after frame {produced}")
                return
            produced += 1
            yield fr.bgr_to_rgb(image)

    def close(self) -> None:
        """Release the camera; idempotent."""
        if not self._closed:
            super().close()
            self._cap.release()


def _as_fps(fps) -> Fraction | None:
    """`fps` (None, int, float, numeric str or Fraction) as a Fraction; InputError unless > 0."""
    if fps is None:
        return None
    try:
        value = Fraction(fps) if isinstance(fps, (int, Fraction)) else Fraction(str(fps))
    except (TypeError, ValueError, ZeroDivisionError):
        raise InputError(f"invalid frame rate {fps!r}: expected a number such as 30 or 29.97") from None
    if not value > 0:
        raise InputError(f"invalid frame rate {fps!r}: must be > 0")
    return value.limit_denominator(1001)


def open_source(spec: str, max_frames: int | None = None, fps: float | Fraction | None = None) -> Source:
    """Open an input and decode its first frame.

    Args:
        spec: a video file path; a folder of images; ``webcam:N`` (``webcam`` means 0);
            a URL (rtsp://, rtmp://, udp://, tcp://, srt://, http(s)://); or ``ndi:NAME``,
            an NDI source (`diffstream.io.ndi`, needs cyndilib).
        max_frames: stop iteration after this many frames (None: no limit).
        fps: frame rate of an image-folder input (a number or Fraction > 0), which has
            none of its own: reported as `Source.fps`, so a video sink writes it. None
            (the default) leaves it unknown and sinks write 30 fps. Videos, webcams and
            streams keep the rate they carry; `fps` is checked but not used for them.
    Returns:
        A `Source`; use it as a context manager or call `close()`.
    Raises:
        InputError: one line naming the input and what is wrong with it.
    """
    spec = str(spec)
    if max_frames is not None and max_frames < 1:
        raise InputError(f"max_frames must be at least 1, got {max_frames}")
    folder_fps = _as_fps(fps)  # checked for every input, so a bad value fails before any I/O
    if spec.strip().lower().startswith("ndi:"):
        from diffstream.io.ndi import NDISource, parse_spec

        return NDISource(parse_spec(spec), max_frames)
    webcam = re.fullmatch(r"webcam(?::(\d+))?", spec.strip(), re.IGNORECASE)
    if webcam:
        return WebcamSource(int(webcam.group(1) or 0), max_frames)
    if _STREAM_URL.match(spec):
        return VideoSource(spec, max_frames)
    path = Path(spec).expanduser()
    if path.is_dir():
        return ImageFolderSource(str(path), max_frames, fps=folder_fps)
    if not path.exists():
        raise InputError(f"input not found: {spec}")
    if not path.is_file():
        raise InputError(f"input {spec} is not a regular file or folder")
    try:
        size = path.stat().st_size
    except OSError as err:
        raise InputError(f"cannot read input {spec}: {err.strerror}") from None
    if size == 0:
        raise InputError(f"input file is empty: {spec}")
    return VideoSource(str(path), max_frames, live=False)
