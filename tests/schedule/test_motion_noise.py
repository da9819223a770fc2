"""Motion-aware noise strength (StreamDiffusionV2's rule) against a hand computation in numpy.

The expected sigmas are computed here from the formula (schedule/motion_noise.py, module
docstring), in float64 numpy, never by the module's code:

    d       = clamp( max_t sqrt( mean_(C, H, W) (x_t - x_{t-1})^2 ) / 0.2, 0, 1 )
    sigma_n = (init - 0.1 d) * 0.9 + sigma_{n-1} * 0.1        (sigma_{-1} = init)
"""

import contextlib

import numpy as np
import pytest
import torch

from diffstream.errors import ConfigError
from diffstream.schedule.motion_noise import MotionNoise, MotionNoiseConfig

INIT = 0.7
SHAPE = (3, 6, 8)  # (C, H, W)


def expected_sigmas(chunks, init, reference=0.2, max_drop=0.1, momentum=0.1, inits=None):
    """The rule by hand, chunk by chunk (float64): `chunks` are (T, C, H, W) arrays; `inits`
    optionally gives each chunk's initial sigma (a strength changed between chunks)."""
    sigmas, previous_frame, previous_sigma = [], None, None
    for n, chunk in enumerate(chunks):
        init_n = init if inits is None else inits[n]
        frames = list(chunk) if previous_frame is None else [previous_frame, *chunk]
        rms = [np.sqrt(np.mean((frames[t] - frames[t - 1]) ** 2)) for t in range(1, len(frames))]
        d = min(max(max(rms) / reference, 0.0), 1.0) if rms else 0.0
        before = init_n if previous_sigma is None else previous_sigma
        sigma = (init_n - max_drop * d) * (1 - momentum) + before * momentum
        sigmas.append(sigma)
        previous_frame, previous_sigma = chunk[-1], sigma
    return sigmas


def motion_chunks():
    """Five 4-frame chunks (float32 values, as the module sees them): varied motion within
    each, across the boundaries, per frame (so the max and the mean of the RMS differ)."""
    rng = np.random.default_rng(0)
    base = rng.uniform(-0.5, 0.5, SHAPE)
    step = rng.standard_normal(SHAPE)
    step /= np.sqrt(np.mean(step**2))  # a unit-RMS direction: a * step has RMS a

    def walk(start, amplitudes):
        frames, frame = [], start
        for a in amplitudes:
            frame = frame + a * step
            frames.append(frame)
        return np.stack(frames)

    chunk0 = walk(base, [0.0, 0.02, 0.05, 0.01])  # the first chunk: within it only (max 0.05, d 0.25)
    chunk1 = np.stack([chunk0[-1]] * 4)  # static, and equal to the frame before it: d 0
    chunk2 = walk(chunk1[-1], [0.01, 0.03, 0.12, 0.02])  # small, uneven: d 0.6 (mean would be 0.225)
    chunk3 = walk(chunk2[-1], [0.1, 0.5, 0.9, 0.3])  # large: clamped at d 1
    chunk4 = np.stack([chunk3[-1] + 0.08 * step] * 4)  # static within, moved 0.08 from chunk 3's last frame
    chunks = [chunk0, chunk1, chunk2, chunk3, chunk4]
    return [c.astype(np.float32).astype(np.float64) for c in chunks]


def run(chunks, mn=None, init=INIT, config=None):
    mn = mn or MotionNoise(config or MotionNoiseConfig(), init)
    return mn, [mn.step(torch.from_numpy(c).to(torch.float32)) for c in chunks]


def test_sigmas_equal_the_hand_computation_over_a_stream():
    chunks = motion_chunks()
    _, got = run(chunks)
    want = expected_sigmas(chunks, INIT)
    # the chunks are what they say: the EMA and the clamp are exercised
    assert want[1] != pytest.approx(INIT) and want[3] == pytest.approx((INIT - 0.1) * 0.9 + want[2] * 0.1)
    # read after the whole stream: each sigma is its own tensor, not updated in place by later chunks
    assert [s.item() for s in got] == pytest.approx(want, abs=1e-6)


def test_sigmas_with_other_constants_and_a_changed_strength():
    """Non-default constants, and set_init between chunks: the EMA continues from the last sigma."""
    chunks = motion_chunks()
    config = MotionNoiseConfig(reference_motion=0.5, max_drop=0.3, momentum=0.4)
    mn = MotionNoise(config, 0.8)
    inits = [0.8, 0.8, 0.5, 0.5, 0.9]
    got = []
    for chunk, init in zip(chunks, inits):
        mn.set_init(init)
        got.append(mn.step(torch.from_numpy(chunk).float()).item())
    assert got == pytest.approx(expected_sigmas(chunks, 0.8, 0.5, 0.3, 0.4, inits=inits), abs=1e-6)


def test_static_frames_keep_sigma_at_init_exactly():
    frame = torch.rand(SHAPE) * 2 - 1
    for init in (0.7, 0.35, 1.0, 0.123):
        mn = MotionNoise(MotionNoiseConfig(), init)
        want = torch.tensor(init, dtype=torch.float32)
        assert torch.equal(mn.step(frame[None]), want)  # a single first frame: d = 0
        for _ in range(5):
            assert torch.equal(mn.step(frame.expand(4, *SHAPE)), want)


def test_more_motion_less_noise_never_below_init_minus_max_drop():
    rng = np.random.default_rng(1)
    base = torch.from_numpy(rng.uniform(-0.5, 0.5, SHAPE)).float()
    direction = torch.from_numpy(rng.standard_normal(SHAPE)).float()
    direction /= direction.square().mean().sqrt()

    def first_sigma(amplitude):
        chunk = torch.stack([base + k * amplitude * direction for k in range(4)])
        return MotionNoise(MotionNoiseConfig(), INIT).step(chunk).item()

    below = [first_sigma(a) for a in (0.0, 0.01, 0.05, 0.1, 0.15, 0.19)]  # under the reference 0.2
    assert all(a > b for a, b in zip(below, below[1:])), below
    beyond = [first_sigma(a) for a in (0.2, 0.4, 1.0, 3.0)]  # clamped: d = 1
    assert beyond == pytest.approx([INIT - 0.9 * 0.1] * 4, abs=1e-6)
    # a long run of violent motion: the EMA converges to init - max_drop from above
    mn = MotionNoise(MotionNoiseConfig(), INIT)
    sigmas = [mn.step(torch.rand(4, *SHAPE) * 2 - 1).item() for _ in range(30)]
    assert all(a >= b for a, b in zip(sigmas, sigmas[1:])) and sigmas[0] > sigmas[1]
    assert min(sigmas) >= INIT - 0.1 - 1e-6 and sigmas[-1] == pytest.approx(INIT - 0.1, abs=1e-6)


def test_sigma_is_never_negative():
    """An initial sigma below max_drop (a low strength): full motion stops at sigma 0."""
    mn = MotionNoise(MotionNoiseConfig(max_drop=0.5), 0.2)
    chunk = torch.stack([torch.full(SHAPE, -1.0), torch.full(SHAPE, 1.0)])  # d = 1: 0.2 - 0.45 < 0
    assert [mn.step(chunk).item() for _ in range(3)] == [0.0, 0.0, 0.0]


def test_reset_forgets_the_previous_frame_and_sigma():
    chunks = motion_chunks()
    mn, _ = run(chunks[:4])  # ends on a low sigma, after chunk 3's violent motion
    mn.reset()
    # a single frame far from the last one: no frame before it any more, so d = 0
    assert torch.equal(mn.step(torch.from_numpy(chunks[0][:1]).float()), torch.tensor(INIT, dtype=torch.float32))
    mn.reset()
    # a moving chunk: what a new stream gives (the EMA starts from init again)
    fresh = MotionNoise(MotionNoiseConfig(), INIT).step(torch.from_numpy(chunks[2]).float())
    assert mn.step(torch.from_numpy(chunks[2]).float()).item() == pytest.approx(fresh.item(), abs=1e-7)
    assert fresh.item() == pytest.approx(expected_sigmas([chunks[2]], INIT)[0], abs=1e-6)


def test_a_new_frame_size_starts_without_a_previous_frame():
    chunks = motion_chunks()
    mn, _ = run(chunks[:2])
    before = expected_sigmas(chunks[:2], INIT)[1]
    # one frame of another size: nothing to compare it with (d = 0), the EMA goes on
    assert mn.step(torch.zeros(1, 3, 4, 4)).item() == pytest.approx(INIT * 0.9 + before * 0.1, abs=1e-6)


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Any read of a tensor's value on the host raises (what would sync a GPU)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a host read of a tensor value (a device sync)")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__"):
            m.setattr(torch.Tensor, name, refuse)
        yield


def test_step_never_reads_a_value_on_the_host(monkeypatch):
    chunks = [torch.from_numpy(c).float() for c in motion_chunks()]
    mn = MotionNoise(MotionNoiseConfig(), INIT)
    with no_host_reads(monkeypatch):
        mn.step(chunks[0][:1])  # the single-frame first chunk
        sigmas = [mn.step(c) for c in chunks]
        mn.set_init(0.5)
        sigmas.append(mn.step(chunks[2]))
        mn.reset()
        sigmas.append(mn.step(chunks[3]))
    assert all(s.shape == () for s in sigmas)


def test_step_runs_on_the_meta_device():
    """On the meta device no value exists: a step that read one on the host would fail."""
    mn = MotionNoise(MotionNoiseConfig(), INIT)
    for frames in (torch.empty(1, *SHAPE, device="meta"), torch.empty(4, *SHAPE, device="meta", dtype=torch.bfloat16)):
        sigma = mn.step(frames)
        assert sigma.device.type == "meta" and sigma.dtype == torch.float32 and sigma.shape == ()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_sigma_is_a_float32_scalar_on_the_frames_device(dtype):
    chunks = motion_chunks()
    mn = MotionNoise(MotionNoiseConfig(), INIT)
    for chunk in chunks[:3]:
        sigma = mn.step(torch.from_numpy(chunk).to(dtype))
        assert sigma.shape == () and sigma.dtype == torch.float32 and sigma.device == torch.device("cpu")
    if dtype in (torch.float32, torch.float64):  # the frames' values unrounded: the hand computation's
        assert sigma.item() == pytest.approx(expected_sigmas(chunks[:3], INIT)[2], abs=1e-6)
    if torch.cuda.is_available():
        on_gpu = MotionNoise(MotionNoiseConfig(), INIT).step(torch.from_numpy(chunks[2]).to(dtype).cuda())
        assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32


@pytest.mark.parametrize("options, match", [
    (dict(reference_motion=0.0), "--motion-reference"),
    (dict(reference_motion=-0.2), "--motion-reference"),
    (dict(reference_motion=float("nan")), "--motion-reference"),
    (dict(reference_motion=float("inf")), "--motion-reference"),
    (dict(max_drop=-0.1), "--motion-max-drop"),
    (dict(max_drop=1.5), "--motion-max-drop"),
    (dict(max_drop=float("nan")), "--motion-max-drop"),
    (dict(momentum=-0.1), "--motion-momentum"),
    (dict(momentum=1.0), "--motion-momentum"),
    (dict(momentum=float("nan")), "--motion-momentum"),
])
def test_bad_options_are_one_line_config_errors(options, match):
    with pytest.raises(ConfigError, match=match) as caught:
        MotionNoiseConfig(**options)
    assert "\n" not in str(caught.value)


def test_bad_initial_sigma_is_a_config_error():
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="--strength"):
            MotionNoise(MotionNoiseConfig(), bad)
        with pytest.raises(ConfigError, match="--strength"):
            MotionNoise(MotionNoiseConfig(), 0.5).set_init(bad)
    MotionNoiseConfig(max_drop=0.0, momentum=0.0)  # the bounds that make sense are accepted
    MotionNoise(MotionNoiseConfig(), 0.0).step(torch.rand(2, *SHAPE))
