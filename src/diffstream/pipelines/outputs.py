"""The output side every stream pipeline shares: finished frames leave in input order.

`StreamPipeline` (per-frame methods) and `CausalVideoPipeline` (chunks of a video model)
finish frames differently, but hand them out alike, which is what `diffstream run`, the
server and `bench` rely on: a pipeline keeps `_ready`, a deque of (input index, frame)
in input order, counts `frames_out` and calls `on_output` with each index as it leaves.
"""

from __future__ import annotations

import numpy as np


class OrderedOutputs:
    """`pop` / `process` / `_take_ready` over a pipeline's `_ready` queue (a mixin).

    The class using it sets `_ready` (deque of (index, (H, W, 3) uint8 frame)),
    `frames_out` (int) and `on_output` (list of callables taking the index), and defines
    `push(frame) -> frame | None`.
    """

    def pop(self) -> np.ndarray | None:
        """The next ready output without pushing a frame, or None.

        `push` returns one frame per call; a call can finish more than one (Live2Diff's
        warmup finishes W frames at once, a chunk of a video model 4 F, a frame skipped
        by the similarity filter is ready as soon as its predecessor is). Call `pop`
        until None, or use `process`, so those do not wait in the queue and add latency.
        """
        return self._pop()

    def process(self, frame: np.ndarray) -> list[np.ndarray]:
        """Push one (H, W, C) uint8 frame and return every output that is ready, oldest first."""
        out = self.push(frame)
        if out is None:
            return []
        return [out, *self._take_ready()]

    def _take_ready(self) -> list[np.ndarray]:
        """Every output in the queue, oldest first."""
        out = []
        while self._ready:
            out.append(self._pop())
        return out

    def _pop(self) -> np.ndarray | None:
        if not self._ready:
            return None
        index, frame = self._ready.popleft()
        self.frames_out += 1
        for callback in self.on_output:
            callback(index)
        return frame
