"""The network's arithmetic: channel widths, spatial sizes, parameter and multiply-add counts.

Pure numbers from a `ModelConfig` (no tensors), so the config can validate a network, the planner
can cost one and `alexnet-pp info` can print one without building it. The table these reproduce at
width 1, 224 px and 1000 classes is in docs/ARCHITECTURE.md ("The network").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from alexnet_pp.errors import ConfigError

# Functions take an alexnet_pp.config.ModelConfig; typed loosely so this module sits below config.py.
ModelConfig = Any

NUM_TOWERS = 2
LAYER_NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")


@dataclass(frozen=True)
class Widths:
    """Per-tower channel / neuron counts for a width multiplier."""

    conv1: int
    conv2: int
    conv3: int
    conv4: int
    conv5: int
    fc: int

    @classmethod
    def of(cls, width: float) -> "Widths":
        base = dict(conv1=48, conv2=128, conv3=192, conv4=192, conv5=128, fc=2048)
        out = {}
        for name, n in base.items():
            scaled = n * width
            if scaled < 1 or abs(scaled - round(scaled)) > 1e-9:
                raise ConfigError(
                    f"model.width={width} gives {scaled:g} {name} channels per tower; the width must "
                    f"make every per-tower count (48, 128, 192, 192, 128, 2048) a whole number ≥ 1, "
                    "e.g. 1, 0.5, 0.25, 0.125, 0.0625"
                )
            out[name] = int(round(scaled))
        return cls(**out)


def input_padding(image_size: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding before conv1: 224 → 227 is 1 top/left, 2 bottom/right."""
    if image_size % 4 == 3:
        return (0, 0, 0, 0)
    if image_size % 4 == 0:
        return (1, 2, 1, 2)
    raise ConfigError(
        f"model.image_size={image_size}: conv1 (11×11, stride 4) needs a side ≡ 3 (mod 4), used as is, "
        "or ≡ 0 (mod 4), zero-padded by 3 like 224 → 227; e.g. 224, 227, 112, 64"
    )


def _pool(n: int) -> int:
    return (n - 3) // 2 + 1


def spatial_sizes(image_size: int) -> dict[str, int]:
    """Output side of each stage: conv1 55 → pool 27 → conv2 27 → pool 13 → conv3-5 13 → pool 6."""
    pl, pr, _, _ = input_padding(image_size)
    side = image_size + pl + pr
    c1 = (side - 11) // 4 + 1
    p1 = _pool(c1) if c1 >= 3 else 0
    p2 = _pool(p1) if p1 >= 3 else 0
    p3 = _pool(p2) if p2 >= 3 else 0
    if p3 < 1:
        raise ConfigError(
            f"model.image_size={image_size} is too small: the three 3×3/2 max-pools need conv1's output "
            "to be at least 15 wide, i.e. an input side of at least 64"
        )
    return {"conv1": c1, "pool1": p1, "conv2": p1, "pool2": p2, "conv3": p2, "conv4": p2, "conv5": p2, "pool5": p3}


def check_model_config(cfg: ModelConfig) -> None:
    Widths.of(cfg.width)
    spatial_sizes(cfg.image_size)
    if cfg.num_classes < 1:
        raise ConfigError("model.num_classes must be ≥ 1")
    if cfg.lrn_order not in ("paper", "caffenet"):
        raise ConfigError("model.lrn_order must be 'paper' or 'caffenet'")
    if cfg.lrn_size < 1:
        raise ConfigError("model.lrn_size must be ≥ 1")
    if cfg.init not in ("paper", "kaiming"):
        raise ConfigError("model.init must be 'paper' or 'kaiming'")


def layer_output_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int, int]]:
    """(channels over both towers, height, width) after each layer and its pooling."""
    w, s = Widths.of(cfg.width), spatial_sizes(cfg.image_size)
    p1, p2 = "pool1", "pool2"
    return {
        "conv1": (2 * w.conv1, s[p1], s[p1]),
        "conv2": (2 * w.conv2, s[p2], s[p2]),
        "conv3": (2 * w.conv3, s["conv3"], s["conv3"]),
        "conv4": (2 * w.conv4, s["conv4"], s["conv4"]),
        "conv5": (2 * w.conv5, s["pool5"], s["pool5"]),
        "fc6": (2 * w.fc, 1, 1),
        "fc7": (2 * w.fc, 1, 1),
        "fc8": (cfg.num_classes, 1, 1),
    }


def layer_macs(cfg: ModelConfig) -> dict[str, int]:
    """Multiply-adds per image of each layer's forward (convolutions and matrix products only)."""
    w, s = Widths.of(cfg.width), spatial_sizes(cfg.image_size)
    T = NUM_TOWERS
    flat = T * w.conv5 * s["pool5"] ** 2
    conv = lambda out_side, cin, cout, k: T * out_side**2 * cout * cin * k * k  # noqa: E731
    return {
        "conv1": conv(s["conv1"], 3, w.conv1, 11),
        "conv2": conv(s["conv2"], w.conv1, w.conv2, 5),
        "conv3": conv(s["conv3"], T * w.conv2, w.conv3, 3),
        "conv4": conv(s["conv4"], w.conv3, w.conv4, 3),
        "conv5": conv(s["conv5"], w.conv4, w.conv5, 3),
        "fc6": T * flat * w.fc,
        "fc7": T * T * w.fc * w.fc,
        "fc8": T * w.fc * cfg.num_classes,
    }


def layer_param_counts(cfg: ModelConfig) -> list[int]:
    w, s = Widths.of(cfg.width), spatial_sizes(cfg.image_size)
    flat = 2 * w.conv5 * s["pool5"] ** 2
    per_tower = [
        3 * 121 * w.conv1 + w.conv1,
        w.conv1 * 25 * w.conv2 + w.conv2,
        2 * w.conv2 * 9 * w.conv3 + w.conv3,
        w.conv3 * 9 * w.conv4 + w.conv4,
        w.conv4 * 9 * w.conv5 + w.conv5,
        flat * w.fc + w.fc,
        2 * w.fc * w.fc + w.fc,
    ]
    return [2 * n for n in per_tower] + [2 * w.fc * cfg.num_classes + cfg.num_classes]
