"""An offline edit on a model that an open stream also uses runs its own attention only.

The web server and the benchmarks keep one loaded model for every method; a stream
leaves its processors installed between frames (`ProcessorLease`). Before Fairy took the
lease, a Fairy edit after an open StreamV2V stream ran the stream's feature bank
(`benchmarks/quality_toy.py` crashed on it with --anchors 0). FateZero installs its
processors on every attention layer and takes the lease too; its test pins that.
"""

import numpy as np
import torch

from diffstream.attention.base import ProcessorLease
from diffstream.config import ModelConfig, StreamConfig
from diffstream.models.loading import load_components
from diffstream.pipelines.factory import make_pipeline
from diffstream.testing import make_frames


def open_stream(components, frames):
    """A StreamV2V stream that has run two frames: its feature bank holds the UNet."""
    stream = make_pipeline(components, StreamConfig(prompt="a cat", size=64, method="streamv2v", steps=2))
    for f in frames[:2]:
        stream.process(f)
    assert ProcessorLease.holder(components.unet) is stream
    return stream


def test_fairy_after_an_open_stream_equals_fairy_alone():
    from diffstream.pipelines.fairy import FairyConfig, FairyPipeline

    comp = load_components(ModelConfig(model="tiny", device="cpu"))  # its own: processors change here
    frames = make_frames(3)
    for anchors in (0, 2):
        config = FairyConfig(prompt="a bronze statue", anchors=anchors, steps=2, strength=0.8, size=64,
                             sampler="ddim")
        with FairyPipeline(comp, config) as pipe:
            alone = list(pipe.edit(frames))
        stream = open_stream(comp, frames)
        with FairyPipeline(comp, config) as pipe:
            after = list(pipe.edit(frames))
        assert all(np.array_equal(a, b) for a, b in zip(alone, after, strict=True)), anchors
        assert stream.process(frames[2]) is not None  # the stream takes its processors back
        stream.close()


def test_fatezero_after_an_open_stream_equals_fatezero_alone():
    from diffstream.attention.fatezero import FateZeroConfig
    from diffstream.pipelines.fatezero import FateZeroEditConfig, FateZeroEditor

    comp = load_components(ModelConfig(model="tiny", device="cpu"))
    frames = make_frames(3)
    config = FateZeroEditConfig(source_prompt="a black swan", prompt="a white duck",
                                fatezero=FateZeroConfig(steps=3))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def edit():
        ed = FateZeroEditor(comp, config, (8, 8))
        store = ed.new_store()
        ed.invert(latents, [1, 1], store)
        return ed.edit(store, [1, 1])

    alone = edit()
    stream = open_stream(comp, frames)
    assert torch.equal(edit(), alone)
    stream.close()
