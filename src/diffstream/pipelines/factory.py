"""Builds the stream pipeline for a method name: the one place methods are wired in."""

from __future__ import annotations

from diffstream.config import StreamConfig
from diffstream.models.loading import Components
from diffstream.pipelines.stream import StreamPipeline


def make_mechanism(method: str):
    """The temporal mechanism of `method` (None for the per-frame StreamDiffusion baseline)."""
    if method == "streamdiffusion":
        return None
    raise ValueError(f"unknown method {method!r}")


def make_pipeline(components: Components, config: StreamConfig) -> StreamPipeline:
    """A StreamPipeline running `config.method` on `components`."""
    return StreamPipeline(components, config, make_mechanism(config.method))
