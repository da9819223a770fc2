"""Execution backends (issue #16): compiled output equals eager's, graphs are reused frame
after frame, mechanisms keep working on a compiled UNet, and what cannot work is refused.

The inductor tests build real compiled kernels for the tiny model (tens of seconds each,
cold), so each method compiles once, in one test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffstream.attention.causal_temporal import CausalTemporalConfig
from diffstream.config import ModelConfig, RunConfig, StreamConfig
from diffstream.errors import ConfigError
from diffstream.models.loading import load_components
from diffstream.pipelines.factory import make_pipeline
from diffstream.testing import make_frames

# 64x96 frames: latents 8x12, the tiny UNet's attention layers at 4x6 tokens.
FRAMES = make_frames(10, 64, 96, seed=3)


def _tiny(method: str, backend: str = "eager"):
    motion = "tiny" if method == "live2diff" else None
    return load_components(ModelConfig(model="tiny", device="cpu", motion_adapter=motion, backend=backend))


def _config(method: str) -> StreamConfig:
    """streamv2v with 2 steps (a stream batch of 1 row while filling, then 2, each row with
    its own bank slot); the others with 1 step, so each compiles fewer batch shapes (a
    cold inductor build of the tiny model takes about a minute per shape here)."""
    if method == "live2diff":  # its reference runs without guidance; a short warmup
        return StreamConfig(prompt="a cat", size=96, method=method, steps=1, strength=0.6,
                            causal=CausalTemporalConfig(warmup_frames=3, window=6))
    return StreamConfig(prompt="a cat", size=96, method=method, steps=2 if method == "streamv2v" else 1,
                        strength=0.6, guidance=1.5, cfg_type="self")


# Changes made while streaming (from frame 6 on): none of them changes a tensor's shape,
# so the compiled graphs stay; the similarity filter skips UNet calls altogether.
UPDATES = dict(prompt="a dog", seed=7, guidance=1.3, similarity_threshold=0.9)


def _stream(components, config: StreamConfig, frames=FRAMES, updates=None) -> np.ndarray:
    """Every output frame of one stream over `frames`, `updates` applied after frame 5:
    (N, H, W, 3) uint8."""
    outs = []
    with make_pipeline(components, config) as pipe:
        for i, frame in enumerate(frames):
            outs.extend(pipe.process(frame))
            if updates and i == 5:
                pipe.update(**updates)
        outs.extend(pipe.flush())
    assert len(outs) == len(frames)
    return np.stack(outs)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """One cold compile cache for this module's tests: the methods share kernels (the VAE's,
    most of the UNet's), as they would on a user's machine."""
    return tmp_path_factory.mktemp("compiled")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["streamdiffusion", "streamv2v", "live2diff"])
def test_inductor_equals_eager_within_one_grey_level(method, compile_cache, monkeypatch):
    """fp32 inductor with freezing against eager, for every streaming method, with prompt,
    seed, guidance and the similarity filter changed mid-stream: at most one grey level
    apart (kernels sum in another order), and mostly identical. The modules are compiled
    in place, so the UNet is the same object and mechanisms restore its processors."""
    monkeypatch.setenv("DIFFSTREAM_CACHE", str(compile_cache))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(compile_cache / "inductor"))
    config = _config(method)
    expected = _stream(_tiny(method), config, updates=UPDATES)
    compiled = _tiny(method, "compile")
    unet = compiled.unet
    original = dict(unet.attn_processors)
    got = _stream(compiled, config, updates=UPDATES)
    assert compiled.backend == "compile" and compiled.unet is unet
    assert unet._compiled_call_impl is not None  # Module.compile: compiled in place
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() <= 1, f"{method}: compiled output off eager by {diff.max()} grey levels"
    assert (diff > 0).mean() < 0.01
    assert dict(unet.attn_processors) == original  # the stream restored the stock processors
    # A second stream on the same compiled model: the same frames again (state was reset).
    np.testing.assert_array_equal(_stream(compiled, config, updates=UPDATES), got)


@pytest.mark.slow
def test_inductor_bf16_is_as_close_to_fp32_as_bf16_eager(compile_cache, monkeypatch):
    """The tolerance of a bf16 backend, stated: bf16 inductor (with freezing) is held to
    what bf16 itself costs. Against fp32 eager, its outputs may be no farther off on
    average than bf16 eager's (x1.5), nor more than 1 grey level on average or 3 at the
    99th percentile; against bf16 eager, within the same bounds (max 12). Measured here:
    bf16 eager vs fp32 eager mean 0.42, p99 2, max 7; bf16 compiled vs bf16 eager mean
    0.43, p99 2, max 6. One method: bf16 changes the dtype of the compiled graphs, which
    are the same modules for every method (the stateful processors stay eager, and their
    fp32 equality per method is the test above)."""
    monkeypatch.setenv("DIFFSTREAM_CACHE", str(compile_cache))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(compile_cache / "inductor"))
    config = _config("streamdiffusion")

    def stream(backend, dtype):
        components = load_components(ModelConfig(model="tiny", device="cpu", backend=backend, dtype=dtype))
        return _stream(components, config, updates=UPDATES).astype(int)

    fp32, eager, compiled = stream("eager", "fp32"), stream("eager", "bf16"), stream("compile", "bf16")
    assert np.abs(eager - fp32).max() > 0  # bf16 is in effect (else the bounds below prove nothing)
    cost_of_bf16 = np.abs(eager - fp32).mean()
    for against, reference in (("fp32 eager", fp32), ("bf16 eager", eager)):
        diff = np.abs(compiled - reference)
        assert diff.mean() <= 1.0 and np.percentile(diff, 99) <= 3 and diff.max() <= 12, (
            f"bf16 compiled vs {against}: mean {diff.mean():.3f}, p99 {np.percentile(diff, 99)}, max {diff.max()}")
    assert np.abs(compiled - fp32).mean() <= 1.5 * cost_of_bf16, "bf16 compiled is farther from fp32 than bf16 eager"
    torch._dynamo.reset()


class _CountingBackend:
    """A torch.compile backend that counts the graphs dynamo hands it and runs them as is."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.mark.parametrize("method", ["streamv2v", "live2diff"])
def test_graphs_are_reused_while_state_fills(method, request):
    """After the first frames, no new graph is built: the stateful processors are opaque
    to the compiler (`attention.base.compiler_opaque`), so a bank filling, a KV cache
    rolling or an update flag flipping never invalidates a compiled graph. A processor
    traced into the graph would guard on that state and recompile frame after frame."""
    torch._dynamo.reset()
    # A high limit, and an error instead of a silent fallback to eager at the limit.
    no_fallback = torch._dynamo.config.patch(recompile_limit=256, fail_on_recompile_limit_hit=True)
    no_fallback.__enter__()
    request.addfinalizer(lambda: no_fallback.__exit__(None, None, None))
    components = _tiny(method)
    backend = _CountingBackend()
    components.unet.compile(backend=backend, dynamic=False)
    config = _config(method).replace(steps=2)
    # 8 frames: live2diff settles after 5 (2 steps + 3 warmup), so 3 more frames show no
    # new graph (a traced processor builds one per frame while its cache fills)
    frames = make_frames(8, 64, 96, seed=5)
    # Every layout has been seen once the stream batch is full (after the warmup):
    # from then on, no frame may build a graph (checked frame by frame: a traced processor
    # fails at the first settled frame instead of retracing the UNet for every frame left).
    settle = config.steps + (config.causal.warmup_frames if method == "live2diff" else 0)
    counts = []
    with make_pipeline(components, config) as pipe:
        for i, frame in enumerate(frames):
            pipe.process(frame)
            counts.append(backend.graphs)
            assert i <= settle or counts[-1] == counts[settle], f"{method}: graphs built per frame {counts}"
        pipe.flush()
    assert counts[settle] > 0
    torch._dynamo.reset()


def test_a_compiled_model_tells_when_it_builds_graphs_for_new_shapes(request):
    """A compiled model builds graphs the first time it meets a UNet batch shape: the
    stream says so once per schedule (at the start; after a steps change that brings new
    shapes), and not for shapes it has run before (back to the old steps, or a second
    stream on the same model). The graphs dynamo builds are counted, so each notice is
    shown to stand for real graph building, and its absence for none."""
    torch._dynamo.reset()
    request.addfinalizer(torch._dynamo.reset)
    components = _tiny("streamdiffusion")
    backend = _CountingBackend()
    components.unet.compile(backend=backend, dynamic=False)
    components.backend = "compile"  # what apply_backend records; the notice reads it
    config = StreamConfig(prompt="a cat", size=96, steps=2, strength=0.6, guidance=1.5, cfg_type="self")
    frames = make_frames(4, 64, 96, seed=5)

    def run(pipe, updates=None):
        """(notices, graphs built) over 4 frames, `updates` applied first."""
        notices = []
        pipe.on_notice.append(notices.append)
        if updates:
            pipe.update(**updates)
        before = backend.graphs
        for frame in frames:
            pipe.process(frame)
        pipe.on_notice.remove(notices.append)
        return notices, backend.graphs - before

    with make_pipeline(components, config) as pipe:
        notices, built = run(pipe)
        assert len(notices) == 1 and built > 0, (notices, built)
        assert "new batch shape" in notices[0] and "slow" in notices[0] and "\n" not in notices[0]
        notices, built = run(pipe, dict(steps=3))  # 3 rows: a shape not met yet
        assert len(notices) == 1 and built > 0, (notices, built)
        notices, built = run(pipe, dict(steps=2))  # back to shapes it has run
        assert notices == [] and built == 0, (notices, built)
    with make_pipeline(components, config) as pipe:  # another stream on the same model
        assert run(pipe) == ([], 0)
    eager = _tiny("streamdiffusion")
    with make_pipeline(eager, config) as pipe:
        assert run(pipe)[0] == []  # eager builds nothing and says nothing


def test_backend_option_and_its_refusals():
    """--backend is checked before anything loads; OpenVINO goes with every method (a
    stateful one falls back, below); a UNet compiled for OpenVINO without the fall-back
    refuses stateful processors in one line."""
    from diffstream.attention.base import check_backend

    with pytest.raises(ConfigError, match="--backend must be one of"):
        ModelConfig(model="tiny", backend="tensorrt")
    RunConfig(model=ModelConfig(model="tiny", backend="openvino"), stream=StreamConfig(method="streamv2v"))
    unet = torch.nn.Linear(1, 1)
    unet._diffstream_backend = "openvino"
    check_backend(unet, {})  # nothing stateful: nothing to do
    with pytest.raises(ConfigError, match="--backend openvino runs the per-frame baseline"):
        check_backend(unet, {"attn1": object()})


def test_a_fallback_notice_reaches_the_stream_once():
    """What `check_backend` leaves on the UNet when it falls back (below) goes to the
    stream's `on_notice` as its processors attach, once."""
    components = _tiny("streamv2v")
    notices = []
    with make_pipeline(components, _config("streamv2v")) as pipe:
        pipe.on_notice.append(notices.append)
        components.unet._diffstream_backend_notice = "the UNet now runs on --backend compile"
        for frame in FRAMES[:3]:
            pipe.process(frame)
    assert notices == ["the UNet now runs on --backend compile"]


@pytest.mark.slow
def test_openvino_falls_back_to_compile_for_a_stateful_mechanism(compile_cache, monkeypatch):
    """The feature bank on a model loaded for OpenVINO: as its processors attach, the UNet
    is recompiled with inductor and the stream's `on_notice` says so in one line, once;
    the VAE stays on OpenVINO; the frames equal eager's within one grey level (inductor's
    tolerance), never OpenVINO's corrupted ones."""
    pytest.importorskip("openvino")
    monkeypatch.setenv("DIFFSTREAM_CACHE", str(compile_cache))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(compile_cache / "inductor"))
    config = _config("streamv2v")
    frames = FRAMES[:4]
    components = _tiny("streamv2v", "openvino")
    notices = []
    with make_pipeline(components, config) as pipe:
        pipe.on_notice.append(notices.append)
        got = np.stack([o for f in frames for o in pipe.process(f)] + pipe.flush())
    fallback = [n for n in notices if "openvino" in n]
    assert len(fallback) == 1 and "--backend compile" in fallback[0] and "\n" not in fallback[0]
    assert components.unet._diffstream_backend == "compile" and components.backend == "compile"
    assert components.vae.decoder._compiled_call_impl is not None  # still OpenVINO's
    diff = np.abs(got.astype(int) - _stream(_tiny("streamv2v"), config, frames).astype(int))
    assert diff.max() <= 1, f"fallback off eager by {diff.max()} grey levels"
    torch._dynamo.reset()


@pytest.mark.slow
def test_openvino_equals_eager_for_the_baseline(tmp_path, monkeypatch):
    """OpenVINO (fp32 on this CPU) against eager for the per-frame baseline: within one
    grey level; a second model with other weights gets its own outputs (its cache folder
    is keyed by the weights)."""
    pytest.importorskip("openvino")
    monkeypatch.setenv("DIFFSTREAM_CACHE", str(tmp_path))
    config = StreamConfig(prompt="a cat", size=96, steps=2, strength=0.6, guidance=1.5, cfg_type="self")
    frames = FRAMES[:5]
    expected = _stream(_tiny("streamdiffusion"), config, frames)
    got = _stream(_tiny("streamdiffusion", "openvino"), config, frames)
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() <= 1, f"openvino off eager by {diff.max()} grey levels"
    assert list(tmp_path.glob("*/openvino/*"))  # the model cache is on disk, under the weights' fingerprint
    torch._dynamo.reset()


def test_auto_backend_by_device():
    from diffstream.models.backends import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "compile"
    assert resolve_backend("auto", torch.device("mps")) == "eager"
    with pytest.raises(ConfigError, match="runs on the CPU"):
        resolve_backend("openvino", torch.device("cuda"))


def test_fingerprint_tells_weights_apart():
    """The cache key changes with any weight, not only with the architecture."""
    from diffstream.models.backends import fingerprint
    from diffstream.models.tiny import tiny_unet

    a, b = tiny_unet(seed=0), tiny_unet(seed=1)
    assert fingerprint(a) == fingerprint(tiny_unet(seed=0))
    assert fingerprint(a) != fingerprint(b)


def _captured(components) -> _CountingBackend:
    """Compile `components`' UNet and VAE halves in place with dynamo's capture only."""
    backend = _CountingBackend()
    for module in (components.unet, components.vae.encoder, components.vae.decoder):
        module.compile(backend=backend, dynamic=False)
    return backend


def test_offline_methods_run_captured_as_eager():
    """Fairy's anchors and FateZero's store/fuse run with the UNet and VAE captured by
    dynamo (their processors opaque between the graphs): the same frames as eager, bit
    for bit, since the captured graphs run the same operations. (Inductor's numerics are
    the streaming tests' above; these edits hold many batch shapes, so compiling them for
    real would cost minutes here.)"""
    from diffstream.attention.fatezero import FateZeroConfig
    from diffstream.pipelines.fairy import FairyConfig, FairyPipeline
    from diffstream.pipelines.fatezero import FateZeroEditConfig, FateZeroEditor

    torch._dynamo.reset()
    frames = make_frames(4, 48, 64, seed=2)
    fairy = FairyConfig(instruction="make it marble", anchors=2, steps=2, size=64, noise="per-frame")

    def fairy_edit(components):
        with FairyPipeline(components, fairy) as pipe:
            return np.stack(list(pipe.edit(frames)))

    def instruct():
        return load_components(ModelConfig(model="tiny", device="cpu", instruct=True))

    expected = fairy_edit(instruct())
    captured = instruct()
    backend = _captured(captured)
    np.testing.assert_array_equal(fairy_edit(captured), expected)
    assert backend.graphs > 0

    config = FateZeroEditConfig(source_prompt="a black swan", prompt="a white duck", blend_words=("swan", "duck"),
                                fatezero=FateZeroConfig(steps=4))
    latents = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(2))

    def fatezero_edit(components):
        editor = FateZeroEditor(components, config, (4, 4))
        store = editor.new_store()
        editor.invert(latents, [1, 1, 1], store)
        return editor.edit(store, [1, 1, 1])

    expected = fatezero_edit(_tiny("streamdiffusion"))
    captured = _tiny("streamdiffusion")
    backend = _captured(captured)
    assert torch.equal(fatezero_edit(captured), expected)
    assert backend.graphs > 0
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_equals_eager_for_causal_video(tmp_path, monkeypatch):
    """`--backend compile` on a Wan model compiles its transformer in place (the pieces
    between the block-causal and cross-attention cache processors, which stay opaque to
    dynamo); a stream with the KV cache rolling and a prompt switch (recache) gives the
    eager frames within one grey level, and a second stream the same frames again."""
    from diffstream.attention.block_causal import BlockCausalConfig
    from diffstream.config import CausalVideoConfig
    from diffstream.models.loading import load_components
    from diffstream.testing import make_frames

    monkeypatch.setenv("DIFFSTREAM_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    video = CausalVideoConfig(block_causal=BlockCausalConfig(chunk_frames=1, sink_chunks=1, window_chunks=1))
    config = StreamConfig(prompt="a watercolor", method="causal-video", video=video, strength=0.7, steps=2, size=64,
                          seed=3)
    frames = make_frames(13, 48, 64)

    def stream(components):
        with make_pipeline(components, config) as pipe:
            out = []
            for i, f in enumerate(frames):
                out += pipe.process(f)
                if i == 6:
                    pipe.update(prompt="a pencil sketch")
            return np.stack(out + pipe.flush())

    expected = stream(load_components(ModelConfig(model="tiny-wan", device="cpu")))
    compiled = load_components(ModelConfig(model="tiny-wan", device="cpu", backend="compile"))
    assert compiled.backend == "compile" and compiled.unet._compiled_call_impl is not None
    got = stream(compiled)
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert len(got) == 13 and diff.max() <= 1, f"compiled causal-video off eager by {diff.max()} grey levels"
    np.testing.assert_array_equal(stream(compiled), got)
    torch._dynamo.reset()
