"""The two interfaces every input and output implements: `Source` and `Sink`.

They live apart from the concrete readers (`io.sources`) and writers (`io.sinks`) so that
optional back-ends (`io.ndi`, `io.virtualcam`) can subclass them while `open_source` /
`open_sink` import those back-ends lazily, without an import circle.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Iterator

import numpy as np

from diffstream.errors import InputError

__all__ = ["Source", "Sink", "DEFAULT_FPS"]

# Frame rate of outputs whose input has none (image folders opened without --fps).
DEFAULT_FPS = Fraction(30)


class Source:
    """A stream of RGB uint8 frames (H, W, 3).

    Attributes:
        fps: frame rate as a Fraction, or None when unknown (an image folder opened
            without `fps`: sinks then write 30 fps).
        width, height: size of the first frame.
        num_frames: known or estimated frame count (already capped by `max_frames`),
            None for live or unknown inputs. Meant for progress bars, not for logic.
        is_live: True for webcams and network streams (the caller may drop frames).
        audio_path: a file whose audio track a sink can copy, or None.
        warnings: messages about damage or dropped streams, appended during iteration;
            read them after the loop ends.

    Iterating yields frames until the input ends or `max_frames` is reached. A source is
    a stream: iterating a second time continues where the first loop stopped.
    """

    fps: Fraction | None = None
    width: int = 0
    height: int = 0
    num_frames: int | None = None
    is_live: bool = False
    audio_path: str | None = None

    def __init__(self, spec: str, max_frames: int | None = None) -> None:
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be at least 1, got {max_frames}")
        self.spec = spec
        self.max_frames = max_frames
        self.warnings: list[str] = []
        self._yielded = 0
        self._first: np.ndarray | None = None
        self._frames: Iterator[np.ndarray] | None = None
        self._closed = False

    def _start(self) -> None:
        """Create the frame generator and decode the first frame (eager validation)."""
        self._frames = self._generate()
        first = next(self._frames, None)
        if first is None:
            # The damage warning names the input too; keep only its explanation.
            detail = f": {self.warnings[0].split(': ', 1)[-1]}" if self.warnings else ""
            self.close()
            raise InputError(f"no decodable frames in input {self.spec}{detail}")
        self._first = first
        self.height, self.width = first.shape[:2]
        if self.num_frames is not None and self.max_frames is not None:
            self.num_frames = min(self.num_frames, self.max_frames)

    def _generate(self) -> Iterator[np.ndarray]:
        """Yield decoded frames; subclasses implement it."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[np.ndarray]:
        """Yield RGB frames in order until the input ends or `max_frames` is reached."""
        # An explicit next() loop (not `yield from`) so that abandoning this iterator
        # does not close the shared decoder generator.
        while not self._closed and self._frames is not None:
            if self.max_frames is not None and self._yielded >= self.max_frames:
                return
            if self._first is not None:
                frame, self._first = self._first, None
            else:
                frame = next(self._frames, None)
                if frame is None:
                    return
            self._yielded += 1
            yield frame

    @property
    def frames_read(self) -> int:
        """How many frames iteration has yielded so far."""
        return self._yielded

    def close(self) -> None:
        """Release the input (file, camera, connection); idempotent."""
        self._closed = True

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.spec!r}, {self.width}x{self.height}, "
            f"fps={self.fps}, num_frames={self.num_frames}, live={self.is_live})"
        )


class Sink:
    """Receives RGB uint8 frames; see `open_sink`.

    Attributes:
        frames_written: number of frames accepted by `write`.
        warnings: problems that did not lose frames, e.g. audio that was not copied.
    """

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.frames_written = 0
        self.warnings: list[str] = []
        self._closed = False

    def write(self, frame: np.ndarray) -> None:
        """Append one RGB uint8 frame (H, W, 3)."""
        raise NotImplementedError

    def close(self) -> None:
        """Finalize the output; idempotent."""
        self._closed = True

    @property
    def closed(self) -> bool:
        """True once `close()` has run."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"write to closed sink {self.spec}")

    def __enter__(self) -> "Sink":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Runs on every exit, KeyboardInterrupt included: that is what makes an
        # interrupted run leave a valid file.
        self.close()
