"""The original two-tower AlexNet (Krizhevsky, Sutskever, Hinton 2012), exact to DESIGN.md §1.

Structure, as in the paper's figure: two `Tower`s ("GPU 0" and "GPU 1"), each holding its half of every
layer, plus `fc8`, which reads all of fc7. Tower-local layers (conv1 from the image, conv2, conv4, conv5)
see only their own tower's previous output; the cross-tower layers (conv3, fc6, fc7, fc8) see both.

The forward pass is a sequence of `TowerLayer`s (`AlexNet.layers()`): each reads the two towers'
activations concatenated along the channel axis ([tower 0 | tower 1]) and returns the same layout.
One tensor between layers is what lets pipeline stages cut anywhere; parallel plans (cluster/,
alexnet_pp/pipeline.py) rebuild these layers from the outside. This file imports nothing distributed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from alexnet_pp.config import ConfigError, ModelConfig
from ops import lrn

NUM_TOWERS = 2
LAYER_NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
CROSS_TOWER = ("conv3", "fc6", "fc7", "fc8")
BIAS_ONE = ("conv2", "conv4", "conv5", "fc6", "fc7")  # paper: bias 1 here, 0 elsewhere

Connect = Literal["image", "own", "both"]


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


class Tower(nn.Module):
    """One side of the network: this tower's half of every layer up to fc7.

    conv3, fc6 and fc7 are cross-tower layers: their input is both towers' output, so their weights
    here take the full (two-tower) input width and produce this tower's half of the output.
    """

    def __init__(self, w: Widths, flat_features: int):
        super().__init__()
        both = NUM_TOWERS
        self.conv1 = nn.Conv2d(3, w.conv1, kernel_size=11, stride=4)
        self.conv2 = nn.Conv2d(w.conv1, w.conv2, kernel_size=5, padding=2)
        self.conv3 = nn.Conv2d(both * w.conv2, w.conv3, kernel_size=3, padding=1)  # cross-tower
        self.conv4 = nn.Conv2d(w.conv3, w.conv4, kernel_size=3, padding=1)
        self.conv5 = nn.Conv2d(w.conv4, w.conv5, kernel_size=3, padding=1)
        self.fc6 = nn.Linear(flat_features, w.fc)  # cross-tower
        self.fc7 = nn.Linear(both * w.fc, w.fc)  # cross-tower


class TowerLayer(nn.Module):
    """One layer of the network across towers, with what follows it (ReLU, LRN, pooling, dropout).

    `parts[t]` is tower t's half of the layer (a single shared part for fc8). Input and output are the
    towers' activations concatenated on dim 1. `connect` says what each tower's part reads:
    "image" — the full input image; "own" — its own tower's channels; "both" — everything.
    """

    def __init__(
        self,
        name: str,
        parts: Sequence[nn.Module],
        connect: Connect,
        post: Sequence[Callable[[torch.Tensor], torch.Tensor]] = (),
        pad: tuple[int, int, int, int] = (0, 0, 0, 0),
        flatten: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.name = name
        self.parts = nn.ModuleList(parts)
        self.connect = connect
        self.post = tuple(post)  # per tower, so LRN windows never cross the tower boundary
        self.pad = pad
        self.flatten = flatten
        self.dropout = dropout

    def tower_inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.flatten:
            x = torch.flatten(x, 1)
        if any(self.pad):
            x = F.pad(x, self.pad)
        if self.connect == "own":
            return list(x.chunk(len(self.parts), dim=1))
        return [x] * len(self.parts)

    def apply_part(self, t: int, x: torch.Tensor) -> torch.Tensor:
        y = self.parts[t](x)
        for op in self.post:
            y = op(y)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [self.apply_part(t, xi) for t, xi in enumerate(self.tower_inputs(x))]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        if self.dropout and self.training:
            y = F.dropout(y, self.dropout, training=True)
        return y

    def extra_repr(self) -> str:
        return f"name={self.name}, connect={self.connect}, towers={len(self.parts)}"


def _relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x, inplace=True)


def _maxpool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=2)  # overlapping pooling


class AlexNet(nn.Module):
    """The two-tower AlexNet. `AlexNet(ModelConfig())` is the paper's network, 60,965,224 parameters."""

    def __init__(self, cfg: ModelConfig | None = None):
        super().__init__()
        cfg = cfg or ModelConfig()
        check_model_config(cfg)
        self.cfg = cfg
        self.widths = w = Widths.of(cfg.width)
        self.sizes = spatial_sizes(cfg.image_size)
        flat = NUM_TOWERS * w.conv5 * self.sizes["pool5"] ** 2
        self.towers = nn.ModuleList(Tower(w, flat) for _ in range(NUM_TOWERS))
        self.fc8 = nn.Linear(NUM_TOWERS * w.fc, cfg.num_classes)  # reads all of fc7
        self._layers = self._build_layers()
        self.reset_parameters()

    def _lrn(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        return lrn(x, size=c.lrn_size, alpha=c.lrn_alpha, beta=c.lrn_beta, k=c.lrn_k)

    def _build_layers(self) -> list[TowerLayer]:
        c = self.cfg
        norm_pool = [_relu, self._lrn, _maxpool] if c.lrn_order == "paper" else [_relu, _maxpool, self._lrn]
        t = lambda name: [getattr(tw, name) for tw in self.towers]  # noqa: E731
        return [
            TowerLayer("conv1", t("conv1"), "image", norm_pool, pad=input_padding(c.image_size)),
            TowerLayer("conv2", t("conv2"), "own", norm_pool),
            TowerLayer("conv3", t("conv3"), "both", [_relu]),
            TowerLayer("conv4", t("conv4"), "own", [_relu]),
            TowerLayer("conv5", t("conv5"), "own", [_relu, _maxpool]),
            TowerLayer("fc6", t("fc6"), "both", [_relu], flatten=True, dropout=c.dropout),
            TowerLayer("fc7", t("fc7"), "both", [_relu], dropout=c.dropout),
            TowerLayer("fc8", [self.fc8], "both"),
        ]

    def layers(self) -> list[TowerLayer]:
        """The forward pass as a sequence of layers sharing this model's parameters."""
        return list(self._layers)

    def reset_parameters(self) -> None:
        """Paper initialisation: weights N(0, 0.01²); biases 1 in conv2, conv4, conv5, fc6, fc7, else 0.
        `init: kaiming` (scaled-down presets): He-normal weights for ReLU layers, zero biases."""
        for layer in self._layers:
            for part in layer.parts:
                if self.cfg.init == "kaiming":
                    relu = layer.name != "fc8"
                    nn.init.kaiming_normal_(part.weight, nonlinearity="relu" if relu else "linear")
                    nn.init.zeros_(part.bias)
                else:
                    nn.init.normal_(part.weight, mean=0.0, std=0.01)
                    nn.init.constant_(part.bias, 1.0 if layer.name in BIAS_ONE else 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self._layers:
            x = layer(x)
        return x

    # Layers are plain attributes, not submodules, so train()/eval() must reach them explicitly.
    def train(self, mode: bool = True) -> "AlexNet":
        super().train(mode)
        for layer in self._layers:
            layer.training = mode
        return self


def layer_parameter_counts(model: AlexNet) -> dict[str, int]:
    return {layer.name: sum(p.numel() for p in layer.parameters()) for layer in model.layers()}


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
