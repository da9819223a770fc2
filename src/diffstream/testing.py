"""Synthetic clips for tests, examples and benchmarks (no downloads, deterministic)."""

from __future__ import annotations

import contextlib

import numpy as np


def make_frames(n: int, height: int = 48, width: int = 64, seed: int = 0) -> list[np.ndarray]:
    """n smooth moving RGB frames (a drifting sinusoid pattern plus mild noise).

    Returns:
        list of (height, width, 3) uint8 frames.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = []
    for i in range(n):
        r = 127 + 100 * np.sin((xx + 3 * i) / 9.0) * np.cos(yy / 7.0 + 0.3 * i)
        g = 127 + 100 * np.cos((yy - 2 * i) / 11.0)
        b = 127 + 100 * np.sin((xx + yy + 4 * i) / 13.0)
        img = np.stack([r, g, b], axis=-1) + rng.normal(0, 6, (height, width, 3))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def write_video(path, frames, fps: int = 25, audio_seconds: float | None = None) -> str:
    """Encode frames to an H.264 file with PyAV, optionally with a sine-wave AAC track.

    Args:
        path: output file (.mp4).
        frames: (H, W, 3) uint8 frames of equal, even size.
        audio_seconds: length of a 440 Hz audio track to add, or None for no audio.
    """
    import fractions

    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        audio = None
        if audio_seconds:
            audio = container.add_stream("aac", rate=44100)
            audio.layout = "mono"
        for i, frame in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            vf.pts = i
            vf.time_base = fractions.Fraction(1, fps)
            for packet in stream.encode(vf):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if audio is not None:
            rate, chunk = 44100, 1024
            total = int(audio_seconds * rate)
            t = np.arange(total) / rate
            samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            for start in range(0, total, chunk):
                part = samples[start : start + chunk]
                af = av.AudioFrame.from_ndarray(part[None, :], format="fltp", layout="mono")
                af.sample_rate = rate
                af.pts = start
                af.time_base = fractions.Fraction(1, rate)
                for packet in audio.encode(af):
                    container.mux(packet)
            for packet in audio.encode():
                container.mux(packet)
    return str(path)


def benchmark_clip(n: int, size: int, name: str = "bigbuckbunny.mp4"):
    """First n frames of a sample clip from ../shared/data, resized to `size` (longer
    side, multiples of 64); generated frames when the clip is absent (a user's clone).

    Returns:
        (frames, origin) where origin names the clip or says "generated".
    """
    from pathlib import Path

    from diffstream import frames as F

    clip = Path(__file__).resolve().parents[3] / "shared" / "data" / name
    if clip.exists():
        from diffstream.io.sources import open_source

        with open_source(str(clip), max_frames=n) as src:
            frames, origin = list(src), clip.name
    else:
        frames, origin = make_frames(n, 180, 320), "generated"
    w, h = F.fit_size(frames[0].shape[1], frames[0].shape[0], size, 64)
    return [F.resize(f, (w, h)) for f in frames], origin


def stream_all(pipe, frames) -> tuple[list[np.ndarray], list[bool]]:
    """Push every frame through a stream pipeline, then flush.

    Returns:
        (outputs in input order, for each push whether it returned a frame)
    """
    outs, returned = [], []
    for frame in frames:
        out = pipe.push(frame)
        returned.append(out is not None)
        if out is not None:
            outs.append(out)
    outs.extend(pipe.flush())
    return outs, returned


def assert_frames_close(a, b, tol: int = 1) -> None:
    """Two equally long lists of uint8 frames differ by at most `tol` grey levels anywhere."""
    assert len(a) == len(b), (len(a), len(b))
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape, (i, x.shape, y.shape)
        diff = np.abs(x.astype(np.int16) - y.astype(np.int16)).max()
        assert diff <= tol, f"frame {i} differs by {diff}"


def stream_with_update(pipe, frames, at: int, **changes) -> list[np.ndarray]:
    """Stream `frames`, calling `pipe.update(**changes)` just before frame `at` is pushed;
    return every output in order (tests of changes that apply from the next frame)."""
    outs = []
    for i, frame in enumerate(frames):
        if i == at:
            pipe.update(**changes)
        out = pipe.push(frame)
        if out is not None:
            outs.append(out)
    return outs + pipe.flush()


class _MaskedStockWanAttention:
    """diffusers' own WanAttnProcessor, called with a fixed attention mask."""

    def __init__(self, mask):
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        self.mask, self.stock = mask, WanAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask=self.mask, rotary_emb=rotary_emb)


@contextlib.contextmanager
def stock_wan_attention_with_mask(model, mask):
    """Every self-attention (attn1) of a Wan transformer runs diffusers' own processor
    under `mask` for the context; its processors are restored after. The oracle of the
    block-causal proofs: the whole video in one call of the stock model, the mask saying
    which frames each frame may see.

    Args:
        model: a `WanTransformer3DModel`.
        mask: (L, L) bool, True where a query token may attend to a key token, L the
            tokens of the whole input (frames x tokens per frame).
    """
    original = dict(model.attn_processors)
    model.set_attn_processor({n: _MaskedStockWanAttention(mask) if ".attn1." in n else p
                              for n, p in original.items()})
    try:
        yield
    finally:
        model.set_attn_processor(original)
