"""JPEG decoding on a CUDA device with torchvision's batched `decode_jpeg(device="cuda")` (nvJPEG).

With `data.decode: gpu` (or `auto` on a machine where this is available) and a loader given a CUDA
`device`, the DataLoader workers no longer decode: they read each JPEG's header, draw its crop box,
flip and lighting offset exactly as on the CPU path (the draws need only the image's size) and send
the JPEG bytes. The loader's main thread decodes the batch here in one call, crops, mirrors and
normalises on the device (`augment.augment_batch`).

Why torchvision rather than NVIDIA DALI: it is the one extra wheel built against the very torch
the project runs (DALI wheels are per CUDA major version and bring their own pipeline runtime),
its batched decode returns torch tensors on the device with nothing in between, and everything
after decoding stays the project's own torch code, so the crops, flips and colour noise are the
CPU path's by construction (DALI's operators draw their own random numbers; feeding ours in means
an external-source pipeline around a single decode operator, which is what this is already).

Decoded pixels may differ from libjpeg-turbo's by a few levels (nvJPEG's IDCT and chroma
upsampling); crop boxes, flips and offsets do not. A JPEG whose header reads but whose body the GPU
cannot decode is decoded on the CPU instead; one that no decoder reads (the worker only parsed its
header, so it cannot be replaced by another sample any more) becomes a mid-grey image and is
counted in `failures`.

torchvision is imported only here, on first use: it does not import beside the project's CPU
torch build, and nothing else needs it.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np
import torch

from . import transforms as T

log = logging.getLogger(__name__)


def _torchvision_decoder():
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception as e:  # ImportError, or a torchvision built for another torch (RuntimeError)
        raise RuntimeError(
            "data.decode gpu needs torchvision's CUDA JPEG decoder (torchvision.io.decode_jpeg with "
            f"device='cuda'), and torchvision does not import here: {type(e).__name__}: {e}. Install the "
            "torchvision release built for this torch (pip install torchvision==<matching>), or set "
            "data.decode: cpu") from None
    return decode_jpeg, ImageReadMode


def available(device=None) -> tuple[bool, str]:
    """(whether JPEGs can be decoded on `device` (default: any CUDA device), why not)."""
    if device is not None and torch.device(device).type != "cuda":
        return False, f"device {device} is not a CUDA device"
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    try:
        _torchvision_decoder()
    except RuntimeError as e:
        return False, str(e)
    return True, ""


# auto decodes on the GPU only for loaders with fewer workers than this. On an H200 host, training the
# paper network in bf16 from 256 px shards: nvJPEG in the loader's thread gave 3.3-4.7k images/s (each
# batch's decode holds up the step), while each CPU worker sending uint8 crops gave ~800, and 12
# workers 8.9k (docs/benchmarks/h200-2026-12-04/).
GPU_DECODE_BELOW_WORKERS = 4


def resolve(mode: str, device, workers: int = 0) -> str:
    """data.decode (cpu | gpu | auto) for a loader finishing batches on `device` → "cpu" or "gpu".
    auto: gpu when `device` is a CUDA device, the decoder imports and the loader has fewer than
    GPU_DECODE_BELOW_WORKERS workers (more CPU workers outpace the GPU decode), else cpu."""
    if mode not in ("cpu", "gpu", "auto"):
        raise ValueError(f"data.decode must be cpu, gpu or auto, not {mode!r}")
    if mode == "cpu":
        return "cpu"
    on_cuda = device is not None and torch.device(device).type == "cuda"
    if mode == "auto":
        return "gpu" if on_cuda and workers < GPU_DECODE_BELOW_WORKERS and available(device)[0] else "cpu"
    if not on_cuda:
        raise ValueError(
            "data.decode gpu decodes on the device the batches are for: build the loader with "
            f"device='cuda…' (build_train_loader(..., device=...)); it was given {device!r}. "
            "Set data.decode: cpu or auto for CPU batches")
    ok, why = available(device)
    if not ok:
        raise RuntimeError(why)
    return "gpu"


class DeviceDecoder:
    """Decodes a batch of payloads (JPEG bytes, or already decoded H×W×3 uint8 arrays/tensors) into
    3×H×W uint8 tensors on `device`."""

    def __init__(self, device, decoder=None):
        self.device = torch.device(device)
        self._decode, mode = decoder if decoder is not None else _torchvision_decoder()
        self._rgb = mode.RGB if mode is not None else None
        self.failures = 0

    def _one(self, data: torch.Tensor, device) -> torch.Tensor:
        if self._rgb is None:
            return self._decode(data, device=device)
        return self._decode(data, mode=self._rgb, device=device)

    def __call__(self, payloads: Sequence) -> list[torch.Tensor]:
        out: list[Optional[torch.Tensor]] = [None] * len(payloads)
        jpeg = [i for i, p in enumerate(payloads) if isinstance(p, (bytes, bytearray, memoryview))]
        datas = [torch.frombuffer(bytearray(payloads[i]), dtype=torch.uint8) for i in jpeg]
        if datas:
            try:
                decoded = self._decode(datas, mode=self._rgb, device=self.device) if self._rgb is not None \
                    else self._decode(datas, device=self.device)
                for i, img in zip(jpeg, decoded):
                    out[i] = img
            except Exception:  # noqa: BLE001 - one bad image fails the batched call: go one by one
                for i, d in zip(jpeg, datas):
                    out[i] = self._fallback(d, payloads[i])
        for i, p in enumerate(payloads):
            if out[i] is None and i not in jpeg:
                arr = torch.as_tensor(np.asarray(p)) if not isinstance(p, torch.Tensor) else p
                out[i] = arr.to(self.device, non_blocking=True).permute(2, 0, 1)
        return out  # type: ignore[return-value]

    def _fallback(self, data: torch.Tensor, raw: bytes) -> torch.Tensor:
        for attempt in (lambda: self._one(data, self.device),
                        lambda: torch.from_numpy(np.ascontiguousarray(T.decode(bytes(raw)))).permute(2, 0, 1)):
            try:
                return attempt().to(self.device)
            except Exception:  # noqa: BLE001
                continue
        self.failures += 1
        log.warning("a JPEG no decoder reads reached the device (%d so far): a mid-grey image stands in",
                    self.failures)
        h, w = T.jpeg_size(bytes(raw))
        return torch.full((3, h, w), 128, dtype=torch.uint8, device=self.device)
