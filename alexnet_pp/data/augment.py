"""The training augmentation as torch ops on any device: the same draws, the same pixels.

    images = finish_batch(images_u8, offsets, device)         # uint8 crops → normalised float
    images = augment_batch(decoded, boxes, offsets, side, device)  # decoded images → the same

The CPU loader decodes, draws (`transforms.draw`: crop corner, flip, PCA lighting offset from the
sample's own generator) and writes each crop straight into its batch as normalised float32
(`native.crop_into`). These functions do the same on a device, given the same draws:

- `finish_batch` takes what `build_train_loader(..., uint8=True)` yields (uint8 crops N×3×S×S,
  any strides, and the lighting offsets N×3) and returns float32 N×3×S×S, contiguous, on `device`:
  `x * scale + bias[n]` with the loader's float32 scale and per-image bias, as one multiply and
  one add (an FMA would round once and differ from the CPU path in the last bit).
- `augment_batch` takes whole decoded images (C×H×W or H×W×3 uint8 tensors, e.g. from
  torchvision's CUDA JPEG decoder), crops and mirrors each with its box, then finishes the batch.

On CPU tensors both are bit for bit the loader's float images (tests/alexnet_pp/data/test_augment.py);
on CUDA the crop boxes, flips and offsets are the same, and the arithmetic is the same IEEE
float32 multiply and add.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .transforms import MEAN, STD, scale_bias

_SCALE, _ = scale_bias(None, 1)
_NEG_MEAN_STD = (-MEAN / STD).astype(np.float32)
_consts: dict = {}


def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c = _consts.get(device)
    if c is None:
        c = tuple(torch.from_numpy(a).to(device) for a in (_SCALE, _NEG_MEAN_STD, STD))
        _consts[device] = c
    return c


def finish_batch(images_u8: torch.Tensor, offsets: Optional[torch.Tensor], device=None,
                 non_blocking: bool = True) -> torch.Tensor:
    """uint8 N×3×S×S crops (+ lighting offsets N×3 in [0, 1] pixel units, or None) → float32
    N×3×S×S normalised, contiguous, on `device` (default: where the images are). The copy to the
    device is the uint8 batch, a quarter of the float one; pinned input copies asynchronously."""
    if images_u8.dtype != torch.uint8 or images_u8.dim() != 4 or images_u8.shape[1] != 3:
        raise ValueError(f"want uint8 N×3×S×S crops, got {tuple(images_u8.shape)} {images_u8.dtype}")
    device = torch.device(device) if device is not None else images_u8.device
    x = images_u8.to(device, non_blocking=non_blocking)
    scale, neg_mean_std, std = _constants(device)
    n = x.shape[0]
    if offsets is None:
        bias = neg_mean_std.expand(n, 3)
    else:
        off = torch.as_tensor(offsets, dtype=torch.float32).to(device, non_blocking=non_blocking)
        bias = off / std + neg_mean_std  # the CPU path's (-mean/std) + offset/std, same roundings
    out = torch.empty(x.shape, dtype=torch.float32, device=device)
    torch.mul(x, scale.view(1, 3, 1, 1), out=out)
    return out.add_(bias.reshape(n, 3, 1, 1))


def crop_boxes(images: Sequence[torch.Tensor], boxes: Sequence[tuple[int, int, bool]], side: int,
               channels_last_input: bool = False) -> torch.Tensor:
    """uint8 N×3×S×S: image i's side×side crop at (y, x), mirrored when flip; images are C×H×W
    (or H×W×3 with channels_last_input), all on one device."""
    if len(images) != len(boxes):
        raise ValueError(f"{len(images)} images for {len(boxes)} boxes")
    device = images[0].device if len(images) else torch.device("cpu")
    out = torch.empty((len(images), 3, side, side), dtype=torch.uint8, device=device)
    for i, (img, (y, x, flip)) in enumerate(zip(images, boxes)):
        chw = img.permute(2, 0, 1) if channels_last_input else img
        h, w = chw.shape[1:]
        if chw.shape[0] != 3 or not (0 <= y <= h - side and 0 <= x <= w - side):
            raise ValueError(f"crop {side} at ({y}, {x}) of an image {tuple(chw.shape)}")
        crop = chw[:, y:y + side, x:x + side]
        out[i] = crop.flip(-1) if flip else crop
    return out


def augment_batch(images: Sequence[torch.Tensor], boxes: Sequence[tuple[int, int, bool]],
                  offsets: Optional[torch.Tensor], side: int, device=None,
                  channels_last_input: bool = False) -> torch.Tensor:
    """Decoded uint8 images (C×H×W, or H×W×3 with channels_last_input) + the loader's draws →
    float32 N×3×S×S normalised on `device` (default: the images' device)."""
    crops = crop_boxes(images, boxes, side, channels_last_input)
    return finish_batch(crops, offsets, device if device is not None else crops.device)
