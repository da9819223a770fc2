"""Frame helpers: letterboxing and the processing-size rule."""

import numpy as np
import pytest

from diffstream import frames as F


def test_letterbox_keeps_the_aspect_ratio_with_black_bars():
    tall = np.full((100, 50, 3), 255, np.uint8)  # 1:2
    out = F.letterbox(tall, (80, 60))
    assert out.shape == (60, 80, 3) and out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"]
    cols = np.flatnonzero(out[30, :, 0])  # the image: 30x60 in the middle
    assert (cols[0], cols[-1]) == (25, 54)
    assert (out[:, :25] == 0).all() and (out[:, 55:] == 0).all() and (out[:, 25:55] == 255).all()
    wide = np.full((10, 40, 3), 7, np.uint8)  # 4:1 into 4:3 -> 80x20, bars top and bottom
    out = F.letterbox(wide, (80, 60))
    assert (out[20:40] == 7).all() and (out[:20] == 0).all() and (out[40:] == 0).all()
    same = np.full((30, 40, 3), 9, np.uint8)
    assert F.letterbox(same, (40, 30)) is same
    assert (F.letterbox(same, (80, 60)) == 9).all()  # same aspect: resized, no bars


@pytest.mark.parametrize("multiple", [8, 16, 64])
@pytest.mark.parametrize("size", [128, 256, 512])
def test_fit_size_keeps_the_aspect_as_closely_as_the_multiple_allows(size, multiple):
    w, h = F.fit_size(1280, 720, size, multiple)
    assert w == size and w % multiple == 0 and h % multiple == 0
    exact = size * 720 / 1280
    assert abs(h - exact) <= multiple / 2  # within half a step of the true aspect
    others = [k * multiple for k in range(1, size // multiple + 1)]  # no other multiple is closer in aspect
    assert all(abs(np.log(h / exact)) <= abs(np.log(o / exact)) + 1e-12 for o in others)
    assert F.fit_size(720, 1280, size, multiple) == (h, w)  # portrait: the same, turned


def test_fit_size_examples():
    assert [F.fit_size(1280, 720, s, 8) for s in (128, 256, 512)] == [(128, 72), (256, 144), (512, 288)]
    assert F.fit_size(1280, 720, 128, 16) == (128, 80)  # 1.6 is closer to 16:9 than 128x64's 2.0
    # the shorter side follows the *rounded* longer side: 120 -> 128 wide, so 72 high ideally -> 80
    assert F.fit_size(1280, 720, 120, 16) == (128, 80)
    assert F.fit_size(640, 480, 512, 64) == (512, 384)
    assert F.fit_size(100, 100, 64, 16) == (64, 64)
    assert F.fit_size(4000, 100, 512, 64) == (512, 64)  # at least one multiple
    with pytest.raises(ValueError):
        F.fit_size(0, 10, 512, 8)
