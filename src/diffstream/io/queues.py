"""Background threads so that capture, inference and encoding overlap.

`ThreadedReader` decodes frames ahead of the consumer; `ThreadedWriter` encodes frames
behind the producer. Decoding and encoding (PyAV, OpenCV) release the GIL, so on a
multi-core machine they run in parallel with the diffusion model.

Exceptions raised in a worker thread are re-raised in the caller's thread, with their
original traceback, at the next call that touches the queue.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Iterable, Iterator

import numpy as np

__all__ = ["ThreadedReader", "ThreadedWriter"]

# Queue item kinds. Control items (end, error) bypass the size limit so a worker can
# always deliver them without blocking.
_FRAME, _END, _ERROR = "frame", "end", "error"


class _Closed(Exception):
    """The channel was closed while a thread waited on it."""


class _Channel:
    """A bounded FIFO between two threads that either side can close to wake the other.

    `queue.Queue` cannot drop its oldest item atomically nor wake blocked threads on
    shutdown, which is why this small condition-variable queue exists.
    """

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, got {maxsize}")
        self.maxsize = maxsize
        self._items: deque = deque()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, item: Any, drop_oldest: bool = False, control: bool = False) -> int:
        """Append `item`; returns how many old items were discarded to make room.

        Blocks while full unless `drop_oldest` (discard the oldest frame) or `control`.
        Raises `_Closed` if the channel is (or gets) closed.
        """
        dropped = 0
        with self._cond:
            while not self._closed and not control and len(self._items) >= self.maxsize:
                if drop_oldest:
                    self._items.popleft()
                    dropped += 1
                else:
                    self._cond.wait()
            if self._closed:
                raise _Closed
            self._items.append(item)
            self._cond.notify_all()
        return dropped

    def get(self) -> Any:
        """Remove and return the oldest item; blocks while empty. Raises `_Closed`."""
        with self._cond:
            while not self._items and not self._closed:
                self._cond.wait()
            if self._closed:
                raise _Closed
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def close(self) -> None:
        """Wake every waiting thread; later puts and gets raise `_Closed`."""
        with self._cond:
            self._closed = True
            self._items.clear()
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


class ThreadedReader:
    """Reads a source (any iterable of frames) in a daemon thread, ahead of the consumer.

    The thread starts at construction, so frames are prefetched while the caller is
    still setting up.

    Args:
        source: iterable of frames, e.g. a `diffstream.io.sources.Source`.
        maxsize: number of frames buffered.
        drop_oldest: False (files): the reader waits when the buffer is full, no frame
            is ever lost. True (live inputs): the oldest buffered frame is discarded and
            counted in `dropped`, so the consumer always gets recent frames.
    """

    def __init__(self, source: Iterable[np.ndarray], maxsize: int = 8, drop_oldest: bool = False):
        self.source = source
        self.drop_oldest = drop_oldest
        self.dropped = 0
        self._channel = _Channel(maxsize)
        self._finished = False
        self._thread = threading.Thread(target=self._run, name="diffstream-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        channel = self._channel
        try:
            try:
                for frame in self.source:
                    self.dropped += channel.put((_FRAME, frame), drop_oldest=self.drop_oldest)
            except _Closed:
                return
            except BaseException as err:  # handed to the consumer, which re-raises it
                channel.put((_ERROR, err), control=True)
                return
            channel.put((_END, None), control=True)
        except _Closed:
            pass  # the consumer closed us; nobody is waiting for the result

    def __iter__(self) -> Iterator[np.ndarray]:
        """Yield frames in order; re-raises an exception of the source."""
        while not self._finished:
            try:
                kind, payload = self._channel.get()
            except _Closed:
                return
            if kind == _FRAME:
                yield payload
            elif kind == _END:
                self._finished = True
                return
            else:
                self._finished = True
                raise payload

    @property
    def buffered(self) -> int:
        """Frames currently waiting in the buffer."""
        return len(self._channel)

    def close(self, timeout: float = 2.0) -> None:
        """Stop the reader thread; does not close the source.

        Returns at once if the thread waits on a full buffer. If it is inside the source
        (e.g. a network read), waits up to `timeout` seconds for it to notice, so the
        caller can then close the source safely; a thread stuck longer is a daemon and
        cannot keep the process alive.
        """
        self._finished = True
        self._channel.close()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> "ThreadedReader":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


class ThreadedWriter:
    """Writes frames to a sink in a daemon thread, behind the producer.

    `write` never drops a frame: it waits when `maxsize` frames are pending. `close`
    writes everything still pending, then stops the thread; it does not close the sink.
    If the sink raises, the error is re-raised by the next `write` or by `close`.
    """

    def __init__(self, sink, maxsize: int = 8) -> None:
        self.sink = sink
        self._channel = _Channel(maxsize)
        self._error: BaseException | None = None
        self._error_raised = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="diffstream-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        channel = self._channel
        while True:
            try:
                kind, frame = channel.get()
            except _Closed:
                return
            if kind == _END:
                return
            try:
                self.sink.write(frame)
            except BaseException as err:  # KeyboardInterrupt too (window sink 'q')
                self._error = err
                # Closing wakes a producer blocked in write() so it can raise the error.
                channel.close()
                return

    def _raise_error(self) -> None:
        if self._error is not None and not self._error_raised:
            self._error_raised = True
            raise self._error

    def write(self, frame: np.ndarray) -> None:
        """Queue one frame; waits while the queue is full. Re-raises a sink error."""
        if self._closed:
            raise ValueError("write to a closed ThreadedWriter")
        self._raise_error()
        try:
            self._channel.put((_FRAME, frame))
        except _Closed:
            self._raise_error()
            raise ValueError("write to a closed ThreadedWriter") from None

    @property
    def pending(self) -> int:
        """Frames queued but not yet written."""
        return len(self._channel)

    def close(self) -> None:
        """Write all pending frames, stop the thread; re-raises a sink error. Idempotent."""
        if not self._closed:
            self._closed = True
            try:
                self._channel.put((_END, None), control=True)
            except _Closed:
                pass  # the thread already stopped because the sink failed
            self._thread.join()
        self._raise_error()

    def __enter__(self) -> "ThreadedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        # Another exception is already propagating; it explains the failure better
        # than a sink error that follows from it, so only a clean close is attempted.
        try:
            self.close()
        except Exception:
            pass
