"""The toy style metric (issue #14) against oracles: each style's exact target is
classified as that style, the metric works at the output's size, and it is undefined for
prompts that are not toy styles."""

import numpy as np
import pytest

from diffstream.metrics.style import STYLE_NAMES, StyleAccuracyMeter, nearest_style, psnr, style_accuracy
from diffstream.models.toy import TOY_STYLES, held_out_clip, style_targets


@pytest.fixture(scope="module")
def clip():
    return held_out_clip(3, (128, 72))


def test_every_exact_target_is_nearest_to_its_own_style(clip):
    for frame in clip:
        for name, target in zip(STYLE_NAMES, style_targets(frame)):
            assert nearest_style(frame, target) == name


def test_the_filters_are_the_issue_formulas():
    import cv2

    frame = held_out_clip(1, (64, 48))[0]
    neg = TOY_STYLES["a negative photo"](frame)
    assert (neg.astype(int) + frame == 255).all()
    # sepia on a darkened frame with a red/blue gradient: no channel clips, R and B differ
    dark = (frame // 3).astype(np.uint8)
    dark[..., 0] = np.linspace(0, 80, dark.shape[1], dtype=np.uint8)[None, :]
    sep = TOY_STYLES["a sepia photo"](dark)
    r, g, b = (dark[..., i].astype(np.float64) for i in range(3))
    matrix = [[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]]
    for channel, (cr, cg, cb) in enumerate(matrix):
        expected = np.clip(cr * r + cg * g + cb * b, 0, 255)
        assert np.abs(sep[..., channel] - expected).max() <= 1, channel  # uint8 truncation
    sketch = TOY_STYLES["a pencil sketch"](frame)
    gray = cv2.pencilSketch(frame, sigma_s=60, sigma_r=0.07, shade_factor=0.05)[0]
    assert (sketch == gray[..., None]).all()


def test_accuracy_counts_frames_of_the_prompted_style_at_the_output_size(clip):
    sepia = [TOY_STYLES["a sepia photo"](f) for f in clip]
    negative = TOY_STYLES["a negative photo"](clip[0])
    outs = sepia[:2] + [negative]
    assert style_accuracy(clip, outs, "a sepia photo") == pytest.approx(2 / 3)
    # a source twice the output's size is resized to it first
    import cv2

    big = [cv2.resize(f, (256, 144), interpolation=cv2.INTER_CUBIC) for f in clip]
    assert style_accuracy(big, sepia, "a sepia photo") == 1.0


def test_a_prompt_that_is_no_toy_style_has_no_accuracy(clip):
    meter = StyleAccuracyMeter("a cat")
    meter.update(clip[0], clip[0])
    assert meter.result() is None and style_accuracy(clip, clip, "a cat") is None


def test_psnr():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255
    assert psnr(a, b) == pytest.approx(10 * np.log10(48))
    assert psnr(a, a) == float("inf")


def test_eval_reports_style_accuracy_for_toy_prompts_only(clip):
    from diffstream.metrics.evaluate import evaluate_frames

    sepia = [TOY_STYLES["a sepia photo"](f) for f in clip]
    report = evaluate_frames(clip, sepia, prompt="a sepia photo", flow_preset="ultrafast")
    assert report.to_dict()["style_accuracy"] == 1.0 and "toy style accuracy" in report.table()
    other = evaluate_frames(clip, sepia, prompt="a cat", flow_preset="ultrafast")
    assert other.style_accuracy is None and "toy style accuracy" not in other.table()
