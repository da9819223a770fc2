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
