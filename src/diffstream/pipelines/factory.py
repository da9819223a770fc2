"""Builds the stream pipeline for a method name: the one place methods are wired in."""

from __future__ import annotations

from diffstream.config import StreamConfig
from diffstream.models.loading import Components
from diffstream.pipelines.stream import StreamPipeline


def make_mechanism(config: StreamConfig):
    """The temporal mechanism of `config.method` (None for the per-frame StreamDiffusion baseline)."""
    if config.method == "streamdiffusion":
        return None
    if config.method == "streamv2v":
        import dataclasses

        from diffstream.attention.feature_bank import FeatureBank

        # The bank's random split follows the stream's seed, so runs are reproducible.
        return FeatureBank(dataclasses.replace(config.feature_bank, seed=config.seed))
    if config.method == "live2diff":
        from diffstream.attention.causal_temporal import CausalTemporal

        return CausalTemporal(config.causal)
    raise ValueError(f"unknown method {config.method!r}")


def make_pipeline(components: Components, config: StreamConfig) -> StreamPipeline:
    """A StreamPipeline running `config.method` on `components`."""
    return StreamPipeline(components, config, make_mechanism(config))
