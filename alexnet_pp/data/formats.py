"""How a stored image is encoded in a shard: `jpeg` (the default) or `raw` pixels.

    data, ext = encode_image(img, "raw")      # → (bytes of {key}.npy, "npy")

- `jpeg` (`{key}.jpg`, quality `--quality`, 4:2:0): smallest on disk; every epoch decodes it
  again (about 0.4 ms for 256 px at quality 90 on the development machine; lower qualities decode
  a little faster and look worse).
- `raw` (`{key}.npy`): the uint8 H×W×3 pixels in numpy's .npy format, which webdataset's decoders
  and numpy read as they are. Nothing to decode, at 196,608 bytes per 256 px image (6–10× a
  JPEG's) plus a 128-byte header.

`python -m benchmarks.data_bench` prints bytes and decode time per image for each (docs/DATA.md).
Light on purpose (numpy and simplejpeg only): shard writers import it in every pool process.
"""

from __future__ import annotations

import io

import numpy as np

FORMATS = ("jpeg", "raw")
EXTENSIONS = {"jpeg": "jpg", "raw": "npy"}


def encode_image(img: np.ndarray, fmt: str = "jpeg", quality: int = 90) -> tuple[bytes, str]:
    """(member bytes, member extension) of uint8 H×W×3 RGB pixels in format `fmt`."""
    img = np.ascontiguousarray(img, dtype=np.uint8)
    if fmt == "jpeg":
        import simplejpeg

        return simplejpeg.encode_jpeg(img, quality=quality, colorspace="RGB", colorsubsampling="420"), "jpg"
    if fmt == "raw":
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"raw format stores H×W×3 pixels, not {img.shape}")
        buf = io.BytesIO()
        np.save(buf, img, allow_pickle=False)
        return buf.getvalue(), "npy"
    raise ValueError(f"image format {fmt!r} not one of {FORMATS}")
