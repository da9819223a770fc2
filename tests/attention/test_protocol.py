"""One mechanism protocol: `with mechanism.attach(unet):` installs processors and leaving
the context restores exactly the original processor objects, for all four mechanisms;
streams sharing one UNet hand the processors over through the lease kept on the UNet."""

import gc

import pytest

from diffstream.attention.anchor import AnchorAttention, AnchorAttnProcessor
from diffstream.attention.base import BatchLayout, Mechanism, ProcessorLease
from diffstream.attention.causal_temporal import CausalTemporal, CausalTemporalAttnProcessor, CausalTemporalConfig
from diffstream.attention.fatezero import FateZero, FateZeroAttnProcessor, FateZeroConfig, probe_layers
from diffstream.attention.feature_bank import FeatureBank, FeatureBankAttnProcessor
from diffstream.config import ModelConfig, StreamConfig
from diffstream.models.loading import load_components
from diffstream.pipelines import stream as stream_module
from diffstream.pipelines.stream import StreamPipeline
from diffstream.testing import make_frames


@pytest.fixture(scope="module")
def video():
    """A tiny UNetMotionModel (Live2Diff needs motion modules)."""
    return load_components(ModelConfig(model="tiny", motion_adapter="tiny", device="cpu"))


def fatezero(tiny):
    text = tiny.encode_prompt(["a black swan"])
    return FateZero(FateZeroConfig(steps=4), probe_layers(tiny.unet, (4, 6)), None, text)


MECHANISMS = {
    "streamv2v": (lambda tiny: FeatureBank(), FeatureBankAttnProcessor, False),
    "live2diff": (lambda tiny: CausalTemporal(CausalTemporalConfig(warmup_frames=2, window=4)),
                  CausalTemporalAttnProcessor, True),
    "fairy": (lambda tiny: AnchorAttention(), AnchorAttnProcessor, False),
    "fatezero": (fatezero, FateZeroAttnProcessor, False),
}


@pytest.mark.parametrize("method", list(MECHANISMS))
def test_attach_installs_and_leaving_restores_the_very_same_processors(tiny, video, method):
    build, processor_class, needs_video = MECHANISMS[method]
    mechanism = build(tiny)
    assert isinstance(mechanism, Mechanism)
    unet = (video if needs_video else tiny).unet
    before = dict(unet.attn_processors)
    with mechanism.attach(unet):
        inside = unet.attn_processors
        assert inside.keys() == before.keys()
        replaced = {name for name in before if inside[name] is not before[name]}
        assert replaced, f"{method} installed nothing"
        assert all(isinstance(inside[name], processor_class) for name in replaced)
    after = unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before)


@pytest.mark.parametrize("method", list(MECHANISMS))
def test_attach_restores_on_an_exception(tiny, video, method):
    build, _, needs_video = MECHANISMS[method]
    unet = (video if needs_video else tiny).unet
    before = dict(unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with build(tiny).attach(unet):
            raise RuntimeError("boom")
    assert all(unet.attn_processors[name] is before[name] for name in before)


def bank_states(unet):
    """The FeatureBankState behind every bank processor installed on `unet`."""
    return {id(p.state) for p in unet.attn_processors.values() if isinstance(p, FeatureBankAttnProcessor)}


def test_streams_sharing_a_unet_hand_the_processors_over_without_a_module_global(tiny):
    assert not hasattr(stream_module, "_OWNERS")
    unet = tiny.unet
    original = dict(unet.attn_processors)
    config = StreamConfig(prompt="a fox", size=64, steps=2, strength=0.6, guidance=1.0, method="streamv2v")
    frame = make_frames(1, height=64, width=64)[0]
    first = StreamPipeline(tiny, config, FeatureBank())
    second = StreamPipeline(tiny, config, FeatureBank())

    first.push(frame)
    assert ProcessorLease.holder(unet) is first
    assert bank_states(unet) == {id(first.mechanism.state)}
    second.push(frame)  # the second stream's push closes the first's processors
    assert ProcessorLease.holder(unet) is second
    assert bank_states(unet) == {id(second.mechanism.state)}
    first.close()  # not the holder: changes nothing
    assert bank_states(unet) == {id(second.mechanism.state)}
    first.push(frame)  # and back
    assert ProcessorLease.holder(unet) is first
    assert bank_states(unet) == {id(first.mechanism.state)}
    first.close()
    assert ProcessorLease.holder(unet) is None
    assert all(unet.attn_processors[n] is original[n] for n in original)

    # A stream dropped without closing does not stay alive through the record, and its
    # processors go when the next stream takes the UNet (or on release).
    second.push(frame)
    del second
    gc.collect()
    assert ProcessorLease.holder(unet) is None
    assert bank_states(unet)  # still installed, owner gone
    assert ProcessorLease.release(unet)
    assert all(unet.attn_processors[n] is original[n] for n in original)
    assert not ProcessorLease.release(unet)


def test_the_layout_describes_every_phase():
    stream = BatchLayout(steps=(1, 0, 1), branches=("uncond", "cond", "cond"), num_steps=2)
    assert stream.phase == "stream" and stream.batch_size == 3 and stream.num_branches == 2
    fairy = BatchLayout.branch_major("record", 3, ("cond", "image", "uncond"), 4, num_steps=10)
    assert fairy.branches == ("cond",) * 4 + ("image",) * 4 + ("uncond",) * 4
    assert (fairy.num_branches, fairy.frames, fairy.step, fairy.steps) == (3, 4, 3, (3,) * 12)
    fuse = BatchLayout.branch_major("fuse", 2, ("uncond", "cond"), 3, num_steps=4, refs=[1, 1, 1], fused_group=1)
    assert fuse.refs == (1, 1, 1) and fuse.fused_group == 1 and fuse.frames == 3
    assert hash(fuse) == hash(BatchLayout.branch_major("fuse", 2, ("uncond", "cond"), 3, 4, refs=(1, 1, 1), fused_group=1))
    with pytest.raises(ValueError, match="unknown UNet call phase"):
        BatchLayout((0,), ("cond",), 1, phase="replay")
    with pytest.raises(ValueError, match="reference row per frame"):
        BatchLayout.branch_major("plain", 0, ("cond",), 3, 4, refs=[0, 1])
    with pytest.raises(ValueError, match="branch-major"):
        BatchLayout(steps=(0, 0, 0), branches=("cond", "uncond", "cond"), num_steps=1, phase="attend")
    with pytest.raises(ValueError, match="fused group"):
        BatchLayout.branch_major("fuse", 0, ("cond",), 1, 4, refs=[0], fused_group=1)


def test_a_fatezero_store_or_fuse_call_needs_its_store(tiny):
    fz = fatezero(tiny)
    for phase in ("store", "fuse"):
        with pytest.raises(RuntimeError, match="use_stores"):
            fz.before_unet(BatchLayout.branch_major(phase, 0, ("cond",), 2, 4, refs=[0, 0]))
    with pytest.raises(ValueError, match="FateZero has no phase"):
        fz.before_unet(BatchLayout((0,), ("cond",), 4))
