"""Audio passthrough: the input's audio track copied (or re-encoded to AAC) into a video
output, in step with the video frames written, and cut at the last frame."""

from __future__ import annotations

from collections import deque
from fractions import Fraction

AAC_BIT_RATE = 192_000


class AudioTrack:
    """Feeds the audio of another file into an output container, in step with the video.

    Audio is muxed incrementally while video frames arrive, only up to the video time
    written so far, so the output never holds audio past its last frame and a run cut
    short stays in sync. Packets are copied unchanged when the container accepts the
    codec (mode "copy"), otherwise decoded and re-encoded to AAC (mode "aac").
    """

    def __init__(self, path: str, container, mode: str) -> None:
        import av

        self.path = path
        self.mode = mode
        self._input = av.open(path, "r")
        try:
            self._in_stream = self._input.streams.audio[0]
            # Output time 0 is the source's first video frame; audio before it is cut.
            ref = None
            if self._input.streams.video:
                video = self._input.streams.video[0]
                if video.start_time is not None and video.time_base is not None:
                    ref = video.start_time * video.time_base
            if ref is None and self._in_stream.start_time is not None:
                ref = self._in_stream.start_time * self._in_stream.time_base
            self._offset = Fraction(ref or 0)
            if mode == "copy":
                self.out_stream = container.add_stream_from_template(self._in_stream)
            else:
                ctx = self._in_stream.codec_context
                rate = ctx.sample_rate or 48000
                self.out_stream = container.add_stream("aac", rate=rate)
                # Named layouts only: the AAC encoder rejects unordered ones ("2 channels"
                # from WAV files); mono stays mono, everything else becomes stereo.
                self.out_stream.layout = "mono" if ctx.layout.nb_channels == 1 else "stereo"
                self.out_stream.bit_rate = AAC_BIT_RATE
                self._rate = rate
            self._container = container
            self._packets = self._input.demux(self._in_stream)
            # Read-ahead packets or frames waiting for the video to catch up.
            self._pending: deque = deque()
            self._exhausted = False
        except BaseException:
            self._input.close()
            raise

    def _time(self, pts, time_base) -> Fraction | None:
        """Output time in seconds of an input timestamp, or None when it has none."""
        if pts is None or time_base is None:
            return None
        return pts * time_base - self._offset

    def _next_items(self) -> bool:
        """Read the next packet into `_pending`; False at the end of the audio."""
        if self._exhausted:
            return False
        try:
            packet = next(self._packets)
        except StopIteration:
            self._exhausted = True
            return False
        if self.mode == "copy":
            if packet.size:  # skip the empty flush packet that ends demuxing
                self._pending.append(packet)
        else:
            import av

            try:
                self._pending.extend(packet.decode())
            except av.FFmpegError:
                pass  # a damaged audio packet is a short gap, not a reason to stop
        return True

    def feed_until(self, seconds: Fraction, final: bool = False) -> None:
        """Mux the audio that lies before `seconds` of output time.

        While video keeps arriving (`final` False) only audio that ends by `seconds` is
        muxed, so nothing is committed past the video yet. At the end (`final` True)
        audio that starts before `seconds` is muxed too; decoded audio (mode "aac") is
        cut exactly there, copied packets can overshoot by at most one packet.
        """
        while True:
            if not self._pending and not self._next_items():
                return
            while self._pending:
                item = self._pending[0]
                start = self._time(item.pts, item.time_base)
                if start is None:
                    self._pending.popleft()  # untimed data cannot be placed; rare and short
                    continue
                end = start + self._duration(item)
                if start >= seconds or (not final and end > seconds):
                    return
                self._pending.popleft()
                # Skip audio wholly before the first video frame; copied packets that
                # end exactly at 0 are AAC priming the decoder needs, so they stay.
                if end < 0 or (end == 0 and self.mode != "copy"):
                    continue
                if self.mode != "copy" and end > seconds:
                    item = self._trimmed(item, seconds - start)
                self._mux(item, start)

    def _duration(self, item) -> Fraction:
        """Length in seconds of a packet (copy) or decoded frame (aac)."""
        if self.mode == "copy":
            return Fraction(item.duration or 0) * item.time_base
        return Fraction(item.samples, item.sample_rate or self._rate)

    @staticmethod
    def _trimmed(frame, seconds: Fraction):
        """The first `seconds` of a decoded audio frame, as a new frame."""
        import av

        keep = max(1, round(seconds * frame.sample_rate))
        samples = frame.to_ndarray()  # planar: (channels, n); packed: (1, n * channels)
        if not frame.format.is_planar:
            keep *= frame.layout.nb_channels
        cut = av.AudioFrame.from_ndarray(
            samples[:, :keep].copy(), format=frame.format.name, layout=frame.layout
        )
        cut.sample_rate = frame.sample_rate
        cut.pts, cut.time_base = frame.pts, frame.time_base
        return cut

    def _mux(self, item, start: Fraction) -> None:
        """Write one input packet (copy) or decoded frame (aac) at output time `start`."""
        if self.mode == "copy":
            shift = round(self._offset / item.time_base) if self._offset else 0
            if shift:
                item.pts -= shift
                if item.dts is not None:
                    item.dts -= shift
            item.stream = self.out_stream
            self._container.mux(item)
        else:
            item.pts = max(0, round(start * self._rate))
            item.time_base = Fraction(1, self._rate)
            self._container.mux(self.out_stream.encode(item))

    def finish(self, seconds: Fraction) -> None:
        """Mux the audio up to `seconds`, flush the encoder and close the input."""
        try:
            self.feed_until(seconds, final=True)
            if self.mode != "copy":
                self._container.mux(self.out_stream.encode(None))
        finally:
            self.close()

    def close(self) -> None:
        """Close the audio input file."""
        try:
            self._input.close()
        except Exception:
            pass  # only an input; nothing to lose
