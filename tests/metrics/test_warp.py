import json

import cv2
import numpy as np
import pytest

from diffstream.frames import resize
from diffstream.metrics.warp import (
    WarpErrorMeter,
    occlusion_mask,
    optical_flow,
    warp_error,
    warp_frame,
)


def _texture(h=160, w=200, seed=0):
    rng = np.random.default_rng(seed)
    noise = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    return cv2.GaussianBlur(noise, (0, 0), 2.0)


def _panning(n=4, size=96, dx=2, dy=1, seed=0):
    """A camera pan over a smooth random texture: frame t is shifted by t*(dx, dy)."""
    big = _texture(size + n * dy + 8, size + n * dx + 8, seed)
    return [
        np.ascontiguousarray(big[t * dy : t * dy + size, t * dx : t * dx + size]) for t in range(n)
    ]


def test_flow_recovers_a_translation():
    a, b = _panning(2, size=128, dx=3, dy=2)
    flow = optical_flow(a, b)
    assert flow.shape == (128, 128, 2) and flow.dtype == np.float32
    # b is a shifted by (-3, -2): a pixel of a appears 3 left / 2 up in b
    inner = flow[16:-16, 16:-16].reshape(-1, 2)
    np.testing.assert_allclose(np.median(inner, axis=0), [-3.0, -2.0], atol=0.25)
    for preset in ("fast", "ultrafast"):
        assert optical_flow(a, b, preset=preset).shape == (128, 128, 2)
    with pytest.raises(ValueError):
        optical_flow(a, b, preset="slow")
    with pytest.raises(ValueError):
        optical_flow(a, b[:64])


def test_occlusion_mask_criterion():
    h, w = 20, 30
    zero = np.zeros((h, w, 2), np.float32)
    assert not occlusion_mask(zero, zero).any()

    fw = np.zeros((h, w, 2), np.float32)
    fw[..., 0] = 3.0
    bw = -fw
    mask = occlusion_mask(fw, bw)
    assert mask.dtype == bool and mask.shape == (h, w)
    # consistent flows: only pixels whose target leaves the frame are invalid
    assert mask[:, w - 3 :].all() and not mask[:, : w - 3].any()

    # |w_f + w_b|^2 = 36 > 0.01 * (9 + 9) + 0.5: inconsistent everywhere
    assert occlusion_mask(fw, fw).all()
    # just inside the tolerance: |w_f + w_b|^2 = 0.49 < 0.5 + 0.01 * (|w_f|^2 + |w_b|^2)
    nearly = bw.copy()
    nearly[..., 1] = 0.7
    assert not occlusion_mask(fw, nearly)[:, : w - 3].any()


def test_motion_boundaries_option():
    h, w = 20, 30
    fw = np.zeros((h, w, 2), np.float32)
    fw[:, 15:, 0] = 2.0  # a motion discontinuity at column 15
    bw = np.zeros_like(fw)
    bw[:, 17:, 0] = -2.0
    plain = occlusion_mask(fw, bw)
    with_boundaries = occlusion_mask(fw, bw, motion_boundaries=True)
    assert with_boundaries[:, 14].all() and not plain[:, 14].any()


def test_warp_frame_backward_warps():
    a, b = _panning(2, size=64, dx=2, dy=0)
    # b(x) = a(x + 2): warping a with flow b -> a (+2 in x) reproduces b
    flow = np.zeros((64, 64, 2), np.float32)
    flow[..., 0] = 2.0
    warped = warp_frame(a, flow)
    np.testing.assert_array_equal(warped[:, :-2], b[:, :-2])


def test_identical_static_video_has_zero_error():
    frame = _texture(64, 80)
    result = warp_error([frame] * 4, [frame] * 4)
    assert result.num_pairs == 3
    assert result.per_pair_255 == (0.0, 0.0, 0.0)
    assert result.mean_255 == 0.0 and result.mean_01 == 0.0


def test_known_error_value_and_both_scales():
    # Static input (zero flow, nothing occluded) and flat outputs whose value jumps
    # by 10, then 20: the per-pair errors are exactly 10^2 and 20^2 on the 255 scale.
    frame = _texture(48, 64)
    outputs = [np.full((48, 64, 3), v, np.uint8) for v in (100, 110, 90)]
    result = warp_error([frame] * 3, outputs)
    assert result.per_pair_255 == pytest.approx((100.0, 400.0))
    assert result.mean_255 == pytest.approx(250.0)
    assert result.mean_01 == pytest.approx(250.0 / 255.0**2)
    assert result.per_pair_01 == pytest.approx((100.0 / 255**2, 400.0 / 255**2))
    assert result.valid_fraction == pytest.approx((1.0, 1.0))
    d = result.to_dict()
    json.dumps(d)
    assert d["warp_error_255"] == pytest.approx(250.0)


def test_consistent_moving_video_beats_flickering_one():
    inputs = _panning(5, size=96, dx=2, dy=1)
    consistent = warp_error(inputs, inputs)
    flicker = [
        np.clip(f.astype(int) + (25 if t % 2 else -25), 0, 255).astype(np.uint8)
        for t, f in enumerate(inputs)
    ]
    flickering = warp_error(inputs, flicker)
    assert consistent.mean_255 < 5.0
    assert flickering.mean_255 > 10 * consistent.mean_255
    assert min(consistent.valid_fraction) > 0.8


def test_inputs_are_resized_to_the_output_size():
    inputs = _panning(3, size=96, dx=2, dy=1)
    outputs = [resize(f, (48, 48)) for f in inputs]
    big = warp_error(inputs, outputs)
    small = warp_error([resize(f, (48, 48)) for f in inputs], outputs)
    assert big.per_pair_255 == pytest.approx(small.per_pair_255)


def test_meter_streams_and_matches_batch():
    inputs = _panning(4, size=64, dx=1, dy=1, seed=3)
    rng = np.random.default_rng(1)
    outputs = [np.clip(f + rng.normal(0, 5, f.shape), 0, 255).astype(np.uint8) for f in inputs]
    meter = WarpErrorMeter()
    returned = [meter.update(a, b) for a, b in zip(inputs, outputs)]
    assert returned[0] is None and all(isinstance(e, float) for e in returned[1:])
    batch = warp_error(iter(inputs), iter(outputs))
    assert tuple(returned[1:]) == pytest.approx(batch.per_pair_255)
    assert meter.result().mean_255 == pytest.approx(batch.mean_255)
    meter.reset()
    assert meter.result().num_pairs == 0 and np.isnan(meter.result().mean_255)


def test_length_and_size_mismatches_raise():
    frames = _panning(3, size=32)
    with pytest.raises(ValueError):
        warp_error(frames, frames[:2])
    with pytest.raises(ValueError):
        warp_error(frames[:2], frames)
    meter = WarpErrorMeter()
    meter.update(frames[0], frames[0])
    with pytest.raises(ValueError):
        meter.update(frames[1], frames[1][:16])


def test_too_small_frames_raise_a_value_error():
    tiny = [np.zeros((8, 8, 3), np.uint8)] * 2
    with pytest.raises(ValueError):
        warp_error(tiny, tiny)
    with pytest.raises(ValueError):
        optical_flow(tiny[0], tiny[1])
