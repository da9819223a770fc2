"""Reading an image prompt (IP-Adapter): a file, an http(s) URL or a data: URI.

Read once when the prompt image changes, never per frame; any failure is one line that
says what to pass instead.
"""

from __future__ import annotations

import base64
import os
import urllib.request

import numpy as np

from diffstream.errors import ConfigError
from diffstream.frames import decode_image_bytes

# Larger images are refused: CLIP sees 224 px, and a URL must not fill the memory.
MAX_IMAGE_BYTES = 20_000_000
URL_TIMEOUT_S = 10.0


def read_image_prompt(spec: str) -> np.ndarray:
    """The image at `spec` as (H, W, 3) uint8 RGB.

    Args:
        spec: a file path, an http(s) URL, or a "data:image/...;base64,..." URI.
    Raises:
        ConfigError: one line (missing file, unreachable URL, too large, not an image).
    """
    what = spec if len(spec) < 80 else spec[:77] + "..."
    try:
        if spec.startswith("data:"):
            header, _, payload = spec.partition(",")
            if ";base64" not in header:
                raise ValueError("only base64 data URIs are read")
            data = base64.b64decode(payload, validate=True)
        elif spec.startswith(("http://", "https://")):
            with urllib.request.urlopen(spec, timeout=URL_TIMEOUT_S) as response:  # noqa: S310 (http(s) only)
                data = response.read(MAX_IMAGE_BYTES + 1)
        else:
            path = os.path.expanduser(spec)
            if not os.path.isfile(path):
                raise FileNotFoundError("no such file")
            if os.path.getsize(path) > MAX_IMAGE_BYTES:
                raise ValueError(f"larger than {MAX_IMAGE_BYTES // 1_000_000} MB")
            with open(path, "rb") as f:
                data = f.read()
        if len(data) > MAX_IMAGE_BYTES:
            raise ValueError(f"larger than {MAX_IMAGE_BYTES // 1_000_000} MB")
        image = decode_image_bytes(data)
    except Exception as exc:
        raise ConfigError(f"cannot read the IP-Adapter image {what!r} ({type(exc).__name__}: {exc}): pass a "
                          f"JPEG/PNG/WebP file, an http(s) URL or a base64 data: URI") from None
    return image[..., :3] if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
