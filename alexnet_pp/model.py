"""The original two-tower AlexNet (Krizhevsky, Sutskever, Hinton 2012), exact to the table in
docs/ARCHITECTURE.md ("The network").

Structure, as in the paper's figure: two `Tower`s ("GPU 0" and "GPU 1"), each holding its half of every
layer, plus `fc8`, which reads all of fc7. Tower-local layers (conv1 from the image, conv2, conv4, conv5)
see only their own tower's previous output; the cross-tower layers (conv3, fc6, fc7, fc8) see both.

The forward pass is a sequence of `TowerLayer`s (`AlexNet.layers()`): each reads the two towers'
activations concatenated along the channel axis ([tower 0 | tower 1]) and returns the same layout.
One tensor between layers is what lets pipeline stages cut anywhere. A layer is its `TowerOps` (how a
tower's share is computed: what it reads, ReLU / LRN / pooling, dropout — no parameters) plus its
parts (the convolutions and linear maps). Each part is built and initialised on its own from
(seed, layer, tower) by `build_part`, so a pipeline rank can build just the parts it holds and get
the very weights the whole network would have. Parallel plans (alexnet_pp/pipeline.py, cluster/)
reuse `TowerOps` from the outside; this file imports nothing distributed.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from alexnet_pp.config import ModelConfig
from alexnet_pp.shapes import LAYER_NAMES, NUM_TOWERS, Widths, check_model_config, input_padding, spatial_sizes
from alexnet_pp.dropout import dropout, random_keys
from ops import lrn
CROSS_TOWER = ("conv3", "fc6", "fc7", "fc8")
BIAS_ONE = ("conv2", "conv4", "conv5", "fc6", "fc7")  # paper: bias 1 here, 0 elsewhere

Connect = Literal["image", "own", "both"]


class Tower(nn.Module):
    """One side of the network: this tower's half of every layer up to fc7.

    conv3, fc6 and fc7 are cross-tower layers: their input is both towers' output, so their weights
    here take the full (two-tower) input width and produce this tower's half of the output.
    """

    def __init__(self, cfg: ModelConfig, tower: int, seed: int):
        super().__init__()
        for name in LAYER_NAMES[:-1]:
            setattr(self, name, build_part(cfg, name, tower, seed))


def part_shape(cfg: ModelConfig, name: str) -> tuple[str, tuple[int, ...]]:
    """("conv", (in, out, kernel, stride, padding)) or ("linear", (in, out)) of one tower's part of a
    layer (fc8: the one shared part)."""
    w, s = Widths.of(cfg.width), spatial_sizes(cfg.image_size)
    both = NUM_TOWERS
    return {
        "conv1": ("conv", (3, w.conv1, 11, 4, 0)),
        "conv2": ("conv", (w.conv1, w.conv2, 5, 1, 2)),
        "conv3": ("conv", (both * w.conv2, w.conv3, 3, 1, 1)),  # cross-tower
        "conv4": ("conv", (w.conv3, w.conv4, 3, 1, 1)),
        "conv5": ("conv", (w.conv4, w.conv5, 3, 1, 1)),
        "fc6": ("linear", (both * w.conv5 * s["pool5"] ** 2, w.fc)),  # cross-tower
        "fc7": ("linear", (both * w.fc, w.fc)),  # cross-tower
        "fc8": ("linear", (both * w.fc, cfg.num_classes)),  # reads all of fc7
    }[name]


def build_part(cfg: ModelConfig, name: str, tower: Optional[int], seed: int) -> nn.Module:
    """Tower `tower`'s part of layer `name` (fc8: the shared part, tower ignored), initialised from its
    own generator: paper init — weights N(0, 0.01²), biases 1 in conv2, conv4, conv5, fc6, fc7, else 0;
    `init: kaiming` (scaled-down presets) — He-normal weights for ReLU layers, zero biases."""
    kind, dims = part_shape(cfg, name)
    with torch.device("meta"):  # the default init would draw from the global RNG; ours replaces it
        part = nn.Conv2d(*dims[:2], dims[2], stride=dims[3], padding=dims[4]) if kind == "conv" else nn.Linear(*dims)
    part = part.to_empty(device="cpu")
    tower = 0 if name == "fc8" else tower
    g = torch.Generator().manual_seed(_part_seed(seed, name, tower))
    with torch.no_grad():
        if cfg.init == "kaiming":
            nonlinearity = "linear" if name == "fc8" else "relu"
            nn.init.kaiming_normal_(part.weight, nonlinearity=nonlinearity, generator=g)
            part.bias.zero_()
        else:
            part.weight.normal_(0.0, 0.01, generator=g)
            part.bias.fill_(1.0 if name in BIAS_ONE else 0.0)
    return part


def _part_seed(seed: int, name: str, tower: int) -> int:
    return (seed * 1_000_003 + LAYER_NAMES.index(name) * 7919 + tower * 104_729) % 2**63


@dataclass(frozen=True)
class TowerOps:
    """How one tower's share of a layer is computed from its part — everything but the parameters.

    The one definition of a tower's forward: `AlexNet`'s layers run it for both towers, the pipeline's
    tower halves (alexnet_pp/pipeline.py) and the tower-parallel shards (cluster/stage_layers.py) for
    the tower they hold, each bringing its own part.
    """

    name: str
    connect: Connect  # "image": the full input image; "own": its own tower's channels; "both": everything
    post: tuple[Callable[[torch.Tensor], torch.Tensor], ...] = ()  # per tower: LRN never crosses towers
    pad: tuple[int, int, int, int] = (0, 0, 0, 0)
    flatten: bool = False
    dropout: float = 0.0

    @property
    def index(self) -> int:
        """The layer's place in the network (salts its dropout masks)."""
        return LAYER_NAMES.index(self.name)

    def input(self, x: torch.Tensor, tower: int, both_towers: bool = True) -> torch.Tensor:
        """What tower `tower`'s part reads from the layer's input. `both_towers`: x holds both towers'
        activations (False on a tower-parallel rank, which holds only its own before an "own" layer)."""
        if self.flatten:
            x = torch.flatten(x, 1)
        if any(self.pad):
            x = F.pad(x, self.pad)
        if self.connect == "own" and both_towers:
            return x.chunk(NUM_TOWERS, dim=1)[tower]
        return x

    def forward(self, part: nn.Module, tower: int, x: torch.Tensor, keys: Optional[torch.Tensor],
                training: bool, offset: Optional[int] = None) -> torch.Tensor:
        """Tower `tower`'s share of the output: the part, ReLU / LRN / pooling, then (training only)
        dropout of this tower's neurons, masks from the rows' keys (alexnet_pp/dropout.py). `offset`:
        the part's first neuron in the layer's output when the part is a piece of the tower's."""
        y = part(x)
        for op in self.post:
            y = op(y)
        if self.dropout and training:
            if keys is None:
                keys = random_keys(y.shape[0], y.device)
            y = dropout(y, keys, self.index, tower * y.shape[1] if offset is None else offset, self.dropout)
        return y


def _relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x, inplace=True)


def _maxpool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=2)  # overlapping pooling


def layer_ops(cfg: ModelConfig) -> list[TowerOps]:
    """The network's eight layers as data (picklable: ranks rebuild their share from it)."""
    norm = functools.partial(lrn, size=cfg.lrn_size, alpha=cfg.lrn_alpha, beta=cfg.lrn_beta, k=cfg.lrn_k)
    norm_pool = (_relu, norm, _maxpool) if cfg.lrn_order == "paper" else (_relu, _maxpool, norm)
    return [
        TowerOps("conv1", "image", norm_pool, pad=input_padding(cfg.image_size)),
        TowerOps("conv2", "own", norm_pool),
        TowerOps("conv3", "both", (_relu,)),
        TowerOps("conv4", "own", (_relu,)),
        TowerOps("conv5", "own", (_relu, _maxpool)),
        TowerOps("fc6", "both", (_relu,), flatten=True, dropout=cfg.dropout),
        TowerOps("fc7", "both", (_relu,), dropout=cfg.dropout),
        TowerOps("fc8", "both"),
    ]


class TowerLayer(nn.Module):
    """One layer across both towers: `ops` applied to each tower's part, outputs concatenated
    ([tower 0 | tower 1]); fc8 has one part that reads everything."""

    def __init__(self, ops: TowerOps, parts: Sequence[nn.Module]):
        super().__init__()
        self.ops = ops
        self.parts = nn.ModuleList(parts)

    @property
    def name(self) -> str:
        return self.ops.name

    @property
    def replicated(self) -> bool:
        """One part, computed in full by every tower that holds it (fc8)."""
        return len(self.parts) == 1

    def forward(self, x: torch.Tensor, keys: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.ops.dropout and self.training and keys is None:
            keys = random_keys(x.shape[0], x.device)  # one draw per row, shared by both towers
        outs = [self.ops.forward(part, t, self.ops.input(x, t), keys, self.training)
                for t, part in enumerate(self.parts)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def extra_repr(self) -> str:
        return f"name={self.name}, connect={self.ops.connect}, towers={len(self.parts)}"


class AlexNet(nn.Module):
    """The two-tower AlexNet. `AlexNet(ModelConfig())` is the paper's network, 60,965,224 parameters;
    `seed` fixes the initial weights (the same seed gives the same weights to every layout)."""

    def __init__(self, cfg: ModelConfig | None = None, seed: int = 0):
        super().__init__()
        cfg = cfg or ModelConfig()
        check_model_config(cfg)
        self.cfg, self.seed = cfg, seed
        self.classes: list[str] = []  # class names, when loaded from an exported file
        self.widths = Widths.of(cfg.width)
        self.sizes = spatial_sizes(cfg.image_size)
        self.towers = nn.ModuleList(Tower(cfg, t, seed) for t in range(NUM_TOWERS))
        self.fc8 = build_part(cfg, "fc8", None, seed)
        self._layers = [
            TowerLayer(ops, [self.fc8] if ops.name == "fc8" else [getattr(tw, ops.name) for tw in self.towers])
            for ops in layer_ops(cfg)
        ]

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "AlexNet":
        """The network exported by `alexnet-pp export` (one safetensors file with its config and class
        names, in `.classes`), in evaluation mode. A file that is not one, or whose tensors do not fit
        the config it carries, is an error naming it; nothing is half loaded."""
        from alexnet_pp.weights import CheckpointError, check_shapes, read_export

        state, meta = read_export(path)
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        model = cls(ModelConfig(**{k: v for k, v in meta["model"].items() if k in names}))
        expected = {k: v.shape for k, v in model.state_dict().items()}
        check_shapes(state, expected, path)
        if set(state) - set(expected):
            raise CheckpointError(f"{path}: tensors this network does not have: {sorted(set(state) - set(expected))}")
        model.load_state_dict(state)
        model.classes = list(meta.get("classes") or [])
        return model.eval()

    def layers(self) -> list[TowerLayer]:
        """The forward pass as a sequence of layers sharing this model's parameters."""
        return list(self._layers)

    def forward(self, x: torch.Tensor, keys: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits. `keys` (training): one dropout key per row (alexnet_pp/dropout.py), so the masks are a
        function of the images; without them masks come from torch's global generator."""
        if self.training and self.cfg.dropout and keys is None:
            keys = random_keys(x.shape[0], x.device)
        for layer in self._layers:
            x = layer(x, keys)
        return x

    # Layers are plain attributes, not submodules, so train()/eval() must reach them explicitly.
    def train(self, mode: bool = True) -> "AlexNet":
        super().train(mode)
        for layer in self._layers:
            layer.training = mode
        return self


def layer_parameter_counts(model: AlexNet) -> dict[str, int]:
    return {layer.name: sum(p.numel() for p in layer.parameters()) for layer in model.layers()}
