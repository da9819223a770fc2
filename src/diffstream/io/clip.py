"""Clips read more than once: offline editors need a clip's length and some of its
frames before they edit frame 0.

- `Clip`: a list of frames, or a file / image folder decoded afresh on every pass, so
  nothing but the requested frames is in memory (Fairy: count, anchors, edit).
- `FrameFile`: frames at the processing size appended to a temporary file and read back
  as a numpy memmap (FateZero inverts and edits windows of a decoded clip).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterator, Sequence

import numpy as np

from diffstream.errors import InputError


class Clip:
    """A clip that can be read more than once: a list of frames, or a video file / image folder.

    Fairy needs the frame count and the anchor frames before it edits frame 0, so a file
    is read in passes (count, anchors, edit), each a fresh decode: nothing but the
    requested frames is held in memory.

    Args:
        frames: a sequence of (H, W, 3) uint8 frames, or a path for `open_source`.
        max_frames: use only the first N frames.
        fps: frame rate of an image-folder input (None: 30).
    Attributes:
        width, height: size of the first frame. fps, audio_path: from the source (files).
        warnings: source messages (e.g. damage) to print after the run.
    """

    def __init__(self, frames: Sequence[np.ndarray] | str, max_frames: int | None = None,
                 fps: float | None = None):
        self.max_frames = max_frames
        self.fps = None
        self.audio_path = None
        self.warnings: list[str] = []
        self._count: int | None = None
        if isinstance(frames, (str, bytes)) or hasattr(frames, "__fspath__"):
            from diffstream.io.sources import open_source

            self.spec = str(frames)
            with open_source(self.spec, max_frames=max_frames, fps=fps) as source:
                if source.is_live:
                    raise InputError(
                        f"edit reads its input more than once and cannot use the live input {self.spec}: "
                        f"record it to a file first, or use `diffstream run` for live streams"
                    )
                self.fps, self.audio_path = source.fps, source.audio_path
                self.width, self.height = source.width, source.height
            self._frames = None
        else:
            self.spec = "<frames>"
            self._frames = list(frames)[: max_frames] if max_frames else list(frames)
            if not self._frames:
                raise InputError("no frames to edit")
            self.height, self.width = self._frames[0].shape[:2]
            self._count = len(self._frames)

    def __len__(self) -> int:
        if self._count is None:
            self._count = sum(1 for _ in self)
            if self._count == 0:
                raise InputError(f"no decodable frames in input {self.spec}")
        return self._count

    def __iter__(self) -> Iterator[np.ndarray]:
        """A new pass over all frames, in order."""
        if self._frames is not None:
            yield from self._frames
            return
        from diffstream.io.sources import open_source

        with open_source(self.spec, max_frames=self.max_frames) as source:
            yield from source
            for warning in source.warnings:
                if warning not in self.warnings:
                    self.warnings.append(warning)

    def read(self, indices: Sequence[int]) -> list[np.ndarray]:
        """The frames at sorted `indices` (one pass that stops after the last one)."""
        wanted = set(indices)
        if self._frames is not None:
            return [self._frames[i] for i in indices]
        found = {}
        if wanted:
            last = max(wanted)
            for i, frame in enumerate(self):
                if i in wanted:
                    found[i] = frame
                if i >= last:
                    break
        missing = wanted - set(found)
        if missing:
            raise InputError(f"input {self.spec} ended before frame {min(missing)} on a second read")
        return [found[i] for i in indices]


def as_clip(frames) -> Clip:
    """A `Clip` from a Clip, a list of frames or a path."""
    return frames if isinstance(frames, Clip) else Clip(frames)


class FrameFile:
    """Frames at the processing size, appended to a temporary file and read back as a
    numpy memmap (N, H, W, 3), so a long clip does not sit in RAM."""

    def __init__(self, size: tuple[int, int], directory=None):
        self.width, self.height = size
        self.dir = tempfile.mkdtemp(prefix="diffstream-frames-", dir=directory)
        self.path = os.path.join(self.dir, "frames.u8")
        self.file = open(self.path, "wb")
        self.count = 0

    def append(self, frame: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(frame, dtype=np.uint8).tobytes())
        self.count += 1

    def array(self) -> np.ndarray:
        self.file.flush()
        return np.memmap(self.path, dtype=np.uint8, mode="r", shape=(self.count, self.height, self.width, 3))

    def close(self) -> None:
        self.file.close()
        shutil.rmtree(self.dir, ignore_errors=True)
