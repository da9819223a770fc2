"""The depth model: host and device paths of DepthEstimator, normalise_depth, DepthConditioner."""

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from diffstream import frames as FR  # noqa: E402
from diffstream.errors import ConfigError, ModelLoadError  # noqa: E402
from diffstream.models.depth import DepthConditioner, DepthEstimator, normalise_depth  # noqa: E402
from diffstream.models.tiny import tiny_dpt  # noqa: E402
from diffstream.testing import make_frames  # noqa: E402


@pytest.fixture(scope="module")
def estimator():
    model, processor = tiny_dpt(seed=0)
    return DepthEstimator.from_components(model, processor, device="cpu")


def _frames(n, seed=0, size=(24, 40)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8) for _ in range(n)]


def test_predict_returns_maps_at_frame_resolution(estimator):
    depth = estimator.predict(_frames(3), batch_size=2)
    assert depth.shape == (3, 24, 40) and depth.dtype == np.float32
    assert np.isfinite(depth).all()
    with pytest.raises(ValueError):
        estimator.predict([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 10, 3), np.uint8)])


def test_normalise_depth_min_max():
    d = np.array([[[2.0, 4.0], [6.0, 10.0]], [[3.0, 3.0], [3.0, 3.0]]])
    out = normalise_depth(d)
    np.testing.assert_allclose(out[0], [[0.0, 0.25], [0.5, 1.0]])
    np.testing.assert_array_equal(out[1], np.zeros((2, 2)))
    np.testing.assert_allclose(normalise_depth(d[0]), out[0])


def test_roundtrip_through_a_local_folder(tmp_path, estimator):
    folder = tmp_path / "tiny-dpt"
    estimator.model.save_pretrained(folder)
    estimator.image_processor.save_pretrained(folder)
    loaded = DepthEstimator(str(folder), device="cpu", local_files_only=True)
    frames = _frames(2, seed=6)
    np.testing.assert_allclose(
        loaded.predict(frames), estimator.predict(frames), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("kind", ["missing_folder", "empty_folder"])
def test_unloadable_model_is_a_one_line_model_load_error(tmp_path, kind):
    path = tmp_path / ("no-such-depth" if kind == "missing_folder" else "empty")
    if kind == "empty_folder":
        path.mkdir()
    with pytest.raises(ModelLoadError) as info:
        DepthEstimator(str(path), device="cpu", local_files_only=True)
    message = str(info.value)
    assert "\n" not in message
    assert "--depth-model PATH" in message


def test_normalise_depth_keeps_a_tensor_on_its_device_and_equals_the_numpy_path():
    d = np.random.default_rng(0).normal(size=(3, 7, 9)).astype(np.float32)
    out = normalise_depth(torch.from_numpy(d))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), normalise_depth(d))


def test_predict_pixels_follows_the_image_processor(estimator):
    """The torch preprocessing (device path) against the checkpoint's own processor (host path):
    the same model on the same frames, only the resampling kernel differs (torch's
    antialiased bicubic vs PIL's)."""
    frames = make_frames(3)  # smooth test frames (48, 64)
    host = estimator.predict(frames)  # (3, 48, 64)
    device = estimator.predict_pixels(FR.frames_to_tensor(frames))
    assert device.shape == (3, 48, 64) and device.dtype == torch.float32
    assert np.corrcoef(host.ravel(), device.numpy().ravel())[0, 1] > 0.999
    assert np.abs(normalise_depth(host) - normalise_depth(device.numpy())).max() < 0.05


def test_depth_conditioner_is_the_encoded_8_bit_depth_image_without_host_copies(estimator, monkeypatch):
    encoded = []

    def encode(pixels):  # stands in for Components.encode_image: (B, 3, H, W) -> (B, 4, H/8, W/8)
        encoded.append(pixels)
        return torch.nn.functional.avg_pool2d(pixels, 8).repeat(1, 2, 1, 1)[:, :4]

    conditioner = DepthConditioner(estimator, encode)
    pixels = FR.frames_to_tensor(make_frames(2))  # (2, 3, 48, 64)
    depth = normalise_depth(estimator.predict_pixels(pixels)).numpy()  # (2, 48, 64)
    grey = (depth * 255.0 + 0.5).astype(np.uint8)
    expected = FR.frames_to_tensor([np.repeat(g[..., None], 3, axis=2) for g in grey])

    def host_copy(*args, **kwargs):
        raise AssertionError("the conditioning path copied to the host")

    for name in ("cpu", "numpy", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, host_copy)
    monkeypatch.setattr(estimator, "image_processor", _NoCalls(estimator.image_processor))
    latent = conditioner(pixels)
    monkeypatch.undo()
    assert latent.shape == (2, 4, 6, 8)
    torch.testing.assert_close(encoded[0], expected, rtol=0, atol=0)


class _NoCalls:
    """An image processor whose configuration can be read but which must not be run."""

    def __init__(self, processor):
        self._processor = processor

    def __getattr__(self, name):
        return getattr(self._processor, name)

    def __call__(self, *args, **kwargs):
        raise AssertionError("the host image processor ran")


def test_depth_conditioner_needs_a_dpt_style_processor(estimator):
    from types import SimpleNamespace

    odd = DepthEstimator.from_components(estimator.model, SimpleNamespace(size={"shortest_edge": 32}), device="cpu")
    with pytest.raises(ConfigError, match="--depth-model"):
        DepthConditioner(odd, lambda pixels: pixels)
