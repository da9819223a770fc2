"""Frame sinks: H.264 video files, PNG folders and a preview window.

A sink receives RGB uint8 frames (see `diffstream.frames`) one at a time. `close()`
finalizes the output and is idempotent; using a sink as a context manager closes it
even when the processing loop raises (including KeyboardInterrupt), so an interrupted
run still leaves a playable file with every frame written so far.

Outputs are safe to point at an existing file: a video is written under a temporary
name in the same folder and renamed into place when it closes with at least one frame
(so an interrupted run replaces it with a valid file, a run that fails earlier leaves it
untouched), and each PNG replaces its namesake only once complete. `check_output`
refuses, before anything loads, an output that is one of the inputs.

Problems that do not lose frames (e.g. the audio track could not be copied) are not
errors: they are appended to `Sink.warnings` for the caller to print.
"""

from __future__ import annotations

import os
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np

from diffstream import frames as fr
from diffstream.errors import OutputError
from diffstream.io.audio import AudioTrack
from diffstream.io.base import DEFAULT_FPS, Sink

__all__ = ["Sink", "VideoSink", "PngFolderSink", "WindowSink", "open_sink", "check_output", "DEFAULT_FPS"]

# x264 settings: CRF 18 is visually near-lossless for diffusion output, and "medium"
# encodes far faster than the diffusion model produces frames, so it never limits speed.
X264_CRF = 18
X264_PRESET = "medium"

# Suffix -> FFmpeg muxer name.
VIDEO_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
# Media suffixes we do not write; treating "out.webm" as a folder name would surprise.
_REFUSED_SUFFIXES = frozenset(
    ".avi .webm .gif .flv .wmv .ts .mts .m2ts .mpg .mpeg .ogv .3gp "
    ".png .jpg .jpeg .webp .bmp .tif .tiff".split()
)
# Audio codecs that play back reliably when copied as-is into each container; other
# codecs are transcoded to AAC. Matroska takes nearly anything, so it has no list.
# PCM is always transcoded: its packets are long (a WAV packet can hold 0.1 s), so a
# copy could not be cut at the last video frame, and AAC is a tenth of the size.
_COPYABLE_AUDIO = {
    "mp4": {"aac", "mp3", "opus", "alac", "ac3", "eac3"},
    "mov": {"aac", "mp3", "alac", "ac3", "eac3"},
}


def _one_line(text) -> str:
    """Collapse a library message onto one line (user-facing errors are one line)."""
    return " ".join(str(text).split())


def _reason(err: BaseException) -> str:
    """Short description of an OS/PyAV error, without errno and file name."""
    return _one_line(getattr(err, "strerror", None) or err or type(err).__name__)


def _as_fps(fps) -> Fraction:
    """Normalise a frame rate to a small Fraction (30000/1001 stays exact)."""
    if fps is None:
        return DEFAULT_FPS
    try:
        value = Fraction(fps).limit_denominator(1001)
    except (TypeError, ValueError):
        raise OutputError(f"invalid output frame rate {fps!r}") from None
    if value <= 0:
        raise OutputError(f"invalid output frame rate {fps!r}: must be positive")
    return value


def _as_frame(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An RGB uint8 frame of exactly `size` = (width, height)."""
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        frame = fr.to_rgb(frame)
    return fr.resize(frame, size)



class VideoSink(Sink):
    """An H.264 (libx264, yuv420p) file at constant frame rate, with optional audio."""

    def __init__(self, path: str, fps, size: tuple[int, int], audio_path: str | None = None):
        """Create `path` and write its header (so an unwritable path fails now).

        Args:
            fps: output frame rate; None means 30.
            size: (width, height); rounded down to even numbers for 4:2:0 chroma.
            audio_path: copy the first audio track of this file, if it has one.
        Raises:
            OutputError: the file cannot be created.
        """
        super().__init__(path)
        self.path = path
        # Frames go to a hidden temporary file beside the output, renamed into place by
        # close() once at least one frame is in it: an existing file at `path` is never
        # truncated, and a run that fails before its first frame leaves it as it was.
        self._final_path = str(Path(path).expanduser())
        self.fps = _as_fps(fps)
        self.size = fr.even_size((int(size[0]), int(size[1])))
        self.format = VIDEO_FORMATS.get(Path(path).suffix.lower(), "mp4")
        self._time_base = 1 / self.fps
        self._audio: AudioTrack | None = None

        parent = Path(path).expanduser().resolve().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(f"cannot create output folder for {path}: {_reason(err)}") from None
        self._temp_path = str(parent / f".{Path(path).name}.partial-{os.getpid()}-{id(self):x}{Path(path).suffix}")

        audio_modes = self._audio_modes(audio_path)
        last_error: BaseException | None = None
        for mode in audio_modes + [None]:
            try:
                self._open(mode, audio_path)
                break
            except Exception as err:  # retry with a simpler audio setup, then none
                last_error = err
                self._abort()
                if mode is not None:
                    continue
                raise OutputError(f"cannot write output {path}: {_reason(err)}") from None
        if audio_modes and self._audio is None:
            self.warnings.append(
                f"audio of {audio_path} not copied: {_reason(last_error)}; the video has no sound"
            )

    def _audio_modes(self, audio_path: str | None) -> list[str]:
        """How to try adding the audio of `audio_path`: "copy", then "aac" as fallback."""
        if not audio_path:
            return []
        import av

        try:
            with av.open(audio_path, "r") as probe:
                if not probe.streams.audio:
                    return []
                codec = probe.streams.audio[0].codec_context.name
        except (av.FFmpegError, OSError) as err:
            self.warnings.append(f"audio of {audio_path} not copied: {_reason(err)}")
            return []
        allowed = _COPYABLE_AUDIO.get(self.format)
        if codec.startswith("pcm_"):
            return ["aac"]
        if allowed is None or codec in allowed:
            return ["copy", "aac"]
        return ["aac"]

    def _open(self, audio_mode: str | None, audio_path: str | None) -> None:
        """Open the container with the video stream (and audio per `audio_mode`)."""
        import av

        self._container = av.open(self._temp_path, "w", format=self.format)
        stream = self._container.add_stream("libx264", rate=self.fps)
        stream.width, stream.height = self.size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = self._time_base
        stream.options = {"crf": str(X264_CRF), "preset": X264_PRESET}
        self._stream = stream
        if audio_mode is not None:
            self._audio = AudioTrack(audio_path, self._container, audio_mode)
        # Writes the header now: fails here (not at the first frame) on a bad path,
        # and tells us whether the muxer accepts the audio stream.
        self._container.start_encoding()

    def _abort(self) -> None:
        """Drop a half-opened container before retrying."""
        if self._audio is not None:
            self._audio.close()
            self._audio = None
        container = getattr(self, "_container", None)
        self._container = None
        if container is not None:
            try:
                container.close()
            except Exception:
                pass  # it never got valid content
        try:
            os.remove(self._temp_path)
        except OSError:
            pass

    def _video_seconds(self) -> Fraction:
        return self.frames_written * self._time_base

    def write(self, frame: np.ndarray) -> None:
        """Encode one RGB frame (resized to the output size if it differs)."""
        self._check_open()
        av_frame = fr.frame_to_av_frame(_as_frame(frame, self.size))
        av_frame.pts = self.frames_written
        av_frame.time_base = self._time_base
        try:
            self._container.mux(self._stream.encode(av_frame))
        except OSError as err:  # disk full, file removed under us, ...
            raise OutputError(f"cannot write output {self.path}: {_reason(err)}") from None
        self.frames_written += 1
        self._feed_audio(self._video_seconds())

    def _feed_audio(self, seconds: Fraction, final: bool = False) -> None:
        """Mux audio up to `seconds`; on failure keep the video and record a warning."""
        if self._audio is None:
            return
        try:
            if final:
                self._audio.finish(seconds)
            else:
                self._audio.feed_until(seconds)
        except Exception as err:
            self.warnings.append(
                f"audio copy from {self._audio.path} stopped at {float(seconds):.2f} s: {_reason(err)}"
            )
            self._audio.close()
            self._audio = None
        else:
            if final:
                self._audio = None

    def close(self) -> None:
        """Flush the encoder, add the remaining audio and finalize the file; idempotent."""
        if self._closed:
            return
        self._closed = True
        error: BaseException | None = None
        try:
            self._container.mux(self._stream.encode(None))
        except Exception as err:
            error = err
        self._feed_audio(self._video_seconds(), final=True)
        try:
            self._container.close()  # writes the index (moov atom): the file is now valid
        except Exception as err:
            error = error or err
        if error is None and self.frames_written:
            try:
                os.replace(self._temp_path, self._final_path)
            except OSError as err:
                error = err
        if error is not None or not self.frames_written:
            try:
                os.remove(self._temp_path)
            except OSError:
                pass
        if error is not None:
            raise OutputError(f"cannot finalize output {self.path}: {_reason(error)}") from None


class PngFolderSink(Sink):
    """Numbered PNG files frame_000000.png, frame_000001.png, ... in a folder."""

    def __init__(self, folder: str, size: tuple[int, int]) -> None:
        """Create `folder` (with parents) if needed.

        Raises:
            OutputError: the folder cannot be created.
        """
        super().__init__(folder)
        self.folder = Path(folder).expanduser()
        self.size = (int(size[0]), int(size[1]))
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(f"cannot create output folder {folder}: {_reason(err)}") from None
        if not os.access(self.folder, os.W_OK):
            raise OutputError(f"cannot write to output folder {folder}: permission denied")
        # Frames left by an earlier, longer run would mix with ours; say so at close.
        self._old_frames = len(list(self.folder.glob("frame_[0-9][0-9][0-9][0-9][0-9][0-9].png")))

    def path_for(self, index: int) -> Path:
        """Path of frame number `index`."""
        return self.folder / f"frame_{index:06d}.png"

    def write(self, frame: np.ndarray) -> None:
        """Save one RGB frame as the next numbered PNG."""
        self._check_open()
        path = self.path_for(self.frames_written)
        temp = path.with_name(f".{path.stem}.partial.png")
        try:
            # A complete PNG replaces an older frame of the same name in one step.
            fr.save_image(temp, _as_frame(frame, self.size))
            os.replace(temp, path)
        except OSError as err:
            raise OutputError(f"cannot write {path}: {_reason(err)}") from None
        self.frames_written += 1

    def close(self) -> None:
        """Nothing to finalize (every PNG is complete); idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._old_frames > self.frames_written:
            self.warnings.append(
                f"output folder {self.spec} still holds {self._old_frames - self.frames_written} "
                f"older frames after {self.path_for(self.frames_written - 1).name if self.frames_written else 'none'}"
            )


def _opencv_has_gui(cv2) -> bool:
    """Whether this OpenCV build can open windows (the -headless wheels cannot)."""
    for line in cv2.getBuildInformation().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "GUI":
            return value.strip().upper() not in ("", "NONE", "NO")
    return False


class WindowSink(Sink):
    """Shows frames in an OpenCV window; `q` or Esc in the window stops the run."""

    WINDOW_NAME = "diffstream"
    _QUIT_KEYS = (ord("q"), ord("Q"), 27)

    def __init__(self, size: tuple[int, int] | None = None) -> None:
        """Check that a window can be shown; the window opens at the first frame.

        Raises:
            OutputError: OpenCV has no GUI support or there is no display.
        """
        super().__init__("window")
        import cv2

        self._cv2 = cv2
        if not _opencv_has_gui(cv2):
            raise OutputError(
                "window preview needs an OpenCV build with GUI support: pip install opencv-python"
            )
        # Checked here because OpenCV's Qt/GTK backends abort the process without a display.
        if sys.platform.startswith("linux") and not (
            os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
        ):
            raise OutputError("window preview needs a display (DISPLAY is not set)")
        self._size = size
        self._window_open = False

    def _open_window(self) -> None:
        # Created at the first frame rather than in __init__ so that every GUI call
        # happens in the thread that writes (a ThreadedWriter's thread); GUI toolkits
        # dislike windows used from a thread other than the one that created them.
        cv2 = self._cv2
        try:
            cv2.namedWindow(self.WINDOW_NAME, cv2.WINDOW_NORMAL)
            if self._size:
                cv2.resizeWindow(self.WINDOW_NAME, int(self._size[0]), int(self._size[1]))
        except cv2.error as err:
            raise OutputError(f"cannot open a preview window: {_one_line(err)}") from None
        self._window_open = True

    def write(self, frame: np.ndarray) -> None:
        """Show one frame.

        Raises:
            KeyboardInterrupt: the user pressed q or Esc, or closed the window.
        """
        self._check_open()
        if not self._window_open:
            self._open_window()
        cv2 = self._cv2
        cv2.imshow(self.WINDOW_NAME, fr.rgb_to_bgr(frame))
        self.frames_written += 1
        # waitKey also runs the GUI event loop; without it the window never repaints.
        key = cv2.waitKey(1)
        if key != -1 and (key & 0xFF) in self._QUIT_KEYS:
            raise KeyboardInterrupt("preview stopped by the user")
        try:
            visible = cv2.getWindowProperty(self.WINDOW_NAME, cv2.WND_PROP_VISIBLE)
        except cv2.error:
            visible = 0
        if visible < 1:
            raise KeyboardInterrupt("preview stopped by the user")

    def close(self) -> None:
        """Close the window; idempotent."""
        if self._closed:
            return
        self._closed = True
        if not self._window_open:
            return
        try:
            self._cv2.destroyWindow(self.WINDOW_NAME)
            self._cv2.waitKey(1)  # lets the GUI backend actually remove the window
        except self._cv2.error:
            pass  # already closed by the user


# Outputs that show or send a stream instead of recording it.
LIVE_KINDS = ("window", "ndi", "virtualcam")


def _output_kind(spec: str) -> str:
    """"window", "ndi", "virtualcam", "video" or "folder": what `open_sink` makes of
    `spec` (OutputError if none)."""
    text = spec.strip().lower()
    if text == "window":
        return "window"
    if text.startswith("ndi:"):
        return "ndi"
    if text == "virtualcam" or text.startswith("virtualcam:"):
        return "virtualcam"
    path = Path(spec).expanduser()
    if path.is_dir() or spec.endswith(("/", os.sep)):
        return "folder"
    suffix = path.suffix.lower()
    if suffix in VIDEO_FORMATS:
        return "video"
    if suffix in _REFUSED_SUFFIXES:
        raise OutputError(
            f"unsupported output {spec}: use a .mp4, .mkv or .mov file, a folder (PNG frames) or 'window'"
        )
    return "folder"


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def check_output(spec: str, inputs=(), live_ok: bool = True) -> None:
    """Check an output before anything is loaded or opened for writing.

    Args:
        spec: what `open_sink` would receive.
        inputs: the run's input specs; an output that resolves to one of them (the same
            path, a symlink or hard link to it, a path inside an input image folder, or
            a folder holding an input image folder) is refused.
        live_ok: False refuses ``window`` (commands that write a recorded result).
    Raises:
        OutputError: one line naming the output and what is wrong.
    """
    spec = str(spec)
    kind = _output_kind(spec)
    if kind in LIVE_KINDS:
        if not live_ok:
            raise OutputError("this command writes a file: -o must be a .mp4, .mkv or .mov file or a folder")
        _check_live_output(kind, spec, inputs)
        return
    out = Path(os.path.abspath(Path(spec).expanduser()))
    resolved = out.resolve()
    for item in inputs:
        item = str(item)
        if "://" in item or item.startswith("webcam"):
            continue
        src = Path(os.path.abspath(Path(item).expanduser()))
        if not src.exists():
            continue
        src_resolved = src.resolve()
        same = resolved == src_resolved or (out.exists() and os.path.samefile(out, src))
        inside = src.is_dir() and (_is_within(resolved, src_resolved) or _is_within(src_resolved, resolved))
        if same or inside:
            what = "is the input" if same else ("is inside the input folder" if _is_within(resolved, src_resolved)
                                                 else "holds the input folder")
            raise OutputError(f"output {spec} {what} {item}: writing it would destroy the input; "
                              f"choose another -o")
    if kind == "video" and out.is_dir():
        raise OutputError(f"output {spec} is a folder: give a file name such as {out / 'out.mp4'}")
    if out.exists() and not out.is_dir() and not os.access(out, os.W_OK):
        raise OutputError(f"output {spec} exists and is read-only: choose another -o or make it writable")
    # The nearest existing folder on the way must let us create the output (or the
    # temporary file it is written under, which is renamed into place).
    folder = out if kind == "folder" and out.is_dir() else out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write output {spec}: folder {folder} is not writable")


def _check_live_output(kind: str, spec: str, inputs) -> None:
    """The checks of an NDI or virtual-camera output that need no model: the package is
    installed, the name is there, the camera device exists."""
    if kind == "ndi":
        from diffstream.io import ndi

        name = ndi.parse_spec(spec, OutputError)
        ndi.check_available(OutputError)
        for item in inputs:
            if ndi.parse_spec(str(item)) == name:
                raise OutputError(f"output {spec} is the input {item}: the run would receive its own output; "
                                  f"choose another NDI name")
    elif kind == "virtualcam":
        from diffstream.io import virtualcam

        virtualcam.check_available(virtualcam.parse_spec(spec)[1])


def open_sink(
    spec: str,
    fps: Fraction | float | None,
    size: tuple[int, int],
    audio_path: str | None = None,
) -> Sink:
    """Open an output.

    Args:
        spec: ``*.mp4`` / ``*.mkv`` / ``*.mov`` (``*.m4v``) for an H.264 video; an
            existing folder, a path ending with ``/`` or a path without a suffix for a
            PNG folder; ``window`` for a preview window; ``ndi:NAME`` for an NDI sender
            (`diffstream.io.ndi`); ``virtualcam`` or ``virtualcam:DEVICE`` for a virtual
            camera (`diffstream.io.virtualcam`).
        fps: frame rate of a video output, announced by NDI and virtual-camera outputs
            (None: 30); ignored by other outputs.
        size: (width, height) of the output; frames of another size are resized.
            Video outputs round it down to even numbers.
        audio_path: for video outputs, copy this file's audio track (if any), cut to
            the length of the video written.
    Returns:
        A `Sink`; use it as a context manager or call `close()`.
    Raises:
        OutputError: one line naming the output and what is wrong.
    """
    spec = str(spec)
    kind = _output_kind(spec)
    if kind == "window":
        return WindowSink(size)
    if kind == "ndi":
        from diffstream.io.ndi import NDISink, parse_spec

        return NDISink(parse_spec(spec, OutputError), fps, size)
    if kind == "virtualcam":
        from diffstream.io.virtualcam import VirtualCamSink, parse_spec

        return VirtualCamSink(fps, size, parse_spec(spec)[1])
    path = Path(spec).expanduser()
    if kind == "video":
        return VideoSink(str(path), fps, size, audio_path)
    return PngFolderSink(str(path), size)
