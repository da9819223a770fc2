"""The depth metric (Live2Diff Sec. 4.1): depth MSE of input vs output frames."""

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from diffstream.metrics.depth import depth_mse  # noqa: E402
from diffstream.models.depth import DepthEstimator, normalise_depth  # noqa: E402


def _tiny_dpt():
    from diffstream.models.tiny import tiny_dpt

    return tiny_dpt(seed=0)


def _tiny_depth_anything():
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        DPTImageProcessor,
    )

    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=28,
        patch_size=14,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=32,
        neck_hidden_sizes=[8, 8, 16, 16],
        fusion_hidden_size=16,
        head_hidden_size=8,
    )
    torch.manual_seed(0)
    model = DepthAnythingForDepthEstimation(config).eval()
    processor = DPTImageProcessor(size={"height": 28, "width": 28}, keep_aspect_ratio=False)
    return model, processor


@pytest.fixture(scope="module")
def estimator():
    model, processor = _tiny_dpt()
    return DepthEstimator.from_components(model, processor, device="cpu")


def _frames(n, seed=0, size=(24, 40)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8) for _ in range(n)]


def test_identical_videos_have_zero_depth_mse(estimator):
    frames = _frames(5, seed=1)
    assert depth_mse(frames, frames, estimator, batch_size=2) == pytest.approx(0.0, abs=1e-10)


def test_depth_mse_matches_definition(estimator):
    inputs, outputs = _frames(3, seed=2), _frames(3, seed=3)
    d_in = normalise_depth(estimator.predict(inputs))
    d_out = normalise_depth(estimator.predict(outputs))
    expected = float(((d_in - d_out) ** 2).mean())
    value = depth_mse(iter(inputs), iter(outputs), estimator, batch_size=2)
    assert value == pytest.approx(expected, rel=1e-5)
    assert 0.0 < value <= 1.0
    with pytest.raises(ValueError):
        depth_mse(inputs, outputs[:2], estimator)


def test_inputs_are_resized_to_the_output_size(estimator):
    big = [np.kron(f, np.ones((2, 2, 1), dtype=np.uint8)) for f in _frames(2, seed=4)]
    small = _frames(2, seed=4)
    # inputs at twice the output size: compared on the output grid
    assert np.isfinite(depth_mse(big, small, estimator))


def test_depth_anything_works_too():
    model, processor = _tiny_depth_anything()
    est = DepthEstimator.from_components(model, processor, device="cpu")
    frames = _frames(2, seed=5)
    assert est.predict(frames).shape == (2, 24, 40)
    assert depth_mse(frames, frames, est) == pytest.approx(0.0, abs=1e-10)
